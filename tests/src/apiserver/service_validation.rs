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
//! - `clusterIP`: an IP, `None` or empty; `None` not for `NodePort` or
//!   `LoadBalancer`; a requested IP within the Service CIDR and free;
//!   `clusterIPs` and `ipFamilies` immutable once set; IPv6 and dual-stack
//!   refused (the double's cluster is IPv4 single-stack);
//! - `externalIPs` valid IPs; `externalTrafficPolicy` only on externally
//!   reachable Services; `loadBalancerSourceRanges`, `loadBalancerClass`,
//!   `allocateLoadBalancerNodePorts` only for `LoadBalancer`;
//!   `sessionAffinityConfig` only with `ClientIP`, its timeout 1–86400 s
//!   (defaulted to 10800).
//!
//! A change of `type` drops the fields the new type has no use for when the
//! write left them as they were (node ports, `externalTrafficPolicy`, …), as
//! the real strategy does, before validation.
//!
//! Not checked (the operator never writes them): selector label syntax,
//! `externalName` syntax, `healthCheckNodePort`, `trafficDistribution` values,
//! `publishNotReadyAddresses`, status.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use super::Cidr;
use super::error::{FieldError, FieldErrorKind};

/// What the allocators know of the other Services.
pub(crate) struct Allocated<'a> {
    /// Node ports of every other Service.
    pub node_ports: BTreeSet<u16>,
    /// ClusterIPs of every other Service.
    pub cluster_ips: BTreeSet<String>,
    /// The configured ranges.
    pub node_port_range: &'a std::ops::RangeInclusive<u16>,
    pub service_cidr: Cidr,
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
}

fn not_supported(field: impl Into<String>, v: &Value, allowed: &[&str]) -> FieldError {
    let list: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    FieldError::new(FieldErrorKind::NotSupported, field, v, format!("supported values: {}", list.join(", ")))
}

fn check_enum(spec: &Value, field: &str, allowed: &[&str], out: &mut Vec<FieldError>) {
    if let Some(v) = spec.get(field)
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
    check_enum(spec, "ipFamilyPolicy", &["PreferDualStack", "RequireDualStack", "SingleStack"], &mut out);

    let cluster_ip = s(spec, "/clusterIP").unwrap_or_default();
    let headless = cluster_ip == "None";
    if typ == "ExternalName" {
        if s(spec, "/externalName").is_none_or(str::is_empty) {
            out.push(FieldError::bare(FieldErrorKind::Required, "spec.externalName", ""));
        }
    } else {
        check_cluster_ip(spec, old, typ, allocated, &mut out);
        check_families(spec, old, &mut out);
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

fn check_cluster_ip(spec: &Value, old: Option<&Value>, typ: &str, allocated: &Allocated<'_>, out: &mut Vec<FieldError>) {
    let ip = s(spec, "/clusterIP").unwrap_or_default();
    let ips: Vec<&str> = spec.get("clusterIPs").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    let wanted: Vec<&str> = if ips.is_empty() && !ip.is_empty() { vec![ip] } else { ips.clone() };
    if !ip.is_empty() && !ips.is_empty() && ips[0] != ip {
        out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs", go_strings(&ips), "first value must match `clusterIP`"));
    }
    for (i, w) in wanted.iter().enumerate() {
        if *w != "None" && w.parse::<IpAddr>().is_err() {
            out.push(FieldError::new(FieldErrorKind::Invalid, format!("spec.clusterIPs[{i}]"), &Value::from(*w), IP_DETAIL));
        }
    }
    if wanted.first() == Some(&"None") && externally_reachable(typ) {
        out.push(FieldError::new(
            FieldErrorKind::Invalid,
            "spec.clusterIPs[0]",
            &Value::from("None"),
            format!("may not be set to 'None' for {typ} services"),
        ));
    }
    let old_spec = old.and_then(|o| o.get("spec"));
    let old_ips: Vec<&str> = old_spec
        .and_then(|o| o.get("clusterIPs"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let was_external_name = old_spec.and_then(|o| o.get("type")).and_then(Value::as_str) == Some("ExternalName");
    if !old_ips.is_empty() && !was_external_name {
        // Immutable: a write may leave them out (kept) but not change them.
        if !wanted.is_empty() && wanted.iter().zip(&old_ips).any(|(a, b)| a != b) {
            out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs[0]", go_strings(&wanted), "may not change once set"));
        }
        return;
    }
    // A requested address, allocated by this write.
    if let Some(w) = wanted.first().filter(|w| **w != "None")
        && let Ok(v4) = w.parse::<Ipv4Addr>()
    {
        let cidr = allocated.service_cidr;
        let mask = if cidr.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(cidr.prefix)) };
        let why = if u32::from(v4) & mask != cidr.base {
            Some(format!(
                "failed to allocate IP {w}: provided IP is not in the valid range. The range of valid IPs is {}/{}",
                Ipv4Addr::from(cidr.base),
                cidr.prefix
            ))
        } else if allocated.cluster_ips.contains(*w) {
            Some(format!("failed to allocate IP {w}: provided IP is already allocated"))
        } else {
            None
        };
        if let Some(why) = why {
            out.push(with_raw_value(FieldErrorKind::Invalid, "spec.clusterIPs", go_strings(&wanted), why));
        }
    }
}

fn check_families(spec: &Value, old: Option<&Value>, out: &mut Vec<FieldError>) {
    let families: Vec<&Value> = spec.get("ipFamilies").and_then(Value::as_array).into_iter().flatten().collect();
    let old_families: Vec<&Value> =
        old.and_then(|o| o.pointer("/spec/ipFamilies")).and_then(Value::as_array).into_iter().flatten().collect();
    for (i, f) in families.iter().enumerate() {
        match f.as_str() {
            Some("IPv4") => {}
            Some("IPv6") => out.push(FieldError::new(FieldErrorKind::Invalid, format!("spec.ipFamilies[{i}]"), f, "not configured on this cluster")),
            _ => out.push(not_supported(format!("spec.ipFamilies[{i}]"), f, &["IPv4", "IPv6"])),
        }
        if let Some(o) = old_families.get(i)
            && o != f
        {
            out.push(FieldError::new(FieldErrorKind::Invalid, format!("spec.ipFamilies[{i}]"), f, "may not change once set"));
        }
    }
    if families.len() > 1 || s(spec, "/ipFamilyPolicy") == Some("RequireDualStack") {
        out.push(FieldError::new(
            FieldErrorKind::Invalid,
            "spec.ipFamilyPolicy",
            spec.get("ipFamilyPolicy").unwrap_or(&json!("SingleStack")),
            "this cluster is not configured for dual-stack services",
        ));
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn allocated(range: &std::ops::RangeInclusive<u16>) -> Allocated<'_> {
        Allocated {
            node_ports: [30080].into(),
            cluster_ips: ["10.96.0.10".to_string()].into(),
            node_port_range: range,
            service_cidr: "10.96.0.0/12".parse().expect("cidr"),
        }
    }

    fn errors(svc: Value, old: Option<&Value>) -> Vec<String> {
        let range = 30000..=32767;
        let mut svc = svc;
        normalize(&mut svc, old);
        validate(&svc, old, &allocated(&range)).iter().map(ToString::to_string).collect()
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
        let svc = json!({"spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ipFamilies": ["IPv6"], "ports": [
            {"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 80}, {"name": "c", "port": 82, "nodePort": 30082},
            {"name": "d", "port": 83, "nodePort": 30082},
        ]}});
        assert_eq!(
            errors(svc, None),
            [
                "spec.clusterIPs: Invalid value: []string{\"10.96.0.10\"}: failed to allocate IP 10.96.0.10: provided IP is already allocated",
                "spec.ipFamilies[0]: Invalid value: \"IPv6\": not configured on this cluster",
                "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated",
                "spec.ports[1].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767",
                "spec.ports[3].nodePort: Duplicate value: 30082",
            ]
        );
        let headless = json!({"spec": {"type": "LoadBalancer", "clusterIP": "None", "ports": [{"port": 80}]}});
        assert_eq!(errors(headless, None), ["spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for LoadBalancer services"]);
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
