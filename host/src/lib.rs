//! ipvs-operator: sets IPVS weights on Kubernetes Services from WebAssembly policies.
//!
//! The binary (`src/main.rs`) is a thin command line over these modules:
//! - [`crd`]: the `WeightedService` custom resource;
//! - [`snapshot`]: what one policy evaluation sees;
//! - [`policy`]: the wasmtime sandbox and the built-in policies;
//! - [`eval`]: offline evaluation (`ipvs-operator eval`);
//! - [`cluster`]: the watch caches the agent and the controller share;
//! - [`pod_info`]: the PodInfoSlices the controller publishes for the agents;
//! - [`agent`]: the node agent that writes IPVS weights;
//! - [`leader`]: the controllers' leader election on a Lease;
//! - [`node_setup`]: the kernel modules and sysctls a node needs for standalone mode;
//! - [`events`], [`metrics`]: what they report.

pub mod agent;
pub mod cluster;
pub mod controller;
pub mod crd;
pub mod eval;
pub mod events;
pub mod leader;
pub mod metrics;
pub mod node_setup;
pub mod pod_info;
pub mod policy;
pub mod policy_test;
pub mod snapshot;
pub mod status;
pub mod summary;
