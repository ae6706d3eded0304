//! Custom resources as the real server treats them through their CRD's
//! structural schema (k8s.io/apiextensions-apiserver):
//!
//! - [`structural_errors`]: a CRD whose schema is not structural is refused on
//!   create and update (`spec.versions[0].schema.openAPIV3Schema…`).
//! - [`prune_and_default`]: on every write, `null`s of non-nullable fields and
//!   fields the schema does not know are dropped (pruning; not under
//!   `x-kubernetes-preserve-unknown-fields`), then `default`s are filled in.
//! - [`validate`]: on every write, value validation: `type`, `enum`,
//!   `minimum`/`maximum` (and exclusive), `pattern`, `minLength`/`maxLength`,
//!   `minItems`/`maxItems`, `minProperties`/`maxProperties`, `required`,
//!   `nullable`, `x-kubernetes-int-or-string` and uniqueness of
//!   `x-kubernetes-list-type` `set` and `map` lists. Refusals read as the real
//!   server's (`spec.weights[0].weight: Invalid value: 70000:
//!   spec.weights[0].weight in body should be less than or equal to 65535`).
//!
//! Limits of the double: `format`, `anyOf`/`allOf`/`oneOf`/`not` and CEL
//! (`x-kubernetes-validations`) are not evaluated (the operator's CRD has
//! none of the latter); a structural check covers the rules listed at
//! [`structural_errors`], not all of them.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::error::{FieldError, FieldErrorKind};

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn is_embedded(schema: &Value, root: bool) -> bool {
    root || flag(schema, "x-kubernetes-embedded-resource")
}

/// The fields of an embedded resource that its schema does not describe but
/// the server knows: `apiVersion`, `kind`, `metadata`.
fn implicit(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind" | "metadata")
}

// ---- structural schemas ----

/// Why the CRD's schemas are not structural, as the real server words it.
/// Checked: every specified node has a `type` (unless
/// `x-kubernetes-int-or-string` or `x-kubernetes-preserve-unknown-fields`),
/// `object` at the root, `items` for arrays, not both `properties` and
/// `additionalProperties`, `x-kubernetes-int-or-string` without a `type`,
/// `metadata` at the root restricted to `name` and `generateName`,
/// `x-kubernetes-list-type` values and map keys that exist and are scalars.
pub(crate) fn structural_errors(crd: &Value) -> Vec<FieldError> {
    let mut out = Vec::new();
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        out.push(FieldError::bare(FieldErrorKind::Required, "spec.versions", "must have exactly one version marked as storage version"));
    }
    let storage = versions.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true)).count();
    if !versions.is_empty() && storage != 1 {
        out.push(FieldError::new(
            FieldErrorKind::Invalid,
            "spec.versions",
            &Value::from(storage),
            "must have exactly one version marked as storage version",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let path = format!("spec.versions[{i}].schema.openAPIV3Schema");
        match v.pointer("/schema/openAPIV3Schema") {
            None => out.push(FieldError::bare(FieldErrorKind::Required, path, "schemas are required")),
            Some(s) => {
                let t = s.get("type").and_then(Value::as_str).unwrap_or_default();
                if t != "object" {
                    out.push(FieldError::new(FieldErrorKind::Invalid, format!("{path}.type"), &Value::from(t), "must be object at the root"));
                }
                if let Some(meta) = s.pointer("/properties/metadata") {
                    let extra = meta.as_object().is_some_and(|m| m.keys().any(|k| k != "type" && k != "properties"))
                        || meta.get("properties").and_then(Value::as_object).is_some_and(|p| p.keys().any(|k| k != "name" && k != "generateName"));
                    if extra {
                        out.push(FieldError::bare(
                            FieldErrorKind::Forbidden,
                            format!("{path}.properties[metadata]"),
                            "must not specify anything other than name and generateName, but metadata is implicitly specified",
                        ));
                    }
                }
                structural_node(s, &path, "object fields", &mut out);
            }
        }
    }
    out
}

fn structural_node(s: &Value, path: &str, what: &str, out: &mut Vec<FieldError>) {
    let t = s.get("type").and_then(Value::as_str).unwrap_or_default();
    let int_or_string = flag(s, "x-kubernetes-int-or-string");
    if int_or_string && !t.is_empty() {
        out.push(FieldError::new(
            FieldErrorKind::Invalid,
            format!("{path}.type"),
            &Value::from(t),
            "must be empty if x-kubernetes-int-or-string is true",
        ));
    }
    if t.is_empty() && !int_or_string && !flag(s, "x-kubernetes-preserve-unknown-fields") {
        out.push(FieldError::bare(FieldErrorKind::Required, format!("{path}.type"), format!("must not be empty for specified {what}")));
    }
    if let Some(t) = s.get("type").and_then(Value::as_str)
        && !matches!(t, "object" | "array" | "string" | "integer" | "number" | "boolean")
    {
        out.push(FieldError::new(
            FieldErrorKind::NotSupported,
            format!("{path}.type"),
            &Value::from(t),
            r#"supported values: "array", "boolean", "integer", "number", "object", "string""#,
        ));
    }
    let props = s.get("properties").and_then(Value::as_object);
    if props.is_some() && s.get("additionalProperties").is_some_and(|a| a != &Value::Bool(false)) {
        out.push(FieldError::bare(
            FieldErrorKind::Forbidden,
            format!("{path}.additionalProperties"),
            "additionalProperties and properties are mutual exclusive",
        ));
    }
    for (k, child) in props.into_iter().flatten() {
        structural_node(child, &format!("{path}.properties[{k}]"), "object fields", out);
    }
    if let Some(a @ Value::Object(_)) = s.get("additionalProperties") {
        structural_node(a, &format!("{path}.additionalProperties"), "object fields", out);
    }
    if t == "array" {
        match s.get("items") {
            Some(items) => structural_node(items, &format!("{path}.items"), "array items", out),
            None => out.push(FieldError::bare(FieldErrorKind::Required, format!("{path}.items"), "must be specified")),
        }
    }
    match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
        None => {}
        Some(_) if t != "array" => out.push(FieldError::bare(
            FieldErrorKind::Invalid,
            format!("{path}.x-kubernetes-list-type"),
            "must only be used on type=array",
        )),
        Some("atomic" | "set") => {}
        Some("map") => {
            let keys: Vec<&str> =
                s.get("x-kubernetes-list-map-keys").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
            if keys.is_empty() {
                out.push(FieldError::bare(
                    FieldErrorKind::Required,
                    format!("{path}.x-kubernetes-list-map-keys"),
                    "must not be empty if x-kubernetes-list-type is map",
                ));
            }
            for k in keys {
                let key_schema = s.pointer("/items/properties").and_then(|p| p.get(k));
                let scalar = key_schema
                    .and_then(|ks| ks.get("type"))
                    .and_then(Value::as_str)
                    .is_some_and(|t| matches!(t, "string" | "integer" | "number" | "boolean"));
                if !scalar {
                    out.push(FieldError::new(
                        FieldErrorKind::Invalid,
                        format!("{path}.x-kubernetes-list-map-keys"),
                        &Value::from(k),
                        "must be a scalar property of the items",
                    ));
                }
            }
        }
        Some(other) => out.push(FieldError::new(
            FieldErrorKind::NotSupported,
            format!("{path}.x-kubernetes-list-type"),
            &Value::from(other),
            r#"supported values: "atomic", "map", "set""#,
        )),
    }
}

// ---- pruning and defaulting ----

/// Drops `null`s where the schema does not allow them and fields it does not
/// know, then fills in `default`s, as the real server does to every custom
/// resource it is sent. Returns the paths of the unknown fields dropped (for
/// the `fieldValidation` warnings).
pub(crate) fn prune_and_default(obj: &mut Value, schema: &Value) -> Vec<String> {
    let mut dropped = Vec::new();
    prune(obj, schema, "", true, &mut dropped);
    default(obj, schema, true);
    dropped
}

fn prune(v: &mut Value, schema: &Value, path: &str, root: bool, dropped: &mut Vec<String>) {
    if flag(schema, "x-kubernetes-int-or-string") {
        return;
    }
    match v {
        Value::Object(m) => {
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = is_embedded(schema, root);
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let keys: Vec<String> = m.keys().cloned().collect();
            for key in keys {
                if embedded && implicit(&key) {
                    continue;
                }
                let child_schema = props.and_then(|p| p.get(&key)).or(match additional {
                    Some(s @ Value::Object(_)) => Some(s),
                    _ => None,
                });
                let p = join(path, &key);
                match child_schema {
                    Some(cs) => {
                        let null_not_allowed = m.get(&key).is_some_and(Value::is_null) && !flag(cs, "nullable");
                        if null_not_allowed {
                            m.remove(&key);
                        } else if let Some(child) = m.get_mut(&key) {
                            prune(child, cs, &p, false, dropped);
                        }
                    }
                    None if preserve || additional == Some(&Value::Bool(true)) => {}
                    None => {
                        if m.remove(&key).is_some_and(|x| !x.is_null()) {
                            dropped.push(p);
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for (i, x) in items.iter_mut().enumerate() {
                    prune(x, is, &format!("{path}[{i}]"), false, dropped);
                }
            }
        }
        _ => {}
    }
}

fn default(v: &mut Value, schema: &Value, root: bool) {
    match v {
        Value::Object(m) => {
            let embedded = is_embedded(schema, root);
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, cs) in props {
                    if embedded && key == "metadata" {
                        continue;
                    }
                    if !m.contains_key(key)
                        && let Some(d) = cs.get("default")
                    {
                        m.insert(key.clone(), d.clone());
                    }
                }
                for (key, child) in m.iter_mut() {
                    if let Some(cs) = props.get(key) {
                        default(child, cs, false);
                    }
                }
            } else if let Some(a @ Value::Object(_)) = schema.get("additionalProperties") {
                for child in m.values_mut() {
                    default(child, a, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = schema.get("items") {
                for x in items {
                    default(x, is, false);
                }
            }
        }
        _ => {}
    }
}

// ---- value validation ----

/// What the real server's schema validation refuses in `obj` (already pruned
/// and defaulted), each as a field error.
pub(crate) fn validate(obj: &Value, schema: &Value) -> Vec<FieldError> {
    let mut out = Vec::new();
    node(obj, schema, "", true, &mut out);
    out
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_matches(want: &str, v: &Value) -> bool {
    match (want, v) {
        ("integer", Value::Number(n)) => n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0),
        ("number", Value::Number(_)) => true,
        ("string", Value::String(_)) | ("boolean", Value::Bool(_)) | ("array", Value::Array(_)) | ("object", Value::Object(_)) => true,
        _ => false,
    }
}

/// `shown in body must be of type want: "actual"`.
fn wrong_type(shown: &str, want: &str, v: &Value) -> FieldError {
    FieldError::new(FieldErrorKind::TypeInvalid, shown, &Value::from(json_type(v)), format!("{shown} in body must be of type {want}: {:?}", json_type(v)))
}

/// A bound as Go's `%v` prints a float64 (`65535`, `0.5`).
fn bound(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 { format!("{}", f as i64) } else { f.to_string() }
}

fn node(v: &Value, s: &Value, path: &str, root: bool, out: &mut Vec<FieldError>) {
    let shown = if path.is_empty() { "<root>" } else { path };
    if v.is_null() {
        if !flag(s, "nullable") && !root {
            let want = s.get("type").and_then(Value::as_str).unwrap_or("object");
            out.push(FieldError::new(FieldErrorKind::TypeInvalid, shown, &Value::from("null"), format!("{shown} in body must be of type {want}: \"null\"")));
        }
        return;
    }
    if flag(s, "x-kubernetes-int-or-string") {
        if !matches!(v, Value::String(_)) && !type_matches("integer", v) {
            out.push(wrong_type(shown, "integer,string", v));
        }
        return;
    }
    if let Some(want) = s.get("type").and_then(Value::as_str)
        && !type_matches(want, v)
    {
        out.push(wrong_type(shown, want, v));
        return;
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(super::error::go_value).collect();
        out.push(FieldError::new(FieldErrorKind::NotSupported, shown, v, format!("supported values: {}", list.join(", "))));
    }
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or_default();
            let exclusive = |name: &str| flag(s, name);
            if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
                let (bad, words) = if exclusive("exclusiveMaximum") { (x >= max, "less than") } else { (x > max, "less than or equal to") };
                if bad {
                    out.push(FieldError::new(FieldErrorKind::Invalid, shown, v, format!("{shown} in body should be {words} {}", bound(max))));
                }
            }
            if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
                let (bad, words) =
                    if exclusive("exclusiveMinimum") { (x <= min, "greater than") } else { (x < min, "greater than or equal to") };
                if bad {
                    out.push(FieldError::new(FieldErrorKind::Invalid, shown, v, format!("{shown} in body should be {words} {}", bound(min))));
                }
            }
            if let Some(m) = s.get("multipleOf").and_then(Value::as_f64)
                && m > 0.0
                && (x / m).fract() != 0.0
            {
                out.push(FieldError::new(FieldErrorKind::Invalid, shown, v, format!("{shown} in body should be a multiple of {}", bound(m))));
            }
        }
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                out.push(FieldError::bare(FieldErrorKind::TooLong, shown, format!("may not be more than {max} bytes")));
            }
            if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                out.push(FieldError::new(FieldErrorKind::Invalid, shown, v, format!("{shown} in body should be at least {min} chars long")));
            }
            if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(pattern) {
                    Ok(re) if re.is_match(text) => {}
                    Ok(_) => out.push(FieldError::new(FieldErrorKind::Invalid, shown, v, format!("{shown} in body should match '{pattern}'"))),
                    // A pattern the CRD create should have refused; the real server
                    // refuses the CRD, so nothing gets here.
                    Err(_) => {}
                }
            }
        }
        Value::Array(items) => {
            count_bounds(s, items.len(), ("maxItems", "minItems", "items"), shown, out);
            list_uniqueness(items, s, shown, out);
            if let Some(is) = s.get("items") {
                for (i, x) in items.iter().enumerate() {
                    node(x, is, &format!("{path}[{i}]"), false, out);
                }
            }
        }
        Value::Object(m) => {
            count_bounds(s, m.len(), ("maxProperties", "minProperties", "properties"), shown, out);
            for r in s.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                if !m.contains_key(r) {
                    out.push(FieldError::bare(FieldErrorKind::Required, join(path, r), ""));
                }
            }
            let embedded = is_embedded(s, root);
            let props = s.get("properties").and_then(Value::as_object);
            for (key, child) in m {
                if embedded && implicit(key) {
                    continue;
                }
                let cs = props.and_then(|p| p.get(key)).or(match s.get("additionalProperties") {
                    Some(a @ Value::Object(_)) => Some(a),
                    _ => None,
                });
                if let Some(cs) = cs {
                    node(child, cs, &join(path, key), false, out);
                }
            }
        }
        _ => {}
    }
}

/// `maxItems`/`minItems` (or `maxProperties`/`minProperties`, `keys`) for a
/// list or map of `n` entries.
fn count_bounds(s: &Value, n: usize, keys: (&str, &str, &str), shown: &str, out: &mut Vec<FieldError>) {
    let (max_key, min_key, noun) = keys;
    let n = n as u64;
    if let Some(max) = s.get(max_key).and_then(Value::as_u64)
        && n > max
    {
        out.push(FieldError::new(FieldErrorKind::TooMany, shown, &Value::from(n), format!("must have at most {max} items")));
    }
    if let Some(min) = s.get(min_key).and_then(Value::as_u64)
        && n < min
    {
        out.push(FieldError::new(FieldErrorKind::Invalid, shown, &Value::from(n), format!("{shown} in body should have at least {min} {noun}")));
    }
}

/// `x-kubernetes-list-type: set` items and `map` keys are unique.
fn list_uniqueness(items: &[Value], s: &Value, path: &str, out: &mut Vec<FieldError>) {
    match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            let mut seen = BTreeSet::new();
            for (i, x) in items.iter().enumerate() {
                if !seen.insert(x.to_string()) {
                    out.push(FieldError::new(FieldErrorKind::Duplicate, format!("{path}[{i}]"), x, ""));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> =
                s.get("x-kubernetes-list-map-keys").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
            let mut seen = BTreeSet::new();
            for (i, x) in items.iter().enumerate() {
                let key: Map<String, Value> = keys.iter().filter_map(|k| x.get(*k).map(|v| (k.to_string(), v.clone()))).collect();
                if !seen.insert(Value::Object(key.clone()).to_string()) {
                    out.push(FieldError::new(FieldErrorKind::Duplicate, format!("{path}[{i}]"), &Value::Object(key), ""));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["selector"], "properties": {
                "selector": {"type": "object", "additionalProperties": {"type": "string"}},
                "scheduler": {"type": "string", "enum": ["wrr", "rr"]},
                "sha": {"type": "string", "pattern": "^[0-9a-f]{4}$", "nullable": true},
                "weights": {"type": "array", "maxItems": 2, "items": {"type": "object", "required": ["weight"], "properties": {
                    "weight": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "selector": {"type": "object", "default": {}, "additionalProperties": {"type": "string"}},
                }}},
                "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["port", "protocol"],
                    "items": {"type": "object", "properties": {"port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"},
                        "targetPort": {"x-kubernetes-int-or-string": true}}}},
                "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            }},
        }})
    }

    fn messages(errs: &[FieldError]) -> Vec<String> {
        errs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn values_are_checked_as_the_real_server_words_it() {
        let ws = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"}, "spec": {
            "scheduler": "lc", "sha": "xyz",
            "weights": [{"weight": 70000}, {"weight": "ten"}, {"selector": {}}],
            "ports": [{"port": 80, "targetPort": true}, {"port": 80, "protocol": "TCP"}],
        }});
        let mut ws = ws;
        // As on the real server: validation sees the object defaulted
        // (`protocol: TCP` makes the two ports the same key).
        prune_and_default(&mut ws, &schema());
        assert_eq!(
            messages(&validate(&ws, &schema())),
            [
                "spec.selector: Required value",
                "spec.ports[1]: Duplicate value: {\"port\":80,\"protocol\":\"TCP\"}",
                "spec.ports[0].targetPort: Invalid value: \"boolean\": spec.ports[0].targetPort in body must be of type integer,string: \"boolean\"",
                "spec.scheduler: Unsupported value: \"lc\": supported values: \"wrr\", \"rr\"",
                "spec.sha: Invalid value: \"xyz\": spec.sha in body should match '^[0-9a-f]{4}$'",
                "spec.weights: Too many: 3: must have at most 2 items",
                "spec.weights[0].weight: Invalid value: 70000: spec.weights[0].weight in body should be less than or equal to 65535",
                "spec.weights[1].weight: Invalid value: \"string\": spec.weights[1].weight in body must be of type integer: \"string\"",
                "spec.weights[2].weight: Required value",
            ]
        );
    }

    #[test]
    fn unknown_fields_and_disallowed_nulls_are_pruned_then_defaults_filled() {
        let mut ws = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"}, "extra": 1, "spec": {
            "selector": {"app": "x"}, "sha": null, "scheduler": null, "weigths": [],
            "weights": [{"weight": 1, "bogus": true}], "ports": [{"port": 80}], "config": {"anything": {"goes": [1]}},
        }});
        let dropped = prune_and_default(&mut ws, &schema());
        assert_eq!(dropped, ["extra", "spec.weights[0].bogus", "spec.weigths"]);
        assert_eq!(
            ws["spec"],
            json!({"selector": {"app": "x"}, "sha": null, "weights": [{"weight": 1, "selector": {}}],
                "ports": [{"port": 80, "protocol": "TCP"}], "config": {"anything": {"goes": [1]}}})
        );
        assert!(validate(&ws, &schema()).is_empty());
    }

    #[test]
    fn non_structural_schemas_are_named() {
        let crd = json!({"spec": {"versions": [{"name": "v1", "storage": true, "schema": {"openAPIV3Schema": {"type": "object", "properties": {
            "spec": {"properties": {"a": {"type": "string"}}},
            "list": {"type": "array", "x-kubernetes-list-type": "map", "items": {"type": "object"}},
            "both": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}},
        }}}}]}});
        assert_eq!(
            messages(&structural_errors(&crd)),
            [
                "spec.versions[0].schema.openAPIV3Schema.properties[both].additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive",
                "spec.versions[0].schema.openAPIV3Schema.properties[list].x-kubernetes-list-map-keys: Required value: must not be empty if x-kubernetes-list-type is map",
                "spec.versions[0].schema.openAPIV3Schema.properties[spec].type: Required value: must not be empty for specified object fields",
            ]
        );
        let ours = crate::apiserver::operator_crds();
        assert_eq!(ours.len(), 2, "deploy/crd.yaml: WeightedService and PodInfoSlice");
        for doc in ours {
            let crd: Value = serde_saphyr::from_str(&doc).expect("a CRD of deploy/crd.yaml");
            let name = crd["metadata"]["name"].clone();
            let errors = messages(&structural_errors(&crd));
            assert_eq!(errors, Vec::<String>::new(), "the operator's CRD {name} is structural");
        }
    }
}
