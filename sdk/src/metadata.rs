//! What [`export_policy!`](crate::export_policy) exports besides the evaluator:
//! the WIT's `metadata` interface, the policy's description and its check of a
//! config. The host calls `validate-config` before it evaluates with a config,
//! and never evaluates with one the policy refuses.
//!
//! A policy that names its config type (`export_policy!(P, config = Config)`)
//! gets both from that type: the JSON Schema `schemars` derives, and
//! validation that parses the config as the type and then runs
//! [`PolicyConfig::check`]. A policy without one describes itself with no
//! schema and accepts every config that is JSON.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::bindings::exports::ipvs_operator::policy::metadata as wit;
use crate::config::{self, ConfigError};

/// A policy's config type: parsed from `spec.policy.config` (see
/// [`config::parse`]) and described by its derived JSON Schema.
///
/// ```
/// use ipvs_policy_sdk::prelude::*;
///
/// #[derive(Deserialize, JsonSchema)]
/// #[serde(rename_all = "camelCase", deny_unknown_fields)]
/// struct Config {
///     /// The pod label holding the weight.
///     label: String,
/// }
///
/// impl PolicyConfig for Config {
///     fn check(&self) -> Result<(), ConfigError> {
///         if self.label.is_empty() {
///             return Err(ConfigError::field("label", "must not be empty"));
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait PolicyConfig: serde::de::DeserializeOwned + schemars::JsonSchema {
    /// Rules the type cannot say (e.g. "give steps or a ramp, not both"), with
    /// the path of what breaks them. The default has none.
    fn check(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// How `export_policy!` reads a config: from a [`PolicyConfig`], or as any
/// JSON when the policy names no config type ([`AnyConfig`]).
pub trait ConfigType {
    /// The JSON Schema, as JSON text.
    fn schema() -> Option<String>;
    /// Parse and check `json`.
    fn validate(json: &str) -> Result<(), ConfigError>;
}

impl<T: PolicyConfig> ConfigType for T {
    fn schema() -> Option<String> {
        serde_json::to_string(&schemars::schema_for!(T)).ok()
    }

    fn validate(json: &str) -> Result<(), ConfigError> {
        config::parse::<T>(json)?.check()
    }
}

/// The config type of a policy that names none: any JSON, no schema.
pub enum AnyConfig {}

impl ConfigType for AnyConfig {
    fn schema() -> Option<String> {
        None
    }

    fn validate(json: &str) -> Result<(), ConfigError> {
        config::parse::<serde_json::Value>(json).map(|_| ())
    }
}

/// `path` as [`ConfigError`] gives it (`steps[2].share`, `.` for the whole
/// config) written as a JSON path (`$.steps[2].share`, `$`).
pub fn json_path(path: &str) -> String {
    match path {
        "" | "." => "$".into(),
        p if p.starts_with('[') => alloc::format!("${p}"),
        p => alloc::format!("$.{p}"),
    }
}

/// `validate-config`: `C`'s verdict on `json`, as the WIT's list of errors.
pub fn validate<C: ConfigType>(json: &str) -> Result<(), Vec<wit::ConfigError>> {
    C::validate(json).map_err(|e| {
        let (path, message) = match e {
            ConfigError::Syntax(reason) => (json_path("."), alloc::format!("not valid JSON: {reason}")),
            ConfigError::Field { path, reason } => (json_path(&path), reason),
        };
        alloc::vec![wit::ConfigError { path, message }]
    })
}

/// `describe`: the policy's name, version and description (the macro passes
/// its crate's) and `C`'s schema.
pub fn describe<C: ConfigType>(name: &str, version: &str, description: &str) -> wit::Description {
    wit::Description {
        name: name.to_string(),
        version: version.to_string(),
        description: description.to_string(),
        config_schema: C::schema(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)] // only parsed and described
    struct Example {
        /// Per endpoint.
        #[serde(default)]
        default_weight: u32,
        #[serde(default)]
        steps: Vec<Step>,
    }

    #[derive(Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only parsed and described
    struct Step {
        share: crate::share::Percent,
        hold: Option<crate::time::Duration>,
    }

    impl PolicyConfig for Example {
        fn check(&self) -> Result<(), ConfigError> {
            if self.default_weight > 100 {
                return Err(ConfigError::field("defaultWeight", "at most 100"));
            }
            Ok(())
        }
    }

    #[test]
    fn errors_carry_json_paths() {
        let e = validate::<Example>(r#"{"steps": [{"share": 10}, {"share": "ten"}]}"#).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "$.steps[1].share");
        let e = validate::<Example>(r#"{"defaultWeight": 101}"#).unwrap_err();
        assert_eq!((e[0].path.as_str(), e[0].message.as_str()), ("$.defaultWeight", "at most 100"));
        let e = validate::<Example>("{nope").unwrap_err();
        assert_eq!(e[0].path, "$");
        assert!(validate::<Example>(r#"{"steps": [{"share": 10, "hold": "5m"}]}"#).is_ok());
        assert!(validate::<Example>("").is_ok(), "no config is {{}}");
    }

    #[test]
    fn any_config_takes_any_json_and_has_no_schema() {
        assert!(validate::<AnyConfig>(r#"{"anything": [1, 2]}"#).is_ok());
        assert_eq!(validate::<AnyConfig>("{nope").unwrap_err()[0].path, "$");
        assert_eq!(describe::<AnyConfig>("p", "1", "d").config_schema, None);
    }

    #[test]
    fn the_schema_is_derived_from_the_type_and_the_sdk_types_have_theirs() {
        let d = describe::<Example>("example", "1.2.0", "An example.");
        assert_eq!((d.name.as_str(), d.version.as_str()), ("example", "1.2.0"));
        let schema: serde_json::Value = serde_json::from_str(&d.config_schema.unwrap()).unwrap();
        assert_eq!(schema["properties"]["defaultWeight"]["type"], "integer");
        let step = &schema["$defs"]["Step"]["properties"];
        assert_eq!(step["share"]["type"], "number");
        assert_eq!(step["hold"]["type"], serde_json::json!(["string", "null"]));
    }

    #[test]
    fn json_paths() {
        assert_eq!(json_path("."), "$");
        assert_eq!(json_path("a.b[2]"), "$.a.b[2]");
        assert_eq!(json_path("[0]"), "$[0]");
    }
}
