//! A native test harness: `cargo test` in a policy crate runs the policy on the
//! host, without building wasm, and applies the same checks the host applies to
//! a decision.
//!
//! ```
//! use ipvs_policy_sdk::testing::{pod, Testcase};
//! # use ipvs_policy_sdk::prelude::*;
//! # struct AllOnes;
//! # impl Policy for AllOnes {
//! #     fn evaluate(input: &Input) -> Result<Decision, String> {
//! #         Ok(Decision::new(input.endpoints.iter().map(|_| 1).collect()))
//! #     }
//! # }
//! let weights = Testcase::new()
//!     .group(10, &[("env", "prod")])
//!     .endpoint(pod("web-1").label("env", "prod"))
//!     .weights::<AllOnes>();
//! assert_eq!(weights, vec![1]);
//! ```

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::selector::labels;
use crate::time::Duration;
use crate::{config, validate, Decision, Endpoint, Input, Label, Node, Policy, Service, Timestamp, WeightGroup};

/// The `now` of every test case unless set: 2026-01-01T00:00:00Z.
pub const DEFAULT_NOW: Timestamp = Timestamp {
    seconds: 1_767_225_600,
    nanos: 0,
};

/// An input under construction, and the policy's answer to it.
#[derive(Debug, Clone)]
pub struct Testcase {
    input: Input,
}

impl Default for Testcase {
    fn default() -> Self {
        Self::new()
    }
}

impl Testcase {
    /// Service `default/test`, no groups, config `{}`, no endpoints, cluster-wide view.
    pub fn new() -> Self {
        Testcase {
            input: Input {
                service: Service {
                    namespace: "default".into(),
                    name: "test".into(),
                    selector: Vec::new(),
                    labels: Vec::new(),
                    annotations: Vec::new(),
                },
                groups: Vec::new(),
                config: "{}".into(),
                endpoints: Vec::new(),
                node: None,
                now: DEFAULT_NOW,
            },
        }
    }

    /// Add a weight group (`spec.weights[]`), in order.
    pub fn group(mut self, weight: u32, selector: &[(&str, &str)]) -> Self {
        self.input.groups.push(WeightGroup {
            weight,
            selector: labels(selector),
        });
        self
    }

    /// Set the policy config (JSON text).
    pub fn config(mut self, json: &str) -> Self {
        self.input.config = json.into();
        self
    }

    /// Add an endpoint (see [`pod`]).
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.input.endpoints.push(endpoint);
        self
    }

    /// Evaluate for this node instead of the cluster-wide view.
    pub fn node(mut self, name: &str, zone: Option<&str>, node_labels: &[(&str, &str)]) -> Self {
        self.input.node = Some(Node {
            name: name.into(),
            zone: zone.map(Into::into),
            labels: labels(node_labels),
        });
        self
    }

    /// Set `now`.
    pub fn now(mut self, now: Timestamp) -> Self {
        self.input.now = now;
        self
    }

    /// Move `now` forward.
    pub fn advance(mut self, by: Duration) -> Self {
        self.input.now = self.input.now.plus(by);
        self
    }

    /// The input as built so far.
    pub fn input(&self) -> &Input {
        &self.input
    }

    /// Run policy `P` and apply the host's checks to its decision, as the host would.
    pub fn evaluate<P: Policy>(&self) -> Result<Decision, String> {
        let decision = P::evaluate(&self.input)?;
        let ready: Vec<bool> = self.input.endpoints.iter().map(|e| e.ready).collect();
        validate::check(&decision.weights, &ready, config::allow_all_zero(&self.input.config))
            .map_err(|e| format!("the host would refuse this decision: {e}"))?;
        Ok(decision)
    }

    /// The weights policy `P` gives; panics with the reason if it fails.
    pub fn weights<P: Policy>(&self) -> Vec<u32> {
        match self.evaluate::<P>() {
            Ok(d) => d.weights,
            Err(e) => panic!("policy failed: {e}"),
        }
    }
}

/// A ready, serving pod endpoint named `name`, with a made-up address, created an
/// hour before [`DEFAULT_NOW`] and ready since then.
pub fn pod(name: &str) -> Endpoint {
    // A stable address per name keeps test output readable and deterministic.
    let h = name.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let an_hour_ago = Timestamp {
        seconds: DEFAULT_NOW.seconds - 3600,
        nanos: 0,
    };
    Endpoint {
        pod_name: Some(name.into()),
        address: format!("10.{}.{}.{}", (h >> 16) & 0xff, (h >> 8) & 0xff, (h & 0xff).max(1)),
        node_name: None,
        zone: None,
        labels: Vec::new(),
        ready: true,
        serving: true,
        terminating: false,
        created: Some(an_hour_ago),
        ready_since: Some(an_hour_ago),
    }
}

impl Endpoint {
    /// Add a pod label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push(Label {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Mark as terminating: no longer ready, still serving.
    pub fn terminating(mut self) -> Self {
        self.terminating = true;
        self.ready = false;
        self
    }

    /// Mark as not ready (and not serving).
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self.ready_since = None;
        self
    }

    /// Place on a node, optionally in a zone.
    pub fn on_node(mut self, node: &str, zone: Option<&str>) -> Self {
        self.node_name = Some(node.into());
        self.zone = zone.map(Into::into);
        self
    }

    /// Set the creation time.
    pub fn created_at(mut self, t: Timestamp) -> Self {
        self.created = Some(t);
        self
    }

    /// Set the time it became ready.
    pub fn ready_since(mut self, t: Timestamp) -> Self {
        self.ready_since = Some(t);
        self
    }
}
