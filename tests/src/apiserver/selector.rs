//! Label and field selectors, in the syntax of the `labelSelector` and
//! `fieldSelector` query parameters.

use std::collections::BTreeSet;

use serde_json::Value;

/// A parse failure; the server answers it with `400 BadRequest`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unable to parse requirement {requirement:?}: {reason}")]
pub struct SelectorError {
    /// The requirement that failed.
    pub requirement: String,
    /// Why.
    pub reason: &'static str,
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` (also true when the key is absent).
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)` (also true when the key is absent).
    NotIn(String, BTreeSet<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

/// A parsed label selector: all requirements must hold. Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for raw in split_top(s) {
            let part = raw.trim();
            let err = |reason| SelectorError { requirement: part.to_string(), reason };
            if part.is_empty() {
                return Err(err("empty requirement"));
            }
            let req = if let Some(key) = part.strip_prefix('!') {
                let key = key.trim();
                if !valid_key(key) {
                    return Err(err("invalid label key"));
                }
                Requirement::DoesNotExist(key.to_string())
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some(open) = part.find('(') {
                let head = part[..open].trim();
                let Some(body) = part[open + 1..].strip_suffix(')') else {
                    return Err(err("missing closing parenthesis"));
                };
                let values: BTreeSet<String> =
                    body.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
                if let Some(key) = head.strip_suffix(" notin") {
                    Requirement::NotIn(key.trim().to_string(), values)
                } else if let Some(key) = head.strip_suffix(" in") {
                    Requirement::In(key.trim().to_string(), values)
                } else {
                    return Err(err("expected 'in' or 'notin'"));
                }
            } else {
                Requirement::Exists(part.to_string())
            };
            let (key, values): (&str, Vec<&String>) = match &req {
                Requirement::Equals(k, v) | Requirement::NotEquals(k, v) => (k, vec![v]),
                Requirement::In(k, vs) | Requirement::NotIn(k, vs) => (k, vs.iter().collect()),
                Requirement::Exists(k) | Requirement::DoesNotExist(k) => (k, vec![]),
            };
            if !valid_key(key) {
                return Err(err("invalid label key"));
            }
            if !values.iter().all(|v| valid_value(v)) {
                return Err(err("invalid label value"));
            }
            if matches!(&req, Requirement::In(_, vs) | Requirement::NotIn(_, vs) if vs.is_empty()) {
                return Err(err("for 'in', 'notin' operators, values set can't be empty"));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        // Not `Value::pointer`: it allocates, and this runs for every object a
        // list or watch passes over.
        let labels = obj.get("metadata").and_then(|m| m.get("labels"));
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector: `path=value` / `path!=value` terms on dotted paths
/// such as `metadata.name` or `spec.nodeName`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `metadata.name=foo,metadata.namespace!=bar`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut terms = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(terms));
        }
        for part in s.split(',') {
            let part = part.trim();
            let (path, eq, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, true, v)
            } else {
                return Err(SelectorError { requirement: part.to_string(), reason: "expected = or !=" });
            };
            terms.push((path.trim().to_string(), eq, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    /// Whether the object's fields satisfy every term. A missing field reads as "".
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut cur = Some(obj);
            for seg in path.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let have = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (have == *want) == *eq
        })
    }

    /// The value a term requires for `path` with `=`, if any (used to narrow a
    /// watch on one object).
    pub fn required(&self, path: &str) -> Option<&str> {
        self.0.iter().find(|(p, eq, _)| p == path && *eq).map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn every_operator() {
        let o = obj(json!({"app": "web", "env": "prod"}));
        let yes = [
            "", "app=web", "app==web", "app!=db", "missing!=x", "env in (prod, canary)", "env notin (dev)",
            "missing notin (x)", "app", "!missing", "app=web,env in (prod),!tier",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&o), "{s} should match");
        }
        let no = ["app=db", "app!=web", "env in (dev)", "env notin (prod)", "missing", "!app", "missing in (x)"];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&o), "{s} should not match");
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in ["app=web,", "env in (prod", "env of (x)", "a b=c", "x in ()"] {
            assert!(LabelSelector::parse(s).is_err(), "{s} should not parse");
        }
    }

    #[test]
    fn fields() {
        let o = obj(json!({}));
        assert!(FieldSelector::parse("metadata.name=a").unwrap().matches(&o));
        assert!(FieldSelector::parse("metadata.name=a,metadata.namespace!=x").unwrap().matches(&o));
        assert!(!FieldSelector::parse("metadata.namespace=x").unwrap().matches(&o));
        assert!(FieldSelector::parse("spec.nodeName=").unwrap().matches(&o));
        assert!(FieldSelector::parse("nonsense").is_err());
        assert_eq!(FieldSelector::parse("metadata.name=a").unwrap().required("metadata.name"), Some("a"));
    }
}
