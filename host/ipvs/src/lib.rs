//! Linux IPVS (IP Virtual Server) over generic netlink.
//!
//! What ipvs-operator's node agent uses to read the kernel's IPVS table and
//! change destination weights and service schedulers beside kube-proxy; the
//! tests and the kube-proxy emulator also add and delete.
//!
//! - [`IpvsClient`] owns a netlink socket: [`IpvsClient::dump`] reads every
//!   service with its destinations, [`IpvsClient::apply`] sends a pass of
//!   [`Write`]s pipelined and reports a result per write.
//! - [`plan`] compares a [`DesiredService`] list with a dump and returns the
//!   minimal writes; a pass over unchanged state writes nothing.
//! - [`SockoptTable`] reads the IPv4 services with their schedulers and
//!   weights through the older `getsockopt` interface: a cheap periodic read
//!   (IPv6 services are not shown there).
//! - [`render_ipvsadm`] prints a dump exactly as `ipvsadm -Ln` does.
//! - [`IpvsError`] says which operation failed and what to do about it.
//!
//! ```no_run
//! use ipvs::{DesiredService, IpvsClient, ServiceKey, plan};
//!
//! # fn main() -> Result<(), ipvs::IpvsError> {
//! let mut client = IpvsClient::new()?;
//! let vip = ServiceKey::tcp("10.96.0.10:80".parse().unwrap());
//! let desired = [DesiredService::new(vip)
//!     .with_scheduler("wrr")
//!     .with_weight("10.244.1.5:8080".parse().unwrap(), 10)
//!     .with_weight("10.244.2.7:8080".parse().unwrap(), 1)];
//! let plan = plan(&desired, &client.dump()?);
//! for (write, result) in plan.writes.iter().zip(client.apply(&plan.writes)) {
//!     if let Err(e) = result {
//!         eprintln!("{:?}: {e}", write.operation());
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The wire layer follows `netlink-packet-generic`'s pattern: [`IpvsMessage`]
//! implements `GenlFamily`; [`nlas`] holds one attribute enum per nested set
//! of `include/uapi/linux/ip_vs.h`, whose constants are in [`constants`] with
//! the kernel's names. Unknown attributes are kept as `Other` and skipped.
//!
//! Requirements: the `ip_vs` module, loaded or loadable (looking the IPVS
//! family up makes the kernel load it on demand; else
//! [`IpvsError::FamilyNotFound`]), and `CAP_NET_ADMIN` in the socket's network
//! namespace, for reading too (else [`IpvsError::PermissionDenied`]). A new
//! network namespace needs an address (`lo` up) before the kernel accepts
//! IPv4 destinations.

#![warn(missing_docs)]

mod client;
pub mod constants;
mod diff;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod message;
mod owned;
pub mod nlas;
mod sockopt;
mod table;
mod types;
mod write;

pub use client::{Counters, DEFAULT_TIMEOUT, IpvsClient};

/// Netlink plumbing the agent's other netlink clients (nftables) share.
pub mod netlink {
    pub use crate::client::{messages, set_timeout};
}
pub use diff::{DesiredService, Plan, plan};
pub use error::{IpvsError, Operation, Result};
pub use message::{IpvsAttr, IpvsCmd, IpvsMessage};
pub use owned::{OwnedPlan, OwnedService, plan_owned};
pub use sockopt::{SockoptService, SockoptTable};
pub use table::render_ipvsadm;
pub use types::{
    AddressFamily, Destination, ForwardMethod, Info, Protocol, Service, ServiceEntry, ServiceKey, Stats, Tunnel,
    TunnelType,
};
pub use write::{MAX_WEIGHT, Write};
