//! Loading manifests: multi-document YAML (and `kind: List`) applied object by
//! object, as `kubectl apply --server-side` would, creating missing namespaces.

use serde_json::{Value, json};

use super::error::{Error, Result};
use super::resources::{self, KINDS, ids};
use super::store::{Store, Sub};

const MANAGER: &str = "test-apiserver-load";

fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for v in serde_saphyr::from_multiple::<Value>(yaml)? {
        if v.is_null() {
            continue;
        }
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            out.extend(v.get("items").and_then(Value::as_array).cloned().unwrap_or_default());
        } else {
            out.push(v);
        }
    }
    Ok(out)
}

pub(crate) fn load(st: &mut Store, yaml: &str) -> Result<Vec<(String, String, String)>> {
    let docs = documents(yaml)?;
    let mut loaded = Vec::new();
    for mut doc in docs {
        let api_version = doc.get("apiVersion").and_then(Value::as_str).ok_or(Error::Incomplete("apiVersion"))?.to_string();
        let kind_name = doc.get("kind").and_then(Value::as_str).ok_or(Error::Incomplete("kind"))?.to_string();
        let kind = resources::find_by_kind(&api_version, &kind_name)
            .ok_or_else(|| Error::UnsupportedKind { api_version: api_version.clone(), kind: kind_name.clone() })?;
        let rk = &KINDS[kind];
        let name = doc.pointer("/metadata/name").and_then(Value::as_str).ok_or(Error::Incomplete("metadata.name"))?.to_string();
        let ns = if rk.namespaced {
            doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_string()
        } else {
            String::new()
        };
        if rk.namespaced && st.get(ids::namespaces(), "", &ns).is_err() {
            st.create(ids::namespaces(), "", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
        }
        if rk.namespaced {
            doc["metadata"]["namespace"] = json!(ns);
        }
        let status = doc.get("status").cloned();
        let body = serde_json::to_vec(&doc).map_err(|e| super::ApiError::bad_request(e.to_string()))?;
        // Forced, as `kubectl apply --server-side --force-conflicts`: a test's
        // manifest wins over what the operator or a test wrote before.
        st.writer = Some(super::store::RequestWriter { manager: MANAGER.to_string(), force: true });
        let applied = st.patch(kind, &ns, &name, "application/apply-patch+yaml", &body, Sub::Main, Some(MANAGER));
        st.writer = None;
        applied?;
        if let (Some(status), true) = (status, rk.status) {
            let mut current = st.get(kind, &ns, &name)?;
            current["status"] = status;
            if let Some(m) = current.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            st.update(kind, &ns, &name, current, Sub::Status)?;
        }
        loaded.push((kind_name, ns, name));
    }
    Ok(loaded)
}
