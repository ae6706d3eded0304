//! The crate's error type: what went wrong, for which operation, and what a
//! person can do about it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use netlink_packet_core::DecodeError;

use crate::types::ServiceKey;

/// The operation a request performed; errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Operation {
    /// Opening the netlink socket.
    OpenSocket,
    /// Looking up the `IPVS` generic netlink family.
    ResolveFamily,
    GetInfo,
    ListServices,
    GetService(ServiceKey),
    ListDestinations(ServiceKey),
    AddService(ServiceKey),
    EditService(ServiceKey),
    DeleteService(ServiceKey),
    AddDestination(ServiceKey, SocketAddr),
    EditDestination(ServiceKey, SocketAddr),
    DeleteDestination(ServiceKey, SocketAddr),
    Flush,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OpenSocket => f.write_str("opening a generic netlink socket"),
            Self::ResolveFamily => f.write_str("looking up the IPVS generic netlink family"),
            Self::GetInfo => f.write_str("reading IPVS information"),
            Self::ListServices => f.write_str("listing IPVS services"),
            Self::GetService(s) => write!(f, "reading service {s}"),
            Self::ListDestinations(s) => write!(f, "listing the destinations of {s}"),
            Self::AddService(s) => write!(f, "adding service {s}"),
            Self::EditService(s) => write!(f, "updating service {s}"),
            Self::DeleteService(s) => write!(f, "deleting service {s}"),
            Self::AddDestination(s, d) => write!(f, "adding destination {d} to {s}"),
            Self::EditDestination(s, d) => write!(f, "updating destination {d} of {s}"),
            Self::DeleteDestination(s, d) => write!(f, "deleting destination {d} of {s}"),
            Self::Flush => f.write_str("flushing the IPVS table"),
        }
    }
}

impl Operation {
    /// The service the operation is about, if any.
    pub fn service(&self) -> Option<&ServiceKey> {
        match self {
            Self::GetService(s)
            | Self::ListDestinations(s)
            | Self::AddService(s)
            | Self::EditService(s)
            | Self::DeleteService(s)
            | Self::AddDestination(s, _)
            | Self::EditDestination(s, _)
            | Self::DeleteDestination(s, _) => Some(s),
            _ => None,
        }
    }
}

/// Errors of the IPVS client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpvsError {
    /// The kernel has no `IPVS` generic netlink family. (Looking it up makes
    /// the kernel try to load `ip_vs` itself, so this means it could not.)
    #[error(
        "the ip_vs kernel module is not loaded, and the kernel could not load it on demand: \
         it has no IPVS generic netlink family (load it with `modprobe ip_vs` on the node)"
    )]
    FamilyNotFound,
    /// The kernel refused the request: IPVS needs `CAP_NET_ADMIN`.
    #[error("{op}: permission denied: needs CAP_NET_ADMIN (run as root or grant the capability)")]
    PermissionDenied {
        /// What was attempted.
        op: Operation,
    },
    /// The virtual service the request names does not exist (`ESRCH`).
    #[error("{op}: the service does not exist")]
    ServiceNotFound {
        /// What was attempted; names the service.
        op: Operation,
    },
    /// The destination the request names does not exist in its service (`ENOENT`).
    #[error("{op}: the destination does not exist")]
    DestinationNotFound {
        /// What was attempted; names the service and destination.
        op: Operation,
    },
    /// The service or destination to add exists already (`EEXIST`).
    #[error("{op}: it exists already")]
    AlreadyExists {
        /// What was attempted.
        op: Operation,
    },
    /// The kernel has no such scheduler or persistence engine (`ENOENT` on a service).
    #[error("{op}: the kernel has no scheduler {scheduler:?} (is its ip_vs_{scheduler} module available?)")]
    SchedulerNotFound {
        /// What was attempted.
        op: Operation,
        /// The scheduler asked for.
        scheduler: String,
    },
    /// The request was invalid before it was sent.
    #[error("{op}: {reason}")]
    InvalidArgument {
        /// What was attempted.
        op: Operation,
        /// Why it cannot be sent.
        reason: String,
    },
    /// Any other error number from the kernel.
    #[error("{op}: the kernel answered: {}", io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// What was attempted.
        op: Operation,
        /// The positive errno.
        errno: i32,
    },
    /// No answer within the socket's timeout.
    #[error("{op}: no answer from the kernel within {timeout:?}")]
    Timeout {
        /// What was attempted.
        op: Operation,
        /// The socket's receive timeout.
        timeout: Duration,
    },
    /// The socket failed.
    #[error("{op}: netlink socket error")]
    Io {
        /// What was attempted.
        op: Operation,
        /// The socket's error.
        #[source]
        source: io::Error,
    },
    /// The kernel's answer could not be parsed.
    #[error("{op}: malformed answer from the kernel")]
    Decode {
        /// What was attempted.
        op: Operation,
        /// What was wrong with it.
        #[source]
        source: DecodeError,
    },
}

impl IpvsError {
    /// A short, stable label for metrics (`ipvs_errors_total{kind=…}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::FamilyNotFound => "family_not_found",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::ServiceNotFound { .. } => "service_not_found",
            Self::DestinationNotFound { .. } => "destination_not_found",
            Self::AlreadyExists { .. } => "already_exists",
            Self::SchedulerNotFound { .. } => "scheduler_not_found",
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::Kernel { .. } => "kernel",
            Self::Timeout { .. } => "timeout",
            Self::Io { .. } => "io",
            Self::Decode { .. } => "decode",
        }
    }

    /// The operation that failed (`None` for [`IpvsError::FamilyNotFound`]).
    pub fn operation(&self) -> Option<&Operation> {
        match self {
            Self::FamilyNotFound => None,
            Self::PermissionDenied { op }
            | Self::ServiceNotFound { op }
            | Self::DestinationNotFound { op }
            | Self::AlreadyExists { op }
            | Self::SchedulerNotFound { op, .. }
            | Self::InvalidArgument { op, .. }
            | Self::Kernel { op, .. }
            | Self::Timeout { op, .. }
            | Self::Io { op, .. }
            | Self::Decode { op, .. } => Some(op),
        }
    }

    /// Maps the kernel's errno for `op` to the typed error. `scheduler` is
    /// the scheduler a service request asked for, if any.
    pub(crate) fn from_errno(op: Operation, errno: i32, scheduler: Option<&str>) -> Self {
        match (errno, &op) {
            (libc::EPERM | libc::EACCES, _) => Self::PermissionDenied { op },
            (libc::ESRCH, op_) if op_.service().is_some() => Self::ServiceNotFound { op },
            (libc::ENOENT, Operation::EditDestination(..) | Operation::DeleteDestination(..)) => {
                Self::DestinationNotFound { op }
            }
            (libc::ENOENT, Operation::AddService(_) | Operation::EditService(_)) if scheduler.is_some() => {
                let scheduler = scheduler.unwrap_or_default().to_owned();
                Self::SchedulerNotFound { op, scheduler }
            }
            (libc::EEXIST, Operation::AddService(_) | Operation::AddDestination(..)) => Self::AlreadyExists { op },
            _ => Self::Kernel { op, errno },
        }
    }
}

/// The crate's result type.
pub type Result<T, E = IpvsError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey::tcp("10.96.0.1:80".parse().unwrap())
    }

    #[test]
    fn errnos_become_typed_errors_that_name_the_operation() {
        let dest: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let e = IpvsError::from_errno(Operation::EditDestination(key(), dest), libc::ESRCH, None);
        assert_eq!(e.metric_label(), "service_not_found");
        assert_eq!(e.to_string(), "updating destination 10.0.0.2:80 of TCP 10.96.0.1:80: the service does not exist");

        let e = IpvsError::from_errno(Operation::EditDestination(key(), dest), libc::ENOENT, None);
        assert_eq!(e.metric_label(), "destination_not_found");

        let e = IpvsError::from_errno(Operation::ListServices, libc::EPERM, None);
        assert!(e.to_string().contains("needs CAP_NET_ADMIN"), "{e}");

        let e = IpvsError::from_errno(Operation::EditService(key()), libc::ENOENT, Some("nope"));
        assert!(e.to_string().contains("no scheduler \"nope\""), "{e}");

        let e = IpvsError::from_errno(Operation::AddService(key()), libc::EINVAL, Some("rr"));
        assert_eq!(e.metric_label(), "kernel");
        assert!(e.to_string().starts_with("adding service TCP 10.96.0.1:80: the kernel answered: Invalid argument"), "{e}");
    }

    #[test]
    fn family_not_found_says_what_to_do() {
        assert!(IpvsError::FamilyNotFound.to_string().contains("the ip_vs kernel module is not loaded"));
    }
}
