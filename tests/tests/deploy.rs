//! deploy/ as `kubectl apply -k deploy/` applies it: rendered by kubectl's
//! kustomize, every object parsed into its k8s-openapi type (no field lost on
//! the way, so a misspelt field fails), and checked: least-privilege RBAC that
//! covers what the binaries request and nothing more, the agent's security
//! settings, probes, resources, the policies mount, and flags the binary has.
//!
//! Needs kubectl (`$KUBECTL`, else `target/tools/kubectl`, which `make setup`
//! installs, else `kubectl` on PATH). Without it this test fails and says so:
//! nothing else renders the kustomization exactly as users will.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipvs_operator::crd::{PodInfoSlice, WeightedService};
use ipvs_operator_tests::apiserver::RequestRecord;
use ipvs_operator_tests::rbac::{self, Attributes, Rbac, ServiceAccount};
use ipvs_operator_tests::project_binary;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ResourceQuota, ServiceAccount as SaObject};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

const NAMESPACE: &str = "ipvs-operator";
const CONTROLLER_SA: &str = "ipvs-operator/ipvs-operator-controller";
const AGENT_SA: &str = "ipvs-operator/ipvs-operator-agent";
const POLICY_DIR: &str = "/etc/ipvs-operator/policies";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl kustomize deploy/`.
fn rendered() -> String {
    let kubectl = ipvs_operator_tests::kubectl::path();
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", kubectl.display()));
    assert!(output.status.success(), "kubectl kustomize deploy/ failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("kubectl prints UTF-8")
}

/// Every object of the rendering, typed.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    crds: Vec<CustomResourceDefinition>,
    service_accounts: Vec<SaObject>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    quotas: Vec<ResourceQuota>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
    disruption_budgets: Vec<PodDisruptionBudget>,
    /// kind/namespace/name of every object, in order.
    all: Vec<String>,
    /// (kind, namespace) of every object.
    namespaces_of: Vec<(String, Option<String>)>,
}

/// Parse `value` into `T`, and fail if that loses anything: k8s-openapi
/// ignores unknown fields, so a misspelt field would otherwise pass unseen.
fn typed<T: DeserializeOwned + serde::Serialize>(what: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    let again = serde_json::to_value(&object).expect("a typed object serializes");
    let mut lost = Vec::new();
    lost_fields(value, &again, String::new(), &mut lost);
    assert!(lost.is_empty(), "{what}: fields its type does not have (misspelt?): {lost:?}");
    object
}

/// Paths in `original` that `round_trip` lacks or has otherwise.
fn lost_fields(original: &Value, round_trip: &Value, path: String, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => lost_fields(value, other, format!("{path}.{key}"), out),
                    None if value.is_null() => {}
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        // kustomize prints 65535.0 as 65535: the same number.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn parse(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    let documents = serde_saphyr::from_multiple::<Value>(yaml).unwrap_or_else(|e| panic!("not YAML: {e}"));
    for (index, value) in documents.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_else(|| panic!("document {index} has no kind")).to_string();
        let name = value["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let namespace = value["metadata"]["namespace"].as_str().map(str::to_string);
        let what = format!("{kind}/{name}");
        objects.all.push(format!("{kind}/{}/{name}", namespace.as_deref().unwrap_or("-")));
        objects.namespaces_of.push((what.clone(), namespace));
        match kind.as_str() {
            "Namespace" => objects.namespaces.push(typed(&what, &value)),
            "CustomResourceDefinition" => objects.crds.push(typed(&what, &value)),
            "ServiceAccount" => objects.service_accounts.push(typed(&what, &value)),
            "ClusterRole" => objects.cluster_roles.push(typed(&what, &value)),
            "ClusterRoleBinding" => objects.cluster_role_bindings.push(typed(&what, &value)),
            "Role" => objects.roles.push(typed(&what, &value)),
            "RoleBinding" => objects.role_bindings.push(typed(&what, &value)),
            "ConfigMap" => objects.config_maps.push(typed(&what, &value)),
            "ResourceQuota" => objects.quotas.push(typed(&what, &value)),
            "Deployment" => objects.deployments.push(typed(&what, &value)),
            "DaemonSet" => objects.daemon_sets.push(typed(&what, &value)),
            "PodDisruptionBudget" => objects.disruption_budgets.push(typed(&what, &value)),
            other => panic!("{what}: a kind this test does not know ({other}): add it here, typed"),
        }
    }
    objects
}

fn one<'a, T>(list: &'a [T], what: &str) -> &'a T {
    assert_eq!(list.len(), 1, "expected exactly one {what}");
    &list[0]
}

fn pod_spec_of_deployment(d: &Deployment) -> &PodSpec {
    d.spec.template.spec.as_ref().expect("the Deployment has a pod spec")
}

fn pod_spec_of_daemon_set(d: &DaemonSet) -> &PodSpec {
    d.spec.template.spec.as_ref().expect("the DaemonSet has a pod spec")
}

fn only_container(spec: &PodSpec) -> &Container {
    assert!(spec.init_containers.as_deref().unwrap_or_default().is_empty(), "no init containers");
    one(&spec.containers, "container")
}

/// The value of `--flag=VALUE` in a container's args.
fn flag<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container.args.iter().flatten().find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

/// The container port that the probe's named port refers to.
fn port_named(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no container port named {name}"))
        .container_port
}

/// Probes: liveness on /healthz, readiness on /readyz, both on the port the
/// binary listens on (`--listen`).
fn check_probes(what: &str, container: &Container) {
    let listen = flag(container, "listen").unwrap_or_else(|| panic!("{what}: no --listen flag"));
    let listen_port: i32 = listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("--listen=ADDR:PORT");
    for (probe, path) in [(&container.liveness_probe, "/healthz"), (&container.readiness_probe, "/readyz")] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: no HTTP probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path), "{what}");
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => port_named(container, name),
        };
        assert_eq!(port, listen_port, "{what}: the {path} probe must reach the port the binary listens on");
    }
}

/// Requests and a memory limit (the limit is what protects the node; CPU is
/// not limited: throttling a repair loop only delays it).
fn check_resources(what: &str, container: &Container) {
    let resources = container.resources.as_ref().unwrap_or_else(|| panic!("{what}: no resources"));
    let requests = resources.requests.clone().unwrap_or_default();
    let limits = resources.limits.clone().unwrap_or_default();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"), "{what}: cpu and memory requests");
    assert!(limits.contains_key("memory"), "{what}: a memory limit");
}

/// The policies ConfigMap is mounted read-only where `--policy-dir` points.
fn check_policies_mount(what: &str, spec: &PodSpec, container: &Container) {
    assert_eq!(flag(container, "policy-dir"), Some(POLICY_DIR), "{what}: --policy-dir");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == POLICY_DIR)
        .unwrap_or_else(|| panic!("{what}: nothing mounted at {POLICY_DIR}"));
    assert_eq!(mount.read_only, Some(true), "{what}: the policies are mounted read-only");
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mounted volume");
    let config_map = volume.config_map.as_ref().unwrap_or_else(|| panic!("{what}: policies come from a ConfigMap"));
    assert_eq!(config_map.name, "ipvs-operator-policies", "{what}");
}

fn env_field<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str())
}

fn no_host_access(what: &str, spec: &PodSpec) {
    assert_ne!(spec.host_pid, Some(true), "{what}: hostPID");
    assert_ne!(spec.host_ipc, Some(true), "{what}: hostIPC");
    assert!(spec.volumes.iter().flatten().all(|v| v.host_path.is_none()), "{what}: no hostPath volumes");
}

#[test]
fn deploy_renders_into_typed_objects_in_one_namespace() {
    let objects = parse(&rendered());
    let namespace = one(&objects.namespaces, "Namespace");
    assert_eq!(namespace.metadata.name.as_deref(), Some(NAMESPACE));
    let cluster_scoped = ["Namespace/", "CustomResourceDefinition/", "ClusterRole/", "ClusterRoleBinding/"];
    for (what, namespace) in &objects.namespaces_of {
        if cluster_scoped.iter().any(|k| what.starts_with(k)) {
            assert_eq!(namespace, &None, "{what} is cluster-scoped");
        } else {
            assert_eq!(namespace.as_deref(), Some(NAMESPACE), "{what} belongs in {NAMESPACE}");
        }
    }
    // Kinds and names users will see, in the order kustomize applies them.
    for expected in [
        "Namespace/-/ipvs-operator",
        "CustomResourceDefinition/-/weightedservices.codesink.net",
        "CustomResourceDefinition/-/podinfoslices.codesink.net",
        "ServiceAccount/ipvs-operator/ipvs-operator-controller",
        "ServiceAccount/ipvs-operator/ipvs-operator-agent",
        "ConfigMap/ipvs-operator/ipvs-operator-policies",
        "Deployment/ipvs-operator/ipvs-operator-controller",
        "DaemonSet/ipvs-operator/ipvs-operator-agent",
    ] {
        assert!(objects.all.iter().any(|o| o == expected), "{expected} missing from {:#?}", objects.all);
    }

    // The CRDs are deploy/crd.yaml as generated from the Rust types (kustomize
    // only adds labels, and orders them by name).
    let generated = [WeightedService::crd(), PodInfoSlice::crd()];
    assert_eq!(objects.crds.len(), generated.len(), "CustomResourceDefinitions: {:#?}", objects.all);
    for generated in generated {
        let name = generated.metadata.name.clone().unwrap_or_default();
        let crd = objects.crds.iter().find(|c| c.metadata.name.as_deref() == Some(&name));
        let crd = crd.unwrap_or_else(|| panic!("no CRD {name}"));
        assert_eq!(
            serde_json::to_value(&crd.spec).unwrap(),
            serde_json::to_value(generated.spec).unwrap(),
            "the rendered CRD {name} is not the one the Rust types generate: run `make crd`"
        );
    }

    // The policies ConfigMap is empty by default: the built-in policies need nothing.
    let policies = one(&objects.config_maps, "ConfigMap");
    assert!(policies.data.as_ref().is_none_or(|d| d.is_empty()), "no policies by default");
    assert!(policies.binary_data.as_ref().is_none_or(|d| d.is_empty()), "no policies by default");

    // Selectors select their own pods.
    for (what, selector, labels) in [
        (
            "Deployment",
            &one(&objects.deployments, "Deployment").spec.selector,
            objects.deployments[0].spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        ),
        (
            "DaemonSet",
            &one(&objects.daemon_sets, "DaemonSet").spec.selector,
            objects.daemon_sets[0].spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()),
        ),
    ] {
        let wanted = selector.match_labels.clone().unwrap_or_default();
        let labels = labels.cloned().unwrap_or_default();
        assert!(!wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v)), "{what}: selector {wanted:?} vs labels {labels:?}");
    }

    // Two controllers (one leads), and a budget that keeps one through drains
    // and selects the controllers only.
    let controller = one(&objects.deployments, "Deployment");
    assert_eq!(controller.spec.replicas, Some(2), "two controller replicas");
    let budget = one(&objects.disruption_budgets, "PodDisruptionBudget");
    let budget_spec = budget.spec.clone().unwrap_or_default();
    assert_eq!(budget_spec.min_available, Some(IntOrString::Int(1)), "the budget keeps one controller");
    let selected = budget_spec.selector.and_then(|s| s.match_labels).unwrap_or_default();
    assert_eq!(Some(&selected), controller.spec.selector.match_labels.as_ref(), "the budget selects the controllers");
    let agent_labels =
        objects.daemon_sets[0].spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    assert!(!selected.iter().all(|(k, v)| agent_labels.get(k) == Some(v)), "the budget selects the agents too");
}

#[test]
fn the_agent_daemon_set_holds_net_admin_and_nothing_else() {
    let objects = parse(&rendered());
    let agent = one(&objects.daemon_sets, "DaemonSet");
    let spec = pod_spec_of_daemon_set(agent);
    let container = only_container(spec);

    assert_eq!(spec.host_network, Some(true), "IPVS is per network namespace: the host's");
    assert_eq!(spec.service_account_name.as_deref(), Some("ipvs-operator-agent"));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );
    no_host_access("agent", spec);

    let security = container.security_context.as_ref().expect("the agent's securityContext");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(capabilities.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_ne!(security.privileged, Some(true));
    // uid 0: capabilities reach a non-root process's effective set only through
    // ambient or file capabilities (see agent.yaml).
    assert_eq!(security.run_as_user, Some(0));
    let seccomp = security
        .seccomp_profile
        .as_ref()
        .or(spec.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()))
        .expect("a seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault");

    assert_eq!(container.args.as_ref().and_then(|a| a.first()).map(String::as_str), Some("agent"));
    assert_eq!(env_field(container, "NODE_NAME"), Some("spec.nodeName"), "the node name from the downward API");
    check_probes("agent", container);
    check_resources("agent", container);
    check_policies_mount("agent", spec, container);
}

/// The node-setup component's privileged init container, in an overlay that
/// uses it; the agent's own container is unchanged.
#[test]
fn the_node_setup_component_adds_a_privileged_init_container_and_leaves_the_agent_alone() {
    // kustomize takes relative paths only: an overlay in target/, as a user's beside deploy/.
    let overlay = tempfile::Builder::new().prefix("overlay-").tempdir_in(repo().join("target")).expect("a temp dir");
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        "resources: [../../deploy]\ncomponents: [../../deploy/components/node-setup]\n",
    )
    .expect("written");
    let kubectl = ipvs_operator_tests::kubectl::path();
    let output = Command::new(&kubectl)
        .arg("kustomize")
        .arg(overlay.path())
        .output()
        .expect("kubectl runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let objects = parse(&String::from_utf8_lossy(&output.stdout));
    let spec = pod_spec_of_daemon_set(one(&objects.daemon_sets, "DaemonSet"));
    let base = parse(&rendered());
    let base_agent = only_container(pod_spec_of_daemon_set(one(&base.daemon_sets, "DaemonSet")));
    assert_eq!(one(&spec.containers, "container"), base_agent, "the agent's container as in the base");
    let init = spec.init_containers.as_deref().map(|i| one(i, "init container")).expect("an init container");
    let args = init.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("node-setup"));
    assert_eq!(init.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let mount = init.volume_mounts.iter().flatten().find(|m| m.mount_path == "/lib/modules").expect("/lib/modules mounted");
    assert_eq!(mount.read_only, Some(true));
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name).expect("its volume");
    assert_eq!(volume.host_path.as_ref().map(|h| h.path.as_str()), Some("/lib/modules"), "the host's module tree");
    let binary = project_binary("ipvs-operator").expect("the operator binary");
    let help = Command::new(&binary).args(&args).arg("--help").output().expect("running ipvs-operator");
    assert!(help.status.success(), "ipvs-operator {} --help: {}", args.join(" "), String::from_utf8_lossy(&help.stderr));
}

#[test]
fn the_controller_runs_unprivileged() {
    let objects = parse(&rendered());
    let controller = one(&objects.deployments, "Deployment");
    let spec = pod_spec_of_deployment(controller);
    let container = only_container(spec);
    assert_eq!(spec.service_account_name.as_deref(), Some("ipvs-operator-controller"));
    assert_ne!(spec.host_network, Some(true));
    no_host_access("controller", spec);
    let pod = spec.security_context.as_ref().expect("the controller's pod securityContext");
    assert_eq!(pod.run_as_non_root, Some(true));
    assert!(pod.run_as_user.is_some_and(|u| u != 0));
    assert_eq!(pod.seccomp_profile.as_ref().map(|s| s.type_.as_str()), Some("RuntimeDefault"));
    let security = container.security_context.as_ref().expect("the controller's securityContext");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert!(capabilities.add.as_deref().unwrap_or_default().is_empty(), "the controller needs no capability");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));

    assert_eq!(container.args.as_ref().and_then(|a| a.first()).map(String::as_str), Some("controller"));
    assert_eq!(env_field(container, "POD_NAME"), Some("metadata.name"), "names the replica in its Events");
    check_probes("controller", container);
    check_resources("controller", container);
    check_policies_mount("controller", spec, container);
    let agent = one(&objects.daemon_sets, "DaemonSet");
    assert_eq!(container.image, only_container(pod_spec_of_daemon_set(agent)).image, "one image for both roles");
}

/// The binary accepts the flags the manifests pass: `ipvs-operator ARGS… --help`
/// fails on an unknown flag before it prints help.
#[test]
fn the_manifests_pass_flags_the_binary_has() {
    let binary = project_binary("ipvs-operator").expect("the operator binary");
    let objects = parse(&rendered());
    let containers = [
        only_container(pod_spec_of_deployment(one(&objects.deployments, "Deployment"))),
        only_container(pod_spec_of_daemon_set(one(&objects.daemon_sets, "DaemonSet"))),
    ];
    for container in containers {
        let args = container.args.clone().unwrap_or_default();
        let output = Command::new(&binary).args(&args).arg("--help").output().expect("running ipvs-operator");
        assert!(
            output.status.success(),
            "ipvs-operator {} --help: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn rbac_has_no_wildcards_no_secrets_and_one_role_per_binary() {
    let yaml = rendered();
    if let Err(findings) = rbac::lint(&yaml) {
        panic!("RBAC findings:\n{}", findings.join("\n"));
    }
    let rbac = Rbac::parse(&yaml).unwrap();
    for account in [CONTROLLER_SA, AGENT_SA] {
        let account: ServiceAccount = account.parse().unwrap();
        let grants = rbac.grants(&account);
        let sources: std::collections::BTreeSet<&str> = grants.iter().map(|g| g.source.as_str()).collect();
        // One ClusterRole each; the controller also has a Role for its Lease,
        // which grants nothing outside its namespace and nothing but Leases.
        let cluster_wide: Vec<&&str> = sources.iter().filter(|s| s.starts_with("ClusterRoleBinding/")).collect();
        assert_eq!(cluster_wide.len(), 1, "{account}: one cluster role, bound once: {sources:?}");
        for grant in grants.iter().filter(|g| !g.source.starts_with("ClusterRoleBinding/")) {
            assert!(account.to_string() == CONTROLLER_SA, "{account}: a namespaced role: {grant:?}");
            assert_eq!(grant.scope, rbac::Scope::Namespace(NAMESPACE.into()), "{grant:?}");
            assert_eq!(grant.rule.resources.as_deref(), Some(&["leases".to_string()][..]), "{grant:?}");
        }
        // Nobody else gets these roles.
        for binding in &rbac.cluster_role_bindings {
            let subjects = binding.subjects.clone().unwrap_or_default();
            assert!(subjects.iter().all(|s| s.kind == "ServiceAccount"), "{:?} binds more than ServiceAccounts", binding.metadata.name);
        }
    }
    // The agent writes nothing to the API server but Events.
    let agent: ServiceAccount = AGENT_SA.parse().unwrap();
    for grant in rbac.grants(&agent) {
        let writes: Vec<&String> =
            grant.rule.verbs.iter().filter(|v| !matches!(v.as_str(), "get" | "list" | "watch")).collect();
        if !writes.is_empty() {
            assert_eq!(grant.rule.resources.as_deref(), Some(&["events".to_string()][..]), "the agent writes only Events: {grant:?}");
        }
    }
}

/// A request record as the test API server writes it.
fn request(verb: &str, group: &str, resource: &str, namespace: &str, name: &str, code: u16) -> RequestRecord {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let prefix = if group.is_empty() { "/api/v1".to_string() } else { format!("/apis/{group}/v1") };
    let mut path = prefix;
    if !namespace.is_empty() {
        path.push_str(&format!("/namespaces/{namespace}"));
    }
    path.push_str(&format!("/{resource}"));
    for part in [name, subresource] {
        if !part.is_empty() {
            path.push_str(&format!("/{part}"));
        }
    }
    RequestRecord {
        verb: verb.into(),
        group: group.into(),
        version: "v1".into(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: namespace.into(),
        name: name.into(),
        path,
        user_agent: String::new(),
        code,
    }
}

/// What the controller requests (host/src/controller.rs, events.rs): watches
/// of all namespaces (a list, then watches), the owned Service read and
/// applied (created the first time), the PodInfoSlices applied (created the
/// first time) and deleted once emptied, the status patched, Events created.
fn controller_requests() -> Vec<RequestRecord> {
    let mut out = Vec::new();
    for (group, resource) in [
        ("codesink.net", "weightedservices"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "pods"),
        ("codesink.net", "podinfoslices"),
    ] {
        out.push(request("list", group, resource, "", "", 200));
        out.push(request("watch", group, resource, "", "", 200));
    }
    out.push(request("patch", "codesink.net", "podinfoslices", "default", "web-0", 201));
    out.push(request("patch", "codesink.net", "podinfoslices", "default", "web-0", 200));
    out.push(request("delete", "codesink.net", "podinfoslices", "default", "web-1", 200));
    out.push(request("get", "", "services", "default", "web", 404));
    out.push(request("patch", "", "services", "default", "web", 201));
    out.push(request("get", "", "services", "default", "web", 200));
    out.push(request("patch", "", "services", "default", "web", 200));
    out.push(request("patch", "codesink.net", "weightedservices/status", "default", "web", 200));
    out.push(request("create", "events.k8s.io", "events", "default", "", 201));
    // Leader election, in its own namespace: the first controller creates the
    // Lease, then each reads it and the holder renews it.
    out.push(request("get", "coordination.k8s.io", "leases", NAMESPACE, "ipvs-operator-controller", 404));
    out.push(request("create", "coordination.k8s.io", "leases", NAMESPACE, "", 201));
    out.push(request("update", "coordination.k8s.io", "leases", NAMESPACE, "ipvs-operator-controller", 200));
    out
}

/// What the agent requests (host/src/cluster.rs, agent/, events.rs): watches of
/// all namespaces (PodInfoSlices, not pods) and of its own Node (a field
/// selector is still a list of nodes), and Events.
fn agent_requests() -> Vec<RequestRecord> {
    let mut out = Vec::new();
    for (group, resource) in [
        ("codesink.net", "weightedservices"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("codesink.net", "podinfoslices"),
        ("", "nodes"),
    ] {
        out.push(request("list", group, resource, "", "", 200));
        out.push(request("watch", group, resource, "", "", 200));
    }
    out.push(request("create", "events.k8s.io", "events", "shop", "", 201));
    out
}

#[test]
fn rbac_covers_what_each_binary_requests_and_nothing_more() {
    let yaml = rendered();
    for (account, requests) in [(CONTROLLER_SA, controller_requests()), (AGENT_SA, agent_requests())] {
        if let Err(denied) = rbac::check_requests(&yaml, account, &requests) {
            panic!("{account} is denied:\n{}", denied.join("\n"));
        }
        if let Err(unused) = rbac::unused_permissions(&yaml, account, &requests) {
            panic!("{account} holds more than it uses:\n{}", unused.join("\n"));
        }
    }
    // And the check can fail: the agent may not write Services, status or
    // PodInfoSlices, nor read pods (the controller publishes what it needs of
    // them) or Secrets; the controller may not touch Nodes, nor write
    // PodInfoSlices but by apply and delete.
    let rbac = Rbac::parse(&yaml).unwrap();
    let agent: ServiceAccount = AGENT_SA.parse().unwrap();
    let controller: ServiceAccount = CONTROLLER_SA.parse().unwrap();
    for denied in [
        Attributes::resource("patch", "", "services", "default", "web"),
        Attributes::resource("create", "", "services", "default", ""),
        Attributes::resource("patch", "codesink.net", "weightedservices/status", "default", "web"),
        Attributes::resource("get", "", "pods", "default", "web-1"),
        Attributes::resource("list", "", "pods", "", ""),
        Attributes::resource("watch", "", "pods", "", ""),
        Attributes::resource("patch", "codesink.net", "podinfoslices", "default", "web-0"),
        Attributes::resource("create", "codesink.net", "podinfoslices", "default", ""),
        Attributes::resource("delete", "codesink.net", "podinfoslices", "default", "web-0"),
        Attributes::resource("list", "", "secrets", "", ""),
    ] {
        assert!(!rbac.allows(&agent, &denied), "the agent may {denied}");
    }
    for denied in [
        Attributes::resource("list", "", "nodes", "", ""),
        Attributes::resource("delete", "", "services", "default", "web"),
        Attributes::resource("update", "codesink.net", "weightedservices", "default", "web"),
        Attributes::resource("update", "codesink.net", "podinfoslices", "default", "web-0"),
        Attributes::resource("deletecollection", "codesink.net", "podinfoslices", "default", ""),
        Attributes::resource("patch", "codesink.net", "podinfoslices/status", "default", "web-0"),
        Attributes::resource("create", "coordination.k8s.io", "leases", "default", ""),
        Attributes::resource("update", "coordination.k8s.io", "leases", "kube-system", "kube-controller-manager"),
        Attributes::resource("delete", "coordination.k8s.io", "leases", NAMESPACE, "ipvs-operator-controller"),
    ] {
        assert!(!rbac.allows(&controller, &denied), "the controller may {denied}");
    }
    let missing_create = [request("patch", "", "services", "default", "web", 201)];
    assert!(rbac::check_requests(&yaml, AGENT_SA, &missing_create).is_err());
}

/// `rbac::deploy_rbac_yaml()` (the files as written, for the VM's tests)
/// grants the ServiceAccounts exactly what the rendering does.
#[test]
fn the_rbac_files_as_written_grant_what_the_rendering_does() {
    let rendered = Rbac::parse(&rendered()).unwrap();
    let raw = Rbac::parse(&rbac::deploy_rbac_yaml()).unwrap();
    for account in [CONTROLLER_SA, AGENT_SA] {
        let account: ServiceAccount = account.parse().unwrap();
        let grants = |rbac: &Rbac| -> Vec<String> {
            rbac.grants(&account).iter().map(|g| format!("{:?} {:?} {}", g.scope, g.rule, g.source)).collect()
        };
        let from_files = grants(&raw);
        assert!(!from_files.is_empty(), "{account}: nothing granted by the files");
        assert_eq!(from_files, grants(&rendered), "{account}");
    }
}

/// The roles for people reach WeightedServices only, and only through the
/// built-in roles' aggregation.
#[test]
fn user_roles_aggregate_into_view_and_edit() {
    let objects = parse(&rendered());
    let by_name: BTreeMap<&str, &ClusterRole> =
        objects.cluster_roles.iter().map(|r| (r.metadata.name.as_deref().unwrap_or_default(), r)).collect();
    let view = by_name["ipvs-operator-view"];
    let edit = by_name["ipvs-operator-edit"];
    let labels = |r: &ClusterRole| r.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels(view).get("rbac.authorization.k8s.io/aggregate-to-view").map(String::as_str), Some("true"));
    assert_eq!(labels(edit).get("rbac.authorization.k8s.io/aggregate-to-edit").map(String::as_str), Some("true"));
    assert!(labels(edit).get("rbac.authorization.k8s.io/aggregate-to-view").is_none(), "viewers do not write");
    for role in [view, edit] {
        for rule in role.rules.iter().flatten() {
            assert_eq!(rule.api_groups.as_deref(), Some(&["codesink.net".to_string()][..]));
        }
    }
    // Nothing binds them: the built-in roles do.
    let rbac = Rbac::parse(&rendered()).unwrap();
    assert!(rbac.role_bindings.iter().all(|b| !b.role_ref.name.ends_with("-view") && !b.role_ref.name.ends_with("-edit")));
    assert!(rbac.cluster_role_bindings.iter().all(|b| !b.role_ref.name.ends_with("-view") && !b.role_ref.name.ends_with("-edit")));
}

/// A real binary started against the test API server, stopped on drop; its
/// log is kept for the failure message.
struct Running {
    child: std::process::Child,
    log: PathBuf,
}

impl Running {
    fn start(role_args: &[&str], kubeconfig: &Path, log: PathBuf) -> Running {
        let file = std::fs::File::create(&log).expect("a log file");
        let child = Command::new(project_binary("ipvs-operator").expect("the operator binary"))
            .args(role_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env("NODE_NAME", "node-1")
            // As the Deployment's downward API sets them (the Lease's namespace).
            .env("POD_NAME", "ipvs-operator-controller-0")
            .env("POD_NAMESPACE", NAMESPACE)
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("ipvs-operator starts");
        Running { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet stops a container (the controller then gives
    /// its Lease up); SIGKILL if it has not ended within 30 s.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WeightedService whose policy works, one whose policy is not there (so
/// that both binaries publish an Event), and the pods behind them.
const CLUSTER: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, env: prod}}
    spec: {containers: [{name: web, image: web, ports: [{containerPort: 8080, name: www}]}]}
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  weights: [{weight: 10, selector: {env: prod}}]
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: broken, namespace: shop}
spec:
  selector: {app: web}
  ports: [{protocol: TCP, port: 81, targetPort: www}]
  weights: [{weight: 1, selector: {env: prod}}]
  policy: {name: no-such-policy}
"#;

/// Polls `done` every 100 ms for up to `seconds`.
async fn wait_for(what: &str, seconds: u64, mut done: impl FnMut() -> bool, running: &Running) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}; log:\n{}", running.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn has(requests: &[RequestRecord], verb: &str, resource: &str) -> bool {
    requests.iter().any(|r| r.verb == verb && r.resource == resource)
}

/// The real binaries, one after the other, against the test API server on
/// this machine: every request each makes is allowed by its ServiceAccount's
/// rendered RBAC, and each permission is used — except `patch` on Events
/// (kube's Recorder patches only an Event repeated with the same reason
/// before the object changes; rare, but it happens, so it is granted).
/// The agent has no IPVS here (nor in most CI): its API traffic is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_recorded_requests_are_allowed_by_their_rbac() {
    use ipvs_operator_tests::apiserver::{kubeconfig_yaml, Config, TestApiServer};

    let yaml = rendered();
    let mut config = Config::default();
    config.namespaces.push(NAMESPACE.into());
    let server = TestApiServer::start(config).await.expect("the test API server starts");
    let handle = server.handle().clone();
    handle.load_manifests(CLUSTER).expect("the cluster loads");
    let dir = std::env::temp_dir().join(format!("ipvs-operator-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(server.url())).expect("the kubeconfig is written");
    let client = server.client().expect("a client");
    let weighted_services: kube::Api<WeightedService> = kube::Api::namespaced(client, "shop");

    // The controller: until both statuses are written, an Event is out and
    // both WeightedServices' PodInfoSlices are published (created by apply).
    handle.clear_requests();
    let controller = Running::start(&["controller", "--listen=127.0.0.1:0"], &kubeconfig, dir.join("controller.log"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let list = weighted_services.list(&Default::default()).await;
        let statuses = list.map(|l| l.items.iter().filter(|ws| ws.status.is_some()).count()).unwrap_or(0);
        let requests = handle.requests();
        let published =
            requests.iter().filter(|r| r.resource == "podinfoslices" && r.verb == "patch" && r.code == 201).count();
        if statuses == 2
            && has(&requests, "create", "events")
            && requests.iter().any(|r| r.resource == "services" && r.code == 201)
            && published == 2
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for the controller; log:\n{}", controller.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // `broken` selects no pod any more (changed in the store, not through the
    // API: no request of this test's is recorded): its slice is deleted.
    let broken = &CLUSTER[CLUSTER.rfind("---").expect("the last document")..];
    handle.load_manifests(&broken.replace("{app: web}", "{app: nothing}")).expect("`broken` reselected");
    wait_for(
        "the controller to delete the emptied PodInfoSlice",
        60,
        || {
            let requests = handle.requests();
            requests.iter().any(|r| r.resource == "podinfoslices" && r.verb == "delete" && r.name == "broken-0" && r.code == 200)
        },
        &controller,
    )
    .await;
    let controller_log = controller.log();
    controller.stop();
    // Only the controller ran: every request but this test's own lists (in
    // one namespace; the controller's are of all namespaces) is its.
    let requests: Vec<RequestRecord> = handle
        .requests()
        .into_iter()
        .filter(|r| !(r.verb == "list" && r.resource == "weightedservices" && r.namespace == "shop"))
        .collect();
    if let Err(denied) = rbac::check_requests(&yaml, CONTROLLER_SA, &requests) {
        panic!("the controller was denied:\n{}\nlog:\n{controller_log}", denied.join("\n"));
    }
    let unused = rbac::unused_permissions(&yaml, CONTROLLER_SA, &requests).err().unwrap_or_default();
    assert!(unused.is_empty(), "the controller holds more than it used:\n{}", unused.join("\n"));

    // The agent: until every watch is open and it has sent an Event. Not about
    // `broken`'s missing policy: the controller's status reports that, so no
    // agent does. About a pod no PodInfoSlice names: with the controller
    // stopped, a third replica is not published, and after 30 s the agent
    // weights it as a pod without labels, and says so.
    let deployment = &CLUSTER[..CLUSTER.find("---").expect("the first document")];
    handle.load_manifests(&deployment.replace("replicas: 2", "replicas: 3")).expect("the Deployment scaled up");
    handle.clear_requests();
    let agent = Running::start(&["agent", "--listen=127.0.0.1:0"], &kubeconfig, dir.join("agent.log"));
    wait_for(
        "the agent's watches and its Event about the unpublished pod",
        120,
        || {
            let requests = handle.requests();
            let watched = ["weightedservices", "services", "endpointslices", "podinfoslices", "nodes"];
            watched.iter().all(|r| has(&requests, "watch", r))
                && has(&requests, "create", "events")
                && handle.list("events", Some("shop")).iter().any(|e| e["reason"] == "PodInfoMissing")
        },
        &agent,
    )
    .await;
    let agent_log = agent.log();
    agent.stop();
    let requests = handle.requests();
    if let Err(denied) = rbac::check_requests(&yaml, AGENT_SA, &requests) {
        panic!("the agent was denied:\n{}\nlog:\n{agent_log}", denied.join("\n"));
    }
    let unused = rbac::unused_permissions(&yaml, AGENT_SA, &requests).err().unwrap_or_default();
    assert!(unused.is_empty(), "the agent holds more than it used:\n{}", unused.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
