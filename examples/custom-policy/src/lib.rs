//! An example policy, not built into ipvs-operator: every pod states its own
//! weight in a label, `weight.example.com/value: "4"` — say, set in each
//! Deployment's pod template to match the size of the machines it runs on.
//! Pods without the label get `defaultWeight`; a value that is not a weight
//! (0..=65535) is ignored, with a note in the message rather than an error, so
//! that one mislabelled pod does not stop the whole Service from being weighted.
//!
//! Config: `{"label": "weight.example.com/value", "defaultWeight": 1}` (both optional).
//!
//! Build: `cargo build --target wasm32-wasip2 --release`, then try it with
//! `ipvs-operator eval --policy-file target/wasm32-wasip2/release/pod_label_weight.wasm …`.
#![cfg_attr(target_family = "wasm", no_std)]

use ipvs_policy_sdk::prelude::*;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    /// The pod label holding the weight.
    #[serde(default = "default_label")]
    label: String,
    /// The weight of pods without the label. (u16: serde refuses values above 65535.)
    #[serde(default = "one")]
    default_weight: u16,
}

fn default_label() -> String {
    "weight.example.com/value".into()
}

fn one() -> u16 {
    1
}

/// The policy: a type implementing [`Policy`], exported with [`export_policy!`].
pub struct PodLabelWeight;

impl Policy for PodLabelWeight {
    fn evaluate(input: &Input) -> Result<Decision, String> {
        // A config error is returned, not panicked on: the host reports it and keeps the last good weights.
        let config: Config = config::parse(&input.config)?;
        let mut labelled = 0;
        let mut ignored: Vec<String> = Vec::new();
        let weights = input
            .endpoints
            .iter()
            .map(|endpoint| {
                if endpoint.is_terminating() {
                    return 0; // kube-proxy drains it; give it nothing new
                }
                let Some(value) = selector::get(input.labels(endpoint), &config.label) else {
                    return u32::from(config.default_weight);
                };
                match value.parse::<u16>() {
                    Ok(weight) => {
                        labelled += 1;
                        u32::from(weight)
                    }
                    Err(_) => {
                        let pod = endpoint.pod_name.as_deref().unwrap_or(&endpoint.address);
                        ignored.push(format!("{pod} ({value:?})"));
                        u32::from(config.default_weight)
                    }
                }
            })
            .collect();
        let mut message = format!("{labelled} of {} weighted by {}", input.endpoints.len(), config.label);
        if !ignored.is_empty() {
            message.push_str(&format!("; not a weight, ignored: {}", ignored.join(", ")));
        }
        Ok(Decision::new(weights).message(message))
    }
}

impl PolicyConfig for Config {}

export_policy!(PodLabelWeight, config = Config);

/// Unit tests run natively (`cargo test`), with the SDK's harness, which also
/// applies the host's checks to every decision.
#[cfg(test)]
mod tests {
    use super::PodLabelWeight;
    use ipvs_policy_sdk::testing::{pod, Testcase};

    const LABEL: &str = "weight.example.com/value";

    #[test]
    fn each_pod_gets_the_weight_of_its_label() {
        let weights = Testcase::new()
            .endpoint(pod("big").label(LABEL, "4"))
            .endpoint(pod("small").label(LABEL, "1"))
            .endpoint(pod("unlabelled"))
            .weights::<PodLabelWeight>();
        assert_eq!(weights, vec![4, 1, 1]);
    }

    #[test]
    fn the_label_and_default_can_be_configured() {
        let weights = Testcase::new()
            .config(r#"{"label": "capacity", "defaultWeight": 2}"#)
            .endpoint(pod("a").label("capacity", "8"))
            .endpoint(pod("b").label(LABEL, "4"))
            .weights::<PodLabelWeight>();
        assert_eq!(weights, vec![8, 2]);
    }

    #[test]
    fn values_that_are_not_weights_are_ignored_and_named() {
        let decision = Testcase::new()
            .endpoint(pod("a").label(LABEL, "lots"))
            .endpoint(pod("b").label(LABEL, "70000"))
            .endpoint(pod("c").label(LABEL, "3"))
            .evaluate::<PodLabelWeight>()
            .unwrap();
        assert_eq!(decision.weights, vec![1, 1, 3]);
        assert_eq!(
            decision.message.as_deref(),
            Some("1 of 3 weighted by weight.example.com/value; not a weight, ignored: a (\"lots\"), b (\"70000\")")
        );
    }

    #[test]
    fn terminating_pods_get_zero() {
        let weights = Testcase::new()
            .endpoint(pod("a").label(LABEL, "5"))
            .endpoint(pod("b").label(LABEL, "5").terminating())
            .weights::<PodLabelWeight>();
        assert_eq!(weights, vec![5, 0]);
    }

    #[test]
    fn weight_zero_everywhere_is_refused_by_the_host() {
        let err = Testcase::new()
            .endpoint(pod("a").label(LABEL, "0"))
            .evaluate::<PodLabelWeight>()
            .unwrap_err();
        assert!(err.contains("allowAllZero"), "{err}");
    }

    #[test]
    fn a_bad_config_names_the_field() {
        let err = Testcase::new()
            .config(r#"{"defaultWeight": 100000}"#)
            .endpoint(pod("a"))
            .evaluate::<PodLabelWeight>()
            .unwrap_err();
        assert!(err.contains("defaultWeight"), "{err}");
    }
}
