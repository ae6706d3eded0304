//! Confirming with the API server, not the watch cache, that an endpoint may
//! carry traffic, before the agent raises a kernel weight of 0 it did not
//! write itself. kube-proxy drains a removed endpoint by setting its weight to
//! 0 once; the agent's watch may be behind kube-proxy's, and what its cache
//! still calls ready may be a pod shutting down. A weight of 0 this process
//! wrote is its own to raise; any other (kube-proxy's, or one written before
//! a restart) needs a fresh read.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use crate::cluster::SERVICE_NAME_LABEL;

/// Why the endpoints could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The API server answered with an error, or could not be reached.
    #[error("listing the EndpointSlices of {namespace}/{service}: {source}")]
    Api {
        /// The Service's namespace.
        namespace: String,
        /// The Service.
        service: String,
        /// What went wrong.
        source: kube::Error,
    },
    /// No answer in time.
    #[error("listing the EndpointSlices of {namespace}/{service}: no answer in {timeout:?}")]
    Timeout {
        /// The Service's namespace.
        namespace: String,
        /// The Service.
        service: String,
        /// How long it waited.
        timeout: Duration,
    },
}

/// Reads a Service's endpoints as the API server has them now.
pub trait EndpointReader: Send {
    /// The addresses of `service`'s endpoints that are ready and not
    /// terminating, from a fresh (quorum) read of its EndpointSlices.
    fn ready_addresses(&mut self, namespace: &str, service: &str) -> Result<HashSet<IpAddr>, ReadError>;
}

/// The addresses of the ready, non-terminating endpoints of `slices`
/// (EndpointSlice semantics: an unknown `ready` is ready).
pub fn ready_addresses<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    for endpoint in slices.into_iter().flat_map(|s| s.endpoints.iter().flatten()) {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        if ready && !terminating {
            out.extend(endpoint.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()));
        }
    }
    out
}

/// An [`EndpointReader`] over the API server, for the agent's work loop (a
/// thread of its own, outside the runtime whose handle it holds).
pub struct ApiEndpointReader {
    client: kube::Client,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl ApiEndpointReader {
    /// Reads through `client`, on `runtime`, waiting at most `timeout` for an answer.
    pub fn new(client: kube::Client, runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        ApiEndpointReader { client, runtime, timeout }
    }
}

impl EndpointReader for ApiEndpointReader {
    fn ready_addresses(&mut self, namespace: &str, service: &str) -> Result<HashSet<IpAddr>, ReadError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
        // No resourceVersion: a quorum read, never the API server's watch cache.
        let params = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
        let list = self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, api.list(&params)).await })
            .map_err(|_| ReadError::Timeout { namespace: namespace.into(), service: service.into(), timeout: self.timeout })?
            .map_err(|source| ReadError::Api { namespace: namespace.into(), service: service.into(), source })?;
        Ok(ready_addresses(&list.items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_non_terminating_endpoints_count() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-abc", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.7"], "conditions": {"ready": false}},
                {"addresses": ["10.244.1.8"]},
            ],
        }))
        .unwrap();
        let ready = ready_addresses([&slice]);
        let expected: HashSet<IpAddr> = ["10.244.1.5".parse().unwrap(), "10.244.1.8".parse().unwrap()].into();
        assert_eq!(ready, expected);
    }
}
