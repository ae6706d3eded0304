//! The fault suite (issue 8), on a real kernel's IPVS in the test VM: the real
//! controller and agent against the test API server and the kube-proxy
//! emulator, while things go wrong —
//!
//! 1. the API server cuts watches, expires resourceVersions (410), answers
//!    bursts of 500/503/429 and stalls for 10 s;
//! 2. kube-proxy syncs every second against another scheduler, restarts
//!    (resetting every weight to 1), and drains pods deleted while the agent's
//!    watches lag behind its own;
//! 3. virtual services vanish mid-pass (deleted while the agent works; kube-proxy
//!    makes them again);
//! 4. a policy rollout fails: its config is refused, its module traps, then
//!    loops;
//! 5. the agent is killed with SIGKILL mid-pass and restarted, again and again;
//! 6. a second controller runs beside the leader, and stands by.
//!
//! Changes keep coming during every fault (pods relabelled, the WeightedService's
//! weights edited), so that there is work to lose. After each fault the kernel's
//! weights must equal what `ipvs-operator eval` computes from the same objects,
//! and during the whole run a sampler reads the kernel every 100 ms: no ready
//! endpoint may be at weight 0, and no destination kube-proxy drained at 0 for
//! a terminating pod may be above 0 again (see `ipvs_operator_tests::consistency`).
//!
//! `IPVS_FAULTS_SECONDS` sets how long each fault phase lasts (default 3: the
//! shortened suite of `make test`; `make soak-faults` runs 60). The 10 s stall
//! is 10 s either way. `make test-kernel` runs this in the VM (tests/vm).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ipvs_operator::policy::embedded_module;
use ipvs_operator_tests::apiserver::{FailRule, Grace, WatchLag};
use ipvs_operator_tests::consistency::{
    wait_for_kernel_to_match_eval, Sampler, SamplerConfig, SamplerReport, ViolationKind,
};
use ipvs_operator_tests::testbed::{pod_manifest, wait_until, Testbed, TestbedConfig, NODE_IP};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

/// How long each fault phase lasts: `IPVS_FAULTS_SECONDS` (default 3).
fn phase() -> Duration {
    let seconds = std::env::var("IPVS_FAULTS_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(seconds.max(1.0))
}

/// Pods `web-1`…`web-4` (two prod, two canary) on this node and `web-5` (prod)
/// on node-2, at fixed addresses, port 8080 named `www`.
fn pods() -> String {
    let pods = [
        ("web-1", "prod", "node-1", "10.244.7.11"),
        ("web-2", "prod", "node-1", "10.244.7.12"),
        ("web-3", "canary", "node-1", "10.244.7.13"),
        ("web-4", "canary", "node-1", "10.244.7.14"),
        ("web-5", "prod", "node-2", "10.244.7.15"),
    ];
    pods.iter()
        .map(|(name, env, node, ip)| pod_manifest(name, &[("app", "web"), ("env", env)], node, ip))
        .collect()
}

/// The WeightedService `web`: prod 10, canary `canary`, scheduler wlc, a
/// NodePort (two virtual services), and `policy` (YAML) when given.
fn weighted_service(canary: u32, policy: Option<&str>) -> String {
    let policy = policy.map(|p| format!("  policy: {p}\n")).unwrap_or_default();
    format!(
        r#"
apiVersion: codesink.net/v1alpha1
kind: WeightedService
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{protocol: TCP, port: 80, targetPort: www}}]
  scheduler: wlc
  weights:
  - {{weight: 10, selector: {{env: prod}}}}
  - {{weight: {canary}, selector: {{env: canary}}}}
{policy}"#
    )
}

/// Every testbed's config: policies get 500 ms instead of 50, because the VM's
/// CPU is emulated and six testbeds share its two CPUs (a timed-out
/// evaluation is retried only after 30 s).
fn base() -> TestbedConfig {
    TestbedConfig { policy_timeout: Some(Duration::from_millis(500)), ..TestbedConfig::default() }
}

/// kube-proxy with the WeightedService's scheduler (no tug of war).
fn agreeing() -> TestbedConfig {
    TestbedConfig { proxy_scheduler: "wlc".into(), ..base() }
}

/// Compile the policies the tests use into the shared compile cache once,
/// before any testbed starts: otherwise every agent and controller of the six
/// testbeds compiles the same module at once, for a minute and a half under the
/// emulated CPU.
fn warm_the_policy_cache() {
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (ws, pods_file, module) = (dir.path().join("ws.yaml"), dir.path().join("pods.yaml"), dir.path().join("misbehaving.wasm"));
        std::fs::write(&ws, weighted_service(1, None)).expect("writing");
        std::fs::write(&pods_file, pods()).expect("writing");
        std::fs::write(&module, policy_fixtures::MISBEHAVING).expect("writing");
        for policy in [
            vec![],
            vec!["--policy-file".into(), module.display().to_string()],
        ] {
            let out = std::process::Command::new(traffic::netns::project_binary("ipvs-operator"))
                .args(["eval", "--weighted-service", &ws.display().to_string(), "--pods", &pods_file.display().to_string()])
                .args(["--policy-timeout", "10s"])
                .args(policy)
                .env("IPVS_OPERATOR_POLICY_CACHE", ipvs_operator_tests::testbed::policy_cache_dir())
                .output()
                .expect("running ipvs-operator eval");
            assert!(out.status.success(), "warming the policy cache: {}", String::from_utf8_lossy(&out.stderr));
        }
    });
}

/// A testbed with the pods and the WeightedService, everything running, the
/// kernel already as eval says, and a sampler watching it.
fn start(config: TestbedConfig, policy: Option<&str>) -> (Testbed, Sampler) {
    warm_the_policy_cache();
    let mut bed = Testbed::new(config);
    bed.load(&pods());
    bed.load(&weighted_service(1, policy));
    bed.start_all();
    check(&bed, "at the start");
    let sampler = Sampler::start(&bed, SamplerConfig::default());
    (bed, sampler)
}

/// The kernel equals eval (waiting for the agent to converge), and the
/// controller has caught up with the WeightedService's generation.
fn check(bed: &Testbed, after: &str) {
    let started = Instant::now();
    let expected = wait_for_kernel_to_match_eval(bed, "default", "web", TIMEOUT);
    let destinations: usize = expected.weights.values().map(BTreeMap::len).sum();
    eprintln!(
        "[{}] {after}: kernel = eval ({destinations} destinations on {} virtual services) after {} ms",
        bed.id,
        expected.weights.len(),
        started.elapsed().as_millis()
    );
    wait_until(TIMEOUT, &format!("{after}: the controller's status to observe the WeightedService's generation"), || {
        let ws = bed.get("weightedservices", "default", "web")?;
        (ws["status"]["observedGeneration"] == ws["metadata"]["generation"]).then_some(())
    });
}

/// Stop the sampler and fail on any ready endpoint it saw at weight 0.
fn finish(bed: &Testbed, sampler: Sampler) {
    let report = sampler.finish();
    eprintln!("[{}] {}", bed.id, report.summary());
    report.assert_clean();
}

/// Change something the agent must follow; `n` picks what. Through the
/// handle, so that the API server's faults do not stop the test's own edits.
fn change(bed: &Testbed, n: usize) {
    if n % 2 == 0 {
        // web-1…web-4 take turns flipping between prod and canary.
        let pod = format!("web-{}", (n / 2) % 4 + 1);
        let now = bed.get("pods", "default", &pod).map(|p| p["metadata"]["labels"]["env"].clone());
        let next = if now == Some(Value::from("prod")) { "canary" } else { "prod" };
        bed.handle().set_pod_label("default", &pod, "env", Some(next)).expect("relabelling a pod");
    } else {
        bed.handle().load_manifests(&weighted_service((n as u32 / 2) % 5 + 1, current_policy(bed).as_deref())).expect("editing the WeightedService");
    }
}

/// The WeightedService's `spec.policy`, as inline JSON (YAML), if any.
fn current_policy(bed: &Testbed) -> Option<String> {
    let ws = bed.get("weightedservices", "default", "web")?;
    let policy = &ws["spec"]["policy"];
    (!policy.is_null()).then(|| policy.to_string())
}

/// Run `each` every `period` for `length`, with a change between; returns how
/// many rounds ran.
fn for_a_while(bed: &Testbed, length: Duration, period: Duration, changes: &mut usize, mut each: impl FnMut(usize)) -> usize {
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < length {
        each(round);
        change(bed, *changes);
        *changes += 1;
        round += 1;
        std::thread::sleep(period);
    }
    round
}

/// The agent's passes (its `pass` log lines) that found virtual services or
/// destinations missing, and that had writes refused.
fn passes_missing_and_failing(bed: &Testbed) -> (usize, usize) {
    let field = |line: &str, name: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let log = bed.log("agent");
    let passes: Vec<&str> = log.lines().filter(|l| l.contains(" pass evaluated=")).collect();
    (
        passes.iter().filter(|l| field(l, "missing=") > 0).count(),
        passes.iter().filter(|l| field(l, "errors=") > 0).count(),
    )
}

/// An agent counter now (0 when not there yet).
fn agent_count(bed: &Testbed, name: &str, labels: &str) -> f64 {
    bed.agent_metric(name, labels).unwrap_or(0.0)
}

/// The kinds the agent watches (not pods: the PodInfoSlices the controller publishes of them).
const AGENT_KINDS: [&str; 5] = ["WeightedService", "Service", "EndpointSlice", "PodInfoSlice", "Node"];

/// The agent's complete lists, by kind.
fn agent_lists(bed: &Testbed) -> Vec<f64> {
    AGENT_KINDS.iter().map(|k| agent_count(bed, "ipvs_operator_watch_lists_total", &format!("kind=\"{k}\""))).collect()
}

/// The watch requests the API server got from the agent, by resource (a cut
/// watch that the agent resumes, without an error or a relist, shows here).
fn agent_watches(bed: &Testbed) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in bed.handle().requests() {
        if r.verb == "watch" && r.user_agent.starts_with("ipvs-operator-agent/") {
            *out.entry(r.resource).or_insert(0) += 1;
        }
    }
    out
}

/// The agent's log lines at WARN or ERROR.
fn agent_warnings(bed: &Testbed) -> Vec<String> {
    bed.log("agent").lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).map(String::from).collect()
}

#[test]
fn api_server_faults_lose_nothing() {
    let (bed, sampler) = start(agreeing(), None);
    let h = bed.handle().clone();
    let mut changes = 0;
    // Each fault must reach the agent, not only be injected: its counters say so.
    let errors = |bed: &Testbed| agent_count(bed, "ipvs_operator_watch_errors_total", "");
    let (errors_before, lists_before, watches_before) = (errors(&bed), agent_lists(&bed), agent_watches(&bed));

    // Watches cut every 2 s, cleanly and mid-stream by turns.
    for_a_while(&bed, phase(), Duration::from_secs(2), &mut changes, |round| {
        if round % 2 == 0 {
            h.close_watches();
        } else {
            h.break_watches();
        }
    });
    check(&bed, "watches cut");
    // A cut watch ends the stream (kube-rs logs the broken one) and the agent
    // watches again from where it was: every watch of the agent came back.
    let (watches_cut, lists_cut) = (agent_watches(&bed), agent_lists(&bed));
    for resource in ["weightedservices", "services", "endpointslices", "podinfoslices", "nodes"] {
        let (before, after) = (watches_before.get(resource).copied().unwrap_or(0), watches_cut.get(resource).copied().unwrap_or(0));
        assert!(after > before, "the agent's {resource} watch was cut but never watched again");
    }

    // Every resourceVersion expired: each watch resumes into a 410 and relists.
    for_a_while(&bed, phase(), Duration::from_secs(2), &mut changes, |_| {
        h.expire_resource_versions();
        h.break_watches();
    });
    check(&bed, "410s");
    // Every watch of the agent met a 410 and listed again.
    let lists_410 = agent_lists(&bed);
    for ((kind, before), after) in AGENT_KINDS.iter().zip(&lists_cut).zip(&lists_410) {
        assert!(after > before, "the agent's {kind} watch did not relist after its resourceVersion expired ({before} → {after} lists)");
    }
    let errors_410 = errors(&bed);

    // Bursts of 500, 503 and 429, on everything and on watches in particular.
    let codes = [500, 503, 429];
    for_a_while(&bed, phase(), Duration::from_secs(1), &mut changes, |round| {
        let code = codes[round % 3];
        h.fail_next(8, code);
        h.add_fail_rule(FailRule { count: 4, code, resource: None, verb: Some("watch".into()) });
        h.add_fail_rule(FailRule { count: 4, code, resource: None, verb: Some("list".into()) });
        if round % 4 == 0 {
            h.break_watches();
        }
    });
    // What the agent's backoff left unused would go on failing its requests
    // for minutes: the bursts end with the phase.
    h.clear_fail_rules();
    check(&bed, "bursts of 500/503/429");
    let errors_bursts = errors(&bed);
    assert!(errors_bursts > errors_410, "no watch or list of the agent failed during the bursts of 500/503/429");

    // A 10 s stall: every watch cut, and every answer (the reconnects
    // included) held for 10 s; the edits go on meanwhile.
    h.set_delay(Some(Duration::from_secs(10)));
    h.break_watches();
    let stall = Instant::now();
    while stall.elapsed() < Duration::from_secs(10) {
        change(&bed, changes);
        changes += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    h.set_delay(None);
    check(&bed, "a 10 s stall");
    let lists: f64 = agent_lists(&bed).iter().sum::<f64>() - lists_before.iter().sum::<f64>();
    eprintln!(
        "[{}] {changes} changes made during the API server's faults; the agent met {} watch errors and listed {lists} times",
        bed.id,
        errors(&bed) - errors_before
    );
    finish(&bed, sampler);
}

#[test]
fn kube_proxy_syncing_every_second_and_restarting_is_repaired() {
    // kube-proxy's scheduler (rr) is not the WeightedService's (wlc): every
    // sync, once a second, reverts it.
    let (mut bed, sampler) = start(
        TestbedConfig { proxy_sync_period: Duration::from_secs(1), ..base() },
        None,
    );
    let mut changes = 0;
    for_a_while(&bed, phase(), Duration::from_millis(700), &mut changes, |_| {});
    check(&bed, "kube-proxy syncing every second");
    let reverts = bed.agent_metric("ipvs_operator_drift_repairs_total", "kind=\"scheduler\"").unwrap_or(0.0);
    assert!(reverts >= 1.0, "kube-proxy's syncs should have reverted the scheduler at least once (repairs: {reverts})");

    // Restarts: each resets every weight to 1 on its first sync.
    let weight_repairs = |bed: &Testbed| agent_count(bed, "ipvs_operator_drift_repairs_total", "kind=\"weight\"");
    let repairs_before = weight_repairs(&bed);
    let restarts = (phase().as_secs() / 2).max(2);
    for _ in 0..restarts {
        bed.start_emulator();
        change(&bed, changes);
        changes += 1;
        std::thread::sleep(phase() / restarts as u32);
    }
    check(&bed, &format!("{restarts} kube-proxy restarts"));
    let repairs = weight_repairs(&bed);
    // The restarts reached the agent: it put back weights kube-proxy reset.
    assert!(repairs > repairs_before, "no weight repaired after {restarts} kube-proxy restarts reset them to 1 ({repairs} repairs)");
    eprintln!("[{}] kube-proxy fights: {reverts} scheduler repairs, {repairs} weight repairs", bed.id);

    // kube-proxy drains pods deleted while the agent's watches lag behind its own.
    delete_pods_behind_a_lagging_agent(&bed, &sampler);
    finish(&bed, sampler);
}

/// The agent's watches lag by this much (the test API server's `lag_watches`).
const LAG_MIN: Duration = Duration::from_millis(500);
const LAG_MAX: Duration = Duration::from_secs(2);

/// Up to three of this node's four pods are deleted (terminating until the
/// end of the phase), 1.5 s apart, while every watch event to the agent comes
/// 0.5–2 s late and kube-proxy's at once: kube-proxy drains their destinations
/// at weight 0 while the agent's plan still has them ready at 10 or 4 (not
/// kube-proxy's 1). The sampler's second check says it never raises them;
/// then, the lag over, the kernel equals eval. The phase stops deleting once it
/// has exercised that: the agent counted a raise it refused, or the sampler saw
/// a drain revived, or kube-proxy drain a destination before the agent could
/// know (within `LAG_MIN` of the termination).
fn delete_pods_behind_a_lagging_agent(bed: &Testbed, sampler: &Sampler) {
    let started = Instant::now();
    let h = bed.handle();
    h.load_manifests(&weighted_service(4, current_policy(bed).as_deref())).expect("editing the WeightedService");
    // Connections give the destinations something to drain (kube-proxy deletes
    // idle ones at once), on the ClusterIP and on the NodePort. A few are
    // refused while the agent swaps back the scheduler kube-proxy reverts.
    let service = bed.get("services", "default", "web").expect("the Service");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().and_then(|p| u16::try_from(p).ok());
    let node_port = node_port.expect("a node port");
    let cluster_ip = SocketAddr::new(bed.cluster_ip("default", "web"), 80);
    for target in [cluster_ip, SocketAddr::new(IpAddr::V4(NODE_IP), node_port)] {
        let (_, refused) = bed.connect_counting_errors(target, 40);
        assert!(refused.len() <= 20, "{} of 40 connections to {target} failed: {refused:?}", refused.len());
    }
    check(bed, "canary weight 4");
    // Of web-1…web-4 (this node's), those whose ClusterIP destination has
    // connections; one stays, so that kube-proxy never falls back to the
    // terminating ones.
    let table = bed.ipvs();
    let with_connections = |pod: &str| {
        let ip = bed.get("pods", "default", pod).and_then(|p| p["status"]["podIP"].as_str()?.parse::<IpAddr>().ok());
        table.iter().filter(|e| e.service.address() == Some(cluster_ip)).flat_map(|e| &e.destinations).any(|d| {
            Some(d.socket_addr().ip()) == ip && d.active_connections + d.inactive_connections > 0
        })
    };
    let candidates: Vec<String> = (1..=4).map(|n| format!("web-{n}")).filter(|p| with_connections(p)).take(3).collect();
    assert!(!candidates.is_empty(), "none of this node's pods has connections to drain:\n{}", bed.ipvsadm());

    let refused = |bed: &Testbed| agent_count(bed, "ipvs_operator_zero_raises_refused_total", "");
    let revived = |report: &SamplerReport| {
        report.violations.iter().filter(|v| matches!(v.kind, ViolationKind::DrainRevived { .. })).count()
    };
    let (before, refused_before) = (sampler.report(), refused(bed));
    let exercised = |report: &SamplerReport, bed: &Testbed| {
        let behind = report.drains[before.drains.len()..]
            .iter()
            .filter(|d| d.after_termination.is_some_and(|t| t < LAG_MIN))
            .count();
        (refused(bed) - refused_before, revived(report) - revived(&before), behind)
    };
    let lagging = Instant::now();
    h.lag_watches(Some(WatchLag { user_agent_prefix: "ipvs-operator-agent/".into(), min: LAG_MIN, max: LAG_MAX }));
    let mut deleted = Vec::new();
    let mut last = Instant::now();
    for pod in &candidates {
        h.delete_pod("default", pod, Grace::UntilFinished).expect("deleting a pod");
        last = Instant::now();
        deleted.push(pod.clone());
        std::thread::sleep(Duration::from_millis(1500));
        let (refusals, revivals, behind) = exercised(&sampler.report(), bed);
        if refusals > 0.0 || revivals > 0 || behind > 0 {
            break;
        }
    }
    // The last deletion's events reach the agent at most LAG_MAX after it:
    // until then it may raise what kube-proxy drained.
    std::thread::sleep((last + LAG_MAX).saturating_duration_since(Instant::now()));
    h.lag_watches(None);
    let lagged = lagging.elapsed();
    check(bed, "pods deleted behind a lagging agent");
    for pod in &deleted {
        h.finish_pod_termination("default", pod).expect("finishing a pod's termination");
    }

    let report = sampler.report();
    let drains = &report.drains[before.drains.len()..];
    let (refusals, revivals, behind) = exercised(&report, bed);
    let described: Vec<String> = drains
        .iter()
        .map(|d| {
            let after = d.after_termination.map_or("?".into(), |t| format!("{} ms", t.as_millis()));
            let (vs, dest, pod) = (&d.seen.virtual_service, d.seen.destination, &d.seen.pod);
            format!("{} {} -> {dest} ({pod}) {} → 0, at most {after} after it terminated", vs.0, vs.1, d.from)
        })
        .collect();
    let summary = format!(
        "{deleted:?} deleted; {} drains ({behind} within {} ms of the termination), {refusals} raises the agent \
         refused, {revivals} drains revived: {described:#?}",
        drains.len(),
        LAG_MIN.as_millis()
    );
    assert!(!drains.is_empty(), "kube-proxy drained no destination at weight 0: {summary}\n{}", bed.ipvsadm());
    assert!(refusals > 0.0 || revivals > 0 || behind > 0, "the agent was never behind a drain: {summary}");
    eprintln!(
        "[{}] lagging agent: {summary}; the watches lagged {:.1} s, the phase took {:.1} s",
        bed.id,
        lagged.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn virtual_services_vanishing_mid_pass_are_reapplied_without_an_error_loop() {
    // kube-proxy makes a deleted virtual service again on its next sync.
    let (bed, sampler) = start(
        TestbedConfig { proxy_sync_period: Duration::from_secs(1), ..agreeing() },
        None,
    );
    let service = bed.get("services", "default", "web").expect("the Service");
    let cluster_ip = bed.cluster_ip("default", "web");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().expect("a node port");
    let virtual_services =
        [SocketAddr::new(cluster_ip, 80).to_string(), format!("{}:{node_port}", ipvs_operator_tests::testbed::NODE_IP)];
    let mut changes = 0;
    let mut deleted = 0;
    let repairs_before = agent_count(&bed, "ipvs_operator_drift_repairs_total", "kind=\"weight\"");
    let started = Instant::now();
    // At least 4 deletions, however slow kube-proxy is to make them again.
    while started.elapsed() < phase() || deleted < 4 {
        let vs = &virtual_services[deleted % 2];
        wait_until(TIMEOUT, &format!("kube-proxy to make {vs} again"), || {
            bed.node.ipvsadm(&["-Ln"]).contains(&format!("TCP  {vs} ")).then_some(())
        });
        // A change starts a pass; the deletion lands in it (or just before or
        // after it: the delay varies).
        change(&bed, changes);
        changes += 1;
        std::thread::sleep(Duration::from_millis((deleted as u64 * 97) % 300));
        let out = bed.node.exec_output(&["ipvsadm", "-D", "-t", vs]);
        assert!(out.status.success(), "ipvsadm -D -t {vs}: {}", String::from_utf8_lossy(&out.stderr));
        deleted += 1;
    }
    check(&bed, &format!("{deleted} virtual services deleted mid-pass"));

    // No error loop: with the kernel right, a few drift intervals pass without
    // a write or a warning.
    let writes = bed.agent_metric("ipvs_operator_netlink_writes_total", "").unwrap_or(0.0);
    let errors = bed.agent_metric("ipvs_operator_netlink_errors_total", "").unwrap_or(0.0);
    let warnings = agent_warnings(&bed).len();
    std::thread::sleep(Duration::from_secs(4));
    let new_warnings: Vec<String> = agent_warnings(&bed).into_iter().skip(warnings).collect();
    assert!(new_warnings.is_empty(), "the agent still warns after the kernel converged:\n{}", new_warnings.join("\n"));
    assert_eq!(bed.agent_metric("ipvs_operator_netlink_writes_total", "").unwrap_or(0.0), writes, "the agent still writes");
    assert_eq!(bed.agent_metric("ipvs_operator_netlink_errors_total", "").unwrap_or(0.0), errors, "the kernel still refuses writes");
    let (missing, failing) = passes_missing_and_failing(&bed);
    // The deletions reached the agent: a pass found a virtual service missing,
    // a write to one was refused, or it repaired the weights of one kube-proxy
    // made again (weight 1).
    let repairs = agent_count(&bed, "ipvs_operator_drift_repairs_total", "kind=\"weight\"") - repairs_before;
    assert!(
        missing + failing > 0 || repairs > 0.0,
        "{deleted} virtual services deleted, but no pass found one missing, had a write refused, or repaired a weight"
    );
    eprintln!(
        "[{}] vanishing virtual services: {deleted} deleted; {missing} passes found one missing, {failing} had writes refused ({errors} refused writes), {repairs} weights repaired, {warnings} warnings",
        bed.id
    );
    finish(&bed, sampler);
}

/// A built-in policy module by name, as the binary embeds it. (The test
/// fixtures are `policy_fixtures`'.)
fn module(name: &str) -> &'static [u8] {
    embedded_module(name).unwrap_or_else(|| panic!("no policy {name}"))
}

/// Replace `NAME.wasm` in a ConfigMap-style directory as the kubelet does: a
/// new timestamped directory, `..data` swapped to it atomically.
fn config_map_update(root: &Path, generation: u32, file: &str, bytes: &[u8]) {
    use std::os::unix::fs::symlink;
    let old = std::fs::read_link(root.join("..data")).ok();
    let version = format!("..{generation}");
    std::fs::create_dir(root.join(&version)).expect("a version directory");
    std::fs::write(root.join(&version).join(file), bytes).expect("writing a module");
    let _ = std::fs::remove_file(root.join("..data_tmp"));
    symlink(&version, root.join("..data_tmp")).expect("the ..data_tmp link");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swapping ..data");
    if root.join(file).symlink_metadata().is_err() {
        symlink(format!("..data/{file}"), root.join(file)).expect("a file link");
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(root.join(old));
    }
}

/// The kernel's weights of every destination, by virtual service.
fn kernel_weights(bed: &Testbed) -> BTreeMap<String, u32> {
    bed.ipvs()
        .iter()
        .flat_map(|e| {
            let vs = e.service.address().map(|a| a.to_string()).unwrap_or_default();
            e.destinations.iter().map(move |d| (format!("{vs} -> {}", d.socket_addr()), d.weight))
        })
        .collect()
}

#[test]
fn a_policy_failing_mid_rollout_keeps_the_last_good_weights() {
    let dir = tempfile::Builder::new().prefix("policies-").tempdir().expect("a temp dir");
    let mut generation = 1;
    config_map_update(dir.path(), generation, "mine.wasm", module("label-selector"));
    // A loop is cut at the 500 ms limit.
    let config = TestbedConfig { policy_dir: Some(dir.path().to_path_buf()), ..agreeing() };
    let (bed, sampler) = start(config, Some("{name: mine, config: {}}"));
    let good = kernel_weights(&bed);
    // Failed evaluations, and configs refused by validate-config (never evaluated).
    let failures = |bed: &Testbed| {
        let all = bed.agent_metric("ipvs_operator_policy_evaluations_total", "policy=\"mine\"").unwrap_or(0.0);
        let refused = bed.agent_metric("ipvs_operator_policy_config_refusals_total", "policy=\"mine\"").unwrap_or(0.0);
        all + refused - bed.agent_metric("ipvs_operator_policy_evaluations_total", "policy=\"mine\",result=\"ok\"").unwrap_or(0.0)
    };
    let hold = |bed: &Testbed, what: &str, length: Duration, changes: &mut usize| {
        let started = Instant::now();
        while started.elapsed() < length {
            // Pods relabelled: work the failing policy cannot do.
            bed.handle()
                .set_pod_label("default", &format!("web-{}", *changes % 4 + 1), "env", Some(if *changes % 2 == 0 { "canary" } else { "prod" }))
                .expect("relabelling");
            *changes += 1;
            for _ in 0..5 {
                let now = kernel_weights(bed);
                assert_eq!(now, good, "{what}: after {:?} the kernel's weights are not the last good ones", started.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let mut changes = 0;

    // The rollout: first its config, which the working module refuses…
    bed.handle().load_manifests(&weighted_service(1, Some("{name: mine, config: {behave: trap}}"))).expect("editing the WeightedService");
    wait_until(TIMEOUT, "the agent to count the refused config", || (failures(&bed) >= 1.0).then_some(()));
    hold(&bed, "the config refused", phase(), &mut changes);
    // …then its module, which traps on every evaluation…
    generation += 1;
    config_map_update(
        dir.path(),
        generation,
        "mine.wasm",
        policy_fixtures::MISBEHAVING,
    );
    let before = failures(&bed);
    wait_until(TIMEOUT, "the agent to count the trapping module's failures", || (failures(&bed) > before).then_some(()));
    hold(&bed, "the module trapping", phase(), &mut changes);
    // …and a config that makes it loop until the time limit cuts it.
    bed.handle().load_manifests(&weighted_service(1, Some("{name: mine, config: {behave: loop}}"))).expect("editing the WeightedService");
    let before = failures(&bed);
    wait_until(TIMEOUT, "the agent to count the looping module's failures", || (failures(&bed) > before).then_some(()));
    hold(&bed, "the module looping", phase(), &mut changes);
    assert!(bed.agent_ready(), "the agent kept running");

    // Rolled back: the working module and its config; the relabels made
    // meanwhile now apply.
    generation += 1;
    config_map_update(dir.path(), generation, "mine.wasm", module("label-selector"));
    bed.handle().load_manifests(&weighted_service(1, Some("{name: mine, config: {}}"))).expect("editing the WeightedService");
    check(&bed, "the rollback");
    eprintln!("[{}] failing rollout: {} failed evaluations, {changes} changes held back", bed.id, failures(&bed));
    finish(&bed, sampler);
}

#[test]
fn the_agent_killed_mid_pass_and_restarted_converges() {
    let (mut bed, sampler) = start(agreeing(), None);
    let mut changes = 0;
    let mut kills = 0;
    let started = Instant::now();
    while started.elapsed() < phase() * 2 || kills < 4 {
        // A change starts a pass; the kill lands in it, or in the start-up of the
        // previous restart's agent (its first pass), by turns.
        change(&bed, changes);
        changes += 1;
        std::thread::sleep(Duration::from_millis((kills as u64 * 173) % 600));
        bed.kill("agent");
        kills += 1;
        bed.start_agent();
        if kills % 2 == 0 {
            wait_until(TIMEOUT, "the restarted agent to be ready", || bed.agent_ready().then_some(()));
        }
    }
    check(&bed, &format!("{kills} SIGKILLs"));
    // The kernel may be right before the last restarted agent's first pass is
    // done (it was right already): wait for that, not assume it.
    wait_until(TIMEOUT, "the last restarted agent to be ready", || bed.agent_ready().then_some(()));

    // With nothing changing, a SIGKILLed agent restarted while the API server
    // fails its first lists (of PodInfoSlices, then of EndpointSlices, then of
    // WeightedServices) must not move a single weight: it writes nothing until
    // it knows everything, and then only what differs.
    let settled = kernel_weights(&bed);
    for resource in ["podinfoslices", "endpointslices", "weightedservices"] {
        bed.kill("agent");
        bed.handle().add_fail_rule(FailRule { count: 3, code: 503, resource: Some(resource.into()), verb: Some("list".into()) });
        bed.start_agent();
        let restarted = Instant::now();
        let mut ready_at: Option<Instant> = None;
        while ready_at.is_none_or(|at| at.elapsed() < Duration::from_secs(2)) {
            let now = kernel_weights(&bed);
            assert_eq!(
                now,
                settled,
                "{:?} after a restart whose first lists of {resource} failed, a weight moved with nothing changed",
                restarted.elapsed()
            );
            if ready_at.is_none() && bed.agent_ready() {
                ready_at = Some(Instant::now());
            }
            assert!(restarted.elapsed() < TIMEOUT, "the agent restarted with failing lists of {resource} never got ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        kills += 1;
    }
    assert_eq!(bed.agent_metric("ipvs_operator_netlink_writes_total", ""), Some(0.0), "the last restart wrote to the kernel");
    eprintln!("[{}] {kills} SIGKILLs, {changes} changes", bed.id);
    finish(&bed, sampler);
}

#[test]
fn a_second_controller_stands_by_and_writes_nothing() {
    let (mut bed, sampler) = start(agreeing(), None);
    bed.start_controller_as("controller-2", 8081);
    wait_until(TIMEOUT, "the second controller to follow", || bed.log("controller-2").contains("following").then_some(()));
    assert_eq!(bed.leader().as_deref(), Some("controller"), "the first controller holds the Lease");
    let mut changes = 0;
    for_a_while(&bed, phase(), Duration::from_millis(700), &mut changes, |_| {});
    check(&bed, "two controllers");
    // The leader caught up; the status says the WeightedService's current split.
    let ws = bed.get("weightedservices", "default", "web").expect("the WeightedService");
    let canary = ws["spec"]["weights"][1]["weight"].clone();
    wait_until(TIMEOUT, "the status to show the current canary weight", || {
        let ws = bed.get("weightedservices", "default", "web")?;
        (ws["status"]["groups"][1]["weight"] == canary).then_some(())
    });
    // The follower did none of it: no reconcile, so no write.
    assert_eq!(bed.controller_metric_on(8081, "ipvs_operator_leader", ""), Some(0.0));
    assert_eq!(
        bed.controller_metric_on(8081, "ipvs_operator_reconcile_seconds_count", ""),
        Some(0.0),
        "the follower reconciled:\n{}",
        bed.log("controller-2")
    );
    assert_eq!(bed.leader().as_deref(), Some("controller"), "the Lease changed hands while its holder ran");
    // Quiet: nothing changes, and the status is not rewritten.
    let status_writes = |bed: &Testbed| {
        bed.handle()
            .requests()
            .iter()
            .filter(|r| r.resource == "weightedservices" && r.subresource == "status" && r.verb != "get" && r.verb != "watch" && r.verb != "list")
            .count()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = status_writes(&bed);
    std::thread::sleep(Duration::from_secs(5));
    let during_quiet = status_writes(&bed) - before;
    assert!(during_quiet <= 2, "{during_quiet} status writes in 5 quiet seconds");
    for controller in ["controller", "controller-2"] {
        let log = bed.log(controller);
        assert!(!log.contains("panicked"), "{controller} panicked:\n{log}");
    }
    eprintln!("[{}] two controllers: {during_quiet} status writes in 5 quiet seconds, {changes} changes", bed.id);
    finish(&bed, sampler);
}
