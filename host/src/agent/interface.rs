//! The dummy interface standalone Services' addresses live on ([`INTERFACE`],
//! `ipvs-op0`), through rtnetlink: IPVS only intercepts packets addressed to
//! the node, so a ClusterIP must be a local address, as kube-proxy's IPVS mode
//! puts its own on `kube-ipvs0`. The interface stays down (a dummy delivers
//! locally either way, and down it answers no ARP for them), and each address
//! is a host address (/32, /128), so that no route to a whole range appears.
//!
//! The interface is ours: whatever addresses it holds are what a previous
//! agent put there, adopted at start and corrected to what is wanted.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::{Handle, LinkDummy};

pub use super::standalone::INTERFACE;

/// `EEXIST` and `ENODEV`, negated as netlink reports them.
const EEXIST: i32 = -libc::EEXIST;
const ENODEV: i32 = -libc::ENODEV;
const EADDRNOTAVAIL: i32 = -libc::EADDRNOTAVAIL;

/// What failed on the interface, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    /// No rtnetlink socket (no `CAP_NET_ADMIN` is reported at the first write instead).
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A request the kernel refused.
    #[error("{action} on {interface}: {source}")]
    Request {
        /// What was asked (e.g. "adding 10.96.0.10/32").
        action: String,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

fn code(error: &rtnetlink::Error) -> i32 {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.raw_code(),
        _ => 0,
    }
}

/// The dummy interface, created if missing.
pub struct Interface {
    handle: Handle,
    name: String,
    index: u32,
}

/// The addresses added and removed by [`Interface::sync`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AddressChanges {
    /// Added.
    pub added: Vec<IpAddr>,
    /// Removed.
    pub removed: Vec<IpAddr>,
}

/// An rtnetlink connection, its task spawned on the current tokio runtime.
pub fn connect() -> Result<Handle, InterfaceError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(InterfaceError::Socket)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The index of interface `name`, if it exists.
async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, InterfaceError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        Err(e) if code(&e) == ENODEV => Ok(None),
        Err(source) => Err(InterfaceError::Request { action: "looking up".into(), interface: name.into(), source }),
    }
}

impl Interface {
    /// Interface `name`, made (a dummy) when it does not exist.
    pub async fn ensure(handle: Handle, name: &str) -> Result<Self, InterfaceError> {
        if let Some(index) = index_of(&handle, name).await? {
            return Ok(Self { handle, name: name.into(), index });
        }
        match handle.link().add(LinkDummy::new(name).build()).execute().await {
            Ok(()) => {}
            // Made meanwhile by someone else: use it.
            Err(e) if code(&e) == EEXIST => {}
            Err(source) => return Err(InterfaceError::Request { action: "creating".into(), interface: name.into(), source }),
        }
        let index = index_of(&handle, name).await?.ok_or_else(|| InterfaceError::Request {
            action: "finding the interface just created".into(),
            interface: name.into(),
            source: rtnetlink::Error::RequestFailed,
        })?;
        tracing::info!(interface = name, index, "created the dummy interface for standalone Services");
        Ok(Self { handle, name: name.into(), index })
    }

    /// Interface `name` if it exists (for cleanup).
    pub async fn existing(handle: Handle, name: &str) -> Result<Option<Self>, InterfaceError> {
        Ok(index_of(&handle, name).await?.map(|index| Self { handle, name: name.into(), index }))
    }

    fn error(&self, action: String, source: rtnetlink::Error) -> InterfaceError {
        InterfaceError::Request { action, interface: self.name.clone(), source }
    }

    /// The addresses on the interface, as the kernel has them.
    pub async fn addresses(&self) -> Result<Vec<(IpAddr, AddressMessage)>, InterfaceError> {
        let mut out = Vec::new();
        let mut messages = self.handle.address().get().set_link_index_filter(self.index).execute();
        while let Some(message) = messages.try_next().await.map_err(|e| self.error("listing addresses".into(), e))? {
            let address = message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(address) = address {
                out.push((address, message));
            }
        }
        Ok(out)
    }

    /// Makes the interface hold exactly `wanted`: adds what is missing,
    /// removes the rest; writes nothing when it already does.
    pub async fn sync(&self, wanted: &BTreeSet<IpAddr>) -> Result<AddressChanges, InterfaceError> {
        let current = self.addresses().await?;
        let mut changes = AddressChanges::default();
        let have: BTreeSet<IpAddr> = current.iter().map(|(ip, _)| *ip).collect();
        for ip in wanted.difference(&have) {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            match self.handle.address().add(self.index, *ip, prefix).execute().await {
                Ok(()) => {}
                Err(e) if code(&e) == EEXIST => {}
                Err(e) => return Err(self.error(format!("adding {ip}/{prefix}"), e)),
            }
            changes.added.push(*ip);
        }
        for (ip, message) in current.into_iter().filter(|(ip, _)| !wanted.contains(ip)) {
            match self.handle.address().del(message).execute().await {
                Ok(()) => {}
                Err(e) if code(&e) == EADDRNOTAVAIL => {}
                Err(e) => return Err(self.error(format!("removing {ip}"), e)),
            }
            changes.removed.push(ip);
        }
        Ok(changes)
    }

    /// Deletes the interface (and its addresses with it).
    pub async fn delete(self) -> Result<(), InterfaceError> {
        match self.handle.link().del(self.index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if code(&e) == ENODEV => Ok(()),
            Err(e) => Err(self.error("deleting".into(), e)),
        }
    }

    /// The interface's index.
    pub fn index(&self) -> u32 {
        self.index
    }
}
