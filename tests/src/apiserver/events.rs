//! Events are one resource served in two schemas, as on the real server:
//! `v1` Events (what `kubectl describe` and `kubectl events` read) and
//! `events.k8s.io/v1` Events (what kube-rs's `Recorder` writes). The store keeps
//! each Event in both kinds; a write to one rewrites its twin in the other
//! (same name, uid and creation time), converted field by field as the real
//! server converts them. Limit of the double: the twins carry different
//! resourceVersions.

use serde_json::{Map, Value};

/// Field renames between `events.k8s.io/v1` (left) and `v1` (right); the
/// other fields (`action`, `eventTime`, `reason`, `related`,
/// `reportingInstance`, `series`, `type`, `metadata`) have the same name.
const RENAMES: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn convert(obj: &Value, to_core: bool, api_version: &str) -> Value {
    let mut out = Map::new();
    for (key, value) in obj.as_object().into_iter().flatten() {
        let renamed = RENAMES.iter().find_map(|(new, old)| if to_core { (key == new).then_some(*old) } else { (key == old).then_some(*new) });
        out.insert(renamed.unwrap_or(key).to_string(), value.clone());
    }
    out.insert("apiVersion".into(), Value::from(api_version));
    out.insert("kind".into(), Value::from("Event"));
    if let Some(Value::Object(m)) = out.get_mut("metadata") {
        // Each twin gets its own resourceVersion and field ownership.
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    if to_core && !out.contains_key("involvedObject") {
        out.insert("involvedObject".into(), Value::Object(Map::new()));
    }
    Value::Object(out)
}

/// An `events.k8s.io/v1` Event as `v1` shows it.
pub(crate) fn to_core(obj: &Value) -> Value {
    convert(obj, true, "v1")
}

/// A `v1` Event as `events.k8s.io/v1` shows it.
pub(crate) fn to_events_v1(obj: &Value) -> Value {
    convert(obj, false, "events.k8s.io/v1")
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_two_schemas_convert_both_ways() {
        let new = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "ws.1", "namespace": "default", "resourceVersion": "7"},
            "regarding": {"kind": "WeightedService", "name": "ws"}, "note": "hello", "reason": "Evaluated", "type": "Normal",
            "reportingController": "ipvs-operator", "reportingInstance": "pod-1", "eventTime": "2025-01-01T00:00:00.000000Z",
        });
        let core = to_core(&new);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "ws");
        assert_eq!(core["message"], "hello");
        assert_eq!(core["reportingComponent"], "ipvs-operator");
        assert!(core["metadata"].get("resourceVersion").is_none());
        let mut back = to_events_v1(&core);
        back["metadata"]["resourceVersion"] = json!("7");
        assert_eq!(back, new);
    }
}
