//! Prefer local: endpoints on the evaluating node get `localWeight`, those in
//! its zone `zoneWeight`, the rest `remoteWeight` — so that connections stay on
//! the node, or at least in the zone, where they can.
//!
//! It never gives every ready endpoint 0: if the weights would (say `zoneWeight`
//! and `remoteWeight` are 0 and no local endpoint is ready), the nearest ready
//! endpoints — local, else in the zone, else any — get weight 1. In the
//! controller's cluster-wide view (no evaluating node) every endpoint is remote.
#![cfg_attr(target_family = "wasm", no_std)]

use ipvs_policy_sdk::prelude::*;

#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    /// The weight of endpoints on the evaluating node (default 100).
    #[serde(default = "local")]
    local_weight: u16,
    /// The weight of endpoints in its zone (default 10).
    #[serde(default = "zone")]
    zone_weight: u16,
    /// The weight of the others (default 1).
    #[serde(default = "remote")]
    remote_weight: u16,
}

fn local() -> u16 {
    100
}

fn zone() -> u16 {
    10
}

fn remote() -> u16 {
    1
}

/// How near an endpoint is to the evaluating node, nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Local,
    Zone,
    Remote,
}

/// The prefer-local policy.
pub struct PreferLocal;

impl Policy for PreferLocal {
    fn evaluate(input: &Input) -> Result<Decision, String> {
        let config: Config = config::parse(&input.config)?;
        let tier = |e: &Endpoint| match (&input.node, input.location(e)) {
            (Some(node), Some(at)) if at.node_name == node.name => Tier::Local,
            (Some(node), Some(at)) if node.zone.is_some() && at.zone == node.zone => Tier::Zone,
            _ => Tier::Remote,
        };
        let weight_of = |t: Tier| match t {
            Tier::Local => u32::from(config.local_weight),
            Tier::Zone => u32::from(config.zone_weight),
            Tier::Remote => u32::from(config.remote_weight),
        };
        let tiers: Vec<Tier> = input.endpoints.iter().map(tier).collect();
        let ready = |i: usize| input.endpoints[i].is_ready();
        let count = |t: Tier| (0..tiers.len()).filter(|i| ready(*i) && tiers[*i] == t).count();

        let mut message = match &input.node {
            Some(node) => format!(
                "on {}: {} local, {} in zone {}, {} remote ready",
                node.name,
                count(Tier::Local),
                count(Tier::Zone),
                node.zone.as_deref().unwrap_or("(none)"),
                count(Tier::Remote)
            ),
            None => format!("cluster-wide view: {} ready, all remote", count(Tier::Remote)),
        };
        let serves = (0..tiers.len()).any(|i| ready(i) && weight_of(tiers[i]) > 0);
        // Never a black hole: the nearest tier with a ready endpoint serves, at weight 1.
        let fallback = match serves {
            true => None,
            false => (0..tiers.len()).filter(|i| ready(*i)).map(|i| tiers[i]).min(),
        };
        if let Some(t) = fallback {
            let what = match t {
                Tier::Local => "local endpoints",
                Tier::Zone => "endpoints in the zone",
                Tier::Remote => "remote endpoints",
            };
            message.push_str(&format!("; no ready endpoint has a weight above 0: falling back to the {what}"));
        }
        let weights = input
            .endpoints
            .iter()
            .zip(&tiers)
            .map(|(e, t)| match (e.is_terminating(), fallback) {
                (true, _) => 0,
                (false, Some(f)) => u32::from(*t == f && e.is_ready()),
                (false, None) => weight_of(*t),
            })
            .collect();
        Ok(Decision::new(weights).message(message))
    }
}

impl PolicyConfig for Config {}

export_policy!(PreferLocal, config = Config);

#[cfg(test)]
mod tests {
    use super::*;
    use ipvs_policy_sdk::testing::{pod, Testcase};

    /// Two pods on node-1 (zone a), one on node-2 (zone a), two on node-3 (zone b).
    fn spread(config: &str) -> Testcase {
        Testcase::new()
            .config(config)
            .endpoint(pod("web-1").on_node("node-1", Some("a")))
            .endpoint(pod("web-2").on_node("node-1", Some("a")))
            .endpoint(pod("web-3").on_node("node-2", Some("a")))
            .endpoint(pod("web-4").on_node("node-3", Some("b")))
            .endpoint(pod("web-5").on_node("node-3", Some("b")))
    }

    #[test]
    fn local_then_zone_then_remote() {
        let d = spread("{}").node("node-1", Some("a"), &[]).evaluate::<PreferLocal>().unwrap();
        assert_eq!(d.weights, vec![100, 100, 10, 1, 1]);
        assert_eq!(d.message.as_deref(), Some("on node-1: 2 local, 1 in zone a, 2 remote ready"));
        let weights = spread(r#"{"localWeight": 5, "zoneWeight": 2, "remoteWeight": 0}"#)
            .node("node-3", Some("b"), &[])
            .weights::<PreferLocal>();
        assert_eq!(weights, vec![0, 0, 0, 5, 5]);
    }

    #[test]
    fn a_node_without_a_zone_has_only_local_and_remote() {
        let weights = spread("{}").node("node-2", None, &[]).weights::<PreferLocal>();
        assert_eq!(weights, vec![1, 1, 100, 1, 1]);
    }

    #[test]
    fn a_node_with_no_endpoint_prefers_its_zone() {
        let weights = spread("{}").node("node-9", Some("b"), &[]).weights::<PreferLocal>();
        assert_eq!(weights, vec![1, 1, 1, 10, 10]);
    }

    #[test]
    fn the_cluster_wide_view_reports_the_remote_weights() {
        let d = spread(r#"{"remoteWeight": 3}"#).evaluate::<PreferLocal>().unwrap();
        assert_eq!(d.weights, vec![3; 5]);
        assert_eq!(d.message.as_deref(), Some("cluster-wide view: 5 ready, all remote"));
    }

    #[test]
    fn local_only_falls_back_to_the_zone_when_no_local_endpoint_is_ready() {
        let config = r#"{"localWeight": 1, "zoneWeight": 0, "remoteWeight": 0}"#;
        let case = Testcase::new()
            .config(config)
            .endpoint(pod("web-1").on_node("node-1", Some("a")).not_ready())
            .endpoint(pod("web-2").on_node("node-1", Some("a")).terminating())
            .endpoint(pod("web-3").on_node("node-2", Some("a")))
            .endpoint(pod("web-4").on_node("node-3", Some("b")))
            .node("node-1", Some("a"), &[]);
        let d = case.evaluate::<PreferLocal>().unwrap();
        assert_eq!(d.weights, vec![0, 0, 1, 0]);
        assert_eq!(
            d.message.as_deref(),
            Some("on node-1: 0 local, 1 in zone a, 1 remote ready; no ready endpoint has a weight above 0: falling back to the endpoints in the zone")
        );
    }

    #[test]
    fn zero_remote_weight_in_the_cluster_wide_view_falls_back_to_everyone() {
        let weights = spread(r#"{"remoteWeight": 0}"#).weights::<PreferLocal>();
        assert_eq!(weights, vec![1; 5]);
    }

    #[test]
    fn local_only_with_a_ready_local_endpoint_sends_nothing_elsewhere() {
        let weights = spread(r#"{"localWeight": 1, "zoneWeight": 0, "remoteWeight": 0}"#)
            .node("node-2", Some("a"), &[])
            .weights::<PreferLocal>();
        assert_eq!(weights, vec![0, 0, 1, 0, 0]);
    }

    #[test]
    fn endpoints_of_unknown_location_are_remote() {
        let weights = Testcase::new()
            .endpoint(pod("somewhere"))
            .endpoint(pod("here").on_node("node-1", None))
            .node("node-1", None, &[])
            .weights::<PreferLocal>();
        assert_eq!(weights, vec![1, 100]);
    }

    #[test]
    fn weights_above_65535_are_refused_naming_the_field() {
        let err = spread(r#"{"localWeight": 70000}"#).evaluate::<PreferLocal>().unwrap_err();
        assert!(err.contains("localWeight"), "{err}");
    }
}
