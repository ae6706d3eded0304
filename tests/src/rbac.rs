//! Kubernetes RBAC, evaluated the way the API server's RBAC authorizer does,
//! to check `deploy/` against the requests the binaries really make.
//!
//! [`Rbac::parse`] reads rendered manifests (`kubectl kustomize deploy/`):
//! ClusterRoles, Roles and their bindings; other kinds are ignored.
//! [`Rbac::allows`] answers "may this ServiceAccount make this request?";
//! [`check_requests`] turns that into findings over the requests the test API
//! server recorded ([`RequestRecord`]), and [`unused_permissions`] finds what
//! the RBAC grants that no recorded request used ("least privilege": nothing
//! more than what is used). [`lint`] checks what no deployment should grant
//! (wildcards, Secrets, privilege escalation verbs).
//!
//! The semantics follow `k8s.io/component-helpers/auth/rbac/validation` and
//! `plugin/pkg/auth/authorizer/rbac`:
//! - a rule matches when its verbs, API groups, resources (`resource` or
//!   `resource/subresource`; `*` is every resource and subresource; `*/sub` is
//!   that subresource of every resource) and, if any, resource names match;
//!   RBAC only ever allows, nothing denies;
//! - a ClusterRoleBinding grants its ClusterRole everywhere; a RoleBinding
//!   grants its Role or ClusterRole only in the binding's namespace, and never
//!   cluster-scoped resources, all-namespace requests or non-resource URLs;
//! - a ServiceAccount subject with no namespace means the binding's namespace;
//!   a ServiceAccount is also the user `system:serviceaccount:NS:NAME` in the
//!   groups `system:serviceaccounts`, `system:serviceaccounts:NS` and
//!   `system:authenticated`;
//! - a server-side apply (or an update) that creates its object is authorized
//!   as `create` as well as `patch` (`update`): the API server checks both.
//!
//! Every cluster also grants every authenticated user the discovery and
//! version URLs (the default `system:discovery` and `system:public-info-viewer`
//! ClusterRoles); [`Rbac::with_kubernetes_defaults`] adds those.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject};
use serde::Deserialize;

use crate::apiserver::RequestRecord;

/// Why manifests could not be read as RBAC.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// A YAML document is not YAML, or has no `kind`.
    #[error("document {index}: {message}")]
    Document {
        /// Its position among the documents, from 0.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// An RBAC object does not parse into its type.
    #[error("{kind} {name}: {source}")]
    Object {
        /// Its kind.
        kind: String,
        /// Its name.
        name: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A ServiceAccount name is neither `NAMESPACE/NAME` nor `system:serviceaccount:NAMESPACE:NAME`.
    #[error("{0:?} is not a ServiceAccount: write NAMESPACE/NAME or system:serviceaccount:NAMESPACE:NAME")]
    ServiceAccount(String),
}

/// A ServiceAccount, the identity a pod's requests are authorized as.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccount {
    /// The ServiceAccount `name` in `namespace`.
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceAccount { namespace: namespace.into(), name: name.into() }
    }

    /// The user name the API server authenticates its tokens as.
    pub fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// The groups its tokens carry.
    pub fn groups(&self) -> [String; 3] {
        [
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".into(),
        ]
    }

    /// Whether a binding's subject (of a binding in `binding_namespace`, empty
    /// for a ClusterRoleBinding) names this ServiceAccount.
    fn is(&self, subject: &Subject, binding_namespace: &str) -> bool {
        match subject.kind.as_str() {
            "ServiceAccount" => {
                let namespace = subject.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(binding_namespace);
                subject.name == self.name && namespace == self.namespace
            }
            "User" => subject.name == self.user(),
            "Group" => self.groups().contains(&subject.name),
            _ => false,
        }
    }
}

impl FromStr for ServiceAccount {
    type Err = RbacError;

    /// `NAMESPACE/NAME` or `system:serviceaccount:NAMESPACE:NAME`.
    fn from_str(text: &str) -> Result<Self, RbacError> {
        let parts = match text.strip_prefix("system:serviceaccount:") {
            Some(rest) => rest.split_once(':'),
            None => text.split_once('/'),
        };
        match parts {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains(['/', ':']) => {
                Ok(ServiceAccount::new(namespace, name))
            }
            _ => Err(RbacError::ServiceAccount(text.into())),
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the authorizer looks at in a request (Kubernetes' `authorizer.Attributes`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete, deletecollection; for a
    /// non-resource URL the lowercase HTTP method.
    pub verb: String,
    /// API group, "" for the core group.
    pub group: String,
    /// Resource plural; empty for a non-resource URL.
    pub resource: String,
    /// Subresource, e.g. `status`.
    pub subresource: String,
    /// Namespace; empty for cluster-scoped resources and all-namespace requests.
    pub namespace: String,
    /// Object name; empty for collections and creates.
    pub name: String,
    /// The URL path (what non-resource rules match).
    pub path: String,
}

impl Attributes {
    /// A resource request.
    pub fn resource(verb: &str, group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    /// A request for a non-resource URL (`/version`, `/apis`, …).
    pub fn non_resource(verb: &str, path: &str) -> Self {
        Attributes {
            verb: verb.into(),
            group: String::new(),
            resource: String::new(),
            subresource: String::new(),
            namespace: String::new(),
            name: String::new(),
            path: path.into(),
        }
    }

    /// What the API server authorizes for one recorded request: usually one
    /// check; two when a patch or an update created its object (201), which
    /// the API server also authorizes as `create`.
    pub fn of(record: &RequestRecord) -> Vec<Attributes> {
        if record.resource.is_empty() {
            return vec![Attributes::non_resource(&record.verb, &record.path)];
        }
        let first = Attributes {
            verb: record.verb.clone(),
            group: record.group.clone(),
            resource: record.resource.clone(),
            subresource: record.subresource.clone(),
            namespace: record.namespace.clone(),
            name: record.name.clone(),
            path: record.path.clone(),
        };
        let created = record.code == 201 && matches!(record.verb.as_str(), "patch" | "update");
        let mut out = vec![first.clone()];
        if created {
            out.push(Attributes { verb: "create".into(), ..first });
        }
        out
    }

    fn is_resource(&self) -> bool {
        !self.resource.is_empty()
    }

    /// `resource` or `resource/subresource`, as rules spell it.
    fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

impl fmt::Display for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_resource() {
            return write!(f, "{} {}", self.verb, self.path);
        }
        let group = if self.group.is_empty() { "core" } else { &self.group };
        write!(f, "{} {}/{}", self.verb, group, self.combined_resource())?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        if self.namespace.is_empty() {
            write!(f, " (cluster-wide)")
        } else {
            write!(f, " in namespace {}", self.namespace)
        }
    }
}

/// Where a rule applies, from the binding that grants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A ClusterRoleBinding: everywhere.
    Cluster,
    /// A RoleBinding: namespaced resources of this namespace only.
    Namespace(String),
}

/// One rule a ServiceAccount holds, and where it comes from.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The rule.
    pub rule: PolicyRule,
    /// Where it applies.
    pub scope: Scope,
    /// `ClusterRoleBinding/x → ClusterRole/y` (or Role), for messages.
    pub source: String,
    /// Whether it comes from [`Rbac::with_kubernetes_defaults`], not from the manifests.
    pub default: bool,
}

impl Grant {
    /// Whether this grant allows `request`.
    pub fn allows(&self, request: &Attributes) -> bool {
        let in_scope = match &self.scope {
            Scope::Cluster => true,
            // A RoleBinding never reaches cluster-scoped resources, all-namespace
            // requests, or non-resource URLs.
            Scope::Namespace(namespace) => request.is_resource() && !request.namespace.is_empty() && *namespace == request.namespace,
        };
        in_scope && rule_allows(&self.rule, request)
    }
}

/// The RBAC objects of a set of manifests.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    /// ClusterRoles (as given: aggregation rules are not evaluated).
    pub cluster_roles: Vec<ClusterRole>,
    /// Roles.
    pub roles: Vec<Role>,
    /// ClusterRoleBindings.
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    /// RoleBindings.
    pub role_bindings: Vec<RoleBinding>,
    /// How many of the ClusterRoles and ClusterRoleBindings came from
    /// [`Rbac::with_kubernetes_defaults`] (they are at the end).
    defaults: (usize, usize),
}

#[derive(Deserialize)]
struct Header {
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    items: Option<Vec<serde_json::Value>>,
}

impl Rbac {
    /// The RBAC objects in multi-document YAML (what `kubectl kustomize`
    /// prints; `List`s are opened). Other kinds are skipped.
    pub fn parse(yaml: &str) -> Result<Self, RbacError> {
        let mut rbac = Rbac::default();
        let documents = serde_saphyr::from_multiple::<serde_json::Value>(yaml)
            .map_err(|e| RbacError::Document { index: 0, message: e.to_string() })?;
        for (index, value) in documents.into_iter().enumerate() {
            if value.is_null() {
                continue; // an empty document (a trailing `---`)
            }
            rbac.add(index, value)?;
        }
        Ok(rbac)
    }

    fn add(&mut self, index: usize, value: serde_json::Value) -> Result<(), RbacError> {
        let header: Header =
            serde_json::from_value(value.clone()).map_err(|e| RbacError::Document { index, message: e.to_string() })?;
        let Some(kind) = header.kind else {
            return Err(RbacError::Document { index, message: "no kind".into() });
        };
        if kind.ends_with("List") {
            for item in header.items.unwrap_or_default() {
                self.add(index, item)?;
            }
            return Ok(());
        }
        let name = header
            .metadata
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string();
        let object = |source| RbacError::Object { kind: kind.clone(), name: name.clone(), source };
        match kind.as_str() {
            "ClusterRole" => self.cluster_roles.push(serde_json::from_value(value).map_err(object)?),
            "Role" => self.roles.push(serde_json::from_value(value).map_err(object)?),
            "ClusterRoleBinding" => self.cluster_role_bindings.push(serde_json::from_value(value).map_err(object)?),
            "RoleBinding" => self.role_bindings.push(serde_json::from_value(value).map_err(object)?),
            _ => {}
        }
        Ok(())
    }

    /// These manifests plus what every cluster grants every authenticated
    /// user: discovery (`/api`, `/apis`, …), `/version` and the health URLs
    /// (`system:discovery`, `system:public-info-viewer`), and asking what one
    /// may do (`system:basic-user`).
    pub fn with_kubernetes_defaults(mut self) -> Self {
        let defaults: [(&str, Vec<PolicyRule>); 3] = [
            (
                "system:discovery",
                vec![non_resource_rule(&[
                    "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/",
                ])],
            ),
            ("system:public-info-viewer", vec![non_resource_rule(&["/healthz", "/livez", "/readyz", "/version", "/version/"])]),
            (
                "system:basic-user",
                vec![PolicyRule {
                    api_groups: Some(vec!["authorization.k8s.io".into()]),
                    resources: Some(vec!["selfsubjectaccessreviews".into(), "selfsubjectrulesreviews".into()]),
                    verbs: vec!["create".into()],
                    ..Default::default()
                }],
            ),
        ];
        for (name, rules) in defaults {
            self.cluster_roles.push(ClusterRole {
                metadata: meta(name),
                rules: Some(rules),
                ..Default::default()
            });
            self.cluster_role_bindings.push(ClusterRoleBinding {
                metadata: meta(name),
                role_ref: k8s_openapi::api::rbac::v1::RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: name.into(),
                },
                subjects: Some(vec![Subject {
                    kind: "Group".into(),
                    name: "system:authenticated".into(),
                    ..Default::default()
                }]),
            });
            self.defaults.0 += 1;
            self.defaults.1 += 1;
        }
        self
    }

    fn is_default_cluster_role(&self, index: usize) -> bool {
        index >= self.cluster_roles.len() - self.defaults.0
    }

    /// Every rule bound to `account`, with where it applies. A binding whose
    /// role is missing grants nothing (as on a cluster).
    pub fn grants(&self, account: &ServiceAccount) -> Vec<Grant> {
        let mut grants = Vec::new();
        let find_cluster_role = |name: &str| self.cluster_roles.iter().enumerate().find(|(_, r)| r.metadata.name.as_deref() == Some(name));
        for binding in &self.cluster_role_bindings {
            if !binding.subjects.iter().flatten().any(|s| account.is(s, "")) || binding.role_ref.kind != "ClusterRole" {
                continue;
            }
            if let Some((index, role)) = find_cluster_role(&binding.role_ref.name) {
                for rule in role.rules.iter().flatten() {
                    grants.push(Grant {
                        rule: rule.clone(),
                        scope: Scope::Cluster,
                        source: format!("ClusterRoleBinding/{} → ClusterRole/{}", name(&binding.metadata), binding.role_ref.name),
                        default: self.is_default_cluster_role(index),
                    });
                }
            }
        }
        for binding in &self.role_bindings {
            let namespace = binding.metadata.namespace.clone().unwrap_or_default();
            if !binding.subjects.iter().flatten().any(|s| account.is(s, &namespace)) {
                continue;
            }
            let rules: Vec<PolicyRule> = match binding.role_ref.kind.as_str() {
                "ClusterRole" => find_cluster_role(&binding.role_ref.name).map(|(_, r)| r.rules.clone().unwrap_or_default()).unwrap_or_default(),
                "Role" => self
                    .roles
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()) && r.metadata.namespace.as_deref().unwrap_or_default() == namespace)
                    .map(|r| r.rules.clone().unwrap_or_default())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            for rule in rules {
                grants.push(Grant {
                    rule,
                    scope: Scope::Namespace(namespace.clone()),
                    source: format!("RoleBinding/{namespace}/{} → {}/{}", name(&binding.metadata), binding.role_ref.kind, binding.role_ref.name),
                    default: false,
                });
            }
        }
        grants
    }

    /// Whether `account` may make `request`.
    pub fn allows(&self, account: &ServiceAccount, request: &Attributes) -> bool {
        self.grants(account).iter().any(|g| g.allows(request))
    }

    /// Bindings whose role is not in these manifests (on a cluster they grant
    /// nothing, and the operator would half-work).
    pub fn dangling_bindings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let has_cluster_role = |n: &str| self.cluster_roles.iter().any(|r| r.metadata.name.as_deref() == Some(n));
        for b in &self.cluster_role_bindings {
            if b.role_ref.kind != "ClusterRole" || !has_cluster_role(&b.role_ref.name) {
                out.push(format!("ClusterRoleBinding/{} refers to {}/{}, which is not there", name(&b.metadata), b.role_ref.kind, b.role_ref.name));
            }
        }
        for b in &self.role_bindings {
            let namespace = b.metadata.namespace.as_deref().unwrap_or_default();
            let found = match b.role_ref.kind.as_str() {
                "ClusterRole" => has_cluster_role(&b.role_ref.name),
                "Role" => self
                    .roles
                    .iter()
                    .any(|r| r.metadata.name.as_deref() == Some(b.role_ref.name.as_str()) && r.metadata.namespace.as_deref().unwrap_or_default() == namespace),
                _ => false,
            };
            if !found {
                out.push(format!("RoleBinding/{namespace}/{} refers to {}/{}, which is not there", name(&b.metadata), b.role_ref.kind, b.role_ref.name));
            }
        }
        out
    }
}

fn meta(name: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta { name: Some(name.into()), ..Default::default() }
}

fn name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

fn non_resource_rule(urls: &[&str]) -> PolicyRule {
    PolicyRule {
        non_resource_urls: Some(urls.iter().map(|u| u.to_string()).collect()),
        verbs: vec!["get".into()],
        ..Default::default()
    }
}

/// Whether `rule` allows `request` (Kubernetes' `RuleAllows`).
pub fn rule_allows(rule: &PolicyRule, request: &Attributes) -> bool {
    let verb = rule.verbs.iter().any(|v| v == "*" || *v == request.verb);
    if !verb {
        return false;
    }
    if !request.is_resource() {
        return rule.non_resource_urls.iter().flatten().any(|url| {
            url == "*" || *url == request.path || url.strip_suffix('*').is_some_and(|prefix| request.path.starts_with(prefix))
        });
    }
    let group = rule.api_groups.iter().flatten().any(|g| g == "*" || *g == request.group);
    let combined = request.combined_resource();
    let resource = rule.resources.iter().flatten().any(|r| {
        r == "*"
            || *r == combined
            // `*/status` is the status subresource of every resource.
            || (!request.subresource.is_empty() && r.strip_prefix("*/") == Some(request.subresource.as_str()))
    });
    let names = rule.resource_names.as_deref().unwrap_or_default();
    group && resource && (names.is_empty() || names.contains(&request.name))
}

/// Every recorded request `account`'s RBAC does not allow, as messages (one
/// per distinct denied check). `rbac_yaml` is the rendered manifests; the
/// Kubernetes default discovery permissions are added.
pub fn check_requests(rbac_yaml: &str, account: &str, requests: &[RequestRecord]) -> Result<(), Vec<String>> {
    let (rbac, account) = load(rbac_yaml, account)?;
    let rbac = rbac.with_kubernetes_defaults();
    let grants = rbac.grants(&account);
    let mut denied = BTreeSet::new();
    for record in requests {
        for attributes in Attributes::of(record) {
            if !grants.iter().any(|g| g.allows(&attributes)) {
                denied.insert((attributes.to_string(), record.path.clone()));
            }
        }
    }
    if denied.is_empty() {
        return Ok(());
    }
    // One message per denied check, with one path that needed it.
    let mut seen = BTreeSet::new();
    Err(denied
        .into_iter()
        .filter(|(check, _)| seen.insert(check.clone()))
        .map(|(check, path)| format!("{account} may not {check} (needed by {path})"))
        .collect())
}

/// What the manifests grant `account` that no recorded request used, as
/// messages: each verb × API group × resource (× resource name) of each
/// rule, and each non-resource URL. A wildcard is always a finding (it grants
/// what nobody can have used all of). The Kubernetes defaults are not counted.
pub fn unused_permissions(rbac_yaml: &str, account: &str, requests: &[RequestRecord]) -> Result<(), Vec<String>> {
    let (rbac, account) = load(rbac_yaml, account)?;
    let used: Vec<Attributes> = requests.iter().flat_map(Attributes::of).collect();
    let mut findings = Vec::new();
    for grant in rbac.grants(&account).iter().filter(|g| !g.default) {
        for permission in expand(&grant.rule) {
            let finding = match permission {
                Permission::Wildcard(what) => Some(format!("{}: {what} is a wildcard", grant.source)),
                Permission::Single(template) => {
                    let is_used = used.iter().any(|u| {
                        let same = u.verb == template.verb
                            && (!template.is_resource()
                                || (u.group == template.group
                                    && u.resource == template.resource
                                    && u.subresource == template.subresource
                                    && (template.name.is_empty() || u.name == template.name)));
                        same && grant.allows(u)
                    });
                    (!is_used).then(|| format!("{}: grants {template} but no recorded request used it", grant.source))
                }
            };
            findings.extend(finding);
        }
    }
    if findings.is_empty() { Ok(()) } else { Err(findings) }
}

/// What no ServiceAccount of an operator should hold, anywhere in the
/// manifests: wildcards, any access to Secrets, and the verbs that grant more
/// than they say (`escalate`, `bind`, `impersonate`), plus bindings to roles
/// that are not there.
pub fn lint(rbac_yaml: &str) -> Result<(), Vec<String>> {
    let rbac = Rbac::parse(rbac_yaml).map_err(|e| vec![e.to_string()])?;
    let mut findings = rbac.dangling_bindings();
    let roles = rbac
        .cluster_roles
        .iter()
        .map(|r| (format!("ClusterRole/{}", name(&r.metadata)), r.rules.as_deref().unwrap_or_default(), r.aggregation_rule.is_some()))
        .chain(rbac.roles.iter().map(|r| {
            (
                format!("Role/{}/{}", r.metadata.namespace.as_deref().unwrap_or_default(), name(&r.metadata)),
                r.rules.as_deref().unwrap_or_default(),
                false,
            )
        }));
    for (role, rules, aggregated) in roles {
        if aggregated {
            findings.push(format!("{role} aggregates other roles: its rules are not in the manifests"));
        }
        for rule in rules {
            let lists = [
                ("verbs", Some(&rule.verbs)),
                ("apiGroups", rule.api_groups.as_ref()),
                ("resources", rule.resources.as_ref()),
                ("nonResourceURLs", rule.non_resource_urls.as_ref()),
            ];
            for (field, list) in lists {
                for item in list.into_iter().flatten() {
                    if item.contains('*') {
                        findings.push(format!("{role}: wildcard {item:?} in {field}"));
                    }
                }
            }
            for resource in rule.resources.iter().flatten() {
                if resource == "secrets" || resource.starts_with("secrets/") {
                    findings.push(format!("{role}: grants {:?} on {resource}", rule.verbs));
                }
            }
            for verb in &rule.verbs {
                if matches!(verb.as_str(), "escalate" | "bind" | "impersonate") {
                    findings.push(format!("{role}: grants the {verb} verb"));
                }
            }
        }
    }
    if findings.is_empty() { Ok(()) } else { Err(findings) }
}

fn load(rbac_yaml: &str, account: &str) -> Result<(Rbac, ServiceAccount), Vec<String>> {
    let rbac = Rbac::parse(rbac_yaml).map_err(|e| vec![e.to_string()])?;
    let account: ServiceAccount = account.parse().map_err(|e: RbacError| vec![e.to_string()])?;
    if rbac.grants(&account).is_empty() {
        return Err(vec![format!("no binding in the manifests grants {account} anything")]);
    }
    Ok((rbac, account))
}

/// One permission of a rule, or a wildcard that cannot be expanded.
enum Permission {
    Single(Attributes),
    Wildcard(String),
}

fn expand(rule: &PolicyRule) -> Vec<Permission> {
    let mut out = Vec::new();
    let wild = |list: &[String]| list.iter().find(|x| x.contains('*')).cloned();
    if let Some(w) = wild(&rule.verbs) {
        out.push(Permission::Wildcard(format!("verb {w:?}")));
        return out;
    }
    for verb in &rule.verbs {
        for url in rule.non_resource_urls.iter().flatten() {
            if url.contains('*') {
                out.push(Permission::Wildcard(format!("non-resource URL {url:?}")));
            } else {
                out.push(Permission::Single(Attributes::non_resource(verb, url)));
            }
        }
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        if let Some(w) = wild(groups) {
            out.push(Permission::Wildcard(format!("API group {w:?}")));
            continue;
        }
        for group in groups {
            for resource in resources {
                if resource.contains('*') {
                    out.push(Permission::Wildcard(format!("resource {resource:?}")));
                    continue;
                }
                let names = rule.resource_names.as_deref().unwrap_or_default();
                if names.is_empty() {
                    out.push(Permission::Single(Attributes::resource(verb, group, resource, "", "")));
                }
                for name in names {
                    out.push(Permission::Single(Attributes::resource(verb, group, resource, "", name)));
                }
            }
        }
    }
    out
}

/// deploy/'s RBAC files as written, for tests that cannot run kubectl (the
/// test VM): kustomize adds labels to them and a namespace to the
/// ServiceAccounts, and the bindings' subjects already name that namespace, so
/// they grant exactly what the rendering does (`tests/tests/deploy.rs` checks).
pub fn deploy_rbac_yaml() -> String {
    [include_str!("../../deploy/rbac-controller.yaml"), include_str!("../../deploy/rbac-agent.yaml")].join("\n---\n")
}

/// The requests whose User-Agent starts with `prefix` (how a test tells the
/// controller's requests from the agent's when both talk to one server).
pub fn requests_from(requests: &[RequestRecord], prefix: &str) -> Vec<RequestRecord> {
    requests.iter().filter(|r| r.user_agent.starts_with(prefix)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RBAC: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules:
- apiGroups: [""]
  resources: [services, pods]
  verbs: [list, watch]
- apiGroups: [codesink.net]
  resources: [weightedservices/status]
  verbs: [patch]
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [settings]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: reader}
subjects:
- {kind: ServiceAccount, name: op, namespace: ops}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: writer, namespace: team}
rules:
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: writer, namespace: team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: writer}
subjects:
- {kind: ServiceAccount, name: op}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;

    fn op() -> ServiceAccount {
        "ops/op".parse().unwrap()
    }

    fn team_op() -> ServiceAccount {
        "system:serviceaccount:team:op".parse().unwrap()
    }

    #[test]
    fn service_accounts_are_written_two_ways() {
        assert_eq!(op(), ServiceAccount::new("ops", "op"));
        assert_eq!(team_op(), ServiceAccount::new("team", "op"));
        assert!("op".parse::<ServiceAccount>().is_err());
        assert!("ops/".parse::<ServiceAccount>().is_err());
        assert!("system:serviceaccount:ops".parse::<ServiceAccount>().is_err());
    }

    #[test]
    fn verbs_groups_resources_and_subresources_match_exactly() {
        let rbac = Rbac::parse(RBAC).unwrap();
        let allows = |a: Attributes| rbac.allows(&op(), &a);
        assert!(allows(Attributes::resource("list", "", "services", "", "")));
        assert!(allows(Attributes::resource("watch", "", "pods", "default", "")));
        assert!(!allows(Attributes::resource("get", "", "services", "default", "web")), "list does not grant get");
        assert!(!allows(Attributes::resource("list", "apps", "services", "", "")), "the group matters");
        assert!(allows(Attributes::resource("patch", "codesink.net", "weightedservices/status", "default", "web")));
        assert!(
            !allows(Attributes::resource("patch", "codesink.net", "weightedservices", "default", "web")),
            "the status subresource does not grant the object"
        );
        assert!(!allows(Attributes::resource("list", "", "services/status", "", "")), "nor the object its subresources");
    }

    #[test]
    fn resource_names_limit_to_those_objects() {
        let rbac = Rbac::parse(RBAC).unwrap();
        assert!(rbac.allows(&op(), &Attributes::resource("get", "", "configmaps", "ops", "settings")));
        assert!(!rbac.allows(&op(), &Attributes::resource("get", "", "configmaps", "ops", "other")));
    }

    #[test]
    fn a_role_binding_grants_only_in_its_namespace_and_never_cluster_scoped() {
        let rbac = Rbac::parse(RBAC).unwrap();
        let create = |ns: &str| Attributes::resource("create", "events.k8s.io", "events", ns, "");
        assert!(rbac.allows(&team_op(), &create("team")), "the subject's namespace defaults to the binding's");
        assert!(!rbac.allows(&team_op(), &create("other")));
        assert!(!rbac.allows(&team_op(), &create("")), "not all namespaces");
        assert!(!rbac.allows(&op(), &create("team")), "ops/op is not team/op");
        assert!(!rbac.allows(&team_op(), &Attributes::resource("get", "", "nodes", "", "n1")), "nodes are cluster-scoped");
    }

    #[test]
    fn wildcards_follow_kubernetes() {
        let yaml = r#"
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: wild}
rules:
- {apiGroups: ["*"], resources: ["*/status"], verbs: [patch]}
- {apiGroups: [apps], resources: ["*"], verbs: ["*"]}
- {apiGroups: [""], resources: ["services/*"], verbs: [get]}
- {nonResourceURLs: ["/metrics*"], verbs: [get]}
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: wild}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: wild}
subjects: [{kind: Group, name: "system:serviceaccounts:ops"}]
"#;
        let rbac = Rbac::parse(yaml).unwrap();
        let allows = |a: Attributes| rbac.allows(&op(), &a);
        assert!(allows(Attributes::resource("patch", "codesink.net", "weightedservices/status", "x", "y")));
        assert!(!allows(Attributes::resource("patch", "codesink.net", "weightedservices", "x", "y")));
        assert!(allows(Attributes::resource("delete", "apps", "deployments/scale", "x", "y")), "* is every subresource too");
        assert!(!allows(Attributes::resource("get", "", "services/status", "x", "y")), "resource/* is not a wildcard in RBAC");
        assert!(allows(Attributes::non_resource("get", "/metrics/cadvisor")));
        assert!(!allows(Attributes::non_resource("post", "/metrics")));
        assert!(!rbac.allows(&team_op(), &Attributes::non_resource("get", "/metrics")), "group of another namespace");
    }

    /// The URL of a request, as a client builds it.
    fn path(group: &str, resource: &str, subresource: &str, namespace: &str, name: &str) -> String {
        let mut path = if group.is_empty() { "/api/v1".to_string() } else { format!("/apis/{group}/v1") };
        if !namespace.is_empty() {
            path = format!("{path}/namespaces/{namespace}");
        }
        path = format!("{path}/{resource}");
        if !name.is_empty() {
            path = format!("{path}/{name}");
        }
        if !subresource.is_empty() {
            path = format!("{path}/{subresource}");
        }
        path
    }

    fn record(verb: &str, group: &str, resource: &str, namespace: &str, name: &str, code: u16) -> RequestRecord {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        RequestRecord {
            verb: verb.into(),
            group: group.into(),
            version: "v1".into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: name.into(),
            path: path(group, resource, subresource, namespace, name),
            user_agent: "test".into(),
            code,
        }
    }

    #[test]
    fn an_apply_that_creates_needs_create_as_well() {
        let yaml = r#"
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: svc}
rules: [{apiGroups: [""], resources: [services], verbs: [patch]}]
---
kind: ClusterRoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: svc}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: svc}
subjects: [{kind: ServiceAccount, name: op, namespace: ops}]
"#;
        assert_eq!(check_requests(yaml, "ops/op", &[record("patch", "", "services", "default", "web", 200)]), Ok(()));
        let denied = check_requests(yaml, "ops/op", &[record("patch", "", "services", "default", "web", 201)]).unwrap_err();
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert!(denied[0].contains("may not create core/services \"web\" in namespace default"), "{denied:?}");
    }

    #[test]
    fn discovery_is_allowed_to_everyone_and_findings_are_deduplicated() {
        let mut version = record("get", "", "", "", "", 200);
        version.path = "/version".into();
        let watch = record("watch", "", "nodes", "", "", 200);
        let requests = [version, watch.clone(), watch];
        let denied = check_requests(RBAC, "ops/op", &requests).unwrap_err();
        assert_eq!(denied, ["ops/op may not watch core/nodes (cluster-wide) (needed by /api/v1/nodes)"]);
    }

    #[test]
    fn unused_permissions_are_findings() {
        let requests = [
            record("list", "", "services", "", "", 200),
            record("watch", "", "services", "", "", 200),
            record("list", "", "pods", "", "", 200),
            record("patch", "codesink.net", "weightedservices/status", "default", "web", 200),
            // In a namespace the RoleBinding does not cover: not a use of it.
            record("create", "events.k8s.io", "events", "default", "", 201),
        ];
        let unused = unused_permissions(RBAC, "ops/op", &requests).unwrap_err();
        assert_eq!(
            unused,
            [
                "ClusterRoleBinding/reader → ClusterRole/reader: grants watch core/pods (cluster-wide) but no recorded request used it",
                "ClusterRoleBinding/reader → ClusterRole/reader: grants get core/configmaps \"settings\" (cluster-wide) but no recorded request used it",
            ]
        );
        let unused = unused_permissions(RBAC, "team/op", &[record("create", "events.k8s.io", "events", "team", "", 201)]).unwrap_err();
        assert_eq!(unused.len(), 1, "only nodes get is unused: {unused:?}");
    }

    /// deploy/'s roles as written: agents read PodInfoSlices instead of pods
    /// and write none; the controller applies (creating) and deletes them.
    #[test]
    fn deploy_lets_the_controller_publish_pod_info_slices_and_the_agent_only_read_them() {
        let rbac = Rbac::parse(&deploy_rbac_yaml()).unwrap();
        let agent = ServiceAccount::new("ipvs-operator", "ipvs-operator-agent");
        let controller = ServiceAccount::new("ipvs-operator", "ipvs-operator-controller");
        let slices = |verb: &str, namespace: &str, name: &str| {
            Attributes::resource(verb, "codesink.net", "podinfoslices", namespace, name)
        };
        for verb in ["list", "watch"] {
            for account in [&agent, &controller] {
                assert!(rbac.allows(account, &slices(verb, "", "")), "{account:?} may not {verb} podinfoslices");
            }
        }
        for denied in [
            slices("get", "shop", "web-0"),
            slices("create", "shop", ""),
            slices("patch", "shop", "web-0"),
            slices("update", "shop", "web-0"),
            slices("delete", "shop", "web-0"),
            Attributes::resource("list", "", "pods", "", ""),
            Attributes::resource("watch", "", "pods", "", ""),
            Attributes::resource("get", "", "pods", "shop", "web-1"),
        ] {
            assert!(!rbac.allows(&agent, &denied), "the agent may {denied}");
        }
        for allowed in [slices("create", "shop", ""), slices("patch", "shop", "web-0"), slices("delete", "shop", "web-1")] {
            assert!(rbac.allows(&controller, &allowed), "the controller may not {allowed}");
        }
        for denied in [slices("update", "shop", "web-0"), slices("deletecollection", "shop", ""), slices("get", "shop", "a")] {
            assert!(!rbac.allows(&controller, &denied), "the controller may {denied}");
        }
        // An apply that creates its slice (201) is authorized as `create` too.
        let created = record("patch", "codesink.net", "podinfoslices", "shop", "web-0", 201);
        assert_eq!(check_requests(&deploy_rbac_yaml(), "ipvs-operator/ipvs-operator-controller", &[created]), Ok(()));
    }

    #[test]
    fn an_account_nothing_is_bound_to_is_an_error() {
        let err = check_requests(RBAC, "ops/nobody", &[]).unwrap_err();
        assert_eq!(err, ["no binding in the manifests grants ops/nobody anything"]);
        let err = check_requests("kind: [", "ops/op", &[]).unwrap_err();
        assert!(err[0].starts_with("document 0:"), "{err:?}");
    }

    #[test]
    fn lint_finds_wildcards_secrets_escalation_and_dangling_bindings() {
        let yaml = r#"
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: bad}
rules:
- {apiGroups: [""], resources: [secrets], verbs: [get]}
- {apiGroups: ["*"], resources: [pods], verbs: [list]}
- {apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles], verbs: [escalate]}
---
kind: RoleBinding
apiVersion: rbac.authorization.k8s.io/v1
metadata: {name: gone, namespace: x}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: missing}
subjects: [{kind: ServiceAccount, name: op}]
"#;
        let findings = lint(yaml).unwrap_err();
        assert_eq!(findings.len(), 4, "{findings:#?}");
        assert!(findings.iter().any(|f| f.contains("secrets")));
        assert!(findings.iter().any(|f| f.contains("wildcard \"*\" in apiGroups")));
        assert!(findings.iter().any(|f| f.contains("escalate")));
        assert!(findings.iter().any(|f| f.contains("RoleBinding/x/gone refers to Role/missing")));
        assert_eq!(lint(RBAC), Ok(()));
    }
}
