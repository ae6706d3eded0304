//! Label matching, with the semantics of a Kubernetes equality-based selector
//! (a `map[string]string` such as a Service's `spec.selector`).

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
}
