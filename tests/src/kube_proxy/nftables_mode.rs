//! The emulator's **nftables mode**: what kube-proxy's nftables mode does
//! that concerns Services it does not serve (standalone ones, labelled
//! `service.kubernetes.io/service-proxy-name`), against the real kernel
//! through `nft`. Only that: its own Services' load balancing (DNAT maps,
//! endpoint chains) is not modelled.
//!
//! From kube-proxy's `pkg/proxy/nftables/proxier.go` (`setupNFTables`): per
//! family a table `kube-proxy` whose base chains `filter-forward` (forward
//! hook, priority dstnat-10) and `filter-output-post-dnat` (output hook,
//! priority dstnat+10) jump, for `ct state new`, to `cluster-ips-check`,
//! which rejects traffic to its ClusterIPs that no DNAT rule took (a port
//! the Service does not have) and drops traffic to any other address of the
//! service CIDRs. The input path is not filtered: a pod's connection to an
//! address on the node's dummy interface reaches IPVS (which runs in
//! LOCAL_IN). On the output path IPVS's LOCAL_OUT hook (priority
//! NAT_DST+2 = -98) has rewritten the destination to the endpoint before
//! `filter-output-post-dnat` (-90) sees it, so a host-network client's
//! connection to an IPVS virtual service is not dropped either.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::Service;

use super::node::IpCidr;
use super::proxier::selected_out;

/// kube-proxy's table name (in families `ip` and `ip6`).
pub const TABLE: &str = "kube-proxy";

/// The `nft -f` script that makes kube-proxy's tables hold the
/// `cluster-ips-check` filtering for `services` (those kube-proxy serves:
/// labelled ones are left out) and `service_cidrs`, replacing what they had.
pub fn cluster_ips_check_script(services: &[Service], service_cidrs: &[IpCidr]) -> String {
    let cluster_ips: BTreeSet<IpAddr> = services
        .iter()
        .filter(|s| !selected_out(&s.metadata))
        .filter_map(|s| s.spec.as_ref())
        .flat_map(|spec| spec.cluster_ips.clone().unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut script = String::new();
    for (family, ip, addr_type, v4) in [("ip", "ip", "ipv4_addr", true), ("ip6", "ip6", "ipv6_addr", false)] {
        let ips: Vec<String> = cluster_ips.iter().filter(|a| a.is_ipv4() == v4).map(ToString::to_string).collect();
        let cidrs: Vec<String> =
            service_cidrs.iter().filter(|c| c.to_string().contains('.') == v4).map(ToString::to_string).collect();
        script += &format!("add table {family} {TABLE}\ndelete table {family} {TABLE}\n");
        script += &format!("table {family} {TABLE} {{\n  comment \"rules for kube-proxy\"\n");
        script += &format!("  set cluster-ips {{\n    type {addr_type}\n    comment \"Active ClusterIPs\"\n");
        if !ips.is_empty() {
            script += &format!("    elements = {{ {} }}\n", ips.join(", "));
        }
        script += "  }\n  chain cluster-ips-check {\n";
        script += &format!("    {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n");
        if !cidrs.is_empty() {
            script += &format!("    {ip} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"\n", cidrs.join(", "));
        }
        script += "  }\n";
        // dstnat is -100.
        script += "  chain filter-forward {\n    type filter hook forward priority -110; policy accept;\n    ct state new jump cluster-ips-check\n  }\n";
        script += "  chain filter-output-post-dnat {\n    type filter hook output priority -90; policy accept;\n    ct state new jump cluster-ips-check\n  }\n";
        script += "}\n";
    }
    script
}

/// Runs `nft -f -` with `script`.
pub fn apply(nft: &Path, script: &str) -> Result<(), String> {
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft -f: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).expect("a Service")
    }

    #[test]
    fn labelled_services_are_not_kube_proxys_cluster_ips_and_the_service_cidrs_are_dropped() {
        let services = [
            service("{metadata: {name: a}, spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00:96::10']}}"),
            service("{metadata: {name: b, labels: {service.kubernetes.io/service-proxy-name: ipvs-operator}}, spec: {clusterIP: 10.96.100.10}}"),
        ];
        let cidrs: Vec<IpCidr> = ["10.96.0.0/16".parse().expect("a CIDR"), "fd00:96::/108".parse().expect("a CIDR")].into();
        let script = cluster_ips_check_script(&services, &cidrs);
        assert!(script.contains("elements = { 10.96.0.10 }"), "{script}");
        assert!(script.contains("elements = { fd00:96::10 }"), "{script}");
        assert!(!script.contains("10.96.100.10"), "{script}");
        assert!(script.contains("ip daddr { 10.96.0.0/16 } drop"), "{script}");
        assert!(script.contains("ip6 daddr { fd00:96::/108 } drop"), "{script}");
        assert_eq!(script.matches("ct state new jump cluster-ips-check").count(), 4);
    }
}
