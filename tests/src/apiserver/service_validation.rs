//! Services as the real server checks them, written after
//! `pkg/apis/core/validation.ValidateService` and `ValidateServiceUpdate`,
//! the Service registry's strategy (`dropTypeDependentFields`) and defaults
//! (`SetDefaults_Service`), and its IP and node-port allocators — for what
//! the operator can produce and a user can write into a WeightedService:
//!
//! - `spec.type`, `sessionAffinity`, `externalTrafficPolicy`,
//!   `internalTrafficPolicy`, `ipFamilies`, `ipFamilyPolicy`: supported values;
//! - ports: required unless headless or `ExternalName`; `port`, `targetPort`
//!   (number 1–65535 or an IANA service name), `protocol`; names required
//!   when there are several, DNS labels, unique; `port`+`protocol` unique;
//!   `nodePort`+`protocol` unique; `nodePort` only for `NodePort` and
//!   `LoadBalancer`, within the node-port range and not allocated to another
//!   Service;
//! - `clusterIP`, `clusterIPs`, `ipFamilies`, `ipFamilyPolicy`, as
//!   `ValidateServiceClusterIPsRelatedFields` and the allocator's
//!   `initIPFamilyFields` check and default them ([`init_families`]): IPs,
//!   `None` or empty; `clusterIPs[0]` is `clusterIP`; at most one address a
//!   family, each of its `ipFamilies` entry's family; `None` not for
//!   `NodePort` or `LoadBalancer`; a family the cluster has no range for
//!   refused, as `RequireDualStack` on a single-stack cluster; a requested IP
//!   within its family's Service CIDR and free; `clusterIPs[0]` and
//!   `ipFamilies[0]` immutable once set, the secondary ones released only
//!   with `SingleStack` (`validateUpgradeDowngradeClusterIPs`);
//! - `externalIPs` valid IPs; `externalTrafficPolicy` only on externally
//!   reachable Services; `loadBalancerSourceRanges`, `loadBalancerClass`,
//!   `allocateLoadBalancerNodePorts` only for `LoadBalancer`;
//!   `sessionAffinityConfig` only with `ClientIP`, its timeout 1–86400 s
//!   (defaulted to 10800).
//!
//! A change of `type` drops the fields the new type has no use for when the
//! write left them as they were (node ports, `externalTrafficPolicy`, …), as
//! the real strategy does, before validation. An update that leaves out the
//! allocated `clusterIP`/`clusterIPs` keeps them (`patchAllocatedValues`,
//! `NormalizeClusterIPs`); one that leaves out `ipFamilyPolicy` keeps the
//! policy. Raising the policy from `SingleStack` adds the second family (its
//! address is allocated), lowering it to `SingleStack` releases it.
//!
//! - `trafficDistribution`: `PreferClose`, `PreferSameZone` or `PreferSameNode`.
//!
//! Not checked (the operator never writes them): selector label syntax,
//! `externalName` syntax, `healthCheckNodePort`, `publishNotReadyAddresses`,
//! status. The real server checks in stages (the families, then the
//! allocations, then the rest) and answers the first stage's errors; this one
//! answers the families' errors alone, and the others together.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::{Map, Value, json};

use super::error::{FieldError, FieldErrorKind};
use super::{Cidr, Cidr6};

/// What the allocators know of the other Services.
pub(crate) struct Allocated<'a> {
    /// Node ports of every other Service.
    pub node_ports: BTreeSet<u16>,
    /// ClusterIPs of every other Service.
    pub cluster_ips: BTreeSet<IpAddr>,
    /// The configured ranges.
    pub node_port_range: &'a std::ops::RangeInclusive<u16>,
    pub service_cidr: Cidr,
    /// The IPv6 range of a dual-stack cluster.
    pub service_cidr_v6: Option<Cidr6>,
}

pub(crate) const IPV4: &str = "IPv4";
pub(crate) const IPV6: &str = "IPv6";

/// The family (`IPv4`, `IPv6`) of an address; `None` if it is none.
pub(crate) fn family_of(ip: &str) -> Option<&'static str> {
    ip.parse::<IpAddr>().ok().map(|a| if a.is_ipv6() { IPV6 } else { IPV4 })
}

/// The strings of a JSON list (others skipped).
pub(crate) fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
}

fn other_family(f: &str) -> &'static str {
    if f == IPV4 { IPV6 } else { IPV4 }
}

/// A `[]core.IPFamily` as Go's `%#v` prints it.
fn go_families(items: &[String]) -> String {
    format!("[]core.IPFamily{{{}}}", items.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", "))
}

fn s<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn externally_reachable(typ: &str) -> bool {
    matches!(typ, "NodePort" | "LoadBalancer")
}

/// The registry's strategy and defaults: on a change of `type`, fields the
/// new type has no use for are dropped when the write did not change them;
/// `ClientIP` affinity gets its default timeout.
pub(crate) fn normalize(svc: &mut Value, old: Option<&Value>) {
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else { return };
    let typ = spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP").to_string();
    if let Some(old) = old {
        let old_spec = old.get("spec").cloned().unwrap_or_else(|| json!({}));
        let unchanged = |spec: &serde_json::Map<String, Value>, f: &str| spec.get(f) == old_spec.get(f);
        if !externally_reachable(&typ) {
            if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                let old_ports = old_spec.get("ports").and_then(Value::as_array).cloned().unwrap_or_default();
                for (i, p) in ports.iter_mut().enumerate() {
                    let was = old_ports.get(i).and_then(|o| o.get("nodePort"));
                    if let Some(m) = p.as_object_mut()
                        && m.get("nodePort").is_some()
                        && m.get("nodePort") == was
                    {
                        m.remove("nodePort");
                    }
                }
            }
            let has_external_ips = spec.get("externalIPs").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
            if !has_external_ips && unchanged(spec, "externalTrafficPolicy") {
                spec.remove("externalTrafficPolicy");
            }
        }
        if typ != "LoadBalancer" {
            for f in ["allocateLoadBalancerNodePorts", "loadBalancerClass", "healthCheckNodePort"] {
                if unchanged(spec, f) {
                    spec.remove(f);
                }
            }
        }
    }
    let timeout = spec.get("sessionAffinityConfig").and_then(|c| c.pointer("/clientIP/timeoutSeconds"));
    if spec.get("sessionAffinity").and_then(Value::as_str) == Some("ClientIP") && timeout.is_none() {
        spec.insert("sessionAffinityConfig".into(), json!({"clientIP": {"timeoutSeconds": 10800}}));
    }
    normalize_cluster_ips(spec, old.and_then(|o| o.get("spec")), &typ);
}

/// The registry's `patchAllocatedValues` and `NormalizeClusterIPs`: an
/// update that leaves out the allocated addresses keeps them, and
/// `clusterIPs` follows `clusterIP` when only that was written.
fn normalize_cluster_ips(spec: &mut Map<String, Value>, old_spec: Option<&Value>, typ: &str) {
    let ip = |spec: &Map<String, Value>| spec.get("clusterIP").and_then(Value::as_str).unwrap_or_default().to_string();
    let Some(old_spec) = old_spec else {
        let ip = ip(spec);
        if !ip.is_empty() && strings(spec.get("clusterIPs")).is_empty() {
            spec.insert("clusterIPs".into(), json!([ip]));
        }
        return;
    };
    let old_ip = old_spec.get("clusterIP").and_then(Value::as_str).unwrap_or_default().to_string();
    let old_ips = strings(old_spec.get("clusterIPs"));
    let old_typ = old_spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP");
    if typ != "ExternalName" && old_typ != "ExternalName" {
        if ip(spec).is_empty() && !old_ip.is_empty() {
            spec.insert("clusterIP".into(), json!(old_ip));
        }
        if strings(spec.get("clusterIPs")).is_empty() && !old_ips.is_empty() {
            spec.insert("clusterIPs".into(), json!(old_ips));
        }
    }
    let new_ip = ip(spec);
    if new_ip != old_ip && strings(spec.get("clusterIPs")) == old_ips {
        // Only `clusterIP` was written: cleared, `clusterIPs` goes too; changed, it follows.
        if new_ip.is_empty() {
            spec.remove("clusterIPs");
        } else {
            spec.insert("clusterIPs".into(), json!([new_ip]));
        }
    }
}

/// `ValidateServiceClusterIPsRelatedFields`: the four fields on their own
/// and against each other.
fn related_field_errors(spec: &Map<String, Value>) -> Vec<FieldError> {
    let mut out = Vec::new();
    let ip = spec.get("clusterIP").and_then(Value::as_str).unwrap_or_default();
    let ips = strings(spec.get("clusterIPs"));
    let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let bad_ips = |detail: &str| with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs", go_strings(&ip_refs), detail);
    if !ip.is_empty() {
        if ips.is_empty() {
            out.push(FieldError::bare(FieldErrorKind::Required, "spec.clusterIPs", ""));
        } else if ips[0] != ip {
            out.push(bad_ips("first value must match `clusterIP`"));
        }
    } else if !ips.is_empty() {
        out.push(bad_ips("must be empty when `clusterIP` is not specified"));
    }
    let mut seen = BTreeSet::new();
    for (i, f) in spec.get("ipFamilies").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if !f.as_str().is_some_and(|x| x == IPV4 || x == IPV6) {
            out.push(not_supported(format!("spec.ipFamilies[{i}]"), f, &[IPV4, IPV6]));
        }
        if !seen.insert(f.to_string()) {
            out.push(FieldError::new(FieldErrorKind::Duplicate, format!("spec.ipFamilies[{i}]"), f, ""));
        }
    }
    const POLICIES: [&str; 3] = ["PreferDualStack", "RequireDualStack", "SingleStack"];
    if let Some(v) = spec.get("ipFamilyPolicy")
        && !v.as_str().is_some_and(|x| POLICIES.contains(&x))
    {
        out.push(not_supported("spec.ipFamilyPolicy", v, &POLICIES));
    }
    let mut invalid = false;
    for (i, a) in ips.iter().enumerate() {
        if i == 0 && a == "None" {
            if ips.len() > 1 {
                invalid = true;
                out.push(bad_ips("'None' must be the first and only value"));
            }
            continue;
        }
        if family_of(a).is_none() {
            invalid = true;
            out.push(FieldError::new(FieldErrorKind::Invalid, format!("spec.clusterIPs[{i}]"), &json!(a), IP_DETAIL));
        }
    }
    if ips.len() > 2 {
        out.push(bad_ips("may only hold up to 2 values"));
    }
    if invalid {
        return out;
    }
    if ips.len() > 1 && family_of(&ips[0]) == family_of(&ips[1]) {
        out.push(bad_ips("may specify no more than one IP for each IP family"));
    }
    let families = strings(spec.get("ipFamilies"));
    if ips.first().is_some_and(|a| a != "None") {
        for (i, (a, f)) in ips.iter().zip(&families).enumerate() {
            if family_of(a).is_some_and(|af| af != f) && (f == IPV4 || f == IPV6) {
                let detail = format!("expected an {f} value as indicated by `ipFamilies[{i}]`");
                out.push(FieldError::new(FieldErrorKind::Invalid, format!("spec.clusterIPs[{i}]"), &json!(a), detail));
            }
        }
    }
    out
}

/// The allocator's `initIPFamilyFields`: checks `ipFamilyPolicy`,
/// `ipFamilies` and `clusterIPs` against each other and the cluster (`dual`:
/// it has an IPv6 Service range besides the IPv4 one), and defaults them:
/// the policy (the old one on an update; `RequireDualStack` for a headless
/// Service without selector; else `SingleStack`), the families (those of the
/// requested IPs, else the cluster's primary, IPv4; the other one added
/// under a dual-stack policy when the cluster has both), and a downgrade to
/// `SingleStack` drops the secondary family and IP. What it refuses is
/// refused before anything else is looked at, as on the real server.
pub(crate) fn init_families(svc: &mut Value, old: Option<&Value>, dual: bool) -> Vec<FieldError> {
    let old_spec = old.and_then(|o| o.get("spec"));
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else { return Vec::new() };
    if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
        return Vec::new();
    }
    let configured = |f: &str| f == IPV4 || (f == IPV6 && dual);
    let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
    let selectorless = spec.get("selector").and_then(Value::as_object).is_none_or(Map::is_empty);
    if spec.get("ipFamilyPolicy").is_none_or(Value::is_null) {
        let kept = old_spec.and_then(|o| o.get("ipFamilyPolicy")).filter(|p| !p.is_null()).cloned();
        let default = if headless && selectorless { "RequireDualStack" } else { "SingleStack" };
        let policy = kept.unwrap_or_else(|| json!(default));
        spec.insert("ipFamilyPolicy".into(), policy);
    }
    let mut out = related_field_errors(spec);
    if !out.is_empty() {
        return out;
    }
    let policy = spec.get("ipFamilyPolicy").and_then(Value::as_str).unwrap_or("SingleStack").to_string();
    let single = policy == "SingleStack";
    let mut ips = strings(spec.get("clusterIPs"));
    let mut families = strings(spec.get("ipFamilies"));
    if let Some(old_spec) = old_spec {
        let (old_ips, old_families) = (strings(old_spec.get("clusterIPs")), strings(old_spec.get("ipFamilies")));
        if single {
            // Unchanged fields under a new SingleStack policy: a downgrade.
            if ips == old_ips && ips.len() > 1 {
                ips.truncate(1);
            }
            if families == old_families && families.len() > 1 {
                families.truncate(1);
            }
        } else {
            if !ips.is_empty() && ips.len() < old_ips.len() {
                out.push(FieldError::new(
                    FieldErrorKind::Invalid,
                    "spec.ipFamilyPolicy",
                    &json!(policy),
                    "must be 'SingleStack' to release the secondary cluster IP",
                ));
            }
            if !families.is_empty() && families.len() < old_families.len() {
                out.push(FieldError::new(
                    FieldErrorKind::Invalid,
                    "spec.ipFamilyPolicy",
                    &json!(policy),
                    "must be 'SingleStack' to release the secondary IP family",
                ));
            }
        }
    }
    if single && ips.len() == 2 {
        let detail = "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified";
        out.push(FieldError::new(FieldErrorKind::Invalid, "spec.ipFamilyPolicy", &json!(policy), detail));
    }
    if single && families.len() == 2 {
        let detail = "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified";
        out.push(FieldError::new(FieldErrorKind::Invalid, "spec.ipFamilyPolicy", &json!(policy), detail));
    }
    // The families of requested IPs that name none.
    let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    for (i, a) in ips.iter().enumerate() {
        let Some(f) = family_of(a) else { break };
        if i >= families.len() {
            if configured(f) {
                families.push(f.to_string());
            } else {
                let detail = format!("{f} is not configured on this cluster");
                let field = format!("spec.clusterIPs[{i}]");
                out.push(with_raw_value(FieldErrorKind::Invalid, field, go_strings(&ip_refs), detail));
            }
        }
    }
    if !out.is_empty() {
        return out;
    }
    if headless && selectorless {
        // Allowed more than any other: both families even on a single-stack cluster.
        if families.is_empty() {
            families.push(IPV4.to_string());
        }
        if families.len() < 2 && !single {
            families.push(other_family(&families[0]).to_string());
        }
    } else {
        if policy == "RequireDualStack" && !dual {
            let detail = "this cluster is not configured for dual-stack services";
            out.push(FieldError::new(FieldErrorKind::Invalid, "spec.ipFamilyPolicy", &json!(policy), detail));
        }
        for (i, f) in families.iter().enumerate() {
            if !configured(f) {
                let field = format!("spec.ipFamilies[{i}]");
                out.push(FieldError::new(FieldErrorKind::Invalid, field, &json!(f), "not configured on this cluster"));
            }
        }
        if !out.is_empty() {
            return out;
        }
        if families.is_empty() {
            families.push(IPV4.to_string());
        }
        if !single && families.len() == 1 && dual {
            families.push(other_family(&families[0]).to_string());
        }
    }
    if !ips.is_empty() {
        spec.insert("clusterIPs".into(), json!(ips));
    }
    spec.insert("ipFamilies".into(), json!(families));
    out
}

fn not_supported(field: impl Into<String>, v: &Value, allowed: &[&str]) -> FieldError {
    let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    FieldError::new(FieldErrorKind::NotSupported, field, v, format!("supported values: {}", list.join(", ")))
}

fn check_enum(spec: &Value, field: &str, allowed: &[&str], out: &mut Vec<FieldError>) {
    // A null is an absent field, as decoding reads it.
    if let Some(v) = spec.get(field).filter(|v| !v.is_null())
        && !v.as_str().is_some_and(|x| allowed.contains(&x))
    {
        out.push(not_supported(format!("spec.{field}"), v, allowed));
    }
}

/// A value as Go's `%#v` prints a `[]string`.
fn go_strings(items: &[&str]) -> String {
    format!("[]string{{{}}}", items.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", "))
}

fn with_raw_value(kind: FieldErrorKind, field: impl Into<String>, raw: String, detail: impl Into<String>) -> FieldError {
    FieldError { kind, field: field.into(), value: Some(raw), detail: detail.into() }
}

const IP_DETAIL: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";
const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

/// `validation.IsDNS1123Label`.
fn dns_label_errors(name: &str) -> Vec<String> {
    let mut e = Vec::new();
    if name.len() > 63 {
        e.push("must be no more than 63 characters".to_string());
    }
    let ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        e.push("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_string());
    }
    e
}

/// `validation.IsValidPortName` (an IANA service name).
fn port_name_errors(name: &str) -> Vec<&'static str> {
    let mut e = Vec::new();
    if name.is_empty() || name.len() > 15 {
        e.push("must be no more than 15 characters");
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        e.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if name.contains("--") {
        e.push("must not contain consecutive hyphens");
    }
    if !name.chars().any(|c| c.is_ascii_lowercase()) {
        e.push("must contain at least one letter (a-z)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        e.push("must not begin or end with a hyphen");
    }
    e
}

fn port_number(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_i64)
}

/// What the real server refuses in Service `svc` (normalized: see
/// [`normalize`]), replacing `old` if this is an update.
pub(crate) fn validate(svc: &Value, old: Option<&Value>, allocated: &Allocated<'_>) -> Vec<FieldError> {
    let mut out = Vec::new();
    let empty = json!({});
    let spec = svc.get("spec").unwrap_or(&empty);
    let typ = spec.get("type").and_then(Value::as_str).unwrap_or("ClusterIP");
    check_enum(spec, "type", &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"], &mut out);
    check_enum(spec, "sessionAffinity", &["ClientIP", "None"], &mut out);
    check_enum(spec, "externalTrafficPolicy", &["Cluster", "Local"], &mut out);
    check_enum(spec, "internalTrafficPolicy", &["Cluster", "Local"], &mut out);
    check_enum(spec, "trafficDistribution", &["PreferClose", "PreferSameZone", "PreferSameNode"], &mut out);

    let cluster_ip = s(spec, "/clusterIP").unwrap_or_default();
    let headless = cluster_ip == "None";
    if typ == "ExternalName" {
        if s(spec, "/externalName").is_none_or(str::is_empty) {
            out.push(FieldError::bare(FieldErrorKind::Required, "spec.externalName", ""));
        }
    } else {
        check_cluster_ip(spec, old, typ, allocated, &mut out);
    }

    let ports: Vec<Value> = spec.get("ports").and_then(Value::as_array).cloned().unwrap_or_default();
    if ports.is_empty() && !headless && typ != "ExternalName" {
        out.push(FieldError::bare(FieldErrorKind::Required, "spec.ports", ""));
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() {
            if ports.len() > 1 {
                out.push(FieldError::bare(FieldErrorKind::Required, format!("{path}.name"), ""));
            }
        } else {
            for e in dns_label_errors(name) {
                out.push(FieldError::new(FieldErrorKind::Invalid, format!("{path}.name"), &Value::from(name), e));
            }
            if !names.insert(name.to_string()) {
                out.push(FieldError::new(FieldErrorKind::Duplicate, format!("{path}.name"), &Value::from(name), ""));
            }
        }
        match port_number(p.get("port")) {
            Some(1..=65535) => {}
            _ => out.push(FieldError::new(FieldErrorKind::Invalid, format!("{path}.port"), p.get("port").unwrap_or(&json!(0)), PORT_RANGE)),
        }
        let protocol = p.get("protocol").cloned().unwrap_or_else(|| json!("TCP"));
        if !protocol.as_str().is_some_and(|x| matches!(x, "TCP" | "UDP" | "SCTP")) {
            out.push(not_supported(format!("{path}.protocol"), &protocol, &["SCTP", "TCP", "UDP"]));
        }
        match p.get("targetPort") {
            None => {}
            Some(Value::String(n)) => {
                for e in port_name_errors(n) {
                    out.push(FieldError::new(FieldErrorKind::Invalid, format!("{path}.targetPort"), &Value::from(n.as_str()), e));
                }
            }
            Some(v) => {
                if !matches!(port_number(Some(v)), Some(1..=65535)) {
                    out.push(FieldError::new(FieldErrorKind::Invalid, format!("{path}.targetPort"), v, PORT_RANGE));
                }
            }
        }
        if let Some(np) = port_number(p.get("nodePort")).filter(|n| *n != 0) {
            if !externally_reachable(typ) {
                out.push(FieldError::bare(
                    FieldErrorKind::Forbidden,
                    format!("{path}.nodePort"),
                    format!("may not be used when `type` is '{typ}'"),
                ));
            } else {
                let old_ports: Vec<i64> = old
                    .and_then(|o| o.pointer("/spec/ports"))
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|o| port_number(o.get("nodePort")))
                    .collect();
                let range = allocated.node_port_range;
                let kept = old_ports.contains(&np);
                if !kept && !(i64::from(*range.start())..=i64::from(*range.end())).contains(&np) {
                    out.push(FieldError::new(
                        FieldErrorKind::Invalid,
                        format!("{path}.nodePort"),
                        &Value::from(np),
                        format!(
                            "provided port is not in the valid range. The range of valid ports is {}-{}",
                            range.start(),
                            range.end()
                        ),
                    ));
                } else if !kept && u16::try_from(np).is_ok_and(|n| allocated.node_ports.contains(&n)) {
                    out.push(FieldError::new(FieldErrorKind::Invalid, format!("{path}.nodePort"), &Value::from(np), "provided port is already allocated"));
                }
            }
        }
    }
    // Duplicates of port+protocol and of nodePort+protocol.
    let mut seen = BTreeSet::new();
    let mut seen_node = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        let port = port_number(p.get("port")).unwrap_or(0);
        if !seen.insert((protocol, port)) {
            out.push(with_raw_value(
                FieldErrorKind::Duplicate,
                format!("spec.ports[{i}]"),
                format!(
                    "core.ServicePort{{Name:\"\", Protocol:{protocol:?}, AppProtocol:(*string)(nil), Port:{port}, TargetPort:intstr.IntOrString{{Type:0, IntVal:0, StrVal:\"\"}}, NodePort:0}}"
                ),
                "",
            ));
        }
        if let Some(np) = port_number(p.get("nodePort")).filter(|n| *n != 0)
            && !seen_node.insert((protocol, np))
        {
            out.push(FieldError::new(FieldErrorKind::Duplicate, format!("spec.ports[{i}].nodePort"), &Value::from(np), ""));
        }
    }

    for (i, ip) in spec.get("externalIPs").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if !ip.as_str().is_some_and(|x| x.parse::<IpAddr>().is_ok()) {
            out.push(FieldError::new(FieldErrorKind::Invalid, format!("spec.externalIPs[{i}]"), ip, IP_DETAIL));
        }
    }
    let has_external_ips = spec.get("externalIPs").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
    if let Some(v) = spec.get("externalTrafficPolicy")
        && !externally_reachable(typ)
        && !has_external_ips
    {
        out.push(FieldError::new(FieldErrorKind::Invalid, "spec.externalTrafficPolicy", v, "may only be set for externally-accessible services"));
    }
    if typ != "LoadBalancer" {
        if spec.get("loadBalancerSourceRanges").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            out.push(FieldError::bare(FieldErrorKind::Forbidden, "spec.loadBalancerSourceRanges", "may only be used when `type` is 'LoadBalancer'"));
        }
        if spec.get("allocateLoadBalancerNodePorts").is_some_and(|v| !v.is_null()) {
            out.push(FieldError::bare(FieldErrorKind::Forbidden, "spec.allocateLoadBalancerNodePorts", "may only be used when `type` is 'LoadBalancer'"));
        }
        if spec.get("loadBalancerClass").is_some_and(|v| !v.is_null()) {
            out.push(FieldError::bare(FieldErrorKind::Forbidden, "spec.loadBalancerClass", "may only be used when `type` is 'LoadBalancer'"));
        }
    }
    let affinity = s(spec, "/sessionAffinity").unwrap_or("None");
    match (affinity, spec.get("sessionAffinityConfig").filter(|c| !c.is_null())) {
        ("ClientIP", Some(c)) => {
            if let Some(t) = c.pointer("/clientIP/timeoutSeconds")
                && !t.as_i64().is_some_and(|t| (1..=86400).contains(&t))
            {
                out.push(FieldError::new(
                    FieldErrorKind::Invalid,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    t,
                    "must be greater than 0 and less than 86400",
                ));
            }
        }
        ("None", Some(c)) => out.push(FieldError::new(
            FieldErrorKind::Invalid,
            "spec.sessionAffinityConfig",
            c,
            "must not be set when session affinity is None",
        )),
        _ => {}
    }
    out
}

/// What [`init_families`] leaves to `ValidateService(Update)` and the
/// allocators: `None` per type, what an update may change, and the requested
/// addresses this write allocates.
fn check_cluster_ip(spec: &Value, old: Option<&Value>, typ: &str, allocated: &Allocated<'_>, out: &mut Vec<FieldError>) {
    let ips = strings(spec.get("clusterIPs"));
    let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let headless = ips.first().is_some_and(|i| i == "None");
    if headless && externally_reachable(typ) {
        out.push(FieldError::new(
            FieldErrorKind::Invalid,
            "spec.clusterIPs[0]",
            &Value::from("None"),
            format!("may not be set to 'None' for {typ} services"),
        ));
    }
    let old_spec = old.and_then(|o| o.get("spec"));
    let was_external_name = old_spec.and_then(|o| o.get("type")).and_then(Value::as_str) == Some("ExternalName");
    let old_ips = old_spec.map(|o| strings(o.get("clusterIPs"))).unwrap_or_default();
    if let Some(old_spec) = old_spec.filter(|_| !was_external_name) {
        let before = out.len();
        check_update(spec, old_spec, &ips, &old_ips, out);
        if out.len() > before {
            return;
        }
    }
    // Requested addresses this write allocates (the others are the Service's already).
    for w in ips.iter().filter(|w| *w != "None" && (was_external_name || !old_ips.contains(w))) {
        let Ok(addr) = w.parse::<IpAddr>() else { continue };
        let range = match addr {
            IpAddr::V4(a) => (!allocated.service_cidr.contains(a)).then(|| allocated.service_cidr.to_string()),
            IpAddr::V6(a) => allocated.service_cidr_v6.filter(|c| !c.contains(a)).map(|c| c.to_string()),
        };
        let why = if let Some(range) = range {
            let range = format!("The range of valid IPs is {range}");
            format!("failed to allocate IP {w}: provided IP is not in the valid range. {range}")
        } else if allocated.cluster_ips.contains(&addr) {
            format!("failed to allocate IP {w}: provided IP is already allocated")
        } else {
            continue;
        };
        out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs", go_strings(&ip_refs), why));
    }
}

/// `validateUpgradeDowngradeClusterIPs` and `…IPFamilies`: the primary
/// address and family never change; a secondary one goes only under
/// `SingleStack`.
fn check_update(spec: &Value, old_spec: &Value, ips: &[String], old_ips: &[String], out: &mut Vec<FieldError>) {
    let ip_refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let single = spec.get("ipFamilyPolicy").and_then(Value::as_str) == Some("SingleStack");
    let old_headless = old_ips.first().is_some_and(|i| i == "None");
    let headless = ips.first().is_some_and(|i| i == "None");
    let changed = |out: &mut Vec<FieldError>, field: &str, raw: String| {
        out.push(with_raw_value(FieldErrorKind::Invalid, field, raw, "may not change once set"));
    };
    if !(old_headless && headless) {
        if ips.len() == old_ips.len() {
            for (i, (a, b)) in old_ips.iter().zip(ips).enumerate() {
                if a != b {
                    changed(out, &format!("spec.clusterIPs[{i}]"), go_strings(&ip_refs));
                }
            }
        } else if ips.len() < old_ips.len() {
            if ips.is_empty() {
                let e = "primary clusterIP can not be unset";
                out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs[0]", go_strings(&ip_refs), e));
            } else if ips[0] != old_ips[0] {
                changed(out, "spec.clusterIPs[0]", go_strings(&ip_refs));
            }
            if ips.len() == 1 && !single {
                let e = "`ipFamilyPolicy` must be set to 'SingleStack' when releasing the secondary clusterIP";
                out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs[0]", go_strings(&ip_refs), e));
            }
        } else if !old_ips.is_empty() && ips[0] != old_ips[0] {
            changed(out, "spec.clusterIPs[0]", go_strings(&ip_refs));
        }
    }
    // Headless Services may change families, and so may a change to or from headless.
    if old_headless || headless {
        return;
    }
    let families = strings(spec.get("ipFamilies"));
    let old_families = strings(old_spec.get("ipFamilies"));
    if families.is_empty() || old_families.is_empty() {
        return;
    }
    if families[0] != old_families[0] || (families.len() == old_families.len() && families != old_families) {
        changed(out, "spec.ipFamilies[0]", go_families(&families));
    }
    if families.len() < old_families.len() && !single {
        let e = "`ipFamilyPolicy` must be set to 'SingleStack' when releasing the secondary ipFamily";
        out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs[0]", go_strings(&ip_refs), e));
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn allocated(range: &std::ops::RangeInclusive<u16>, dual: bool) -> Allocated<'_> {
        Allocated {
            node_ports: [30080].into(),
            cluster_ips: ["10.96.0.10", "fd00:10:96::10"].iter().filter_map(|a| a.parse().ok()).collect(),
            node_port_range: range,
            service_cidr: "10.96.0.0/12".parse().expect("cidr"),
            service_cidr_v6: dual.then(|| "fd00:10:96::/112".parse().expect("cidr")),
        }
    }

    /// What the server answers to `svc` (replacing `old`) on a cluster that
    /// is dual-stack or not, and the Service as it is stored if it is taken.
    fn check(svc: Value, old: Option<&Value>, dual: bool) -> (Vec<String>, Value) {
        let range = 30000..=32767;
        let mut svc = svc;
        normalize(&mut svc, old);
        let early = init_families(&mut svc, old, dual);
        if !early.is_empty() {
            return (early.iter().map(ToString::to_string).collect(), svc);
        }
        (validate(&svc, old, &allocated(&range, dual)).iter().map(ToString::to_string).collect(), svc)
    }

    /// On a single-stack cluster.
    fn errors(svc: Value, old: Option<&Value>) -> Vec<String> {
        check(svc, old, false).0
    }

    #[test]
    fn ports_as_the_real_server_checks_them() {
        let svc = json!({"metadata": {"name": "web"}, "spec": {"ports": [
            {"port": 80, "protocol": "TCP", "targetPort": 8080},
            {"port": 80, "targetPort": "http_alt"},
            {"name": "Web", "port": 0, "protocol": "ICMP", "targetPort": 70000},
            {"name": "b", "port": 443, "nodePort": 30443},
        ]}});
        assert_eq!(
            errors(svc, None),
            [
                "spec.ports[0].name: Required value",
                "spec.ports[1].name: Required value",
                "spec.ports[1].targetPort: Invalid value: \"http_alt\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
                "spec.ports[2].name: Invalid value: \"Web\": a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
                "spec.ports[2].port: Invalid value: 0: must be between 1 and 65535, inclusive",
                "spec.ports[2].protocol: Unsupported value: \"ICMP\": supported values: \"SCTP\", \"TCP\", \"UDP\"",
                "spec.ports[2].targetPort: Invalid value: 70000: must be between 1 and 65535, inclusive",
                "spec.ports[3].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'",
                "spec.ports[1]: Duplicate value: core.ServicePort{Name:\"\", Protocol:\"TCP\", AppProtocol:(*string)(nil), Port:80, TargetPort:intstr.IntOrString{Type:0, IntVal:0, StrVal:\"\"}, NodePort:0}",
            ]
        );
    }

    #[test]
    fn node_ports_cluster_ips_and_families() {
        let svc = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
            {"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 80}, {"name": "c", "port": 82, "nodePort": 30082},
            {"name": "d", "port": 83, "nodePort": 30082},
        ]}});
        assert_eq!(
            errors(svc, None),
            [
                "spec.clusterIPs: Invalid value: []string{\"10.96.0.10\"}: failed to allocate IP 10.96.0.10: provided IP is already allocated",
                "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated",
                "spec.ports[1].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767",
                "spec.ports[3].nodePort: Duplicate value: 30082",
            ]
        );
        let headless = json!({"spec": {"type": "LoadBalancer", "clusterIP": "None", "ports": [{"port": 80}]}});
        assert_eq!(errors(headless, None), ["spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for LoadBalancer services"]);
        // IPv6 on a single-stack cluster, as the families are checked first (alone).
        let v6 = json!({"spec": {"ipFamilies": ["IPv6"], "ports": [{"port": 80, "nodePort": 30080}]}});
        assert_eq!(errors(v6, None), ["spec.ipFamilies[0]: Invalid value: \"IPv6\": not configured on this cluster"]);
        let v6 = json!({"spec": {"clusterIP": "fd00:10:96::20", "ports": [{"port": 80}]}});
        assert_eq!(
            errors(v6, None),
            ["spec.clusterIPs[0]: Invalid value: []string{\"fd00:10:96::20\"}: IPv6 is not configured on this cluster"]
        );
        let mismatch = json!({"spec": {"clusterIP": "10.96.0.20", "ipFamilies": ["IPv6"], "ports": [{"port": 80}]}});
        assert_eq!(
            check(mismatch, None, true).0,
            ["spec.clusterIPs[0]: Invalid value: \"10.96.0.20\": expected an IPv6 value as indicated by `ipFamilies[0]`"]
        );
    }

    #[test]
    fn families_follow_the_policy_and_the_cluster() {
        let svc = |spec: Value| {
            let mut v = json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
            for (k, x) in spec.as_object().into_iter().flatten() {
                v["spec"][k] = x.clone();
            }
            v
        };
        let families = |spec: Value, dual: bool| {
            let (e, v) = check(svc(spec), None, dual);
            assert_eq!(e, Vec::<String>::new());
            (v["spec"]["ipFamilyPolicy"].clone(), v["spec"]["ipFamilies"].clone())
        };
        assert_eq!(families(json!({}), true), (json!("SingleStack"), json!(["IPv4"])));
        let prefer = json!({"ipFamilyPolicy": "PreferDualStack"});
        assert_eq!(families(prefer.clone(), true), (json!("PreferDualStack"), json!(["IPv4", "IPv6"])));
        assert_eq!(families(prefer, false), (json!("PreferDualStack"), json!(["IPv4"])));
        let v6_first = json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]});
        assert_eq!(families(v6_first, true), (json!("RequireDualStack"), json!(["IPv6", "IPv4"])));
        assert_eq!(families(json!({"ipFamilies": ["IPv6"]}), true), (json!("SingleStack"), json!(["IPv6"])));
        // The families of requested addresses.
        let both = json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": "fd00:10:96::20",
            "clusterIPs": ["fd00:10:96::20", "10.96.0.20"]});
        assert_eq!(families(both, true), (json!("PreferDualStack"), json!(["IPv6", "IPv4"])));
        // Headless: families per policy, and without selector dual even on a single-stack cluster.
        let headless = json!({"clusterIP": "None", "ipFamilyPolicy": "PreferDualStack"});
        assert_eq!(families(headless, true).1, json!(["IPv4", "IPv6"]));
        let (e, v) = check(json!({"spec": {"clusterIP": "None"}}), None, false);
        assert_eq!(e, Vec::<String>::new());
        assert_eq!((&v["spec"]["ipFamilyPolicy"], &v["spec"]["ipFamilies"]), (&json!("RequireDualStack"), &json!(["IPv4", "IPv6"])));

        assert_eq!(
            check(svc(json!({"ipFamilyPolicy": "RequireDualStack"})), None, false).0,
            ["spec.ipFamilyPolicy: Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services"]
        );
        assert_eq!(
            check(svc(json!({"ipFamilies": ["IPv4", "IPv6"]})), None, true).0,
            ["spec.ipFamilyPolicy: Invalid value: \"SingleStack\": must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified"]
        );
        let two = |second: &str| {
            svc(json!({"ipFamilyPolicy": "PreferDualStack", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20", second]}))
        };
        assert_eq!(
            check(two("10.96.0.21"), None, true).0,
            ["spec.clusterIPs: Invalid value: []string{\"10.96.0.20\", \"10.96.0.21\"}: may specify no more than one IP for each IP family"]
        );
        assert_eq!(
            check(two("fd00:1::1"), None, true).0,
            ["spec.clusterIPs: Invalid value: []string{\"10.96.0.20\", \"fd00:1::1\"}: failed to allocate IP fd00:1::1: provided IP is not in the valid range. The range of valid IPs is fd00:10:96::/112"]
        );
        assert_eq!(
            check(two("fd00:10:96::10"), None, true).0,
            ["spec.clusterIPs: Invalid value: []string{\"10.96.0.20\", \"fd00:10:96::10\"}: failed to allocate IP fd00:10:96::10: provided IP is already allocated"]
        );
    }

    #[test]
    fn upgrades_add_the_second_family_and_downgrades_release_it() {
        let single = json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20"], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"}});
        let mut up = single.clone();
        up["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
        let (e, v) = check(up, Some(&single), true);
        assert_eq!(e, Vec::<String>::new());
        // The address of the new family is the allocator's to give.
        assert_eq!(v["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(v["spec"]["clusterIPs"], json!(["10.96.0.20"]));

        let dual = json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20", "fd00:10:96::20"], "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}});
        let mut down = dual.clone();
        down["spec"]["ipFamilyPolicy"] = json!("SingleStack");
        let (e, v) = check(down, Some(&dual), true);
        assert_eq!(e, Vec::<String>::new());
        assert_eq!((&v["spec"]["ipFamilies"], &v["spec"]["clusterIPs"]), (&json!(["IPv4"]), &json!(["10.96.0.20"])));
        // A write that leaves the addresses and families out keeps them, and the policy.
        let (e, v) = check(json!({"spec": {"selector": {"app": "web"}, "ports": [{"port": 81}]}}), Some(&dual), true);
        assert_eq!(e, Vec::<String>::new());
        assert_eq!(v["spec"]["clusterIPs"], dual["spec"]["clusterIPs"]);
        assert_eq!(v["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(v["spec"]["ipFamilyPolicy"], json!("PreferDualStack"));
        // Releasing the secondary address without SingleStack, or changing the primary family: refused.
        let mut cut = dual.clone();
        cut["spec"]["clusterIPs"] = json!(["10.96.0.20"]);
        assert_eq!(
            check(cut, Some(&dual), true).0,
            ["spec.ipFamilyPolicy: Invalid value: \"PreferDualStack\": must be 'SingleStack' to release the secondary cluster IP"]
        );
        let mut flipped = single.clone();
        flipped["spec"]["ipFamilies"] = json!(["IPv6"]);
        flipped["spec"]["clusterIP"] = json!("fd00:10:96::20");
        flipped["spec"]["clusterIPs"] = json!(["fd00:10:96::20"]);
        assert_eq!(
            check(flipped, Some(&single), true).0,
            [
                "spec.clusterIPs[0]: Invalid value: []string{\"fd00:10:96::20\"}: may not change once set",
                "spec.ipFamilies[0]: Invalid value: []core.IPFamily{\"IPv6\"}: may not change once set",
            ]
        );
    }

    #[test]
    fn updates_keep_what_is_immutable_and_drop_what_a_new_type_does_not_use() {
        let old = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "ipFamilies": ["IPv4"],
            "externalTrafficPolicy": "Cluster", "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}]}});
        // NodePort → ClusterIP with the rest as it was: node port and policy dropped.
        let mut to_cluster_ip = old.clone();
        to_cluster_ip["spec"]["type"] = json!("ClusterIP");
        assert_eq!(errors(to_cluster_ip.clone(), Some(&old)), Vec::<String>::new());
        normalize(&mut to_cluster_ip, Some(&old));
        assert_eq!(to_cluster_ip["spec"]["ports"][0].get("nodePort"), None);
        assert_eq!(to_cluster_ip["spec"].get("externalTrafficPolicy"), None);
        // The same port is not "already allocated" to itself.
        assert_eq!(errors(old.clone(), Some(&old)), Vec::<String>::new());
        let mut moved = old.clone();
        moved["spec"]["clusterIP"] = json!("10.96.0.21");
        moved["spec"]["clusterIPs"] = json!(["10.96.0.21"]);
        assert_eq!(errors(moved, Some(&old)), ["spec.clusterIPs[0]: Invalid value: []string{\"10.96.0.21\"}: may not change once set"]);
        let affinity = json!({"spec": {"sessionAffinity": "ClientIP", "ports": [{"port": 80}]}});
        let mut defaulted = affinity.clone();
        normalize(&mut defaulted, None);
        assert_eq!(defaulted["spec"]["sessionAffinityConfig"], json!({"clientIP": {"timeoutSeconds": 10800}}));
        let bad = json!({"spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}, "ports": [{"port": 80}]}});
        assert_eq!(errors(bad, None), ["spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 0: must be greater than 0 and less than 86400"]);
    }
}
