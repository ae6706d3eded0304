//! The policy sandbox against real components: the built-in policy, a fixture
//! that misbehaves on request, and hand-written components for what a Rust
//! guest built with the SDK cannot do (import WASI, export another version).

use std::time::{Duration, Instant};

use ipvs_operator::crd::WeightGroup;
use ipvs_operator::policy::{Catalog, EngineConfig, LoadedPolicy, PolicyEngine, PolicyError};
use ipvs_operator::snapshot::{Endpoint, ServiceMeta, Snapshot};
use k8s_openapi::jiff::Timestamp;

fn engine() -> PolicyEngine {
    PolicyEngine::new(EngineConfig::default()).expect("engine")
}

fn misbehaving(engine: &PolicyEngine) -> LoadedPolicy {
    engine
        .load("misbehaving", policy_fixtures::MISBEHAVING)
        .expect("the fixture loads")
}

fn endpoint(i: usize, env: &str) -> Endpoint {
    Endpoint {
        pod_name: Some(format!("{env}-{i}")),
        address: format!("10.0.0.{}", i + 1).parse().unwrap(),
        node_name: None,
        zone: None,
        labels: std::sync::Arc::new([("app".into(), "demo".into()), ("env".into(), env.into())].into()),
        ready: true,
        serving: true,
        terminating: false,
        created: None,
        ready_since: None,
        ports: vec![],
        hints: Default::default(),
    }
}

fn seed(config: &str) -> Snapshot {
    Snapshot {
        service: ServiceMeta {
            namespace: "default".into(),
            name: "example".into(),
            ..Default::default()
        },
        groups: vec![
            WeightGroup { weight: 10, selector: [("env".into(), "prod".into())].into() },
            WeightGroup { weight: 1, selector: [("env".into(), "canary".into())].into() },
        ],
        config: config.into(),
        endpoints: (0..3).map(|i| endpoint(i, "prod")).chain((3..6).map(|i| endpoint(i, "canary"))).collect(),
        node: None,
        now: Timestamp::UNIX_EPOCH,
    }
}

fn behave(how: &str) -> Snapshot {
    seed(&format!(r#"{{"behave": "{how}"}}"#))
}

#[test]
fn the_builtin_label_selector_gives_the_seed_weights() {
    let catalog = Catalog::builtin(engine());
    let policy = catalog.get("label-selector").unwrap();
    assert_eq!(policy.sha256().len(), 64);
    let evaluation = policy.evaluate(&seed("{}")).unwrap();
    assert_eq!(evaluation.weights, vec![10, 10, 10, 1, 1, 1]);
    assert_eq!(evaluation.requeue_after, None);
}

#[test]
fn an_unknown_policy_lists_the_known_ones() {
    let err = Catalog::builtin(engine()).get("no-such-policy").err().unwrap();
    assert!(matches!(err, PolicyError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("label-selector"), "{err}");
}

#[test]
fn a_trap_is_reported_as_a_trap() {
    let err = misbehaving(&engine()).evaluate(&behave("trap")).unwrap_err();
    assert!(matches!(err, PolicyError::Trap { .. }), "{err}");
    assert!(err.to_string().contains("\"misbehaving\""), "{err}");
}

#[test]
fn an_endless_loop_is_stopped_at_the_deadline() {
    let engine = PolicyEngine::new(EngineConfig { timeout: Duration::from_millis(50), ..Default::default() }).unwrap();
    let policy = misbehaving(&engine);
    let started = Instant::now();
    let err = policy.evaluate(&behave("loop")).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
    assert!(took >= Duration::from_millis(50), "stopped after {took:?}, before its deadline");
    assert!(took < Duration::from_millis(1000), "stopped only after {took:?}");
    // The engine is still good for the next evaluation.
    assert_eq!(policy.evaluate(&behave("ok")).unwrap().weights, vec![1; 6]);
}

#[test]
fn unbounded_allocation_hits_the_memory_limit() {
    let engine = PolicyEngine::new(EngineConfig { memory_limit: 16 << 20, ..Default::default() }).unwrap();
    let err = misbehaving(&engine).evaluate(&behave("grow")).unwrap_err();
    assert!(matches!(err, PolicyError::OutOfMemory { limit_mib: 16, .. }), "{err}");
}

#[test]
fn unbounded_recursion_is_a_trap() {
    let err = misbehaving(&engine()).evaluate(&behave("recurse")).unwrap_err();
    assert!(matches!(err, PolicyError::Trap { .. }), "{err}");
}

#[test]
fn the_wrong_number_of_weights_is_refused() {
    let err = misbehaving(&engine()).evaluate(&behave("wrong-length")).unwrap_err();
    assert!(matches!(err, PolicyError::InvalidDecision { .. }), "{err}");
    assert!(err.to_string().contains("returned 5 weights for 6 endpoints"), "{err}");
}

#[test]
fn a_weight_above_65535_is_refused_naming_the_endpoint() {
    let err = misbehaving(&engine()).evaluate(&behave("too-heavy")).unwrap_err();
    assert!(matches!(err, PolicyError::InvalidDecision { .. }), "{err}");
    assert!(err.to_string().contains("weight 70000 for endpoint prod-0"), "{err}");
}

#[test]
fn all_zero_is_refused_unless_the_config_allows_it() {
    let policy = misbehaving(&engine());
    let err = policy.evaluate(&behave("all-zero")).unwrap_err();
    assert!(matches!(err, PolicyError::InvalidDecision { .. }), "{err}");
    assert!(err.to_string().contains("allowAllZero"), "{err}");
    let allowed = policy.evaluate(&seed(r#"{"behave": "all-zero", "allowAllZero": true}"#)).unwrap();
    assert_eq!(allowed.weights, vec![0; 6]);
}

#[test]
fn a_policy_error_is_passed_on() {
    let err = misbehaving(&engine()).evaluate(&behave("error")).unwrap_err();
    assert!(matches!(err, PolicyError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("asked to fail"), "{err}");
}

#[test]
fn a_bad_config_is_refused_by_validate_config_with_its_json_path() {
    let err = misbehaving(&engine()).evaluate(&seed(r#"{"behave": 3}"#)).unwrap_err();
    let PolicyError::ConfigInvalid { issues, .. } = &err else { panic!("{err}") };
    assert_eq!(issues[0].path, "$.behave", "{err}");
    assert_eq!(err.kind(), "config_invalid");
}

#[test]
fn a_config_the_module_refuses_is_never_evaluated() {
    // `evaluate` would take this config (and give weights): the host must not ask it.
    let policy = misbehaving(&engine());
    let refused = seed(r#"{"validate": "error"}"#);
    for _ in 0..2 {
        let err = policy.evaluate(&refused).unwrap_err();
        let PolicyError::ConfigInvalid { issues, .. } = &err else { panic!("{err}") };
        assert_eq!((issues[0].path.as_str(), issues[0].message.as_str()), ("$.validate", "asked to refuse"));
        assert!(err.to_string().contains("refuses its config: $.validate: asked to refuse"), "{err}");
    }
    assert_eq!(policy.evaluate(&behave("ok")).unwrap().weights, vec![1; 6], "another config is evaluated");
}

#[test]
fn validate_config_runs_in_the_same_sandbox_as_evaluate() {
    let engine = PolicyEngine::new(EngineConfig { timeout: Duration::from_millis(50), ..Default::default() }).unwrap();
    let policy = misbehaving(&engine);
    let started = Instant::now();
    let err = policy.validate_config(r#"{"validate": "loop"}"#).unwrap_err();
    assert!(matches!(err, PolicyError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "stopped only after {:?}", started.elapsed());
    let err = policy.evaluate(&seed(r#"{"validate": "trap"}"#)).unwrap_err();
    assert!(matches!(err, PolicyError::Trap { .. }), "{err}");
}

#[test]
fn the_builtin_policies_speak_the_current_interface_and_describe_themselves() {
    let catalog = Catalog::builtin(engine());
    for name in ["label-selector", "gradual-rollout", "slow-start", "prefer-local"] {
        let policy = catalog.get(name).unwrap();
        assert_eq!(policy.interface().to_string(), ipvs_policy_sdk::INTERFACE_VERSION, "{name}");
        let description = policy.describe().unwrap().unwrap_or_else(|| panic!("{name} has describe"));
        assert_eq!(description.name, name);
        assert_eq!(description.version, env!("CARGO_PKG_VERSION"), "{name}: the workspace's version");
        assert!(!description.description.is_empty(), "{name}");
        let schema: serde_json::Value = serde_json::from_str(description.config_schema.as_deref().unwrap()).unwrap();
        assert_eq!(schema["type"], "object", "{name}: {schema}");
    }
    // A rule beyond the type, with the path of what breaks it.
    let rollout = catalog.get("gradual-rollout").unwrap();
    let err = rollout
        .validate_config(r#"{"canary": {"env": "canary"}, "steps": [{"share": 10}, {"share": 100}]}"#)
        .unwrap_err();
    let PolicyError::ConfigInvalid { issues, .. } = &err else { panic!("{err}") };
    assert_eq!(issues[0].path, "$.steps[0].hold", "{err}");
    let err = rollout.validate_config(r#"{"canary": {"env": "canary"}, "steps": [{"share": "ten"}]}"#).unwrap_err();
    assert!(err.to_string().contains("$.steps[0].share"), "{err}");
}

/// `label-selector` as built by ipvs-operator 0.1 (interface 0.1.0, before
/// `metadata` existed), kept byte for byte: modules deployed then must keep working.
const LABEL_SELECTOR_0_1: &[u8] = include_bytes!("fixtures/label-selector-interface-0.1.0.wasm");

#[test]
fn a_module_built_against_interface_0_1_evaluates_unchanged() {
    let engine = engine();
    let old = engine.load("label-selector", LABEL_SELECTOR_0_1).unwrap();
    assert_eq!(old.interface().to_string(), "0.1.0");
    assert!(old.describe().unwrap().is_none(), "0.1 has no describe");
    assert!(old.validate_config(r#"{"anything": 1}"#).is_ok(), "0.1 has no validate-config: every config goes to evaluate");
    let current = Catalog::builtin(engine.clone()).get("label-selector").unwrap();
    for config in ["{}", r#"{"mode": "share"}"#, r#"{"mode": "share", "defaultWeight": 3}"#] {
        let snapshot = seed(config);
        assert_eq!(old.evaluate(&snapshot).unwrap(), current.evaluate(&snapshot).unwrap(), "{config}");
    }
    assert_eq!(old.evaluate(&seed("{}")).unwrap().weights, vec![10, 10, 10, 1, 1, 1]);
    // Its own config errors still come from evaluate, as before.
    let err = old.evaluate(&seed(r#"{"mode": "nope"}"#)).unwrap_err();
    assert!(matches!(err, PolicyError::Failed { .. }), "{err}");
}

#[test]
fn every_evaluation_gets_a_fresh_instance() {
    let policy = misbehaving(&engine());
    for _ in 0..3 {
        assert_eq!(policy.evaluate(&behave("count")).unwrap().weights, vec![1; 6]);
    }
}

#[test]
fn a_component_that_imports_wasi_is_refused_at_load() {
    let wat = r#"(component
        (import "wasi:cli/environment@0.2.0" (instance
            (export "get-arguments" (func (result (list string))))
        ))
    )"#;
    let err = engine().load("wants-env", &wat::parse_str(wat).expect("valid WAT")).err().unwrap();
    assert!(matches!(err, PolicyError::Imports { .. }), "{err}");
    assert!(err.to_string().contains("wasi:cli/environment@0.2.0"), "{err}");
}

#[test]
fn another_interface_version_is_refused_at_load() {
    let wat = r#"(component
        (core module $m (func (export "f") (result i32) i32.const 1))
        (core instance $i (instantiate $m))
        (func $f (result u32) (canon lift (core func $i "f")))
        (instance $evaluator (export "evaluate" (func $f)))
        (export "ipvs-operator:policy/evaluator@0.3.0" (instance $evaluator))
    )"#;
    let err = engine().load("future", &wat::parse_str(wat).expect("valid WAT")).err().unwrap();
    assert!(matches!(err, PolicyError::Interface { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("@0.2.x or @0.1.x") && text.contains("@0.3.0"), "{text}");
}

#[test]
fn the_right_name_with_the_wrong_signature_is_refused_at_load() {
    let wat = r#"(component
        (core module $m (func (export "f") (result i32) i32.const 1))
        (core instance $i (instantiate $m))
        (func $f (result u32) (canon lift (core func $i "f")))
        (instance $evaluator (export "evaluate" (func $f)))
        (export "ipvs-operator:policy/evaluator@0.1.0" (instance $evaluator))
    )"#;
    let err = engine().load("liar", &wat::parse_str(wat).expect("valid WAT")).err().unwrap();
    assert!(matches!(err, PolicyError::Interface { .. }), "{err}");
}

#[test]
fn bytes_that_are_not_a_component_do_not_compile() {
    let err = engine().load("garbage", b"\0asm but not really").err().unwrap();
    assert!(matches!(err, PolicyError::Compile { .. }), "{err}");
    assert!(err.to_string().contains("\"garbage\""), "{err}");
}

#[test]
fn every_builtin_policy_imports_nothing_and_evaluates() {
    let catalog = Catalog::builtin(engine());
    let names = catalog.names();
    for expected in ["label-selector", "gradual-rollout", "slow-start", "prefer-local"] {
        assert!(names.iter().any(|n| n == expected), "{expected} is not built in: {names:?}");
    }
    // Each needs its own config; label groups and a canary label are in the seed snapshot.
    let configs = [
        ("label-selector", r#"{"mode": "share"}"#),
        ("gradual-rollout", r#"{"canary": {"env": "canary"}, "startTime": "1969-12-31T23:55:00Z", "steps": [{"share": 1, "hold": "1m"}, {"share": 25, "hold": "10m"}, {"share": 100}]}"#),
        ("slow-start", r#"{"window": "1m"}"#),
        ("prefer-local", "{}"),
    ];
    for (name, config) in configs {
        // Loading checks the imports (none) and the interface.
        let policy = catalog.get(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let evaluation = policy.evaluate(&seed(config)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(evaluation.weights.len(), 6, "{name}");
        assert!(evaluation.weights.iter().any(|w| *w > 0), "{name}: {evaluation:?}");
    }
    // The rollout, 5 minutes in, gives 3 canaries 25 % against 3 prod: 3 : 1 per endpoint.
    let rollout = catalog.get("gradual-rollout").unwrap().evaluate(&seed(configs[1].1)).unwrap();
    assert_eq!(rollout.weights, vec![3, 3, 3, 1, 1, 1]);
    assert_eq!(rollout.requeue_after, Some(Duration::from_secs(6 * 60)));
    assert_eq!(rollout.message.as_deref(), Some("step 2/3: canary 25 %, next in 6m"));
}

#[test]
fn a_policy_that_reaches_for_the_hosts_clock_env_files_or_network_is_refused_at_load() {
    // Built with std, which on wasm32-wasip2 reaches the host through WASI imports.
    let err = engine()
        .load("nosy", policy_fixtures::NOSY)
        .err()
        .expect("a component with WASI imports must not load");
    assert!(matches!(err, PolicyError::Imports { .. }), "{err}");
    let text = err.to_string();
    for import in [
        "wasi:clocks/wall-clock@",
        "wasi:cli/environment@",
        "wasi:filesystem/preopens@",
        "wasi:sockets/tcp@",
    ] {
        assert!(text.contains(import), "{import} not named in: {text}");
    }
}

#[test]
fn each_kind_of_host_access_is_refused_naming_the_import() {
    // One component per capability, each importing just that interface.
    for (import, func) in [
        ("wasi:clocks/wall-clock@0.2.6", r#"(export "now" (func (result (tuple u64 u32))))"#),
        ("wasi:clocks/monotonic-clock@0.2.6", r#"(export "now" (func (result u64)))"#),
        ("wasi:filesystem/preopens@0.2.6", r#"(export "get-directories" (func (result (list string))))"#),
        ("wasi:sockets/instance-network@0.2.6", r#"(export "instance-network" (func (result u32)))"#),
        ("wasi:random/random@0.2.6", r#"(export "get-random-u64" (func (result u64)))"#),
        ("wasi:cli/environment@0.2.6", r#"(export "get-environment" (func (result (list (tuple string string)))))"#),
        ("host:anything/at-all", r#"(export "f" (func))"#),
    ] {
        let wat = format!(r#"(component (import "{import}" (instance {func})))"#);
        let err = engine().load("curious", &wat::parse_str(&wat).expect("valid WAT")).err().unwrap_or_else(|| panic!("{import} was accepted"));
        assert!(matches!(err, PolicyError::Imports { .. }), "{import}: {err}");
        assert!(err.to_string().contains(import), "{import}: {err}");
    }
}
