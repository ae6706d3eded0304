//! ipvs-operator: sets IPVS weights on Kubernetes Services from WebAssembly policies.
//!
//! The binary (`src/main.rs`) is a thin command line over these modules:
//! - [`crd`]: the `WeightedService` custom resource;
//! - [`snapshot`]: what one policy evaluation sees;
//! - [`policy`]: the wasmtime sandbox and the built-in policies;
//! - [`eval`]: offline evaluation (`ipvs-operator eval`).

pub mod crd;
pub mod eval;
pub mod policy;
pub mod snapshot;
pub mod summary;
