//! OpenAPI v3, as much as kubectl reads before it writes.
//!
//! kubectl (1.27 and later) validates on the server when the server says it
//! can: it reads `/openapi/v3` (a map from `api/v1`, `apis/GROUP/VERSION` to
//! each group-version's document) and, in the document of the object's
//! group-version, looks for the PATCH operation tagged with the object's
//! `x-kubernetes-group-version-kind`: if that operation takes a
//! `fieldValidation` query parameter, kubectl sends `fieldValidation=Strict`
//! (with the default `--validate=strict`) and validates nothing itself. This
//! server honours the parameter (see [`super::validation`]), so it says so.
//! kubectl apply also reads a PATCH operation's request media types to decide
//! whether to compute a strategic merge patch from OpenAPI; with no schemas
//! here (see below) it falls back to its built-in types, as with a server
//! whose OpenAPI lacks them.
//!
//! Each document lists, for every kind of the group-version, the paths and
//! operations this server serves, with their `x-kubernetes-action`,
//! `x-kubernetes-group-version-kind` and the query parameters it honours.
//! Limits of the double: no `components.schemas` (no object schemas: `kubectl
//! explain` finds nothing to explain), no OpenAPI v2 (`/openapi/v2` is 404),
//! and a custom resource's group-version is listed whether or not its CRD is
//! stored, as discovery lists it.

use std::hash::{Hash, Hasher};

use serde_json::{Map, Value, json};

use super::resources::{self, KINDS, ResourceKind};

/// `api/v1` or `apis/GROUP/VERSION`: the key kubectl looks a group-version up by.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") }
}

/// Every group-version served, core first.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut gvs: Vec<(&'static str, &'static str)> = Vec::new();
    for k in KINDS {
        if !gvs.contains(&(k.group, k.version)) {
            gvs.push((k.group, k.version));
        }
    }
    gvs.sort_by_key(|(g, _)| !g.is_empty());
    gvs
}

/// `GET /openapi/v3`: where each group-version's document is.
pub(crate) fn discovery() -> Value {
    let mut paths = Map::new();
    for (g, v) in group_versions() {
        let doc = group_version(g, v).unwrap_or(Value::Null);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        doc.to_string().hash(&mut h);
        let path = gv_path(g, v);
        paths.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={:016X}", h.finish())}));
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/api/v1` (segments after `openapi/v3`): one group-version's document.
pub(crate) fn document(segments: &[&str]) -> Option<Value> {
    match segments {
        ["api", v] => group_version("", v),
        ["apis", g, v] => group_version(g, v),
        _ => None,
    }
}

fn group_version(group: &str, version: &str) -> Option<Value> {
    let kinds: Vec<(usize, &ResourceKind)> =
        KINDS.iter().enumerate().filter(|(_, k)| k.group == group && k.version == version).collect();
    if kinds.is_empty() {
        return None;
    }
    let mut paths = Map::new();
    for (id, k) in kinds {
        let base = format!("/{}", gv_path(k.group, k.version));
        let (collection, item) = if k.namespaced {
            (format!("{base}/namespaces/{{namespace}}/{}", k.plural), format!("{base}/namespaces/{{namespace}}/{}/{{name}}", k.plural))
        } else {
            (format!("{base}/{}", k.plural), format!("{base}/{}/{{name}}", k.plural))
        };
        let scope = if k.namespaced { vec![param("namespace", "path", "object name and auth scope, such as for teams and projects")] } else { vec![] };
        let named = |extra: Vec<Value>| {
            let mut p = vec![param("name", "path", &format!("name of the {}", k.kind))];
            p.extend(scope.clone());
            p.extend(extra);
            p
        };
        let smp = resources::strategic_merge_patch(id);
        paths.insert(
            collection,
            json!({
                "parameters": scope,
                "get": operation(k, "list", "", list_params()),
                "post": operation(k, "post", "", write_params(false)).with_body(false, smp),
                "delete": operation(k, "deletecollection", "", list_params()),
            }),
        );
        paths.insert(
            item.clone(),
            json!({
                "parameters": named(vec![]),
                "get": operation(k, "get", "", vec![]),
                "put": operation(k, "put", "", write_params(false)).with_body(false, smp),
                "patch": operation(k, "patch", "", write_params(true)).with_body(true, smp),
                "delete": operation(k, "delete", "", delete_params()),
            }),
        );
        if k.namespaced {
            paths.insert(format!("{base}/{}", k.plural), json!({"get": operation(k, "list", "ForAllNamespaces", list_params())}));
        }
        if k.status {
            paths.insert(
                format!("{item}/status"),
                json!({
                    "parameters": named(vec![]),
                    "get": operation(k, "get", "Status", vec![]),
                    "put": operation(k, "put", "Status", write_params(false)).with_body(false, smp),
                    "patch": operation(k, "patch", "Status", write_params(true)).with_body(true, smp),
                }),
            );
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (test API server, a test double)", "version": "v1.37.0"},
        "paths": paths,
    }))
}

fn param(name: &str, location: &str, description: &str) -> Value {
    let mut p = json!({"name": name, "in": location, "description": description, "schema": {"type": "string", "uniqueItems": true}});
    if location == "path" {
        p["required"] = json!(true);
    }
    p
}

fn list_params() -> Vec<Value> {
    vec![
        param("labelSelector", "query", "A selector to restrict the list of returned objects by their labels."),
        param("fieldSelector", "query", "A selector to restrict the list of returned objects by their fields."),
        param("limit", "query", "limit is a maximum number of responses to return for a list call."),
        param("continue", "query", "The continue option should be set when retrieving more results from the server."),
        param("resourceVersion", "query", "resourceVersion sets a constraint on what resource versions a request may be served from."),
        param("watch", "query", "Watch for changes to the described resources and return them as a stream of add, update, and remove notifications."),
        param("allowWatchBookmarks", "query", "allowWatchBookmarks requests watch events with type \"BOOKMARK\"."),
        param("sendInitialEvents", "query", "`sendInitialEvents=true` may be set together with `watch=true`."),
        param("timeoutSeconds", "query", "Timeout for the list/watch call."),
    ]
}

fn write_params(patch: bool) -> Vec<Value> {
    let mut p = vec![
        param("dryRun", "query", "When present, indicates that modifications should not be persisted (honoured by create only)."),
        param("fieldManager", "query", "fieldManager is a name associated with the actor or entity that is making these changes."),
        param(
            "fieldValidation",
            "query",
            "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown fields: Ignore, Warn or Strict.",
        ),
    ];
    if patch {
        p.push(param("force", "query", "Force is going to \"force\" Apply requests."));
    }
    p
}

fn delete_params() -> Vec<Value> {
    vec![
        param("gracePeriodSeconds", "query", "The duration in seconds before the object should be deleted."),
        param("propagationPolicy", "query", "Whether and how garbage collection will be performed."),
    ]
}

/// One operation, tagged as kubectl looks operations up.
fn operation(k: &ResourceKind, action: &str, suffix: &str, parameters: Vec<Value>) -> Value {
    let verb = match action {
        "get" => "read",
        "put" => "replace",
        "post" => "create",
        "deletecollection" => "deleteCollection",
        a => a,
    };
    let group: String = if k.group.is_empty() { "Core".into() } else { camel(k.group.trim_end_matches(".k8s.io")) };
    let namespaced = if k.namespaced && suffix != "ForAllNamespaces" { "Namespaced" } else { "" };
    json!({
        "operationId": format!("{verb}{group}{}{namespaced}{}{suffix}", camel(k.version), k.kind),
        "parameters": parameters,
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": k.group, "version": k.version, "kind": k.kind},
    })
}

fn camel(s: &str) -> String {
    s.split(['.', '-'])
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

trait WithBody {
    fn with_body(self, patch: bool, strategic: bool) -> Value;
}

impl WithBody for Value {
    /// Adds the request body media types this server accepts.
    fn with_body(mut self, patch: bool, strategic: bool) -> Value {
        let schema = json!({"schema": {"type": "object"}});
        let mut content = Map::new();
        if patch {
            for t in ["application/apply-patch+yaml", "application/json-patch+json", "application/merge-patch+json"] {
                content.insert(t.into(), schema.clone());
            }
            if strategic {
                content.insert("application/strategic-merge-patch+json".into(), schema);
            }
        } else {
            content.insert("*/*".into(), schema);
        }
        self["requestBody"] = json!({"content": content, "required": true});
        self
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// What kubectl's query-param verifier does: find the PATCH operation of
    /// the kind in its group-version's document and look for the parameter.
    fn supports_field_validation(group: &str, version: &str, kind: &str) -> bool {
        let root = discovery();
        let url = root["paths"][gv_path(group, version)]["serverRelativeURL"].as_str().expect("listed").to_string();
        let path = url.split('?').next().unwrap_or_default();
        let segments: Vec<&str> = path.trim_start_matches("/openapi/v3/").split('/').collect();
        let doc = document(&segments).expect("served");
        doc["paths"].as_object().expect("paths").values().filter_map(|p| p.get("patch")).any(|op| {
            op["x-kubernetes-group-version-kind"] == json!({"group": group, "version": version, "kind": kind})
                && op["parameters"].as_array().expect("params").iter().any(|p| p["name"] == "fieldValidation")
        })
    }

    #[test]
    fn every_kind_says_it_takes_field_validation() {
        for k in KINDS {
            assert!(supports_field_validation(k.group, k.version, k.kind), "{}/{} {}", k.group, k.version, k.kind);
        }
        assert!(document(&["apis", "nothing", "v1"]).is_none());
    }
}
