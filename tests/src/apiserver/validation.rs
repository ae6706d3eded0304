//! Server-side field validation: the `fieldValidation` query parameter of
//! create, update and patch (`Strict`, `Warn` or `Ignore`; `Warn` when a
//! request names none, as on the real server since 1.27). kubectl sends it
//! (`Strict` by default, `--validate=warn` → `Warn`, `--validate=false` →
//! `Ignore`); kube-rs never does.
//!
//! What is checked is what the real server's strict decoding checks: fields
//! the kind does not have.
//! - Built-in kinds: the object is decoded into its k8s-openapi type and
//!   encoded again; a field that does not come back is unknown. An object that
//!   does not decode at all (a string where a number goes, a required field
//!   missing) is refused under `Strict` with the decoder's words.
//! - Custom resources: the fields pruning drops along the stored CRD's schema
//!   ([`super::schema`]), and `metadata` decoded as `ObjectMeta`.
//!
//! `Strict` refuses the write (400 BadRequest, `strict decoding error: unknown
//! field "spec.x"`), `Warn` answers a `Warning: 299 - "unknown field
//! \"spec.x\""` header per field, `Ignore` checks nothing. Under `Warn` and
//! `Ignore` the unknown fields are dropped before the object is stored, as
//! decoding (built-in kinds) and pruning (custom resources) drop them on the
//! real server.
//!
//! Limits of the double:
//! - Duplicate fields are not detected (the body's last value wins).
//! - A custom resource whose CRD is not stored is not checked (the real server
//!   would not serve it at all).
//! - The whole object after the write is checked, so a patch is refused for
//!   an unknown field it did not add only if one was stored without checks.
//! - A missing required field of a built-in kind is a decoding error here
//!   (400); the real server reports it from validation (422 Invalid).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::resources::{KINDS, KindId};

/// The `fieldValidation` directive of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Directive {
    Ignore,
    Warn,
    Strict,
}

impl Directive {
    /// The directive a request asks for; `None` when it names none.
    pub(crate) fn from_query(v: Option<&str>) -> Result<Option<Self>, ApiError> {
        match v {
            None | Some("") => Ok(None),
            Some("Ignore") => Ok(Some(Self::Ignore)),
            Some("Warn") => Ok(Some(Self::Warn)),
            Some("Strict") => Ok(Some(Self::Strict)),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: {other:?}: supported values: \"Ignore\", \"Strict\", \"Warn\""
            ))),
        }
    }
}

/// What a check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Findings {
    /// Paths of unknown fields, e.g. `spec.template.spec.containers[0].prots`.
    pub unknown: Vec<String>,
    /// Why the object does not decode into its type, if it does not.
    pub undecodable: Option<String>,
}

/// Checks `obj` of `kind`; `schema` is the stored CRD's `openAPIV3Schema`
/// for a custom resource (`None`: not checked).
pub(crate) fn check(kind: KindId, obj: &Value, schema: Option<&Value>) -> Findings {
    let mut f = Findings::default();
    let Some(typed) = typed_round_trip(kind, obj) else {
        if let Some(schema) = schema {
            let mut pruned = obj.clone();
            f.unknown = super::schema::prune_and_default(&mut pruned, schema);
            if let Some(meta) = obj.get("metadata") {
                match round_trip::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(meta) {
                    Ok(back) => lost_fields(meta, &back, "metadata", &mut f.unknown),
                    Err(e) => f.undecodable = Some(format!("metadata: {e}")),
                }
            }
            f.unknown.sort();
        }
        return f;
    };
    match typed {
        Ok(back) => lost_fields(obj, &back, "", &mut f.unknown),
        Err(e) => f.undecodable = Some(e),
    }
    f
}

/// `obj` decoded into its kind's k8s-openapi type and encoded again; `None`
/// for a custom resource.
fn typed_round_trip(kind: KindId, obj: &Value) -> Option<Result<Value, String>> {
    let k = &KINDS[kind];
    Some(match (k.group, k.kind) {
        ("", "Service") => round_trip::<k8s_openapi::api::core::v1::Service>(obj),
        ("", "Pod") => round_trip::<k8s_openapi::api::core::v1::Pod>(obj),
        ("", "Node") => round_trip::<k8s_openapi::api::core::v1::Node>(obj),
        ("", "Namespace") => round_trip::<k8s_openapi::api::core::v1::Namespace>(obj),
        ("", "Event") => round_trip::<k8s_openapi::api::core::v1::Event>(obj),
        ("", "ConfigMap") => round_trip::<k8s_openapi::api::core::v1::ConfigMap>(obj),
        ("", "Secret") => round_trip::<k8s_openapi::api::core::v1::Secret>(obj),
        ("", "ServiceAccount") => round_trip::<k8s_openapi::api::core::v1::ServiceAccount>(obj),
        ("", "ResourceQuota") => round_trip::<k8s_openapi::api::core::v1::ResourceQuota>(obj),
        ("discovery.k8s.io", "EndpointSlice") => round_trip::<k8s_openapi::api::discovery::v1::EndpointSlice>(obj),
        ("events.k8s.io", "Event") => round_trip::<k8s_openapi::api::events::v1::Event>(obj),
        ("coordination.k8s.io", "Lease") => round_trip::<k8s_openapi::api::coordination::v1::Lease>(obj),
        ("apps", "Deployment") => round_trip::<k8s_openapi::api::apps::v1::Deployment>(obj),
        ("apps", "DaemonSet") => round_trip::<k8s_openapi::api::apps::v1::DaemonSet>(obj),
        ("policy", "PodDisruptionBudget") => round_trip::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(obj),
        ("rbac.authorization.k8s.io", "ClusterRole") => round_trip::<k8s_openapi::api::rbac::v1::ClusterRole>(obj),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => round_trip::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>(obj),
        ("rbac.authorization.k8s.io", "Role") => round_trip::<k8s_openapi::api::rbac::v1::Role>(obj),
        ("rbac.authorization.k8s.io", "RoleBinding") => round_trip::<k8s_openapi::api::rbac::v1::RoleBinding>(obj),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            round_trip::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>(obj)
        }
        _ => return None,
    })
}

impl Findings {
    /// The refusal `Strict` answers, if anything was found.
    pub(crate) fn refusal(&self, kind: KindId) -> Option<ApiError> {
        let k = &KINDS[kind];
        let why = match (&self.undecodable, self.unknown.is_empty()) {
            (Some(e), _) => e.clone(),
            (None, false) => format!(
                "strict decoding error: {}",
                self.unknown.iter().map(|p| format!("unknown field {p:?}")).collect::<Vec<_>>().join(", ")
            ),
            (None, true) => return None,
        };
        Some(ApiError::bad_request(format!("{} in version {:?} cannot be handled as a {}: {why}", k.kind, k.version, k.kind)))
    }

    /// The warnings `Warn` answers.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self.unknown.iter().map(|p| format!("unknown field {p:?}")).collect();
        w.extend(self.undecodable.clone());
        w
    }
}

/// Drops the fields of a built-in kind's object that its type does not have,
/// as decoding does on the real server; an object that does not decode is
/// left as it is.
pub(crate) fn drop_unknown(kind: KindId, obj: &mut Value) {
    match typed_round_trip(kind, obj) {
        Some(Ok(back)) => drop_lost(obj, &back),
        Some(Err(_)) => {}
        // A custom resource: pruning takes care of the rest.
        None => {
            if let Some(meta) = obj.get_mut("metadata")
                && let Ok(back) = round_trip::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(meta)
            {
                drop_lost(meta, &back);
            }
        }
    }
}

/// Removes what `back` (the object decoded and encoded again) lacks.
fn drop_lost(original: &mut Value, back: &Value) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            a.retain(|key, value| value.is_null() || b.contains_key(key));
            for (key, value) in a.iter_mut() {
                if let Some(other) = b.get(key) {
                    drop_lost(value, other);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (x, y) in a.iter_mut().zip(b) {
                drop_lost(x, y);
            }
        }
        _ => {}
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// Paths of `original` (non-null) that `back` lacks.
fn lost_fields(original: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &join(path, key), out),
                    None if value.is_null() => {}
                    None => out.push(join(path, key)),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::apiserver::resources::{find_by_kind, ids};
    use serde_json::json;

    #[test]
    fn built_in_kinds_by_their_types() {
        let deploy = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"a": "b"}, "bogus": 1},
            "spec": {"selector": {"matchLabels": {"a": "b"}}, "replica": 3, "template": {"metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "web", "image": "nginx", "prots": [], "ports": [{"containerPort": 80, "nmae": "www"}]}]}}},
        });
        let f = check(ids::deployments(), &deploy, None);
        assert_eq!(
            f.unknown,
            ["metadata.bogus", "spec.replica", "spec.template.spec.containers[0].ports[0].nmae", "spec.template.spec.containers[0].prots"]
        );
        let refusal = f.refusal(ids::deployments()).expect("refused").message;
        assert!(refusal.starts_with("Deployment in version \"v1\" cannot be handled as a Deployment: strict decoding error: unknown field \"metadata.bogus\", "), "{refusal}");
        let ok = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "creationTimestamp": null}, "data": {"k": "v"}});
        assert_eq!(check(find_by_kind("v1", "ConfigMap").unwrap(), &ok, None), Findings::default());
        let bad_type = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": 1}});
        assert!(check(find_by_kind("v1", "ConfigMap").unwrap(), &bad_type, None).undecodable.is_some());
    }

    #[test]
    fn custom_resources_by_their_schema() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "ports": {"type": "array", "items": {"type": "object", "properties": {"port": {"type": "integer"}, "targetPort": {"x-kubernetes-int-or-string": true}}}},
                "selector": {"type": "object", "additionalProperties": {"type": "string"}},
                "policy": {"type": "object", "properties": {"config": {"x-kubernetes-preserve-unknown-fields": true}}},
            }},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        }});
        let ws = json!({"apiVersion": "codesink.net/v1alpha1", "kind": "WeightedService", "metadata": {"name": "x", "labelz": {}},
            "spec": {"ports": [{"port": 80, "targetPort": "www", "prot": "TCP"}], "selector": {"app": "x"}, "policy": {"config": {"anything": [1]}}, "weigths": []},
            "status": {"free": true}});
        let kind = find_by_kind("codesink.net/v1alpha1", "WeightedService").unwrap();
        assert_eq!(check(kind, &ws, Some(&schema)).unknown, ["metadata.labelz", "spec.ports[0].prot", "spec.weigths"]);
        assert_eq!(check(kind, &ws, None), Findings::default(), "no CRD stored: not checked");
    }
}
