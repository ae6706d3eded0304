//! What the emulator needs of IPVS: a dump and a pass of writes. The real
//! kernel through the `ipvs` crate, or [`FakeIpvs`], an in-memory table for
//! tests that run without a kernel.

use ipvs::{Destination, IpvsClient, IpvsError, ServiceEntry, Write};

/// The IPVS operations the emulator uses.
pub trait IpvsOps: Send {
    /// Every virtual service with its destinations.
    fn dump(&mut self) -> Result<Vec<ServiceEntry>, IpvsError>;
    /// Applies writes in order; one result per write.
    fn apply(&mut self, writes: &[Write]) -> Vec<Result<(), IpvsError>>;
}

impl IpvsOps for IpvsClient {
    fn dump(&mut self) -> Result<Vec<ServiceEntry>, IpvsError> {
        IpvsClient::dump(self)
    }
    fn apply(&mut self, writes: &[Write]) -> Vec<Result<(), IpvsError>> {
        IpvsClient::apply(self, writes)
    }
}

/// An in-memory IPVS table that behaves as the kernel does for the writes
/// kube-proxy sends (a test double). Connection counts are set by tests.
#[derive(Debug, Default, Clone)]
pub struct FakeIpvs {
    /// The table.
    pub entries: Vec<ServiceEntry>,
}

impl FakeIpvs {
    fn find(&mut self, key: &ipvs::ServiceKey) -> Option<&mut ServiceEntry> {
        self.entries.iter_mut().find(|e| e.service.key == *key)
    }

    fn write(&mut self, w: &Write) -> Result<(), IpvsError> {
        let not_found = || IpvsError::ServiceNotFound { op: w.operation() };
        match w {
            Write::AddService(s) => {
                if self.find(&s.key).is_some() {
                    return Err(IpvsError::AlreadyExists { op: w.operation() });
                }
                let mut s = s.clone();
                s.flags |= 0x0002; // IP_VS_SVC_F_HASHED, as the kernel reports it
                self.entries.push(ServiceEntry { service: s, destinations: Vec::new() });
            }
            Write::EditService(s) => {
                let e = self.find(&s.key).ok_or_else(not_found)?;
                let stats = e.service.stats.clone();
                e.service = s.clone();
                e.service.flags |= 0x0002;
                e.service.stats = stats;
            }
            Write::DeleteService(k) => {
                let before = self.entries.len();
                self.entries.retain(|e| e.service.key != *k);
                if self.entries.len() == before {
                    return Err(not_found());
                }
            }
            Write::AddDestination { service, destination } => {
                let e = self.find(service).ok_or_else(not_found)?;
                if e.destinations.iter().any(|d| d.socket_addr() == destination.socket_addr()) {
                    return Err(IpvsError::AlreadyExists { op: w.operation() });
                }
                e.destinations.push(destination.clone());
            }
            Write::EditDestination { service, destination } => {
                let e = self.find(service).ok_or_else(not_found)?;
                let d = e
                    .destinations
                    .iter_mut()
                    .find(|d| d.socket_addr() == destination.socket_addr())
                    .ok_or(IpvsError::DestinationNotFound { op: w.operation() })?;
                let (a, i) = (d.active_connections, d.inactive_connections);
                *d = Destination { active_connections: a, inactive_connections: i, ..destination.clone() };
            }
            Write::DeleteDestination { service, destination } => {
                let e = self.find(service).ok_or_else(not_found)?;
                let before = e.destinations.len();
                e.destinations.retain(|d| d.socket_addr() != *destination);
                if e.destinations.len() == before {
                    return Err(IpvsError::DestinationNotFound { op: w.operation() });
                }
            }
        }
        Ok(())
    }
}

impl IpvsOps for FakeIpvs {
    fn dump(&mut self) -> Result<Vec<ServiceEntry>, IpvsError> {
        Ok(self.entries.clone())
    }
    fn apply(&mut self, writes: &[Write]) -> Vec<Result<(), IpvsError>> {
        writes.iter().map(|w| self.write(w)).collect()
    }
}

/// A [`FakeIpvs`] shared with the test that inspects and changes it.
impl IpvsOps for std::sync::Arc<std::sync::Mutex<FakeIpvs>> {
    fn dump(&mut self) -> Result<Vec<ServiceEntry>, IpvsError> {
        Ok(self.lock().map(|f| f.entries.clone()).unwrap_or_default())
    }
    fn apply(&mut self, writes: &[Write]) -> Vec<Result<(), IpvsError>> {
        match self.lock() {
            Ok(mut f) => writes.iter().map(|w| f.write(w)).collect(),
            Err(p) => {
                let mut f = p.into_inner();
                writes.iter().map(|w| f.write(w)).collect()
            }
        }
    }
}
