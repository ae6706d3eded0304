//! The default policy, with the semantics of the original ipvs-operator: the
//! groups of `spec.weights` apply in order, and an endpoint takes the weight of
//! the last group whose selector matches its pod's labels. Endpoints no group
//! matches get `defaultWeight` (default 1, kube-proxy's own weight); terminating
//! endpoints get 0.
//!
//! With `"mode": "share"` the group weights are shares of new connections
//! instead: `{prod: 90, canary: 10}` gives canary 10 % whatever the replica
//! counts, each group's share spread over its ready endpoints. Endpoints no group
//! matches then share `defaultWeight` (default 0). The message gives the split
//! and the rounding error.
#![cfg_attr(target_family = "wasm", no_std)]

use ipvs_policy_sdk::prelude::*;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    /// `per-endpoint` (the original semantics) or `share` (group weights are shares of new connections).
    #[serde(default)]
    mode: groups::Mode,
    /// Per endpoint (default 1), or in share mode the share of the ungrouped (default 0).
    default_weight: Option<u32>,
}

/// The label-selector policy.
pub struct LabelSelector;

impl Policy for LabelSelector {
    fn evaluate(input: &Input) -> Result<Decision, String> {
        let config: Config = config::parse(&input.config)?;
        let (weights, message) = groups::weights(input, config.mode, config.default_weight);
        Ok(Decision { weights, requeue_after_ms: None, message })
    }
}

impl PolicyConfig for Config {}

export_policy!(LabelSelector, config = Config);

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

        let err = seed().config(r#"{"mode": "shares"}"#).endpoint(pod("a")).evaluate::<LabelSelector>().unwrap_err();
        assert!(err.contains("mode") && err.contains("share"), "{err}");
    }

    fn shares() -> Testcase {
        Testcase::new()
            .config(r#"{"mode": "share"}"#)
            .group(90, &[("env", "prod")])
            .group(10, &[("env", "canary")])
    }

    /// The split of new connections between prod and canary that `weights` give.
    fn canary_share(case: &Testcase, weights: &[u32]) -> f64 {
        let (mut canary, mut total) = (0u64, 0u64);
        for (endpoint, weight) in case.input().endpoints.iter().zip(weights) {
            if endpoint.is_ready() {
                total += u64::from(*weight);
                if ipvs_policy_sdk::selector::get(case.input().labels(endpoint), "env") == Some("canary") {
                    canary += u64::from(*weight);
                }
            }
        }
        canary as f64 / total as f64
    }

    #[test]
    fn share_mode_gives_the_canary_its_share_whatever_the_replica_counts() {
        for (prod, canary) in [(3, 3), (9, 1), (1, 9), (20, 5), (7, 3), (1, 1)] {
            let mut case = shares();
            for i in 0..prod {
                case = case.endpoint(pod(&format!("prod-{i}")).label("env", "prod"));
            }
            for i in 0..canary {
                case = case.endpoint(pod(&format!("canary-{i}")).label("env", "canary"));
            }
            let weights = case.weights::<LabelSelector>();
            let share = canary_share(&case, &weights);
            assert!((share - 0.1).abs() < 1e-12, "{prod}+{canary}: canary gets {share} with {weights:?}");
        }
    }

    #[test]
    fn share_mode_uses_the_smallest_exact_weights_and_says_so() {
        let case = shares()
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("prod-2").label("env", "prod"))
            .endpoint(pod("canary-1").label("env", "canary"));
        let decision = case.evaluate::<LabelSelector>().unwrap();
        assert_eq!(decision.weights, vec![9, 9, 2]);
        assert_eq!(
            decision.message.as_deref(),
            Some("env=prod 90 % (2 × 9), env=canary 10 % (1 × 2); exact")
        );
    }

    #[test]
    fn share_mode_reports_the_rounding_error() {
        // 1 % over 1000 canaries against one prod endpoint cannot be expressed
        // with weights ≤ 65535: the closest is 1.5 %.
        let mut case = Testcase::new()
            .config(r#"{"mode": "share"}"#)
            .group(99, &[("env", "prod")])
            .group(1, &[("env", "canary")])
            .endpoint(pod("prod").label("env", "prod"));
        for i in 0..1000 {
            case = case.endpoint(pod(&format!("canary-{i}")).label("env", "canary"));
        }
        let decision = case.evaluate::<LabelSelector>().unwrap();
        assert_eq!(decision.weights[0], 65535);
        assert!(decision.weights[1..].iter().all(|w| *w == 1));
        let message = decision.message.unwrap();
        assert!(message.ends_with("rounding error 0.5030 pp"), "{message}");
    }

    #[test]
    fn share_mode_ignores_endpoints_that_are_not_ready() {
        let case = shares()
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("prod-2").label("env", "prod").not_ready())
            .endpoint(pod("prod-3").label("env", "prod").terminating())
            .endpoint(pod("canary-1").label("env", "canary"));
        // One ready endpoint each: 90 : 10.
        assert_eq!(case.weights::<LabelSelector>(), vec![9, 0, 0, 1]);
    }

    #[test]
    fn share_mode_gives_a_missing_groups_share_to_the_others() {
        let case = shares()
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("canary-1").label("env", "canary").not_ready());
        let decision = case.evaluate::<LabelSelector>().unwrap();
        assert_eq!(decision.weights, vec![1, 0]);
        assert!(decision.message.unwrap().contains("env=canary: no ready endpoint"));
    }

    #[test]
    fn share_mode_ungrouped_endpoints_share_the_default_weight() {
        let case = shares()
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("dev-1").label("env", "dev"));
        assert_eq!(case.weights::<LabelSelector>(), vec![1, 0]);
        let case = case.config(r#"{"mode": "share", "defaultWeight": 10}"#);
        assert_eq!(case.weights::<LabelSelector>(), vec![9, 1]);
    }

    #[test]
    fn share_mode_with_nothing_to_serve_is_refused_like_all_zero() {
        let case = shares().endpoint(pod("dev-1").label("env", "dev"));
        let err = case.evaluate::<LabelSelector>().unwrap_err();
        assert!(err.contains("allowAllZero"), "{err}");
    }

    #[test]
    fn the_default_mode_is_per_endpoint() {
        let case = Testcase::new()
            .config(r#"{"mode": "per-endpoint"}"#)
            .group(90, &[("env", "prod")])
            .group(10, &[("env", "canary")])
            .endpoint(pod("prod-1").label("env", "prod"))
            .endpoint(pod("canary-1").label("env", "canary"));
        assert_eq!(case.weights::<LabelSelector>(), vec![90, 10]);
        assert_eq!(case.evaluate::<LabelSelector>().unwrap().message, None);
    }
}
