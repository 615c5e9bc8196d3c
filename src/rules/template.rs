//! Alert label and annotation templates, as Prometheus 2.42 expands them (`template/template.go`):
//! Go's text/template syntax (through the `gotmpl` crate, a port of it) with the variables
//! `$labels`, `$externalLabels`, `$externalURL` and `$value` and Prometheus's functions
//! (`humanize`, `humanizeDuration`, `printf`, `reReplaceAll`, ...). What an action prints is
//! printed as Go's `fmt` prints it (`1.234567e+06` for a float of seven digits, an empty string
//! for a missing label), and a failure turns the whole text into
//! `<error expanding template: ...>`, as in Prometheus.

use gotmpl::parse::{CommandNode, Expr, ListNode, Node, SmolStr};
use gotmpl::{Template, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The variables Prometheus defines before every alert template (its 112-byte prefix).
const DEFS: &str = "{{$labels := .Labels}}{{$externalLabels := .ExternalLabels}}{{$externalURL := .ExternalURL}}{{$value := .Value}}";
/// The function appended to every printing action: prints a value as Go's `fmt.Print`.
const PRINT: &str = "__secumon_print";

/// The most bytes one expansion may write, and `{{range}}` iterations it may run: a template
/// (which a tenant may write over the ruler API) cannot take more than this of memory or CPU.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
pub const MAX_RANGE_ITERATIONS: u64 = 1_000;

/// A `fmt::Write` that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct Bounded {
    out: String,
    overflowed: bool,
}

impl std::fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.out.len() + s.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::fmt::Error);
        }
        self.out.push_str(s);
        Ok(())
    }
}

/// What the `query` function runs against: set on the evaluating thread around the
/// expansions of one evaluation (`with_query`).
pub struct QueryContext {
    pub engine: crate::promql::Engine,
    pub tenant: crate::model::TenantId,
    /// The evaluation time, in ms: a template's query is evaluated at it, as in Prometheus.
    pub t: i64,
}

/// Most template queries under way at once, across all rules: each holds a thread while it
/// runs, so past this one fails at once rather than waiting.
pub const MAX_TEMPLATE_QUERIES: usize = 4;
static TEMPLATE_QUERIES: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_TEMPLATE_QUERIES);

thread_local! {
    static QUERY: std::cell::RefCell<Option<QueryContext>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` (template expansions, which are synchronous) with `context` available to the
/// `query` function.
pub fn with_query<R>(context: QueryContext, f: impl FnOnce() -> R) -> R {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            QUERY.with(|q| *q.borrow_mut() = None);
        }
    }
    QUERY.with(|q| *q.borrow_mut() = Some(context));
    let _clear = Clear;
    f()
}

/// Prometheus's `query`: the expression evaluated at the rule's evaluation time, as a list of
/// samples (`.Labels`, `.Value`). The engine is asynchronous and templates are not: the
/// evaluating worker thread hands its other tasks off while it waits (`block_in_place`).
fn run_query(text: &str) -> Result<Value, String> {
    let context = QUERY.with(|q| {
        q.borrow()
            .as_ref()
            .map(|c| (c.engine.clone(), c.tenant.clone(), c.t))
    });
    let Some((engine, tenant, t)) = context else {
        return Err("query is only available when a rule is evaluated".into());
    };
    let handle = tokio::runtime::Handle::try_current()
        .ok()
        .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        .ok_or("query needs the server's multi-threaded runtime")?;
    let expr = engine.parse(text).map_err(|e| e.to_string())?;
    let _permit = TEMPLATE_QUERIES.try_acquire().map_err(|_| {
        format!("more than {MAX_TEMPLATE_QUERIES} template queries at once; try again at the next evaluation")
    })?;
    let value = tokio::task::block_in_place(|| {
        handle.block_on(engine.instant_query(
            &tenant,
            expr,
            t,
            crate::promql::QueryOptions::default(),
        ))
    })
    .map_err(|e| e.to_string())?;
    let samples: Vec<(Vec<(String, String)>, f64)> = match value {
        crate::promql::QueryValue::Vector(samples) => samples
            .into_iter()
            .map(|(labels, s)| {
                (
                    labels
                        .iter()
                        .map(|l| (l.name.to_string(), l.value.to_string()))
                        .collect(),
                    s.v,
                )
            })
            .collect(),
        crate::promql::QueryValue::Scalar { v, .. } => vec![(Vec::new(), v)],
        _ => return Err("rule result is not a vector or scalar".into()),
    };
    Ok(Value::List(
        samples
            .into_iter()
            .map(|(labels, v)| {
                let labels: BTreeMap<Arc<str>, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (Arc::from(k.as_str()), Value::String(Arc::from(v.as_str()))))
                    .collect();
                let mut sample = BTreeMap::new();
                sample.insert(Arc::from("Labels"), Value::Map(Arc::new(labels)));
                sample.insert(Arc::from("Value"), Value::Float(v));
                Value::Map(Arc::new(sample))
            })
            .collect::<Vec<_>>()
            .into(),
    ))
}

/// What an alert template sees.
pub struct AlertData<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub external_labels: &'a BTreeMap<String, String>,
    pub external_url: &'a str,
    pub value: f64,
}

/// Parses `text` as an alert template without running it (`promtool check rules`).
pub fn check(rule: &str, text: &str) -> Result<(), String> {
    template(&format!("__alert_{rule}"), text, "").map(|_| ())
}

/// An alert template parsed once, when its rule is loaded, and expanded for every series of
/// every evaluation.
pub struct Compiled {
    name: String,
    template: Result<Template, String>,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("name", &self.name)
            .finish()
    }
}

impl Compiled {
    /// `text` as a template of the alert rule `rule` (a parse failure is kept, and is what
    /// every expansion gives, as Prometheus reports it).
    pub fn new(rule: &str, text: &str, external_url: &str) -> Compiled {
        let name = format!("__alert_{rule}");
        let template = template(&name, text, external_url)
            .map_err(|e| format!("error parsing template {name}: {e}"));
        Compiled { name, template }
    }

    /// The expansion with `data` (from [`data`]), or `<error expanding template: ...>`.
    pub fn expand(&self, data: &Value) -> String {
        let name = &self.name;
        let run = || -> Result<String, String> {
            let template = self.template.as_ref().map_err(Clone::clone)?;
            let mut out = Bounded {
                out: String::new(),
                overflowed: false,
            };
            match template.execute_template_fmt(&mut out, name, data) {
                Ok(()) => Ok(out.out),
                Err(_) if out.overflowed => Err(format!(
                    "error executing template {name}: output longer than {MAX_OUTPUT_BYTES} bytes"
                )),
                Err(e) => Err(format!("error executing template {name}: {e}")),
            }
        };
        run().unwrap_or_else(|e| format!("<error expanding template: {e}>"))
    }
}

/// What the templates of one alert see (`.Labels`, `.ExternalLabels`, `.ExternalURL`,
/// `.Value`), built once per alert for all its templates.
pub fn data(data: &AlertData<'_>) -> Value {
    let map = |m: &BTreeMap<String, String>| {
        Value::Map(Arc::new(
            m.iter()
                .map(|(k, v)| (Arc::from(k.as_str()), Value::String(Arc::from(v.as_str()))))
                .collect(),
        ))
    };
    let mut root = BTreeMap::new();
    root.insert(Arc::from("Labels"), map(data.labels));
    root.insert(Arc::from("ExternalLabels"), map(data.external_labels));
    root.insert(
        Arc::from("ExternalURL"),
        Value::String(Arc::from(data.external_url)),
    );
    root.insert(Arc::from("Value"), Value::Float(data.value));
    Value::Map(Arc::new(root))
}

/// Parses and expands `text` for the alert rule `rule` in one go.
#[cfg(test)]
fn expand(rule: &str, text: &str, d: &AlertData<'_>) -> String {
    Compiled::new(rule, text, d.external_url).expand(&data(d))
}

/// The parsed template, with Prometheus's functions and every printing action ending in
/// [`PRINT`].
fn template(name: &str, text: &str, external_url: &str) -> Result<Template, String> {
    let source = format!("{DEFS}{text}");
    let template = with_functions(Template::new(name), external_url)
        .max_range_iters(MAX_RANGE_ITERATIONS)
        .parse(&source)
        .map_err(|e| e.to_string())?;
    let mut tree = template
        .lookup(name)
        .cloned()
        .ok_or_else(|| format!("template {name} is empty"))?;
    // Go refuses a variable used but never declared when it parses; the port finds it only
    // when it runs.
    let (mut declared, mut used) = (vec![SmolStr::new("$")], Vec::new());
    variables(&tree, &mut declared, &mut used);
    for symbol in &used {
        if let Some(function) = symbol.strip_prefix("()=") {
            if !FUNCTIONS.contains(&function) && !GO_FUNCTIONS.contains(&function) {
                return Err(format!(
                    "template: {name}:1: function {function:?} not defined"
                ));
            }
        } else if !declared.contains(symbol) {
            return Err(format!(
                "template: {name}:1: undefined variable {:?}",
                symbol.as_str()
            ));
        }
    }
    print_as_go(&mut tree);
    Ok(template.add_parse_tree(name, tree))
}

/// The variables `list` declares and those it uses, everywhere in it.
fn variables(list: &ListNode, declared: &mut Vec<SmolStr>, used: &mut Vec<SmolStr>) {
    fn pipe(p: &gotmpl::parse::PipeNode, declared: &mut Vec<SmolStr>, used: &mut Vec<SmolStr>) {
        declared.extend(p.decl.iter().cloned());
        for command in &p.commands {
            for arg in &command.args {
                match arg {
                    Expr::Variable(_, name, _) => used.push(name.clone()),
                    Expr::Identifier(_, name) => used.push(SmolStr::new(format!("()={name}"))),
                    Expr::Pipe(_, inner) => pipe(inner, declared, used),
                    _ => {}
                }
            }
        }
    }
    for node in &list.nodes {
        match node {
            Node::Action(action) => pipe(&action.pipe, declared, used),
            Node::List(inner) => variables(inner, declared, used),
            Node::If(branch) | Node::Range(branch) | Node::With(branch) => {
                pipe(&branch.pipe, declared, used);
                variables(&branch.body, declared, used);
                if let Some(other) = &branch.else_body {
                    variables(other, declared, used);
                }
            }
            _ => {}
        }
    }
}

/// Appends `| __secumon_print` to every action that prints (not to declarations).
fn print_as_go(list: &mut ListNode) {
    for node in &mut list.nodes {
        match node {
            Node::Action(action) if action.pipe.decl.is_empty() => {
                let pos = action.pipe.pos;
                action.pipe.commands.push(CommandNode {
                    pos,
                    args: vec![Expr::Identifier(pos, SmolStr::new(PRINT))],
                });
            }
            Node::List(inner) => print_as_go(inner),
            Node::If(branch) | Node::Range(branch) | Node::With(branch) => {
                print_as_go(&mut branch.body);
                if let Some(other) = &mut branch.else_body {
                    print_as_go(other);
                }
            }
            _ => {}
        }
    }
}

/// Prometheus's template functions (`template.go`'s function map).
const FUNCTIONS: [&str; 26] = [
    "humanize",
    "humanize1024",
    "humanizeDuration",
    "humanizePercentage",
    "humanizeTimestamp",
    "toTime",
    "title",
    "toUpper",
    "toLower",
    "match",
    "reReplaceAll",
    "safeHtml",
    "args",
    "label",
    "value",
    "strvalue",
    "first",
    "sortByLabel",
    "query",
    "graphLink",
    "tableLink",
    "parseDuration",
    "stripPort",
    "stripDomain",
    "externalURL",
    "pathPrefix",
];
/// Go's text/template built-ins.
const GO_FUNCTIONS: [&str; 19] = [
    "and", "or", "not", "len", "index", "slice", "print", "printf", "println", "call", "eq", "ne",
    "lt", "le", "gt", "ge", "html", "js", "urlquery",
];

type Args<'a> = &'a [Value];

fn err(message: impl Into<String>) -> gotmpl::TemplateError {
    gotmpl::TemplateError::Exec(message.into())
}

fn string(v: &str) -> Value {
    Value::String(Arc::from(v))
}

fn arg(args: Args<'_>, i: usize, function: &str) -> Result<Value, gotmpl::TemplateError> {
    args.get(i)
        .cloned()
        .ok_or_else(|| err(format!("wrong number of args for {function}")))
}

/// A value as text (a missing label is the empty string, as `missingkey=zero` gives it).
fn text_of(v: &Value) -> String {
    match v {
        Value::Nil => String::new(),
        Value::String(s) => s.to_string(),
        other => go_print(other),
    }
}

/// Prometheus's `convertToFloat`: a number, or a string that parses as one.
fn float_of(v: &Value) -> Result<f64, gotmpl::TemplateError> {
    match v {
        Value::Float(f) => Ok(*f),
        Value::Int(i) => Ok(*i as f64),
        Value::Uint(u) => Ok(*u as f64),
        Value::String(s) => parse_go_float(s)
            .ok_or_else(|| err(format!("strconv.ParseFloat: parsing {s:?}: invalid syntax"))),
        other => Err(err(format!("can't convert {} to float", other.type_name()))),
    }
}

/// Go's `strconv.ParseFloat`, which also reads `Inf`, `+Inf`, `NaN` in any case.
fn parse_go_float(s: &str) -> Option<f64> {
    match s.to_ascii_lowercase().as_str() {
        "inf" | "+inf" | "infinity" | "+infinity" => Some(f64::INFINITY),
        "-inf" | "-infinity" => Some(f64::NEG_INFINITY),
        "nan" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// A value as Go's `fmt.Print` prints it.
fn go_print(v: &Value) -> String {
    match v {
        Value::Nil => String::new(),
        Value::Float(f) => go_float(*f),
        Value::String(s) => s.to_string(),
        Value::List(items) => format!(
            "[{}]",
            items.iter().map(go_print).collect::<Vec<_>>().join(" ")
        ),
        Value::Map(m) => format!(
            "map[{}]",
            m.iter()
                .map(|(k, v)| format!("{k}:{}", go_print(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        other => other.to_string(),
    }
}

/// Go's `%v` of a float64: the shortest digits that read back, in exponent form when the
/// exponent is below -4 or at least 6 (`strconv`'s rule for the shortest `'g'`).
fn go_float(v: f64) -> String {
    format_g(v, None)
}

/// Go's `%g` (`precision` significant digits, or the shortest when `None`) as `fmt` writes it:
/// exponent form when the exponent is below -4 or at least the precision (6 for the
/// shortest), trailing zeros removed, an exponent of two digits at least.
pub fn format_g(v: f64, precision: Option<usize>) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    // Digits and exponent: `d.ddddde±x`.
    let scientific = match precision {
        Some(p) => format!("{:.*e}", p.max(1) - 1, v),
        None => format!("{v:e}"),
    };
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let limit = precision.map_or(6, |p| p.max(1) as i32);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = digits.trim_end_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    let sign = if negative { "-" } else { "" };
    if exponent < -4 || exponent >= limit {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_owned()
        } else {
            format!("{first}.{rest}")
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    } else if exponent >= 0 {
        let int_len = exponent as usize + 1;
        if digits.len() <= int_len {
            format!("{sign}{digits}{}", "0".repeat(int_len - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
        }
    } else {
        format!("{sign}0.{}{digits}", "0".repeat((-exponent - 1) as usize))
    }
}

/// Go's `%.4g`.
fn g4(v: f64) -> String {
    format_g(v, Some(4))
}

fn humanize(v: f64) -> String {
    if v == 0.0 || v.is_nan() || v.is_infinite() {
        return g4(v);
    }
    let mut v = v;
    if v.abs() >= 1.0 {
        let mut prefix = "";
        for p in ["k", "M", "G", "T", "P", "E", "Z", "Y"] {
            if v.abs() < 1000.0 {
                break;
            }
            prefix = p;
            v /= 1000.0;
        }
        return format!("{}{prefix}", g4(v));
    }
    let mut prefix = "";
    for p in ["m", "u", "n", "p", "f", "a", "z", "y"] {
        if v.abs() >= 1.0 {
            break;
        }
        prefix = p;
        v *= 1000.0;
    }
    format!("{}{prefix}", g4(v))
}

fn humanize1024(v: f64) -> String {
    if v.abs() <= 1.0 || v.is_nan() || v.is_infinite() {
        return g4(v);
    }
    let mut v = v;
    let mut prefix = "";
    for p in ["ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"] {
        if v.abs() < 1024.0 {
            break;
        }
        prefix = p;
        v /= 1024.0;
    }
    format!("{}{prefix}", g4(v))
}

fn humanize_duration(v: f64) -> String {
    if v.is_nan() || v.is_infinite() {
        return g4(v);
    }
    if v == 0.0 {
        return format!("{}s", g4(v));
    }
    if v.abs() >= 1.0 {
        let (sign, v) = if v < 0.0 { ("-", -v) } else { ("", v) };
        let d = v as i64;
        let (seconds, minutes, hours, days) = (d % 60, (d / 60) % 60, (d / 3600) % 24, d / 86_400);
        return if days != 0 {
            format!("{sign}{days}d {hours}h {minutes}m {seconds}s")
        } else if hours != 0 {
            format!("{sign}{hours}h {minutes}m {seconds}s")
        } else if minutes != 0 {
            format!("{sign}{minutes}m {seconds}s")
        } else {
            format!("{sign}{}s", g4(v))
        };
    }
    let mut v = v;
    let mut prefix = "";
    for p in ["m", "u", "n", "p", "f", "a", "z", "y"] {
        if v.abs() >= 1.0 {
            break;
        }
        prefix = p;
        v *= 1000.0;
    }
    format!("{}{prefix}s", g4(v))
}

/// Go's `time.Time.String()` of a UTC time: `2015-06-23 13:19:44.128 +0000 UTC`.
fn go_time(seconds: f64) -> Result<String, gotmpl::TemplateError> {
    if seconds.is_nan() || seconds.is_infinite() {
        return Err(err("value is NaN or Inf"));
    }
    let nanos = seconds * 1e9;
    if nanos.abs() >= 9.2e18 {
        return Err(err(format!(
            "{} cannot be represented as a nanoseconds timestamp since it overflows int64",
            go_float(seconds)
        )));
    }
    let time = chrono::DateTime::from_timestamp_nanos(nanos as i64);
    let mut text = time.format("%Y-%m-%d %H:%M:%S").to_string();
    let fraction = time.timestamp_subsec_nanos();
    if fraction != 0 {
        let digits = format!("{fraction:09}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    text.push_str(" +0000 UTC");
    Ok(text)
}

/// Go's `strings.Title`: the first letter of each word upper-cased.
fn title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut previous_is_separator = true;
    for c in s.chars() {
        if previous_is_separator {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        previous_is_separator = !(c.is_alphanumeric() || c == '_');
    }
    out
}

fn query_link(expr: &str, tab: u8) -> String {
    let escaped: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    format!("/graph?g0.expr={escaped}&g0.tab={tab}")
}

fn with_functions(template: Template, external_url: &str) -> Template {
    let external = external_url.to_owned();
    let prefix = url_path(external_url);
    template
        .func(PRINT, |args| {
            Ok(string(&go_print(args.last().unwrap_or(&Value::Nil))))
        })
        .func("humanize", |args| {
            Ok(string(&humanize(float_of(&arg(args, 0, "humanize")?)?)))
        })
        .func("humanize1024", |args| {
            Ok(string(&humanize1024(float_of(&arg(
                args,
                0,
                "humanize1024",
            )?)?)))
        })
        .func("humanizeDuration", |args| {
            Ok(string(&humanize_duration(float_of(&arg(
                args,
                0,
                "humanizeDuration",
            )?)?)))
        })
        .func("humanizePercentage", |args| {
            Ok(string(&format!(
                "{}%",
                g4(float_of(&arg(args, 0, "humanizePercentage")?)? * 100.0)
            )))
        })
        .func("humanizeTimestamp", |args| {
            let v = float_of(&arg(args, 0, "humanizeTimestamp")?)?;
            if v.is_nan() || v.is_infinite() {
                return Ok(string(&g4(v)));
            }
            Ok(string(&go_time(v)?))
        })
        .func("toTime", |args| {
            Ok(string(&go_time(float_of(&arg(args, 0, "toTime")?)?)?))
        })
        .func("title", |args| {
            Ok(string(&title(&text_of(&arg(args, 0, "title")?))))
        })
        .func("toUpper", |args| {
            Ok(string(&text_of(&arg(args, 0, "toUpper")?).to_uppercase()))
        })
        .func("toLower", |args| {
            Ok(string(&text_of(&arg(args, 0, "toLower")?).to_lowercase()))
        })
        .func("match", |args| {
            let pattern = text_of(&arg(args, 0, "match")?);
            let regex = regex::Regex::new(&pattern).map_err(|e| err(e.to_string()))?;
            Ok(Value::Bool(
                regex.is_match(&text_of(&arg(args, 1, "match")?)),
            ))
        })
        .func("reReplaceAll", |args| {
            let pattern = text_of(&arg(args, 0, "reReplaceAll")?);
            let regex = regex::Regex::new(&pattern)
                .map_err(|e| err(format!("regexp: Compile(`{pattern}`): {e}")))?;
            let replacement = text_of(&arg(args, 1, "reReplaceAll")?);
            let text = text_of(&arg(args, 2, "reReplaceAll")?);
            Ok(string(&regex.replace_all(&text, replacement.as_str())))
        })
        .func("safeHtml", |args| {
            Ok(string(&text_of(&arg(args, 0, "safeHtml")?)))
        })
        .func("args", |args| {
            Ok(Value::Map(Arc::new(
                args.iter()
                    .enumerate()
                    .map(|(i, v)| (Arc::from(format!("arg{i}").as_str()), v.clone()))
                    .collect(),
            )))
        })
        .func("label", |args| {
            let name = text_of(&arg(args, 0, "label")?);
            Ok(arg(args, 1, "label")?
                .field("Labels")
                .and_then(|l| l.field(&name))
                .map_or_else(|| string(""), Clone::clone))
        })
        .func("value", |args| {
            Ok(arg(args, 0, "value")?
                .field("Value")
                .cloned()
                .unwrap_or(Value::Float(0.0)))
        })
        .func("strvalue", |args| {
            Ok(arg(args, 0, "strvalue")?
                .field("Labels")
                .and_then(|l| l.field("__value__"))
                .map_or_else(|| string(""), Clone::clone))
        })
        .func("first", |args| match arg(args, 0, "first")? {
            Value::List(items) => items
                .first()
                .cloned()
                .ok_or_else(|| err("first() called on vector with no elements")),
            _ => Err(err("first() called on vector with no elements")),
        })
        .func("sortByLabel", |args| {
            let name = text_of(&arg(args, 0, "sortByLabel")?);
            match arg(args, 1, "sortByLabel")? {
                Value::List(items) => {
                    let mut items: Vec<Value> = items.to_vec();
                    let key = |v: &Value| {
                        v.field("Labels")
                            .and_then(|l| l.field(&name))
                            .map(text_of)
                            .unwrap_or_default()
                    };
                    items.sort_by_key(key);
                    Ok(Value::List(items.into()))
                }
                other => Ok(other),
            }
        })
        .func("query", |args| {
            run_query(&text_of(&arg(args, 0, "query")?)).map_err(err)
        })
        .func("graphLink", |args| {
            Ok(string(&query_link(
                &text_of(&arg(args, 0, "graphLink")?),
                0,
            )))
        })
        .func("tableLink", |args| {
            Ok(string(&query_link(
                &text_of(&arg(args, 0, "tableLink")?),
                1,
            )))
        })
        .func("parseDuration", |args| {
            let text = text_of(&arg(args, 0, "parseDuration")?);
            let ms = super::file::parse_duration(&text).map_err(err)?;
            Ok(Value::Float(ms as f64 / 1000.0))
        })
        .func("stripPort", |args| {
            let host_port = text_of(&arg(args, 0, "stripPort")?);
            Ok(string(
                split_host_port(&host_port).map_or(host_port.as_str(), |(h, _)| h),
            ))
        })
        .func("stripDomain", |args| {
            let host_port = text_of(&arg(args, 0, "stripDomain")?);
            let (host, port) = split_host_port(&host_port).unwrap_or((host_port.as_str(), ""));
            if host.parse::<std::net::IpAddr>().is_ok() {
                return Ok(string(&host_port));
            }
            let short = host.split('.').next().unwrap_or(host);
            Ok(string(&if port.is_empty() {
                short.to_owned()
            } else {
                format!("{short}:{port}")
            }))
        })
        .func("externalURL", move |_| Ok(string(&external)))
        .func("pathPrefix", move |_| Ok(string(&prefix)))
}

/// Go's `net.SplitHostPort`, for the forms a target address takes.
fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return Some((host, after.strip_prefix(':')?));
    }
    let (host, port) = s.rsplit_once(':')?;
    (!host.contains(':')).then_some((host, port))
}

/// The path of a URL (`http://host/prom` is `/prom`).
fn url_path(url: &str) -> String {
    url.split_once("://")
        .map(|(_, rest)| rest.find('/').map_or("", |i| &rest[i..]))
        .unwrap_or("")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, value: f64) -> String {
        let labels: BTreeMap<String, String> = [("instance", "host:9100"), ("job", "node")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        expand(
            "A",
            text,
            &AlertData {
                labels: &labels,
                external_labels: &BTreeMap::new(),
                external_url: "http://localhost:19090/prom",
                value,
            },
        )
    }

    /// Outputs Prometheus 2.42 gave for the same templates (`promtool test rules`).
    #[test]
    fn expansions_match_prometheus() {
        for (value, printed) in [
            (1_234_567.0, "1.234567e+06"),
            (123_456.0, "123456"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (42.5, "42.5"),
        ] {
            assert_eq!(run("{{ $value }}", value), printed, "{value}");
        }
        for (text, expected) in [
            ("{{ humanize 1234567.0 }}", "1.235M"),
            ("{{ humanize 0.00123 }}", "1.23m"),
            ("{{ humanize 0 }}", "0"),
            ("{{ humanize 1e30 }}", "1e+06Y"),
            ("{{ humanize \"12345\" }}", "12.35k"),
            ("{{ humanize1024 1048576.0 }}", "1Mi"),
            ("{{ humanize1024 0.5 }}", "0.5"),
            ("{{ humanize1024 1536.0 }}", "1.5ki"),
            ("{{ humanizeDuration 90061.0 }}", "1d 1h 1m 1s"),
            ("{{ humanizeDuration 3661.0 }}", "1h 1m 1s"),
            ("{{ humanizeDuration 61.0 }}", "1m 1s"),
            ("{{ humanizeDuration 1.5 }}", "1.5s"),
            ("{{ humanizeDuration 0.0015 }}", "1.5ms"),
            ("{{ humanizeDuration 0 }}", "0s"),
            ("{{ humanizeDuration -3661.0 }}", "-1h 1m 1s"),
            ("{{ humanizeDuration -0.5 }}", "-500ms"),
            ("{{ humanizePercentage 0.12345 }}", "12.35%"),
            ("{{ humanizePercentage 1 }}", "100%"),
            (
                "{{ humanizeTimestamp 1435065584.128 }}",
                "2015-06-23 13:19:44.128 +0000 UTC",
            ),
            ("{{ humanizeTimestamp 0 }}", "1970-01-01 00:00:00 +0000 UTC"),
            ("{{ title \"hello world\" }}", "Hello World"),
            ("{{ toUpper \"abc\" }}", "ABC"),
            ("{{ reReplaceAll \"(a)b\" \"x$1\" \"abab\" }}", "xaxa"),
            ("{{ match \"a.c\" \"xabcx\" }}", "true"),
            ("{{ (args 1 \"x\").arg1 }}", "x"),
            (
                "{{ tableLink \"up{a=\\\"b\\\"}\" }}",
                "/graph?g0.expr=up%7Ba%3D%22b%22%7D&g0.tab=1",
            ),
            ("{{ graphLink \"up\" }}", "/graph?g0.expr=up&g0.tab=0"),
            (
                "{{ stripPort \"host.example.com:9090\" }}",
                "host.example.com",
            ),
            ("{{ stripDomain \"host.example.com:9090\" }}", "host:9090"),
            ("{{ parseDuration \"1h30m\" }}", "5400"),
            ("{{ pathPrefix }}", "/prom"),
            ("{{ externalURL }}", "http://localhost:19090/prom"),
            ("[{{ $labels.nonexistent }}]", "[]"),
            (
                "{{ $labels.instance }} of {{ .Labels.job }}",
                "host:9100 of node",
            ),
            ("{{ printf \"%.2f\" $value }}", "42.50"),
            ("{{ if gt $value 40.0 }}high{{ else }}low{{ end }}", "high"),
            ("{{ $value | humanize }}", "42.5"),
        ] {
            assert_eq!(run(text, 42.5), expected, "{text}");
        }
    }

    #[test]
    fn a_template_cannot_take_unbounded_memory_or_time() {
        let out = run(
            "{{ range $i, $x := (args 1 2 3 4 5 6 7 8 9 10) }}{{ printf \"%65535d\" 1 }}{{ end }}",
            1.0,
        );
        assert!(
            out.starts_with("<error expanding template:"),
            "{}",
            &out[..80.min(out.len())]
        );
        assert!(out.len() < 1024);
    }

    #[test]
    fn failures_become_the_whole_text() {
        let out = run("before {{ humanize \"abc\" }} after", 1.0);
        assert!(
            out.starts_with("<error expanding template: error executing template __alert_A"),
            "{out}"
        );
        assert!(out.contains("invalid syntax"), "{out}");
        assert!(check("A", "{{ $foo }}").is_err());
        assert!(check("A", "{{ unclosed").is_err());
        assert!(check("A", "{{ nosuchfunction 1 }}").is_err());
        assert!(check(
            "A",
            "{{ $value | humanize }} {{ $labels.x }} {{ query \"up\" }}"
        )
        .is_ok());
    }
}
