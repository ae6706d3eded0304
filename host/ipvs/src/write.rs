//! Writes to the IPVS table: what [`crate::IpvsClient::apply`] sends.

use std::net::SocketAddr;

use crate::constants::{IP_VS_PENAME_MAXLEN, IP_VS_SCHEDNAME_MAXLEN};
use crate::error::{IpvsError, Operation};
use crate::message::{IpvsAttr, IpvsCmd};
use crate::types::{Destination, Service, ServiceKey};

/// The largest weight this crate writes: kube-proxy reads weights as 16 bits.
pub const MAX_WEIGHT: u32 = u16::MAX as u32;

/// One change to the IPVS table.
///
/// Behind kube-proxy the agent only produces [`Write::EditService`] (via
/// [`Write::set_scheduler`]) and [`Write::EditDestination`] (via
/// [`Write::set_weight`]); adding and deleting are for the virtual services
/// it owns ([`crate::plan_owned`]), tests and the kube-proxy emulator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// `IPVS_CMD_NEW_SERVICE`.
    AddService(Service),
    /// `IPVS_CMD_SET_SERVICE`: scheduler, flags, timeout, netmask and
    /// persistence engine become exactly those given.
    EditService(Service),
    /// `IPVS_CMD_DEL_SERVICE` (its destinations go with it).
    DeleteService(ServiceKey),
    /// `IPVS_CMD_NEW_DEST`.
    AddDestination {
        /// The service to add it to.
        service: ServiceKey,
        /// The destination; weight at most [`MAX_WEIGHT`].
        destination: Destination,
    },
    /// `IPVS_CMD_SET_DEST`: forwarding method, weight, thresholds and tunnel
    /// settings become exactly those given (the kernel resets what is left out).
    EditDestination {
        /// The destination's service.
        service: ServiceKey,
        /// The destination as it should be; weight at most [`MAX_WEIGHT`].
        destination: Destination,
    },
    /// `IPVS_CMD_DEL_DEST`.
    DeleteDestination {
        /// The destination's service.
        service: ServiceKey,
        /// Which destination.
        destination: SocketAddr,
    },
}

impl Write {
    /// Changes only the weight of `current`, a destination as the kernel
    /// reported it: forwarding method, thresholds and tunnel settings are
    /// sent back as they were.
    pub fn set_weight(service: ServiceKey, current: &Destination, weight: u16) -> Self {
        let mut destination = current.clone();
        destination.weight = u32::from(weight);
        Self::EditDestination { service, destination }
    }

    /// Changes only the scheduler of `current`, a service as the kernel
    /// reported it: flags, timeout, netmask and persistence engine are sent
    /// back as they were.
    pub fn set_scheduler(current: &Service, scheduler: impl Into<String>) -> Self {
        let mut service = current.clone();
        service.scheduler = scheduler.into();
        Self::EditService(service)
    }

    /// The operation, as errors name it.
    pub fn operation(&self) -> Operation {
        match self {
            Self::AddService(s) => Operation::AddService(s.key),
            Self::EditService(s) => Operation::EditService(s.key),
            Self::DeleteService(k) => Operation::DeleteService(*k),
            Self::AddDestination { service, destination } => {
                Operation::AddDestination(*service, destination.socket_addr())
            }
            Self::EditDestination { service, destination } => {
                Operation::EditDestination(*service, destination.socket_addr())
            }
            Self::DeleteDestination { service, destination } => Operation::DeleteDestination(*service, *destination),
        }
    }

    /// The scheduler a service write asks for (to name it in errors).
    pub(crate) fn scheduler(&self) -> Option<&str> {
        match self {
            Self::AddService(s) | Self::EditService(s) => Some(&s.scheduler),
            _ => None,
        }
    }

    /// The request: command and attributes, after checking what the kernel
    /// would refuse or silently mangle.
    pub(crate) fn request(&self) -> Result<(IpvsCmd, Vec<IpvsAttr>), IpvsError> {
        let invalid = |reason: String| IpvsError::InvalidArgument { op: self.operation(), reason };
        match self {
            Self::AddService(s) | Self::EditService(s) => {
                if s.scheduler.is_empty() || s.scheduler.len() >= IP_VS_SCHEDNAME_MAXLEN || s.scheduler.contains('\0') {
                    return Err(invalid(format!(
                        "scheduler name {:?} must be 1 to {} bytes",
                        s.scheduler,
                        IP_VS_SCHEDNAME_MAXLEN - 1
                    )));
                }
                if let Some(pe) = &s.persistence_engine
                    && (pe.len() >= IP_VS_PENAME_MAXLEN || pe.contains('\0'))
                {
                    return Err(invalid(format!("persistence engine name {pe:?} is too long")));
                }
                if let ServiceKey::Fwmark { mark: 0, .. } = s.key {
                    return Err(invalid("a firewall mark of 0 means no mark".into()));
                }
                let cmd = if matches!(self, Self::AddService(_)) { IpvsCmd::NewService } else { IpvsCmd::SetService };
                Ok((cmd, vec![IpvsAttr::Service(s.to_attrs())]))
            }
            Self::DeleteService(key) => Ok((IpvsCmd::DelService, vec![IpvsAttr::Service(key.to_attrs())])),
            Self::AddDestination { service, destination } | Self::EditDestination { service, destination } => {
                if destination.weight > MAX_WEIGHT {
                    return Err(invalid(format!(
                        "weight {} is above {MAX_WEIGHT}, the largest kube-proxy reads correctly",
                        destination.weight
                    )));
                }
                let cmd = if matches!(self, Self::AddDestination { .. }) { IpvsCmd::NewDest } else { IpvsCmd::SetDest };
                Ok((
                    cmd,
                    vec![IpvsAttr::Service(service.to_attrs()), IpvsAttr::Destination(destination.to_attrs())],
                ))
            }
            Self::DeleteDestination { service, destination } => Ok((
                IpvsCmd::DelDest,
                vec![
                    IpvsAttr::Service(service.to_attrs()),
                    IpvsAttr::Destination(Destination::key_attrs(*destination)),
                ],
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ForwardMethod;

    #[test]
    fn a_weight_above_65535_is_refused_before_sending() {
        let mut destination = Destination::new("10.0.0.2:80".parse().unwrap(), ForwardMethod::Masquerade, 1);
        destination.weight = 65_536;
        let write = Write::EditDestination { service: ServiceKey::tcp("10.0.0.1:80".parse().unwrap()), destination };
        let err = write.request().unwrap_err();
        assert_eq!(err.metric_label(), "invalid_argument");
        assert!(err.to_string().contains("weight 65536"), "{err}");
        assert!(err.to_string().contains("updating destination 10.0.0.2:80 of TCP 10.0.0.1:80"), "{err}");
    }

    #[test]
    fn scheduler_names_must_fit_the_kernels_buffer() {
        let service = Service::new(ServiceKey::tcp("10.0.0.1:80".parse().unwrap()), "rr");
        assert!(Write::set_scheduler(&service, "a-very-long-name").request().is_err());
        assert!(Write::set_scheduler(&service, "").request().is_err());
        assert!(Write::set_scheduler(&service, "wrr").request().is_ok());
    }

    #[test]
    fn set_weight_changes_nothing_but_the_weight() {
        let service = ServiceKey::tcp("10.0.0.1:80".parse().unwrap());
        let mut current = Destination::new("10.0.0.2:80".parse().unwrap(), ForwardMethod::DirectRoute, 1);
        current.lower_threshold = 4;
        current.active_connections = 9;
        let Write::EditDestination { destination, .. } = Write::set_weight(service, &current, 65_535) else {
            panic!()
        };
        assert_eq!(destination, Destination { weight: 65_535, ..current });
    }
}
