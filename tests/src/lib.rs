//! Test doubles for ipvs-operator's end-to-end tests.
//!
//! - [`apiserver`]: a Kubernetes **test API server** (a test double) that kube-rs
//!   and kubectl run against unmodified, with an emulated cluster behind it
//!   (Deployments, pods with IPs, EndpointSlices) and fault injection.
//!
//! Neither is meant for production: `deploy/` is what runs on real clusters.

pub mod apiserver;
