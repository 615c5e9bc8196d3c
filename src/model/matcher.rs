//! Label matchers (`=`, `!=`, `=~`, `!~`) with Prometheus semantics: a missing label matches as
//! the empty string, and regexes are fully anchored.

use super::LabelLookup;
use regex::Regex;

#[derive(Clone, Debug)]
pub enum MatchOp {
    Equal(String),
    NotEqual(String),
    /// Already anchored as `^(?:re)$`.
    Regex(Regex),
    NotRegex(Regex),
}

#[derive(Clone, Debug)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
}

impl Matcher {
    pub fn equal(name: impl Into<String>, value: impl Into<String>) -> Matcher {
        Matcher {
            name: name.into(),
            op: MatchOp::Equal(value.into()),
        }
    }

    /// Builds a regex matcher, anchoring the pattern as Prometheus does.
    pub fn regex(
        name: impl Into<String>,
        pattern: &str,
        negate: bool,
    ) -> Result<Matcher, regex::Error> {
        let re = Regex::new(&format!("^(?:{pattern})$"))?;
        Ok(Matcher {
            name: name.into(),
            op: if negate {
                MatchOp::NotRegex(re)
            } else {
                MatchOp::Regex(re)
            },
        })
    }

    pub fn matches_value(&self, value: &str) -> bool {
        match &self.op {
            MatchOp::Equal(v) => v == value,
            MatchOp::NotEqual(v) => v != value,
            MatchOp::Regex(re) => re.is_match(value),
            MatchOp::NotRegex(re) => !re.is_match(value),
        }
    }

    pub fn matches(&self, labels: &(impl LabelLookup + ?Sized)) -> bool {
        self.matches_value(labels.value_or_empty(&self.name))
    }

    /// Whether the matcher selects series that lack the label entirely.
    pub fn matches_empty(&self) -> bool {
        self.matches_value("")
    }
}

/// Whether every matcher accepts the series.
pub fn matches_all(matchers: &[Matcher], labels: &(impl LabelLookup + ?Sized)) -> bool {
    matchers.iter().all(|m| m.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Label, Labels};

    #[test]
    fn missing_labels_match_as_empty_and_regexes_are_anchored() {
        let labels = Labels::from_trusted(vec![
            Label::new("__name__", "up"),
            Label::new("job", "node"),
        ]);
        assert!(Matcher::equal("instance", "").matches(&labels));
        assert!(Matcher::regex("job", "no.*", false)
            .unwrap()
            .matches(&labels));
        assert!(!Matcher::regex("job", "no", false).unwrap().matches(&labels));
        assert!(!Matcher::regex("job", "ode", false)
            .unwrap()
            .matches(&labels));
        assert!(Matcher::regex("job", "ode", true).unwrap().matches(&labels));
        assert!(Matcher::regex("instance", "", false)
            .unwrap()
            .matches(&labels));
        assert!(!Matcher::equal("job", "node").matches_empty());
    }
}
