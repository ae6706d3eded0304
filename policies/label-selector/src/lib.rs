//! The default policy, with the semantics of the original ipvs-operator: the
//! groups of `spec.weights` apply in order, and an endpoint takes the weight of
//! the last group whose selector matches its pod's labels. Endpoints no group
//! matches get `defaultWeight` (default 1, kube-proxy's own weight); terminating
//! endpoints get 0.
#![cfg_attr(target_family = "wasm", no_std)]

use ipvs_policy_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default = "one")]
    default_weight: u32,
}

fn one() -> u32 {
    1
}

/// The label-selector policy.
pub struct LabelSelector;

impl Policy for LabelSelector {
    fn evaluate(input: &Input) -> Result<Decision, String> {
        let config: Config = config::parse(&input.config)?;
        // Pods of one ReplicaSet share a label set: find each set's group once.
        let set_weights: Vec<u32> = input
            .label_sets
            .iter()
            .map(|labels| {
                input
                    .groups
                    .iter()
                    .rev()
                    .find(|group| selector::matches(&group.selector, labels))
                    .map_or(config.default_weight, |group| group.weight)
            })
            .collect();
        let weights = input
            .endpoints
            .iter()
            .map(|endpoint| match endpoint.is_terminating() {
                true => 0,
                false => set_weights
                    .get(endpoint.label_set as usize)
                    .copied()
                    .unwrap_or(config.default_weight),
            })
            .collect();
        Ok(Decision::new(weights))
    }
}

export_policy!(LabelSelector);

#[cfg(test)]
mod tests {
    use super::LabelSelector;
    use ipvs_policy_sdk::testing::{pod, Testcase};

    fn seed() -> Testcase {
        Testcase::new()
            .group(10, &[("env", "prod")])
            .group(1, &[("env", "canary")])
    }

    #[test]
    fn each_endpoint_takes_its_groups_weight() {
        let weights = seed()
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("canary-1").label("env", "canary"))
            .endpoint(pod("prod-2").label("env", "prod"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![10, 1, 10]);
    }

    #[test]
    fn the_last_matching_group_wins() {
        let weights = Testcase::new()
            .group(10, &[("app", "web")])
            .group(3, &[("env", "canary")])
            .endpoint(pod("both").label("app", "web").label("env", "canary"))
            .endpoint(pod("web-only").label("app", "web"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![3, 10]);
    }

    #[test]
    fn a_group_selector_needs_every_label() {
        let weights = Testcase::new()
            .group(7, &[("env", "prod"), ("tier", "web")])
            .endpoint(pod("a").label("env", "prod"))
            .endpoint(pod("b").label("env", "prod").label("tier", "web"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![1, 7]);
    }

    #[test]
    fn unmatched_endpoints_get_the_default_weight() {
        let weights = seed()
            .endpoint(pod("other").label("env", "staging"))
            .endpoint(pod("prod").label("env", "prod"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![1, 10]);

        let weights = seed()
            .config(r#"{"defaultWeight": 4}"#)
            .endpoint(pod("other").label("env", "staging"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![4]);
    }

    #[test]
    fn terminating_endpoints_get_zero() {
        let weights = seed()
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("prod-2").label("env", "prod").terminating())
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![10, 0]);
    }

    #[test]
    fn an_empty_group_selector_matches_everyone() {
        let weights = Testcase::new()
            .group(5, &[])
            .endpoint(pod("a").label("env", "prod"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![5]);
    }

    #[test]
    fn no_groups_gives_everyone_the_default() {
        let weights = Testcase::new()
            .endpoint(pod("a"))
            .endpoint(pod("b"))
            .weights::<LabelSelector>();
        assert_eq!(weights, vec![1, 1]);
    }

    #[test]
    fn zero_for_every_ready_endpoint_is_refused_unless_allowed() {
        let case = Testcase::new()
            .group(0, &[("env", "prod")])
            .endpoint(pod("a").label("env", "prod"));
        let err = case.evaluate::<LabelSelector>().unwrap_err();
        assert!(err.contains("allowAllZero"), "{err}");

        let allowed = case.config(r#"{"allowAllZero": true}"#);
        assert_eq!(allowed.weights::<LabelSelector>(), vec![0]);
    }

    #[test]
    fn a_bad_config_names_the_field() {
        let err = seed()
            .config(r#"{"defaultWeight": "ten"}"#)
            .endpoint(pod("a"))
            .evaluate::<LabelSelector>()
            .unwrap_err();
        assert!(err.contains("defaultWeight"), "{err}");
    }
}
