//! A policy module replaced many times (a ConfigMap updated during a rollout)
//! must not leave the old modules' machine code resident. Its own test binary:
//! it measures this process's resident memory.

use ipvs_operator::policy::{EngineConfig, PolicyEngine, BUILTIN_POLICIES};
use ipvs_operator::snapshot::{ServiceMeta, Snapshot};
use k8s_openapi::jiff::Timestamp;

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// `bytes` with a custom section, so that each is a different module.
fn variant(bytes: &[u8], i: usize) -> Vec<u8> {
    let tag = format!("reload-{i}");
    let mut payload = vec![1, b't'];
    payload.extend_from_slice(tag.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0);
    out.push(payload.len() as u8);
    out.extend(payload);
    out
}

#[test]
fn replaced_modules_do_not_stay_resident() {
    let engine = PolicyEngine::new(EngineConfig::default()).expect("engine");
    let (_, bytes) = BUILTIN_POLICIES.iter().find(|(n, _)| *n == "label-selector").expect("built in");
    let snapshot = Snapshot {
        service: ServiceMeta { namespace: "default".into(), name: "reload".into(), ..Default::default() },
        groups: vec![],
        config: "{}".into(),
        endpoints: vec![],
        node: None,
        now: Timestamp::UNIX_EPOCH,
    };
    let mut rss = Vec::new();
    let mut current = None;
    for i in 0..24 {
        let policy = engine.load("reloaded", &variant(bytes, i)).expect("loads");
        policy.evaluate(&snapshot).expect("evaluates");
        // The catalog keeps one module per name: the previous one is dropped.
        current = Some(policy);
        rss.push(resident_kib());
    }
    drop(current);
    // Each module is about 1 MiB of machine code. Kept for every reload, the
    // 23 after the warm-up would add over 20 MiB; what stays is bounded by the
    // engine's few warm instance slots.
    let grew_mib = (rss[23] as f64 - rss[3] as f64) / 1024.0;
    assert!(grew_mib < 10.0, "resident memory grew {grew_mib:.1} MiB over 20 reloads: {rss:?} KiB");
}
