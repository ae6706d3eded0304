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
use crate::{config, validate, Conditions, Decision, Endpoint, Input, Label, Location, Node, Policy, Service, Timestamp, WeightGroup};

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
                label_sets: Vec::new(),
                locations: Vec::new(),
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

    /// Add an endpoint (see [`pod`]). Its labels join `input.label_sets`,
    /// shared with earlier endpoints that have the same ones, as the host does.
    pub fn endpoint(mut self, endpoint: TestEndpoint) -> Self {
        let TestEndpoint { mut endpoint, labels, location } = endpoint;
        endpoint.label_set = intern(&mut self.input.label_sets, labels);
        endpoint.location = location.map(|l| intern(&mut self.input.locations, l));
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
        let ready: Vec<bool> = self.input.endpoints.iter().map(Endpoint::is_ready).collect();
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

/// The index of `item` in `table`, added if new.
fn intern<T: PartialEq>(table: &mut Vec<T>, item: T) -> u32 {
    let index = table.iter().position(|t| *t == item).unwrap_or_else(|| {
        table.push(item);
        table.len() - 1
    });
    index as u32
}

/// An endpoint under construction, with its pod's labels and location.
#[derive(Debug, Clone)]
pub struct TestEndpoint {
    endpoint: Endpoint,
    labels: Vec<Label>,
    location: Option<Location>,
}

/// A ready, serving pod endpoint named `name`, with a made-up address, created an
/// hour before [`DEFAULT_NOW`] and ready since then.
pub fn pod(name: &str) -> TestEndpoint {
    // A stable address per name keeps test output readable and deterministic.
    let h = name.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let an_hour_ago = Timestamp {
        seconds: DEFAULT_NOW.seconds - 3600,
        nanos: 0,
    };
    TestEndpoint {
        endpoint: Endpoint {
            pod_name: Some(name.into()),
            address: format!("10.{}.{}.{}", (h >> 16) & 0xff, (h >> 8) & 0xff, (h & 0xff).max(1)),
            location: None,
            label_set: 0,
            conditions: Conditions::READY | Conditions::SERVING,
            created: Some(an_hour_ago),
            ready_since: Some(an_hour_ago),
        },
        labels: Vec::new(),
        location: None,
    }
}

impl TestEndpoint {
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
        self.endpoint.conditions = Conditions::SERVING | Conditions::TERMINATING;
        self
    }

    /// Mark as not ready (and not serving).
    pub fn not_ready(mut self) -> Self {
        self.endpoint.conditions = Conditions::empty();
        self.endpoint.ready_since = None;
        self
    }

    /// Place on a node, optionally in a zone.
    pub fn on_node(mut self, node: &str, zone: Option<&str>) -> Self {
        self.location = Some(Location {
            node_name: node.into(),
            zone: zone.map(Into::into),
        });
        self
    }

    /// Set the creation time.
    pub fn created_at(mut self, t: Timestamp) -> Self {
        self.endpoint.created = Some(t);
        self
    }

    /// Set the time it became ready.
    pub fn ready_since(mut self, t: Timestamp) -> Self {
        self.endpoint.ready_since = Some(t);
        self
    }
}
