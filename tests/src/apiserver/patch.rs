//! Patch semantics: JSON merge patch (RFC 7386) and strategic merge patch as
//! kubectl sends it. Server-side apply is [`super::ssa`].

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// Applies an RFC 7386 JSON merge patch: objects merge, `null` removes, anything
/// else (lists included) replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// The key that identifies elements of a list field under strategic merge, as
/// the built-in types declare it (`patchMergeKey`); `None` means the list is
/// replaced whole.
fn merge_key(field: &str, live: Option<&Value>, patch: &[Value]) -> Option<&'static str> {
    let has = |k: &str| {
        patch.iter().chain(live.and_then(Value::as_array).into_iter().flatten()).any(|e| e.get(k).is_some())
    };
    Some(match field {
        "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env" | "imagePullSecrets"
        | "readinessGates" | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "conditions" => "type",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "addresses" if has("type") && has("address") => "type",
        "ports" if has("containerPort") => "containerPort",
        "ports" => "port",
        _ => return None,
    })
}

/// Lists of scalars that strategic merge treats as sets.
fn is_primitive_set(field: &str) -> bool {
    matches!(field, "finalizers")
}

/// What a patch map asks of the element it is applied to.
enum Outcome {
    Keep,
    Delete,
}

/// Applies a strategic merge patch as kubectl's client-side apply and `kubectl
/// patch` send it, with the directives `$patch` (merge/replace/delete),
/// `$setElementOrder/<field>`, `$deleteFromPrimitiveList/<field>` and
/// `$retainKeys`, and list merging by the usual keys (`name`, `port`,
/// `containerPort`, `uid`, `type`, …).
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    if let Outcome::Delete = strategic_merge_value(target, patch) {
        *target = Value::Object(Map::new());
    }
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), strip_directives(v))).collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|e| !(e.is_object() && e.get("$patch").is_some() && e.as_object().is_some_and(|m| m.len() == 1)))
                .map(strip_directives)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn strategic_merge_value(target: &mut Value, patch: &Value) -> Outcome {
    let Value::Object(pm) = patch else {
        *target = patch.clone();
        return Outcome::Keep;
    };
    match pm.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Outcome::Delete,
        Some("replace") => {
            *target = strip_directives(patch);
            return Outcome::Keep;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(tm) = target else { return Outcome::Keep };
    if let Some(Value::Array(keep)) = pm.get("$retainKeys") {
        let keep: BTreeSet<&str> = keep.iter().filter_map(Value::as_str).collect();
        tm.retain(|k, _| keep.contains(k.as_str()));
    }
    for (k, v) in pm {
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                tm.remove(k);
            }
            Value::Array(items) => {
                let merged = merge_list(k, tm.get(k), items);
                tm.insert(k.clone(), merged);
            }
            Value::Object(_) => {
                let entry = tm.entry(k.clone()).or_insert(Value::Null);
                if let Outcome::Delete = strategic_merge_value(entry, v) {
                    tm.remove(k);
                }
            }
            scalar => {
                tm.insert(k.clone(), scalar.clone());
            }
        }
    }
    for (k, v) in pm {
        if let (Some(field), Value::Array(gone)) = (k.strip_prefix("$deleteFromPrimitiveList/"), v)
            && let Some(Value::Array(list)) = tm.get_mut(field)
        {
            list.retain(|e| !gone.contains(e));
        }
    }
    for (k, v) in pm {
        if let (Some(field), Value::Array(order)) = (k.strip_prefix("$setElementOrder/"), v)
            && let Some(Value::Array(list)) = tm.get_mut(field)
        {
            reorder(field, list, order);
        }
    }
    Outcome::Keep
}

fn merge_list(field: &str, live: Option<&Value>, items: &[Value]) -> Value {
    if items.iter().any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace")) {
        return strip_directives(&Value::Array(items.to_vec()));
    }
    let live_items: Vec<Value> = live.and_then(Value::as_array).cloned().unwrap_or_default();
    if items.iter().all(|e| !e.is_object()) {
        if is_primitive_set(field) {
            let mut out = live_items;
            for e in items {
                if !out.contains(e) {
                    out.push(e.clone());
                }
            }
            return Value::Array(out);
        }
        return Value::Array(items.to_vec());
    }
    let Some(key) = merge_key(field, live, items) else {
        return strip_directives(&Value::Array(items.to_vec()));
    };
    let mut out = live_items;
    for item in items {
        let id = item.get(key);
        let pos = id.and_then(|id| out.iter().position(|e| e.get(key) == Some(id)));
        match (pos, item.get("$patch").and_then(Value::as_str)) {
            (Some(i), Some("delete")) => {
                out.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), _) => {
                if let Outcome::Delete = strategic_merge_value(&mut out[i], item) {
                    out.remove(i);
                }
            }
            (None, _) => out.push(strip_directives(item)),
        }
    }
    Value::Array(out)
}

/// Orders `list` as `$setElementOrder` says: listed elements first, in order,
/// then the rest as they were.
fn reorder(field: &str, list: &mut Vec<Value>, order: &[Value]) {
    if order.iter().all(|e| !e.is_object()) {
        let mut out: Vec<Value> = order.iter().filter(|e| list.contains(e)).cloned().collect();
        out.extend(list.iter().filter(|e| !order.contains(e)).cloned());
        *list = out;
        return;
    }
    let Some(key) = merge_key(field, Some(&Value::Array(list.clone())), order) else { return };
    let mut rest = std::mem::take(list);
    for o in order {
        if let Some(i) = rest.iter().position(|e| e.get(key).is_some() && e.get(key) == o.get(key)) {
            list.push(rest.remove(i));
        }
    }
    list.extend(rest);
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_lists_by_key_and_honours_directives() {
        let mut live = json!({
            "metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}},
            "spec": {
                "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30001}, {"port": 443}],
                "template": {"spec": {"containers": [
                    {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80, "name": "www"}]},
                    {"name": "side", "image": "busybox"}
                ]}}
            }
        });
        let patch = json!({
            "metadata": {"finalizers": ["b"], "labels": {"y": null}},
            "spec": {
                "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
                "ports": [{"port": 80, "targetPort": "www"}],
                "template": {"spec": {
                    "$setElementOrder/containers": [{"name": "web"}],
                    "containers": [{"name": "web", "image": "nginx:2"}, {"name": "side", "$patch": "delete"}]
                }}
            }
        });
        strategic_merge_patch(&mut live, &patch);
        assert_eq!(live["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(live["metadata"]["labels"], json!({"x": "1"}));
        assert_eq!(live["spec"]["ports"], json!([{"port": 443}, {"port": 80, "targetPort": "www", "nodePort": 30001}]));
        let containers = &live["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().map(Vec::len), Some(1));
        assert_eq!(containers[0]["image"], "nginx:2");
        assert_eq!(containers[0]["ports"][0]["name"], "www");
    }

    #[test]
    fn strategic_replace_and_primitive_delete() {
        let mut live = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"selector": {"a": "1", "b": "2"}}});
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]},
            "spec": {"selector": {"$patch": "replace", "c": "3"}}
        });
        strategic_merge_patch(&mut live, &patch);
        assert_eq!(live, json!({"metadata": {"finalizers": ["b"]}, "spec": {"selector": {"c": "3"}}}));
    }
}
