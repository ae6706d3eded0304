//! Typed policy configuration from the JSON text of `spec.policy.config`.

use alloc::string::{String, ToString};
use serde::de::DeserializeOwned;

/// Keys of the config object that the host interprets for every policy. They are
/// removed before a policy's own config type sees the object, so policies can use
/// `#[serde(deny_unknown_fields)]` to catch typos.
pub const HOST_KEYS: &[&str] = &["allowAllZero"];

/// The config did not fit the policy's config type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON at all.
    #[error("policy config is not valid JSON: {0}")]
    Syntax(String),
    /// JSON, but a field is missing, unknown, or of the wrong type.
    #[error("policy config: {path}: {reason}")]
    Field {
        /// Where in the config, e.g. `steps[2].share` (`.` for the whole object).
        path: String,
        /// What is wrong there.
        reason: String,
    },
}

impl ConfigError {
    /// A config that parsed but breaks a rule of the policy's, at `path` (e.g. `steps[2].hold`).
    pub fn field(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl From<ConfigError> for String {
    fn from(e: ConfigError) -> String {
        e.to_string()
    }
}

/// Parse `json` (the `config` of the input) into `T`.
///
/// An empty text reads as `{}`; the [`HOST_KEYS`] are removed first. The error
/// names the offending field, e.g. `policy config: defaultWeight: invalid type:
/// string "ten", expected u32`.
pub fn parse<T: DeserializeOwned>(json: &str) -> Result<T, ConfigError> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let mut value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    if let serde_json::Value::Object(map) = &mut value {
        for key in HOST_KEYS {
            map.remove(*key);
        }
    }
    serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Field {
        path: e.path().to_string(),
        reason: e.inner().to_string(),
    })
}

/// Whether the config says `"allowAllZero": true`: a decision that gives every
/// ready endpoint weight 0 is then accepted.
pub fn allow_all_zero(json: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("allowAllZero").and_then(|b| b.as_bool()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Example {
        #[serde(default)]
        default_weight: u32,
        #[serde(default)]
        steps: Vec<Step>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Step {
        share: u32,
    }

    #[test]
    fn empty_text_is_an_empty_object() {
        let c: Example = parse("").unwrap();
        assert_eq!(c.default_weight, 0);
    }

    #[test]
    fn host_keys_are_removed() {
        let c: Example = parse(r#"{"allowAllZero": true, "defaultWeight": 3}"#).unwrap();
        assert_eq!(c.default_weight, 3);
    }

    #[test]
    fn error_names_the_field() {
        let e = parse::<Example>(r#"{"steps": [{"share": 1}, {"share": "ten"}]}"#).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("steps[1].share"), "{text}");
        assert!(text.contains("invalid type"), "{text}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse::<Example>(r#"{"defaultWieght": 3}"#).unwrap_err();
        assert!(e.to_string().contains("defaultWieght"), "{e}");
    }

    #[test]
    fn syntax_error() {
        let e = parse::<Example>("{nope").unwrap_err();
        assert!(matches!(e, ConfigError::Syntax(_)), "{e}");
    }

    #[test]
    fn allow_all_zero_flag() {
        assert!(allow_all_zero(r#"{"allowAllZero": true}"#));
        assert!(!allow_all_zero(r#"{"allowAllZero": false}"#));
        assert!(!allow_all_zero("{}"));
        assert!(!allow_all_zero("not json"));
    }
}
