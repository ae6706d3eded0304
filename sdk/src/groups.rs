//! The weight groups of `spec.weights`, read two ways: as per-endpoint weights
//! (the original ipvs-operator's semantics, the label-selector policy's default)
//! or as shares of new connections. Policies that build on label groups (such as
//! slow-start) use these so that they agree with label-selector exactly.
//!
//! An endpoint belongs to the **last** group whose selector matches its pod's
//! labels, as in the original; endpoints no group matches form a group of their own.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Write as _;

use crate::selector::{self, LabelSelector};
use crate::share::{self, Demand, Percent, Split};
use crate::Input;

/// How the weights of `spec.weights` are read (`"mode"` in the label-selector
/// policy's config, and in those built on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Each endpoint gets its group's weight (the original semantics).
    #[default]
    PerEndpoint,
    /// Group weights are shares of new connections ([`by_share`]).
    Share,
}

/// The label-selector policy's weights: [`per_endpoint`] with `default_weight`
/// (default 1), or [`by_share`] with `default_weight` as the share of the
/// endpoints no group matches (default 0) and its message.
pub fn weights(input: &Input, mode: Mode, default_weight: Option<u32>) -> (Vec<u32>, Option<String>) {
    match mode {
        Mode::PerEndpoint => (per_endpoint(input, default_weight.unwrap_or(1)), None),
        Mode::Share => {
            let shares = by_share(input, default_weight.unwrap_or(0));
            (shares.weights, Some(shares.message))
        }
    }
}

/// For each label set of `input.label_sets`: the index of the last group of
/// `input.groups` whose selector matches it, or `None`.
pub fn label_set_groups(input: &Input) -> Vec<Option<usize>> {
    // Pods of one ReplicaSet share a label set: match each set once, not each endpoint.
    input
        .label_sets
        .iter()
        .map(|labels| input.groups.iter().rposition(|g| selector::matches(&g.selector, labels)))
        .collect()
}

/// Per-endpoint weights: each endpoint gets its group's weight, `default_weight`
/// when no group matches; terminating endpoints get 0.
pub fn per_endpoint(input: &Input, default_weight: u32) -> Vec<u32> {
    let set_weights: Vec<u32> = label_set_groups(input)
        .iter()
        .map(|g| g.and_then(|i| input.groups.get(i)).map_or(default_weight, |g| g.weight))
        .collect();
    input
        .endpoints
        .iter()
        .map(|endpoint| match endpoint.is_terminating() {
            true => 0,
            false => set_weights.get(endpoint.label_set as usize).copied().unwrap_or(default_weight),
        })
        .collect()
}

/// Weights from shares, and how they came about.
#[derive(Debug, Clone, PartialEq)]
pub struct Shares {
    /// One weight per endpoint; 0 for endpoints that are not ready.
    pub weights: Vec<u32>,
    /// The split over the groups: `input.groups` in order, then the endpoints no group matches.
    pub split: Split,
    /// Ready endpoints per group, in the same order.
    pub ready: Vec<u32>,
    /// For status and events: each group's share, its endpoints and their weight, and the rounding error.
    pub message: String,
}

/// Weights from shares: the group weights are shares of new connections
/// (`{prod: 90, canary: 10}` gives canary 10 % whatever the replica counts),
/// spread over each group's ready endpoints. Endpoints no group matches share
/// `default_share`. Endpoints that are not ready get 0.
pub fn by_share(input: &Input, default_share: u32) -> Shares {
    let set_groups = label_set_groups(input);
    let ungrouped = input.groups.len();
    let group_of = |label_set: u32| set_groups.get(label_set as usize).copied().flatten().unwrap_or(ungrouped);
    let mut ready = alloc::vec![0u32; ungrouped + 1];
    for endpoint in input.endpoints.iter().filter(|e| e.is_ready()) {
        ready[group_of(endpoint.label_set)] += 1;
    }
    let demands: Vec<Demand> = input
        .groups
        .iter()
        .map(|g| g.weight)
        .chain([default_share])
        .zip(&ready)
        .map(|(share, ready)| Demand { share: u64::from(share), ready: *ready })
        .collect();
    let split = share::split(&demands);
    let weights = input
        .endpoints
        .iter()
        .map(|e| match e.is_ready() {
            true => split.weights[group_of(e.label_set)],
            false => 0,
        })
        .collect();
    let message = describe(input, &demands, &split);
    Shares { weights, split, ready, message }
}

/// `env=prod 90 % (3 × 9), env=canary 10 % (3 × 1); exact`
fn describe(input: &Input, demands: &[Demand], split: &Split) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (i, demand) in demands.iter().enumerate() {
        if demand.share == 0 && demand.ready == 0 {
            continue;
        }
        let name = match input.groups.get(i) {
            Some(g) => LabelSelector::from_labels(&g.selector).to_string(),
            None => "(no group)".to_string(),
        };
        let mut part = name;
        if demand.ready == 0 {
            part.push_str(": no ready endpoint");
        } else {
            let achieved = Percent::from_percent(split.achieved[i] * 100.0).unwrap_or(Percent::ZERO);
            let _ = write!(part, " {achieved} ({} × {})", demand.ready, split.weights[i]);
        }
        parts.push(part);
    }
    let mut message = parts.join(", ");
    if split.is_empty() {
        message.push_str("; no group with a share has a ready endpoint");
    } else {
        let _ = write!(message, "; {}", split.rounding_note());
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{pod, Testcase};
    use alloc::vec;

    fn seed() -> Testcase {
        Testcase::new().group(90, &[("env", "prod")]).group(10, &[("env", "canary")])
    }

    #[test]
    fn per_endpoint_is_the_seed_semantics() {
        let case = seed()
            .endpoint(pod("p").label("env", "prod"))
            .endpoint(pod("c").label("env", "canary"))
            .endpoint(pod("x").label("env", "dev"))
            .endpoint(pod("t").label("env", "prod").terminating());
        assert_eq!(per_endpoint(case.input(), 1), vec![90, 10, 1, 0]);
    }

    #[test]
    fn shares_are_spread_over_ready_endpoints() {
        let case = seed()
            .endpoint(pod("p1").label("env", "prod"))
            .endpoint(pod("p2").label("env", "prod"))
            .endpoint(pod("c1").label("env", "canary"))
            .endpoint(pod("p3").label("env", "prod").not_ready())
            .endpoint(pod("c2").label("env", "canary").terminating());
        let shares = by_share(case.input(), 0);
        // 2 ready prod share 90, 1 ready canary 10: 45 : 10 → 9 : 2.
        assert_eq!(shares.weights, vec![9, 9, 2, 0, 0]);
        assert_eq!(shares.ready, vec![2, 1, 0]);
        assert_eq!(shares.message, "env=prod 90 % (2 × 9), env=canary 10 % (1 × 2); exact");
    }

    #[test]
    fn ungrouped_endpoints_share_the_default() {
        let case = seed()
            .endpoint(pod("p").label("env", "prod"))
            .endpoint(pod("x").label("env", "dev"));
        let none = by_share(case.input(), 0);
        assert_eq!(none.weights, vec![1, 0]);
        assert_eq!(none.message, "env=prod 100 % (1 × 1), env=canary: no ready endpoint, (no group) 0 % (1 × 0); exact");
        let some = by_share(case.input(), 10);
        assert_eq!(some.weights, vec![9, 1]);
    }

    #[test]
    fn nothing_to_serve_is_said() {
        let case = seed().endpoint(pod("x").label("env", "dev"));
        let shares = by_share(case.input(), 0);
        assert_eq!(shares.weights, vec![0]);
        assert!(shares.message.ends_with("no group with a share has a ready endpoint"), "{}", shares.message);
    }
}
