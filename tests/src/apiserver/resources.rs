//! The resource kinds the test API server serves, as discovery describes them.
//!
//! Objects are stored as JSON per kind; this table is all the server knows about
//! a kind's shape: where it lives in the URL space, whether it is namespaced,
//! and whether it has a `status` subresource.

/// One resource kind served by the test API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceKind {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// The URL plural, e.g. `pods`.
    pub plural: &'static str,
    /// The singular name, as discovery gives it.
    pub singular: &'static str,
    /// The `kind`, e.g. `Pod`.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether the kind has a `status` subresource (main-resource writes then keep
    /// the old status, and status writes keep everything else).
    pub status: bool,
    /// Short names kubectl accepts, e.g. `svc`.
    pub short_names: &'static [&'static str],
}

impl ResourceKind {
    /// `apiVersion` as objects carry it: `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name errors use for the kind: `pods`, or `weightedservices.codesink.net`.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn kind(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    short_names: &'static [&'static str],
) -> ResourceKind {
    ResourceKind { group, version, plural, singular, kind, namespaced, status, short_names }
}

/// Every kind served. Index into this table is a kind's id in the store.
pub static KINDS: &[ResourceKind] = &[
    kind("codesink.net", "v1alpha1", "weightedservices", "weightedservice", "WeightedService", true, true, &["wsvc"]),
    // What the controller publishes of each WeightedService's pods for the agents (no status).
    kind("codesink.net", "v1alpha1", "podinfoslices", "podinfoslice", "PodInfoSlice", true, false, &[]),
    kind("", "v1", "services", "service", "Service", true, true, &["svc"]),
    kind("", "v1", "pods", "pod", "Pod", true, true, &["po"]),
    kind("", "v1", "nodes", "node", "Node", false, true, &["no"]),
    kind("", "v1", "namespaces", "namespace", "Namespace", false, true, &["ns"]),
    kind("", "v1", "events", "event", "Event", true, false, &["ev"]),
    kind("", "v1", "configmaps", "configmap", "ConfigMap", true, false, &["cm"]),
    kind("", "v1", "secrets", "secret", "Secret", true, false, &[]),
    kind("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, false, &["sa"]),
    kind("", "v1", "resourcequotas", "resourcequota", "ResourceQuota", true, true, &["quota"]),
    kind("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, false, &[]),
    kind("events.k8s.io", "v1", "events", "event", "Event", true, false, &["ev"]),
    kind("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, false, &[]),
    kind("apps", "v1", "deployments", "deployment", "Deployment", true, true, &["deploy"]),
    kind("apps", "v1", "daemonsets", "daemonset", "DaemonSet", true, true, &["ds"]),
    kind("policy", "v1", "poddisruptionbudgets", "poddisruptionbudget", "PodDisruptionBudget", true, true, &["pdb"]),
    kind("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole", false, false, &[]),
    kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, false, &[]),
    kind("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", true, false, &[]),
    kind("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding", true, false, &[]),
    kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "customresourcedefinition", "CustomResourceDefinition", false, true, &["crd", "crds"]),
];

/// A kind's index in [`KINDS`].
pub type KindId = usize;

/// Finds a kind by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<KindId> {
    KINDS.iter().position(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Finds a kind by `apiVersion` and `kind`, as a manifest names it.
pub fn find_by_kind(api_version: &str, kind: &str) -> Option<KindId> {
    let (group, version) = split_api_version(api_version);
    KINDS.iter().position(|k| k.group == group && k.version == version && k.kind == kind)
}

/// Finds a kind by its plural alone (the first match: core before the others).
pub fn find_by_plural(plural: &str) -> Option<KindId> {
    KINDS.iter().position(|k| k.plural == plural)
}

/// Whether the kind takes strategic merge patches (`application/strategic-merge-patch+json`):
/// built-in kinds do; custom resources and CRDs do not.
pub fn strategic_merge_patch(kind: KindId) -> bool {
    let k = &KINDS[kind];
    !(k.group == "codesink.net" || k.group == "apiextensions.k8s.io")
}

/// Splits `group/version` (or `v1`) into its parts.
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// The groups served, in discovery order, each with its one version.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = Vec::new();
    for k in KINDS {
        if !k.group.is_empty() && !out.iter().any(|(g, _)| *g == k.group) {
            out.push((k.group, k.version));
        }
    }
    out
}

/// Ids of well-known kinds the built-in controllers use.
pub mod ids {
    use super::{KindId, find};

    fn must(group: &str, plural: &str) -> KindId {
        // The table above is static: a miss is a programming error caught by the unit test.
        find(group, "v1", plural).unwrap_or(usize::MAX)
    }

    /// `v1/pods`.
    pub fn pods() -> KindId {
        must("", "pods")
    }
    /// `v1/services`.
    pub fn services() -> KindId {
        must("", "services")
    }
    /// `v1/nodes`.
    pub fn nodes() -> KindId {
        must("", "nodes")
    }
    /// `v1/namespaces`.
    pub fn namespaces() -> KindId {
        must("", "namespaces")
    }
    /// `discovery.k8s.io/v1/endpointslices`.
    pub fn endpointslices() -> KindId {
        must("discovery.k8s.io", "endpointslices")
    }
    /// `apps/v1/deployments`.
    pub fn deployments() -> KindId {
        must("apps", "deployments")
    }
    /// `apps/v1/daemonsets`.
    pub fn daemonsets() -> KindId {
        must("apps", "daemonsets")
    }
    /// `v1/events` (the core group's view of Events).
    pub fn core_events() -> KindId {
        must("", "events")
    }
    /// `events.k8s.io/v1/events` (the same Events, in the newer schema).
    pub fn events() -> KindId {
        must("events.k8s.io", "events")
    }
    /// `apiextensions.k8s.io/v1/customresourcedefinitions`.
    pub fn crds() -> KindId {
        must("apiextensions.k8s.io", "customresourcedefinitions")
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn well_known_ids_resolve() {
        for id in [
            ids::pods(),
            ids::services(),
            ids::nodes(),
            ids::namespaces(),
            ids::endpointslices(),
            ids::deployments(),
            ids::daemonsets(),
            ids::core_events(),
            ids::events(),
            ids::crds(),
        ] {
            assert!(id < KINDS.len());
        }
        assert_eq!(KINDS[ids::endpointslices()].kind, "EndpointSlice");
    }

    #[test]
    fn lookups() {
        assert_eq!(find_by_kind("codesink.net/v1alpha1", "WeightedService"), Some(0));
        assert_eq!(KINDS[0].qualified_plural(), "weightedservices.codesink.net");
        let slices = find_by_kind("codesink.net/v1alpha1", "PodInfoSlice").expect("PodInfoSlices are served");
        assert_eq!(KINDS[slices].qualified_plural(), "podinfoslices.codesink.net");
        assert!(KINDS[slices].namespaced && !KINDS[slices].status);
        assert_eq!(find("codesink.net", "v1alpha1", "podinfoslices"), Some(slices));
        assert!(!strategic_merge_patch(slices), "a custom resource takes no strategic merge patch");
        assert_eq!(KINDS[ids::pods()].api_version(), "v1");
        assert!(groups().contains(&("events.k8s.io", "v1")));
    }
}
