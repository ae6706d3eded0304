//! Label matching: equality selectors (a `map[string]string` such as a
//! Service's `spec.selector`, or `spec.weights[].selector`), and
//! [`LabelSelector`], a Kubernetes `metav1.LabelSelector` for policy configs.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::Label;

/// True when every `key=value` of `selector` is among `labels`.
/// An empty selector matches everything, as in Kubernetes.
pub fn matches(selector: &[Label], labels: &[Label]) -> bool {
    selector
        .iter()
        .all(|s| get(labels, &s.key) == Some(s.value.as_str()))
}

/// The value of label `key`, if present.
pub fn get<'a>(labels: &'a [Label], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|l| l.key == key)
        .map(|l| l.value.as_str())
}

/// Build a label list from pairs; handy in tests and in policies that synthesize selectors.
pub fn labels(pairs: &[(&str, &str)]) -> alloc::vec::Vec<Label> {
    pairs
        .iter()
        .map(|(k, v)| Label {
            key: (*k).into(),
            value: (*v).into(),
        })
        .collect()
}

/// A Kubernetes label selector in a policy config, written either as a plain
/// map (`{"track": "canary"}`, every pair must match) or as a
/// `metav1.LabelSelector` (`{"matchLabels": {…}, "matchExpressions": [{"key",
/// "operator": "In"|"NotIn"|"Exists"|"DoesNotExist", "values"}]}`), with
/// Kubernetes semantics: all requirements must hold, and an empty selector
/// matches everything.
///
/// An object whose keys are only `matchLabels` and/or `matchExpressions` is read
/// as the structured form; anything else as a plain map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// One requirement of a [`LabelSelector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// How the label's value is tested.
    pub operator: Operator,
    /// The values for `In` and `NotIn` (sorted); empty for the others.
    pub values: Vec<String>,
}

/// The operator of a [`Requirement`], as in `matchExpressions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Operator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent, or its value is none of `values`.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelSelector {
    /// The selector requiring every `key=value` of `labels` (an equality selector).
    pub fn from_labels(labels: &[Label]) -> Self {
        LabelSelector {
            requirements: labels
                .iter()
                .map(|l| Requirement {
                    key: l.key.clone(),
                    operator: Operator::In,
                    values: alloc::vec![l.value.clone()],
                })
                .collect(),
        }
    }

    /// True when every requirement holds for `labels`.
    pub fn matches(&self, labels: &[Label]) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// No requirements: matches every set of labels.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, in the order written (`matchLabels` first).
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }
}

impl Requirement {
    /// True when `labels` satisfy this requirement.
    pub fn matches(&self, labels: &[Label]) -> bool {
        let value = get(labels, &self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            Operator::NotIn => value.is_none_or(|v| self.values.iter().all(|x| x != v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl fmt::Display for LabelSelector {
    /// As kubectl writes selectors: `track=canary,version in (v2,v3),!legacy`;
    /// `(everything)` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("(everything)");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match (r.operator, r.values.as_slice()) {
                (Operator::In, [one]) => write!(f, "{}={one}", r.key)?,
                (Operator::In, values) => write!(f, "{} in ({})", r.key, values.join(","))?,
                (Operator::NotIn, values) => write!(f, "{} notin ({})", r.key, values.join(","))?,
                (Operator::Exists, _) => write!(f, "{}", r.key)?,
                (Operator::DoesNotExist, _) => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// The structured form, as in `metav1.LabelSelector`.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Structured {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Expression>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Expression {
    key: String,
    operator: Operator,
    #[serde(default)]
    values: Vec<String>,
}

impl schemars::JsonSchema for LabelSelector {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> alloc::borrow::Cow<'static, str> {
        "LabelSelector".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "Pod labels: a map of label to value, or a Kubernetes label selector (matchLabels, matchExpressions)."
        })
    }
}

impl<'de> serde::Deserialize<'de> for LabelSelector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_json::Value;
        let map = serde_json::Map::<String, Value>::deserialize(d)?;
        let structured = map.keys().any(|k| k == "matchLabels" || k == "matchExpressions");
        let mut requirements = Vec::new();
        if !structured {
            for (key, value) in map {
                let Value::String(value) = value else {
                    return Err(D::Error::custom(alloc::format!(
                        "label {key:?}: expected a string value, or matchLabels/matchExpressions"
                    )));
                };
                requirements.push(Requirement { key, operator: Operator::In, values: alloc::vec![value] });
            }
            return Ok(LabelSelector { requirements });
        }
        // Through serde_path_to_error, so that the message says where inside the selector.
        let parsed: Structured = serde_path_to_error::deserialize(Value::Object(map))
            .map_err(|e| D::Error::custom(alloc::format!("{}: {}", e.path(), e.inner())))?;
        for (key, value) in parsed.match_labels {
            requirements.push(Requirement { key, operator: Operator::In, values: alloc::vec![value] });
        }
        for (i, e) in parsed.match_expressions.into_iter().enumerate() {
            let needs_values = matches!(e.operator, Operator::In | Operator::NotIn);
            if needs_values == e.values.is_empty() {
                return Err(D::Error::custom(alloc::format!(
                    "matchExpressions[{i}]: operator {:?} {}",
                    e.operator,
                    if needs_values { "needs at least one value" } else { "takes no values" }
                )));
            }
            let mut values = e.values;
            values.sort();
            values.dedup();
            requirements.push(Requirement { key: e.key, operator: e.operator, values });
        }
        Ok(LabelSelector { requirements })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_selector_matches_everything() {
        assert!(matches(&[], &labels(&[("app", "demo")])));
        assert!(matches(&[], &[]));
    }

    #[test]
    fn every_pair_must_match() {
        let pod = labels(&[("app", "demo"), ("env", "prod")]);
        assert!(matches(&labels(&[("env", "prod")]), &pod));
        assert!(matches(&labels(&[("app", "demo"), ("env", "prod")]), &pod));
        assert!(!matches(&labels(&[("env", "canary")]), &pod));
        assert!(!matches(&labels(&[("env", "prod"), ("tier", "web")]), &pod));
    }

    #[test]
    fn get_finds_values() {
        let pod = labels(&[("app", "demo")]);
        assert_eq!(get(&pod, "app"), Some("demo"));
        assert_eq!(get(&pod, "env"), None);
    }

    fn selector(json: &str) -> Result<LabelSelector, String> {
        serde_json::from_str(json).map_err(|e| alloc::string::ToString::to_string(&e))
    }

    #[test]
    fn a_plain_map_is_an_equality_selector() {
        let s = selector(r#"{"track": "canary", "app": "web"}"#).unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("track", "canary"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("track", "stable")])));
        assert!(!s.matches(&labels(&[("track", "canary")])));
        assert_eq!(s, LabelSelector::from_labels(&labels(&[("app", "web"), ("track", "canary")])));
    }

    #[test]
    fn match_labels_and_expressions_all_apply() {
        let s = selector(
            r#"{"matchLabels": {"app": "web"},
                "matchExpressions": [
                    {"key": "version", "operator": "In", "values": ["v3", "v2"]},
                    {"key": "tier", "operator": "NotIn", "values": ["batch"]},
                    {"key": "canary", "operator": "Exists"},
                    {"key": "legacy", "operator": "DoesNotExist"}]}"#,
        )
        .unwrap();
        let base = [("app", "web"), ("version", "v2"), ("canary", "")];
        assert!(s.matches(&labels(&base)));
        // NotIn also matches when the label is absent, as in Kubernetes.
        assert!(s.matches(&labels(&[("app", "web"), ("version", "v3"), ("canary", "yes"), ("tier", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("version", "v1"), ("canary", "")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("version", "v2"), ("canary", ""), ("tier", "batch")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("version", "v2")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("version", "v2"), ("canary", ""), ("legacy", "1")])));
        assert!(!s.matches(&labels(&[("app", "api"), ("version", "v2"), ("canary", "")])));
        assert_eq!(
            alloc::string::ToString::to_string(&s),
            "app=web,version in (v2,v3),tier notin (batch),canary,!legacy"
        );
    }

    #[test]
    fn an_empty_selector_matches_everything() {
        for json in ["{}", r#"{"matchLabels": {}}"#] {
            let s = selector(json).unwrap();
            assert!(s.is_empty());
            assert!(s.matches(&labels(&[("a", "b")])));
            assert_eq!(alloc::string::ToString::to_string(&s), "(everything)");
        }
    }

    #[test]
    fn malformed_selectors_say_what_is_wrong() {
        let e = selector(r#"{"track": 3}"#).unwrap_err();
        assert!(e.contains("\"track\": expected a string"), "{e}");
        let e = selector(r#"{"matchExpressions": [{"key": "a", "operator": "Is"}]}"#).unwrap_err();
        assert!(e.contains("matchExpressions[0].operator") && e.contains("unknown variant"), "{e}");
        let e = selector(r#"{"matchExpressions": [{"key": "a", "operator": "In"}]}"#).unwrap_err();
        assert!(e.contains("matchExpressions[0]: operator In needs at least one value"), "{e}");
        let e = selector(r#"{"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}"#).unwrap_err();
        assert!(e.contains("takes no values"), "{e}");
        let e = selector(r#"{"matchLabels": {"a": "b"}, "track": "canary"}"#).unwrap_err();
        assert!(e.contains("unknown field `track`"), "{e}");
    }
}
