//! Test doubles for ipvs-operator's end-to-end tests.
//!
//! - [`apiserver`]: a Kubernetes **test API server** (a test double) that kube-rs
//!   and kubectl run against unmodified, with an emulated cluster behind it
//!   (Deployments, pods with IPs, EndpointSlices) and fault injection.
//! - [`kube_proxy`]: a **kube-proxy emulator** (a test double) that programs the
//!   kernel's IPVS table from Services and EndpointSlices as kube-proxy's IPVS
//!   mode does.
//! - [`rbac`]: Kubernetes RBAC evaluated as the API server does, to check
//!   `deploy/` against the requests the binaries make (recorded by the server).
//!
//! - [`consistency`]: checks for runs under faults and churn: the kernel equals
//!   what `ipvs-operator eval` computes, and a sampler that flags any ready
//!   endpoint at weight 0 no policy asked for, and any terminating endpoint
//!   raised above 0 after kube-proxy zeroed it.
//! - [`kubectl`]: the kubectl the tests run (`make setup` installs it).
//! - [`policy_dir`]: policy modules as a ConfigMap mount delivers them.
//! - [`procstat`]: a process's CPU time and memory, for benchmarks and soaks.
//! - [`testbed`]: a one-node cluster in network namespaces (inside the test VM)
//!   with the real controller and agent, for end-to-end tests and the demo.
//!
//! Neither double is meant for production: `deploy/` is what runs on real clusters.

pub mod apiserver;
pub mod consistency;
pub mod kube_proxy;
pub mod kubectl;
pub mod policy_dir;
pub mod procstat;
pub mod rbac;
pub mod testbed;

/// A binary of this workspace in the directory cargo builds into (e.g.
/// `target/release`): one or two levels up from the running test or bench
/// executable (`deps/`).
pub fn project_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let found = exe.ancestors().skip(1).take(2).map(|d| d.join(name)).find(|p| p.is_file());
    found.ok_or_else(|| {
        anyhow::anyhow!("{name} is not built next to {}: run `cargo build --release -p ipvs-operator` (or build the whole workspace)", exe.display())
    })
}
