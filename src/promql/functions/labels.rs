//! `label_replace` and `label_join` (functions.go `funcLabelReplace`, `funcLabelJoin`).

use super::string_arg;
use crate::model::labels::is_valid_label_name;
use crate::model::{Label, Labels};
use crate::promql::eval::{merge_by_labels, Evaluator};
use crate::promql::value::Value;
use crate::promql::QueryError;
use promql_parser::parser::Call;

fn with_label(labels: &Labels, name: &str, value: &str) -> Labels {
    let mut out: Vec<Label> = labels.iter().filter(|l| l.name != name).cloned().collect();
    if !value.is_empty() {
        out.push(Label::new(name, value));
    }
    Labels::from_trusted(out)
}

/// `label_replace(v, dst, replacement, src, regex)`: when the anchored regex matches the
/// source label, sets `dst` to the expanded replacement (`$1`, `${name}`).
pub(super) fn label_replace(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let args = &call.args.args;
    let (dst, replacement, src, pattern) = (
        string_arg(&args[1])?,
        string_arg(&args[2])?,
        string_arg(&args[3])?,
        string_arg(&args[4])?,
    );
    let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|_| {
        QueryError::Execution(format!(
            "invalid regular expression in label_replace(): {pattern}"
        ))
    })?;
    if !is_valid_label_name(&dst) {
        return Err(QueryError::Execution(format!(
            "invalid destination label name in label_replace(): {dst}"
        )));
    }
    let mut series = ev.eval_vector(&args[0])?;
    for s in &mut series {
        let source = s.labels.value_or_empty(&src).to_owned();
        if let Some(captures) = re.captures(&source) {
            let mut value = String::new();
            captures.expand(&replacement, &mut value);
            s.labels = with_label(&s.labels, &dst, &value);
        }
    }
    Ok(Value::Vector(merge_by_labels(series)?))
}

/// `label_join(v, dst, separator, src...)`: joins the source labels' values into `dst`.
pub(super) fn label_join(ev: &mut Evaluator, call: &Call) -> Result<Value, QueryError> {
    let args = &call.args.args;
    let dst = string_arg(&args[1])?;
    let separator = string_arg(&args[2])?;
    let sources = args[3..]
        .iter()
        .map(|a| string_arg(a))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(bad) = sources.iter().find(|s| !is_valid_label_name(s)) {
        return Err(QueryError::Execution(format!(
            "invalid source label name in label_join(): {bad}"
        )));
    }
    if !is_valid_label_name(&dst) {
        return Err(QueryError::Execution(format!(
            "invalid destination label name in label_join(): {dst}"
        )));
    }
    let mut series = ev.eval_vector(&args[0])?;
    for s in &mut series {
        let value = sources
            .iter()
            .map(|name| s.labels.value_or_empty(name))
            .collect::<Vec<_>>()
            .join(&separator);
        s.labels = with_label(&s.labels, &dst, &value);
    }
    Ok(Value::Vector(merge_by_labels(series)?))
}
