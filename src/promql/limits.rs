//! Bounds on what a query may cost, checked before the work they bound: the text's length and
//! nesting before the parser sees it, and the points of every step loop as they are produced.
//!
//! The parser, the planner and the evaluator recurse once per level of the expression, and the
//! parser asks each new node for its children's types (`Expr::value_type`, itself recursive),
//! so an expression a million levels deep would overflow the stack and cost quadratic time
//! before any limit on samples could apply. [`check_text`] refuses it from the text alone.

use super::QueryError;

/// Stack of the server's threads (tokio's workers and blocking threads), which parse, plan and
/// evaluate queries. Reserved address space, touched only as deep as a query goes: a query
/// at [`MAX_DEPTH_CEILING`] in a debug build uses a few MiB of it.
pub const THREAD_STACK_BYTES: usize = 16 * 1024 * 1024;

/// The highest `--query-max-depth` takes effect: the depth proven to fit
/// [`THREAD_STACK_BYTES`] with room to spare (tests/integration/hardening.rs).
pub const MAX_DEPTH_CEILING: usize = 1000;

/// Why a query's text is refused before parsing.
fn too_long(len: usize, limit: usize) -> QueryError {
    QueryError::BadData(format!(
        "query of {len} bytes exceeds the limit of {limit} bytes (--query-max-length-bytes)"
    ))
}

fn too_deep(limit: usize) -> QueryError {
    QueryError::BadData(format!(
        "query nests deeper than {limit} levels (--query-max-depth): split it or remove parentheses"
    ))
}

/// Refuses a query longer than `max_len` bytes or whose expression could nest deeper than
/// `max_depth` levels, from its tokens alone.
///
/// The estimate never undercounts: within one pair of parentheses, an expression of `k`
/// operators (binary, unary, `[...]` ranges and subqueries) over operands is at most `k + 1`
/// levels deep, plus the deepest parenthesised operand, plus one for the parentheses. Label
/// matchers in braces, strings and comments add nothing; their operators are not counted.
pub fn check_text(query: &str, max_len: usize, max_depth: usize) -> Result<(), QueryError> {
    if query.len() > max_len {
        return Err(too_long(query.len(), max_len));
    }
    // One entry per open parenthesis: (operators at this level, deepest nested group).
    let mut groups: Vec<(usize, usize)> = vec![(0, 0)];
    let depth = |(operators, nested): (usize, usize)| operators + nested + 1;
    let bytes = query.as_bytes();
    let mut i = 0;
    let mut in_braces = false;
    while i < bytes.len() {
        let c = bytes[i];
        i += 1;
        let operators = match c {
            b'"' | b'\'' | b'`' => {
                i = skip_string(bytes, i, c);
                0
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                0
            }
            b'{' => {
                in_braces = true;
                0
            }
            b'}' => {
                in_braces = false;
                0
            }
            _ if in_braces => 0,
            b'(' => {
                groups.push((0, 0));
                if groups.len() > max_depth {
                    return Err(too_deep(max_depth));
                }
                0
            }
            b')' => {
                // An unbalanced `)` is the parser's error to report.
                if groups.len() > 1 {
                    let closed = groups.pop().map_or(0, depth);
                    let parent = groups.last_mut().expect("the outermost level stays");
                    parent.1 = parent.1.max(closed);
                }
                0
            }
            // A range or subquery wraps what precedes it; what is inside is durations.
            b'[' => {
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
                1
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'^' | b'<' | b'>' | b'=' | b'!' => {
                // `==`, `!=`, `<=`, `>=` are one operator.
                if i < bytes.len() && bytes[i] == b'=' {
                    i += 1;
                }
                1
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b':' => {
                let start = i - 1;
                // A decimal number's exponent may carry a sign (`1e-5`), once, followed by
                // digits only: every other `+` and `-` is an operator.
                let decimal =
                    (c.is_ascii_digit() || c == b'.') && !matches!(bytes.get(i), Some(b'x' | b'X'));
                let mut signed = false;
                while i < bytes.len() {
                    let d = bytes[i];
                    let ok = if signed {
                        d.is_ascii_digit()
                    } else if decimal && matches!(d, b'+' | b'-') {
                        signed = matches!(bytes[i - 1], b'e' | b'E');
                        signed
                    } else {
                        d.is_ascii_alphanumeric() || matches!(d, b'_' | b'.' | b':')
                    };
                    if !ok {
                        break;
                    }
                    i += 1;
                }
                let word = &query[start..i];
                usize::from(
                    ["and", "or", "unless", "atan2"]
                        .iter()
                        .any(|op| word.eq_ignore_ascii_case(op)),
                )
            }
            _ => 0,
        };
        if operators > 0 {
            // Each enclosing pair of parentheses adds at least one level.
            let enclosing = groups.len() - 1;
            let level = groups.last_mut().expect("the outermost level stays");
            level.0 += operators;
            if depth(*level) + enclosing > max_depth {
                return Err(too_deep(max_depth));
            }
        }
    }
    // Groups left open are the parser's error; they nest no deeper than counted.
    while groups.len() > 1 {
        let closed = groups.pop().map_or(0, depth);
        let parent = groups.last_mut().expect("the outermost level stays");
        parent.1 = parent.1.max(closed);
    }
    if depth(groups[0]) > max_depth {
        return Err(too_deep(max_depth));
    }
    Ok(())
}

/// The index after the string that opened with `quote` just before `i` (or the end).
fn skip_string(bytes: &[u8], mut i: usize, quote: u8) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote != b'`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth of a parsed expression, counted the way the evaluator recurses.
    fn ast_depth(expr: &promql_parser::parser::Expr) -> usize {
        use promql_parser::parser::Expr;
        1 + match expr {
            Expr::Aggregate(a) => ast_depth(&a.expr).max(a.param.as_deref().map_or(0, ast_depth)),
            Expr::Unary(u) => ast_depth(&u.expr),
            Expr::Binary(b) => ast_depth(&b.lhs).max(ast_depth(&b.rhs)),
            Expr::Paren(p) => ast_depth(&p.expr),
            Expr::Subquery(s) => ast_depth(&s.expr),
            Expr::Call(c) => c.args.args.iter().map(|a| ast_depth(a)).max().unwrap_or(0),
            Expr::MatrixSelector(_) => 1,
            _ => 0,
        }
    }

    #[test]
    fn the_estimate_never_undercounts_the_parsed_depth() {
        let queries = [
            "up",
            "-up",
            "- - -1",
            "1 + 2 * 3 ^ 4 - 5",
            "sum by (job) (rate(http_requests_total{code=~\"5..\", path!=\"/a(b\"}[5m])) / on (job) group_left sum(up)",
            "((((up))))",
            "max_over_time(rate(x[5m])[1h:1m])[2h:]",
            "histogram_quantile(0.9, sum by (le) (rate(b_bucket[5m]))) > bool 1e-5",
            "a and b or c unless d",
            "x atan2 y or vector(1)",
            "label_replace(up, \"dst\", \"$1\", \"src\", \"(.*)\")",
            "topk(3, -x offset 5m @ 100)",
            "x # a comment ((((((\n + 1",
            "count_over_time(vector(1)[1y:1ms])",
        ];
        for query in queries {
            let expr =
                promql_parser::parser::parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
            let actual = ast_depth(&expr);
            assert!(
                check_text(query, 1 << 20, actual - 1).is_err(),
                "{query}: estimate below {actual}"
            );
            assert!(
                check_text(query, 1 << 20, 16).is_ok(),
                "{query}: estimate too high"
            );
        }
    }

    #[test]
    fn the_parser_s_panics_are_parse_errors() {
        let query = format!("up[5{}]", "6".repeat(60));
        let error = super::super::parse(&query).unwrap_err().to_string();
        assert!(error.contains("out of range"), "{error}");
    }

    #[test]
    fn deep_and_long_queries_are_refused_before_parsing() {
        let cases = [
            "(".repeat(10_000) + "1" + &")".repeat(10_000),
            "-".repeat(10_000) + "1",
            "1".to_owned() + &"+1".repeat(10_000),
            "sum(".repeat(10_000) + "x" + &")".repeat(10_000),
            "x".to_owned() + &"[1m:]".repeat(10_000),
            "a".to_owned() + &" or a".repeat(10_000),
            "(".repeat(10_000),
            "1e+1".to_owned() + &"e+1".repeat(10_000),
            "0x1e".to_owned() + &"+0x1e".repeat(10_000),
        ];
        for query in &cases {
            let error = check_text(query, 1 << 20, 100).unwrap_err().to_string();
            assert!(error.contains("nests deeper than 100"), "{error}");
        }
        let error = check_text(&"x".repeat(101), 100, 100)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("101 bytes exceeds the limit of 100"),
            "{error}"
        );
        // Operators inside label matchers and strings do not count.
        let matchers = format!("x{{{}}}", ["a!=\"-+-\""; 200].join(","));
        assert!(check_text(&matchers, 1 << 20, 3).is_ok());
    }
}
