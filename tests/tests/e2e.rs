//! End to end, on a real kernel's IPVS in the test VM: the real controller and
//! agent binaries against the test API server and the kube-proxy emulator, with
//! pods as network-namespace backends and real connections counted.
//!
//! `make test-kernel` runs this in the VM (tests/vm). Each test builds its own
//! testbed (namespaces, IPVS table, API server), so they run side by side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ipvs_operator_tests::testbed::{wait_until, Testbed, TestbedConfig};

/// The original project's example: two Deployments of 3 and the README's weights.
const SEED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: demo-deployment-canary, labels: {app: demo, env: canary}}
spec:
  replicas: 3
  selector: {matchLabels: {app: demo, env: canary}}
  template:
    metadata: {labels: {app: demo, env: canary}}
    spec:
      containers:
      - name: demo
        image: justinbarrick/demo-server:latest
        ports: [{containerPort: 8080, name: www}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: demo-deployment-prod, labels: {app: demo, env: prod}}
spec:
  replicas: 3
  selector: {matchLabels: {app: demo, env: prod}}
  template:
    metadata: {labels: {app: demo, env: prod}}
    spec:
      containers:
      - name: demo
        image: justinbarrick/demo-server:latest
        ports: [{containerPort: 8080, name: www}]
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: example, namespace: default}
spec:
  selector: {app: demo}
  ports: [{protocol: TCP, port: 80, targetPort: www}]
  scheduler: wlc
  weights:
  - {weight: 10, selector: {env: prod}}
  - {weight: 1, selector: {env: canary}}
"#;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Share of connections per group (pod names start with their Deployment's).
fn shares(counts: &BTreeMap<String, usize>) -> BTreeMap<&'static str, f64> {
    let total: usize = counts.values().sum();
    let mut out = BTreeMap::new();
    for (pod, n) in counts {
        let group = if pod.contains("canary") { "canary" } else { "prod" };
        *out.entry(group).or_insert(0.0) += *n as f64 / total as f64;
    }
    out
}

fn assert_split(counts: &BTreeMap<String, usize>, prod: f64, canary: f64) {
    let s = shares(counts);
    let (p, c) = (s.get("prod").copied().unwrap_or(0.0), s.get("canary").copied().unwrap_or(0.0));
    assert!(
        (p - prod).abs() <= 0.02 && (c - canary).abs() <= 0.02,
        "measured prod {:.2}% canary {:.2}%, expected {:.2}% / {:.2}% (counts {counts:?})",
        p * 100.0,
        c * 100.0,
        prod * 100.0,
        canary * 100.0
    );
}

/// The weights the kernel has for the VIP's destinations, by destination.
fn weights(bed: &Testbed, vip: SocketAddr) -> Option<(String, BTreeMap<SocketAddr, u32>)> {
    let entry = bed.ipvs().into_iter().find(|e| e.service.address() == Some(vip))?;
    let weights = entry.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
    Some((entry.service.scheduler, weights))
}

/// Wait until the VIP has 6 destinations at 10 (prod) and 1 (canary) under `scheduler`.
fn wait_for_seed_weights(bed: &Testbed, vip: SocketAddr, scheduler: &str) {
    let pod_ips: BTreeMap<String, String> = bed
        .handle()
        .list("pods", Some("default"))
        .iter()
        .filter_map(|p| Some((p["status"]["podIP"].as_str()?.to_string(), p["metadata"]["name"].as_str()?.to_string())))
        .collect();
    wait_until(TIMEOUT, "the agent's weights in the kernel", || {
        let (sched, w) = weights(bed, vip)?;
        let ok = sched == scheduler
            && w.len() == 6
            && w.iter().all(|(dest, weight)| {
                let pod = pod_ips.get(&dest.ip().to_string()).map(String::as_str).unwrap_or("");
                *weight == if pod.contains("canary") { 1 } else { 10 }
            });
        ok.then_some(())
    });
}

/// kube-proxy run as the README advises: with the scheduler the WeightedService
/// asks for, so that its syncs do not revert it. (When they do, every revert and
/// repair swaps the kernel's scheduler, and connections that arrive during the
/// swap are refused: see the tug-of-war test.)
fn kube_proxy_agrees() -> TestbedConfig {
    TestbedConfig { proxy_scheduler: "wlc".into(), ..TestbedConfig::default() }
}

/// Every request the controller and the agent made to this testbed's API server
/// (told apart by their User-Agent) is allowed by their RBAC in deploy/.
fn assert_rbac_allows_every_request(bed: &Testbed) {
    use ipvs_operator_tests::rbac;
    let records = bed.handle().requests();
    let yaml = rbac::deploy_rbac_yaml();
    for (account, agent) in [
        ("ipvs-operator/ipvs-operator-controller", "ipvs-operator-controller"),
        ("ipvs-operator/ipvs-operator-agent", "ipvs-operator-agent"),
    ] {
        let requests = rbac::requests_from(&records, agent);
        assert!(!requests.is_empty(), "no request recorded from {agent}");
        if let Err(denied) = rbac::check_requests(&yaml, account, &requests) {
            panic!("{account} would be denied by deploy/'s RBAC:\n{}", denied.join("\n"));
        }
    }
}

#[test]
fn the_seed_weighted_service_splits_real_connections_30_to_3() {
    let mut bed = Testbed::new(kube_proxy_agrees());
    bed.load(SEED);
    bed.start_all();
    let vip = SocketAddr::new(bed.cluster_ip("default", "example"), 80);
    wait_for_seed_weights(&bed, vip, "wlc");
    let counts = bed.connect(vip, 5000);
    assert_split(&counts, 30.0 / 33.0, 3.0 / 33.0);
    // The status says the same.
    let ws = bed.get("weightedservices", "default", "example").expect("the WeightedService");
    let ready = ws["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "Ready")).cloned();
    assert_eq!(ready.as_ref().map(|c| c["status"].clone()), Some("True".into()), "{ws}");
    assert!((ws["status"]["groups"][0]["share"].as_f64().unwrap_or(0.0) - 0.9091).abs() < 1e-3, "{ws}");
    assert_rbac_allows_every_request(&bed);
}

/// The seed testbed, running, with the agent's weights in place.
fn seed_bed(config: TestbedConfig) -> (Testbed, SocketAddr) {
    let mut bed = Testbed::new(config);
    bed.load(SEED);
    bed.start_all();
    let vip = SocketAddr::new(bed.cluster_ip("default", "example"), 80);
    wait_for_seed_weights(&bed, vip, "wlc");
    (bed, vip)
}

/// Pod name by pod IP, in `default`.
fn pods_by_ip(bed: &Testbed) -> BTreeMap<std::net::IpAddr, String> {
    bed.handle()
        .list("pods", Some("default"))
        .iter()
        .filter_map(|p| Some((p["status"]["podIP"].as_str()?.parse().ok()?, p["metadata"]["name"].as_str()?.to_string())))
        .collect()
}

/// Apply a change to the `example` WeightedService (a JSON merge patch).
fn patch_weighted_service(bed: &Testbed, patch: serde_json::Value) {
    use ipvs_operator::crd::WeightedService;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<WeightedService> = Api::namespaced(bed.client(), "default");
    bed.block_on(api.patch("example", &PatchParams::default(), &Patch::Merge(&patch))).expect("patching the WeightedService");
}

/// The `example` WeightedService's status, once `check` accepts it.
fn wait_for_status(bed: &Testbed, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    wait_until(TIMEOUT, what, || {
        let ws = bed.get("weightedservices", "default", "example")?;
        let current = ws["status"]["observedGeneration"] == ws["metadata"]["generation"];
        (current && check(&ws["status"])).then_some(ws)
    })
}

/// Every weight the kernel has for `vip`, by pod name.
fn weights_by_pod(bed: &Testbed, vip: SocketAddr) -> BTreeMap<String, u32> {
    let by_ip = pods_by_ip(bed);
    weights(bed, vip)
        .map(|(_, w)| w.into_iter().filter_map(|(d, w)| Some((by_ip.get(&d.ip())?.clone(), w))).collect())
        .unwrap_or_default()
}

#[test]
fn editing_weights_converges_and_the_status_follows() {
    let (bed, vip) = seed_bed(kube_proxy_agrees());
    patch_weighted_service(&bed, serde_json::json!({"spec": {"weights": [
        {"weight": 10, "selector": {"env": "prod"}},
        {"weight": 5, "selector": {"env": "canary"}},
    ]}}));
    wait_until(TIMEOUT, "canary weights of 5 in the kernel", || {
        let w = weights_by_pod(&bed, vip);
        (w.len() == 6 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 5 } else { 10 })).then_some(())
    });
    let ws = wait_for_status(&bed, "a status with the new split", |s| {
        (s["groups"][1]["share"].as_f64().unwrap_or(0.0) - 1.0 / 3.0).abs() < 1e-3
    });
    assert_eq!(ws["status"]["groups"][1]["weight"], 5, "{ws}");
    assert_split(&bed.connect(vip, 3000), 2.0 / 3.0, 1.0 / 3.0);
    assert_rbac_allows_every_request(&bed);
}

#[test]
fn kube_proxy_reverts_and_restarts_are_repaired_within_a_drift_interval() {
    let (bed, vip) = reverts_and_restarts_are_repaired(None);
    // The split is right again. kube-proxy keeps reverting the scheduler every
    // 2 s here, and the kernel refuses the few connections that arrive while a
    // virtual service's scheduler is being swapped: they are counted, and must
    // stay rare.
    let (counts, errors) = bed.connect_counting_errors(vip, 3000);
    assert_split(&counts, 30.0 / 33.0, 3.0 / 33.0);
    assert!(errors.len() <= 60, "{} of 3000 connections failed: {errors:?}", errors.len());
    eprintln!("scheduler tug of war: {} of 3000 connections refused", errors.len());
}

/// The same repairs with the sweep reading `/proc/net/ip_vs` (what it does
/// when a WeightedService has IPv6 virtual services) instead of getsockopt.
#[test]
fn reverts_and_restarts_are_repaired_when_the_sweep_reads_proc() {
    reverts_and_restarts_are_repaired(Some("proc"));
}

/// kube-proxy reverts the scheduler every 2 s and, restarted, resets the
/// weights: each is repaired within a drift interval (with some slack for the
/// emulated CPU). The testbed, for more checks.
fn reverts_and_restarts_are_repaired(table_reader: Option<&str>) -> (Testbed, SocketAddr) {
    let drift = Duration::from_secs(1);
    let (mut bed, vip) = seed_bed(TestbedConfig {
        drift_interval: drift,
        proxy_sync_period: Duration::from_secs(2),
        table_reader: table_reader.map(str::to_owned),
        ..TestbedConfig::default()
    });
    // kube-proxy (scheduler rr) reverts wlc on every sync; the agent puts it back.
    let mut longest = Duration::ZERO;
    let mut reverted_since: Option<std::time::Instant> = None;
    let mut reverts = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        let scheduler = weights(&bed, vip).map(|(s, _)| s).unwrap_or_default();
        match (scheduler.as_str(), reverted_since) {
            ("wlc", Some(since)) => {
                longest = longest.max(since.elapsed());
                reverted_since = None;
            }
            ("wlc", None) => {}
            (_, None) => {
                reverts += 1;
                reverted_since = Some(std::time::Instant::now());
            }
            (_, Some(_)) => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reverts >= 2, "kube-proxy's syncs should have reverted the scheduler (saw {reverts})");
    assert!(longest <= drift + Duration::from_millis(1500), "a revert stood for {longest:?}");
    assert!(bed.agent_metric("ipvs_operator_drift_repairs_total", "kind=\"scheduler\"").unwrap_or(0.0) >= 2.0);

    // A restarted kube-proxy sets every weight to 1; the agent puts them back.
    // The reset may stand for less than the 100 ms between two looks at the
    // table: then the agent's repair counter is what shows it happened.
    let weight_repairs = |bed: &Testbed| bed.agent_metric("ipvs_operator_drift_repairs_total", "kind=\"weight\"").unwrap_or(0.0);
    let repairs_before = weight_repairs(&bed);
    bed.start_emulator();
    let seen_reset = wait_until(TIMEOUT, "kube-proxy's restart to reset weights", || {
        if weights_by_pod(&bed, vip).values().all(|w| *w == 1) {
            Some(true)
        } else {
            (weight_repairs(&bed) >= repairs_before + 3.0).then_some(false)
        }
    });
    let reset = std::time::Instant::now();
    wait_for_seed_weights(&bed, vip, "wlc");
    if seen_reset {
        assert!(reset.elapsed() <= drift + Duration::from_millis(1500), "weights repaired after {:?}", reset.elapsed());
    }
    let repairs = weight_repairs(&bed) - repairs_before;
    // The three prod weights went from 10 to 1; the canaries' 1 is kube-proxy's own.
    assert!(repairs >= 3.0, "{repairs} weight repairs counted after kube-proxy reset 3 weights");
    (bed, vip)
}

#[test]
fn a_terminating_canary_stays_at_weight_zero_until_it_is_gone() {
    let (bed, vip) = seed_bed(kube_proxy_agrees());
    // Connections give the destinations something to drain.
    bed.connect(vip, 300);
    let canary = weights_by_pod(&bed, vip).into_keys().find(|p| p.contains("canary")).expect("a canary pod");
    bed.handle()
        .delete_pod("default", &canary, ipvs_operator_tests::apiserver::Grace::UntilFinished)
        .expect("deleting the pod");
    wait_until(TIMEOUT, "kube-proxy to drain the terminating canary at weight 0", || {
        (weights_by_pod(&bed, vip).get(&canary) == Some(&0)).then_some(())
    });
    // Several drift intervals later the agent has left it alone, and the others as they were.
    for _ in 0..30 {
        let w = weights_by_pod(&bed, vip);
        assert_eq!(w.get(&canary), Some(&0), "the terminating canary was raised: {w:?}");
        for (pod, weight) in w.iter().filter(|(p, _)| **p != canary) {
            assert_eq!(*weight, if pod.contains("canary") { 1 } else { 10 }, "{w:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bed.handle().finish_pod_termination("default", &canary).expect("finishing the termination");
    wait_until(TIMEOUT, "the pod to be gone", || bed.get("pods", "default", &canary).is_none().then_some(()));
    let w = weights_by_pod(&bed, vip);
    assert!(w.get(&canary).is_none_or(|w| *w == 0), "{w:?}");
    assert_rbac_allows_every_request(&bed);
}

#[test]
fn removing_a_group_restores_weight_one_and_deleting_the_weighted_service_its_service() {
    let (bed, vip) = seed_bed(TestbedConfig::default());
    patch_weighted_service(&bed, serde_json::json!({"spec": {"weights": [{"weight": 10, "selector": {"env": "prod"}}]}}));
    wait_until(TIMEOUT, "canary pods back at weight 1", || {
        let w = weights_by_pod(&bed, vip);
        (w.len() == 6 && w.iter().all(|(pod, w)| *w == if pod.contains("canary") { 1 } else { 10 })).then_some(())
    });
    use ipvs_operator::crd::WeightedService;
    use kube::api::{Api, DeleteParams};
    let api: Api<WeightedService> = Api::namespaced(bed.client(), "default");
    bed.block_on(api.delete("example", &DeleteParams::default())).expect("deleting the WeightedService");
    wait_until(TIMEOUT, "the owned Service to be garbage-collected", || {
        bed.get("services", "default", "example").is_none().then_some(())
    });
    wait_until(TIMEOUT, "kube-proxy to remove the virtual service", || weights(&bed, vip).is_none().then_some(()));
    assert_rbac_allows_every_request(&bed);
}

#[test]
fn dropped_watches_and_a_410_change_no_weight_and_the_agent_still_follows() {
    let (bed, vip) = seed_bed(TestbedConfig::default());
    let expected = weights_by_pod(&bed, vip);
    let check = |bed: &Testbed| {
        let w = weights_by_pod(bed, vip);
        assert_eq!(w, expected, "a weight changed while the watches were disturbed");
    };
    for fault in 0..3 {
        match fault {
            0 => bed.handle().close_watches(),
            1 => bed.handle().break_watches(),
            _ => {
                bed.handle().expire_resource_versions();
                bed.handle().break_watches();
            }
        }
        for _ in 0..20 {
            check(&bed);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Still watching: a pod that turns canary gets the canary's weight.
    let prod = expected.keys().find(|p| p.contains("prod")).expect("a prod pod").clone();
    bed.handle().set_pod_label("default", &prod, "env", Some("canary")).expect("relabelling");
    wait_until(TIMEOUT, "the relabelled pod at weight 1", || (weights_by_pod(&bed, vip).get(&prod) == Some(&1)).then_some(()));
}

#[test]
fn a_restarted_agent_with_the_kernel_already_right_writes_nothing() {
    // kube-proxy agrees on the scheduler: nothing reverts anything.
    let (mut bed, vip) = seed_bed(kube_proxy_agrees());
    bed.kill("agent");
    bed.start_agent();
    wait_until(TIMEOUT, "the restarted agent to be ready", || bed.agent_ready().then_some(()));
    // A few drift intervals.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(bed.agent_metric("ipvs_operator_netlink_writes_total", ""), Some(0.0), "{}", bed.log("agent"));
    wait_for_seed_weights(&bed, vip, "wlc");
}

#[test]
fn every_virtual_service_of_a_two_port_node_port_service_gets_the_weights() {
    const TWO_PORTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-canary}
spec:
  replicas: 1
  selector: {matchLabels: {app: web, env: canary}}
  template:
    metadata: {labels: {app: web, env: canary}}
    spec:
      containers:
      - name: web
        image: web
        ports: [{containerPort: 8080, name: www}, {containerPort: 9000}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web-prod}
spec:
  replicas: 2
  selector: {matchLabels: {app: web, env: prod}}
  template:
    metadata: {labels: {app: web, env: prod}}
    spec:
      containers:
      - name: web
        image: web
        ports: [{containerPort: 8080, name: www}, {containerPort: 9000}]
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: example, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: www}
  - {name: admin, protocol: TCP, port: 9000, targetPort: 9000}
  weights:
  - {weight: 4, selector: {env: prod}}
  - {weight: 2, selector: {env: canary}}
"#;
    let mut bed = Testbed::new(TestbedConfig { proxy_scheduler: "wrr".into(), ..TestbedConfig::default() });
    bed.load(TWO_PORTS);
    bed.start_all();
    let cluster_ip = bed.cluster_ip("default", "example");
    let service = bed.get("services", "default", "example").expect("the Service");
    let node_ports: Vec<u16> = service["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| p["nodePort"].as_u64().expect("a node port") as u16)
        .collect();
    let node = std::net::IpAddr::V4(ipvs_operator_tests::testbed::NODE_IP);
    let virtual_services = [
        (SocketAddr::new(cluster_ip, 80), 8080),
        (SocketAddr::new(cluster_ip, 9000), 9000),
        (SocketAddr::new(node, node_ports[0]), 8080),
        (SocketAddr::new(node, node_ports[1]), 9000),
    ];
    for (vs, target_port) in virtual_services {
        wait_until(TIMEOUT, &format!("weights on {vs}"), || {
            let (scheduler, w) = weights(&bed, vs)?;
            let by_ip = pods_by_ip(&bed);
            let ok = scheduler == "wrr"
                && w.len() == 3
                && w.iter().all(|(dest, weight)| {
                    let pod = by_ip.get(&dest.ip()).map(String::as_str).unwrap_or("");
                    dest.port() == target_port && *weight == if pod.contains("canary") { 2 } else { 4 }
                });
            ok.then_some(())
        });
    }
    // Real connections through the NodePort split 8:2.
    let counts = bed.connect(SocketAddr::new(node, node_ports[0]), 2000);
    let canary: usize = counts.iter().filter(|(p, _)| p.contains("canary")).map(|(_, n)| n).sum();
    let share = canary as f64 / 2000.0;
    assert!((share - 0.2).abs() <= 0.02, "canary got {:.1}% through the NodePort: {counts:?}", share * 100.0);
}

/// UDP and SCTP ports, an external IP and a load-balancer IP (set by a status
/// write, as a cloud controller would, after the agent has started): the agent
/// sets the weights on every virtual service of the Service — each protocol on
/// the ClusterIP, the external IP, the load-balancer IP and the NodePorts — and
/// real traffic of each protocol to each of those addresses, from the client,
/// splits as they say.
#[test]
fn udp_sctp_external_and_load_balancer_virtual_services_get_the_weights_and_split_real_traffic() {
    use ipvs::{Protocol, ServiceKey};
    use ipvs_operator_tests::testbed::NODE_IP;
    use std::net::{IpAddr, Ipv4Addr};
    use traffic::Transport;
    const MIXED: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: mixed-canary}
spec:
  replicas: 1
  selector: {matchLabels: {app: mixed, env: canary}}
  template:
    metadata: {labels: {app: mixed, env: canary}}
    spec:
      containers:
      - name: server
        image: server
        ports:
        - {name: www, containerPort: 8080}
        - {name: dns, containerPort: 5353, protocol: UDP}
        - {name: signalling, containerPort: 3868, protocol: SCTP}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: mixed-prod}
spec:
  replicas: 2
  selector: {matchLabels: {app: mixed, env: prod}}
  template:
    metadata: {labels: {app: mixed, env: prod}}
    spec:
      containers:
      - name: server
        image: server
        ports:
        - {name: www, containerPort: 8080}
        - {name: dns, containerPort: 5353, protocol: UDP}
        - {name: signalling, containerPort: 3868, protocol: SCTP}
---
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {name: example, namespace: default}
spec:
  type: LoadBalancer
  selector: {app: mixed}
  externalIPs: [192.0.2.10]
  ports:
  - {name: http, protocol: TCP, port: 80, targetPort: www}
  - {name: dns, protocol: UDP, port: 53, targetPort: dns}
  - {name: diameter, protocol: SCTP, port: 3868, targetPort: signalling}
  weights:
  - {weight: 3, selector: {env: prod}}
  - {weight: 2, selector: {env: canary}}
"#;
    // Addresses outside every cluster range, bound only inside this testbed's node
    // (kube-proxy binds external and load-balancer IPs to kube-ipvs0 as it does
    // ClusterIPs), which the client reaches through its default route, the node.
    let external_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    let lb_ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20));
    // An ingress IP of a proxying load balancer (`ipMode: Proxy`), which sends its
    // traffic to the NodePorts: kube-proxy makes no virtual service for it.
    let proxy_lb_ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 30));
    let mut bed = Testbed::new(TestbedConfig { proxy_scheduler: "wrr".into(), ..TestbedConfig::default() });
    bed.load(MIXED);
    bed.start_all();
    let cluster_ip = bed.cluster_ip("default", "example");
    let service = bed.get("services", "default", "example").expect("the Service");
    let node_port = |name: &str| -> u16 {
        let port = service["spec"]["ports"].as_array().expect("ports").iter().find(|p| p["name"] == name).expect("the port");
        port["nodePort"].as_u64().expect("a node port") as u16
    };
    let node = IpAddr::V4(NODE_IP);
    // Per Service port: its protocol, port, node port and target port.
    let ports = [
        (Protocol::Tcp, Transport::Tcp, 80, node_port("http"), 8080),
        (Protocol::Udp, Transport::Udp, 53, node_port("dns"), 5353),
        (Protocol::Sctp, Transport::Sctp, 3868, node_port("diameter"), 3868),
    ];
    let expected = |target_port: u16| -> BTreeMap<SocketAddr, u32> {
        pods_by_ip(&bed)
            .into_iter()
            .map(|(ip, pod)| (SocketAddr::new(ip, target_port), if pod.contains("canary") { 2 } else { 3 }))
            .collect()
    };
    let wait_for_weights = |addresses: &[(IpAddr, bool)]| {
        for (protocol, _, port, node_port, target_port) in ports {
            for (ip, is_node) in addresses {
                let vs = SocketAddr::new(*ip, if *is_node { node_port } else { port });
                let key = ServiceKey::new(protocol, vs);
                wait_until(TIMEOUT, &format!("weights on {protocol} {vs}"), || {
                    let entry = bed.ipvs().into_iter().find(|e| e.service.key == key)?;
                    let weights: BTreeMap<SocketAddr, u32> = entry.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
                    (entry.service.scheduler == "wrr" && weights == expected(target_port)).then_some(())
                });
            }
        }
    };
    wait_for_weights(&[(cluster_ip, false), (external_ip, false), (node, true)]);
    // Then the cloud's load balancer is ready: its controller writes the
    // Service's status (a status-only change, which the agent must follow).
    let started = std::time::Instant::now();
    {
        use k8s_openapi::api::core::v1::Service;
        use kube::api::{Api, Patch, PatchParams};
        let api: Api<Service> = Api::namespaced(bed.client(), "default");
        let ingress = [serde_json::json!({"ip": lb_ip.to_string()}), serde_json::json!({"ip": proxy_lb_ip.to_string(), "ipMode": "Proxy"})];
        let status = serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}});
        bed.block_on(api.patch_status("example", &PatchParams::default(), &Patch::Merge(&status)))
            .expect("the cloud controller's status write");
    }
    wait_for_weights(&[(lb_ip, false)]);
    let proxied: Vec<_> = bed.ipvs().into_iter().filter(|e| e.service.address().is_some_and(|a| a.ip() == proxy_lb_ip)).collect();
    assert!(proxied.is_empty(), "virtual services for the Proxy-mode ingress IP: {proxied:?}");
    eprintln!("weights on the load-balancer IP's 3 virtual services {:?} after the status write", started.elapsed());

    // ipvsadm, a tool nobody here wrote, shows the same weights: on the UDP and
    // SCTP virtual services too.
    let listing = bed.ipvsadm();
    let table = parse_ipvsadm(&listing);
    for (protocol, _, port, node_port, target_port) in ports {
        for vs in [(cluster_ip, port), (external_ip, port), (lb_ip, port), (node, node_port)].map(|(ip, port)| SocketAddr::new(ip, port)) {
            assert_eq!(table.get(&(protocol.to_string(), vs)), Some(&expected(target_port)), "{protocol} {vs} in ipvsadm -Ln:\n{listing}");
        }
    }

    // Real traffic of each protocol to each address splits 6:2 (three destinations, wrr 3:3:2).
    let connections = 200;
    for (_, transport, port, _, _) in ports {
        for vs in [cluster_ip, external_ip, lb_ip].map(|ip| SocketAddr::new(ip, port)) {
            let t = std::time::Instant::now();
            let counts = bed.connect_over(transport, vs, connections);
            let canary: usize = counts.iter().filter(|(p, _)| p.contains("canary")).map(|(_, n)| n).sum();
            let share = canary as f64 / connections as f64;
            eprintln!("{transport:?} {vs}: canary {:.1}% of {connections} in {:?} ({counts:?})", share * 100.0, t.elapsed());
            assert_eq!(counts.values().sum::<usize>(), connections, "{counts:?}");
            assert_eq!(counts.len(), 3, "every pod answers {transport:?} {vs}: {counts:?}");
            assert!((share - 0.25).abs() <= 0.02, "canary got {:.1}% of {transport:?} to {vs}: {counts:?}", share * 100.0);
        }
    }
    eprintln!("ipvsadm checked and traffic counted {:?} after the status write", started.elapsed());
}

/// `ipvsadm -Ln`'s virtual services, by protocol name and address, with each
/// one's destination weights.
fn parse_ipvsadm(listing: &str) -> BTreeMap<(String, SocketAddr), BTreeMap<SocketAddr, u32>> {
    let mut table = BTreeMap::new();
    let mut current: Option<(String, SocketAddr)> = None;
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["->", dest, _forward, weight, ..] => {
                if let (Some(key), Ok(dest), Ok(weight)) = (&current, dest.parse(), weight.parse()) {
                    table.entry(key.clone()).or_insert_with(BTreeMap::new).insert(dest, weight);
                }
            }
            [protocol @ ("TCP" | "UDP" | "SCTP"), vs, ..] => {
                current = vs.parse().ok().map(|vs| (protocol.to_string(), vs));
                if let Some(key) = &current {
                    table.entry(key.clone()).or_insert_with(BTreeMap::new);
                }
            }
            _ => {}
        }
    }
    table
}
