//! The HTTP layer: routing of Kubernetes REST paths, discovery, content
//! negotiation (JSON, `PartialObjectMetadata`, `Table`), watch streams, fault
//! injection and the request record.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::error::ApiError;
use super::resources::{self, KINDS, KindId};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{DeleteOptions, Filter, Grace, RequestWriter, Store, Sub};
use super::table::{Columns, Include, metadata_only};
use super::validation::Directive;
use super::{CloseMode, FailRule, Handle, RequestRecord, lock, openapi};

pub(crate) type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

pub(crate) fn json_response(code: u16, v: &Value) -> Response<Body> {
    respond(code, "application/json", serde_json::to_vec(v).unwrap_or_default())
}

fn respond(code: u16, content_type: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

pub(crate) fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_status());
    if e.code == 429
        && let Ok(v) = "1".parse()
    {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
    }
    r
}

/// Accepts connections until `shutdown` fires; then ends every connection.
pub(crate) async fn serve(listener: tokio::net::TcpListener, handle: Handle, mut shutdown: tokio::sync::oneshot::Receiver<()>) {
    let mut conns = tokio::task::JoinSet::new();
    let kubelet = tokio::spawn(kubelet_ticker(handle.clone()));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let h = handle.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let h = h.clone();
                        async move { Ok::<_, Infallible>(dispatch(h, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    kubelet.abort();
    conns.shutdown().await;
}

/// Fires the store's timers: pod terminations whose grace period is over,
/// namespace clean-ups, and the EndpointSlice controller's delayed syncs. The
/// tick (10 ms) is what a due timer may wait beyond its time.
async fn kubelet_ticker(handle: Handle) {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        let mut st = handle.store();
        if st.has_timers() {
            st.fire_timers();
        }
    }
}

/// What a path addresses.
#[derive(Debug)]
enum Route {
    Version,
    Health,
    Api,
    Apis,
    Group(String),
    Resources { group: String, version: String },
    OpenApi(Vec<String>),
    Admin(String),
    Object(Target),
    Unknown,
}

#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub kind: KindId,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

fn route(path: &str) -> Route {
    if let Some(rest) = path.strip_prefix("/_test/") {
        return Route::Admin(rest.to_string());
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "livez" | "readyz", ..] => return Route::Health,
        ["openapi", rest @ ..] => return Route::OpenApi(rest.iter().map(|s| s.to_string()).collect()),
        ["swagger.json"] => return Route::OpenApi(Vec::new()),
        ["api"] => return Route::Api,
        ["apis"] => return Route::Apis,
        ["apis", g] => return Route::Group(g.to_string()),
        ["api", v] => return Route::Resources { group: String::new(), version: v.to_string() },
        ["apis", g, v] => return Route::Resources { group: g.to_string(), version: v.to_string() },
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Unknown,
    };
    let find = |plural: &str| resources::find(group, version, plural);
    let t = match rest {
        ["namespaces", ns, plural, tail @ ..] if find(plural).is_some_and(|k| KINDS[k].namespaced) => {
            let Some(kind) = find(plural) else { return Route::Unknown };
            match tail {
                [] => Target { kind, namespace: Some(ns.to_string()), name: None, sub: None },
                [name] => Target { kind, namespace: Some(ns.to_string()), name: Some(name.to_string()), sub: None },
                [name, sub] => Target { kind, namespace: Some(ns.to_string()), name: Some(name.to_string()), sub: Some(sub.to_string()) },
                _ => return Route::Unknown,
            }
        }
        [plural, tail @ ..] => {
            let Some(kind) = find(plural) else { return Route::Unknown };
            match tail {
                [] => Target { kind, namespace: None, name: None, sub: None },
                [name] if !KINDS[kind].namespaced => Target { kind, namespace: None, name: Some(name.to_string()), sub: None },
                [name, sub] if !KINDS[kind].namespaced => {
                    Target { kind, namespace: None, name: Some(name.to_string()), sub: Some(sub.to_string()) }
                }
                _ => return Route::Unknown,
            }
        }
        _ => return Route::Unknown,
    };
    Route::Object(t)
}

fn rbac_verb(method: &Method, t: &Target, watch: bool) -> &'static str {
    match (method.as_str(), t.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// How the client wants objects rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    Full,
    Metadata,
    Table,
}

fn negotiate(accept: &str) -> Render {
    for media in accept.split(',') {
        let params: HashMap<&str, &str> =
            media.split(';').skip(1).filter_map(|p| p.trim().split_once('=')).collect();
        match (params.get("as").copied(), params.get("v").copied()) {
            (None, _) => return Render::Full,
            (Some("PartialObjectMetadata" | "PartialObjectMetadataList"), Some("v1")) => return Render::Metadata,
            (Some("Table"), Some("v1")) => return Render::Table,
            _ => {}
        }
    }
    Render::Full
}

async fn dispatch(h: Handle, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req.uri().query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
    let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
    let content_type = req.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
    let user_agent = req.headers().get(hyper::header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let r = route(&path);
    if let Route::Admin(rest) = &r {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error_response(&ApiError::bad_request(format!("reading the body: {e}"))),
        };
        return super::admin::handle(&h, &method, rest, &query, &body);
    }
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut rec = RequestRecord {
        verb: String::new(),
        group: String::new(),
        version: String::new(),
        resource: String::new(),
        subresource: String::new(),
        namespace: String::new(),
        name: String::new(),
        path: path.clone(),
        user_agent,
        code: 0,
    };
    if let Route::Object(t) = &r {
        let k = &KINDS[t.kind];
        rec.verb = rbac_verb(&method, t, watch).to_string();
        rec.group = k.group.to_string();
        rec.version = k.version.to_string();
        rec.resource = k.plural.to_string();
        rec.subresource = t.sub.clone().unwrap_or_default();
        rec.namespace = t.namespace.clone().unwrap_or_default();
        rec.name = t.name.clone().unwrap_or_default();
    } else {
        rec.verb = method.as_str().to_ascii_lowercase();
    }
    let injected = {
        let mut f = lock(&h.0.faults);
        let delay = f.delay;
        let hit = f.rules.iter_mut().find(|rule| rule_matches(rule, &rec)).map(|rule| {
            rule.count -= 1;
            rule.code
        });
        f.rules.retain(|rule| rule.count > 0);
        (delay, hit)
    };
    if let Some(d) = injected.0 {
        tokio::time::sleep(d).await;
    }
    let resp = match injected.1 {
        Some(code) => error_response(&ApiError::injected(code)),
        None => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error_response(&ApiError::bad_request(format!("reading the body: {e}"))),
            };
            let render = negotiate(&accept);
            match r {
                Route::Version => json_response(200, &version(&h)),
                Route::Health => respond(200, "text/plain", b"ok".to_vec()),
                Route::Api => json_response(200, &json!({
                    "kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": h.url().trim_start_matches("http://")}],
                })),
                Route::Apis => json_response(200, &group_list()),
                Route::Group(g) => match group_list()["groups"].as_array().and_then(|gs| gs.iter().find(|x| x["name"] == g.as_str())) {
                    Some(x) => {
                        let mut x = x.clone();
                        x["kind"] = json!("APIGroup");
                        x["apiVersion"] = json!("v1");
                        json_response(200, &x)
                    }
                    None => error_response(&ApiError::no_route(&path)),
                },
                Route::Resources { group, version } => match resource_list(&group, &version) {
                    Some(v) => json_response(200, &v),
                    None => error_response(&ApiError::no_route(&path)),
                },
                Route::OpenApi(segments) => {
                    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
                    let doc = match segments.as_slice() {
                        ["v3"] => Some(openapi::discovery()),
                        ["v3", rest @ ..] => openapi::document(rest),
                        _ => None,
                    };
                    match doc {
                        Some(d) => json_response(200, &d),
                        None => error_response(&ApiError::no_route(&path)),
                    }
                }
                Route::Unknown | Route::Admin(_) => error_response(&ApiError::no_route(&path)),
                Route::Object(t) => match object_request(&h, &method, &t, &query, &content_type, &body, render, watch, &rec.user_agent).await {
                    Ok(r) => r,
                    Err(e) => error_response(&e),
                },
            }
        }
    };
    rec.code = resp.status().as_u16();
    if !rec.resource.is_empty() {
        let bytes = if watch { 0 } else { hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0) };
        let items = resp.extensions().get::<ListItems>().map_or(0, |n| n.0);
        h.count_traffic(&rec.user_agent, &rec.resource, |t| {
            t.requests += 1;
            t.response_bytes += bytes;
            t.list_items += items;
        });
    }
    tracing::debug!(verb = %rec.verb, path = %rec.path, code = rec.code, "request");
    lock(&h.0.record).push(rec);
    resp
}

fn rule_matches(rule: &FailRule, rec: &RequestRecord) -> bool {
    rule.count > 0
        && rule.resource.as_deref().is_none_or(|r| r == rec.resource)
        && rule.verb.as_deref().is_none_or(|v| v == rec.verb)
}

fn version(h: &Handle) -> Value {
    let (major, minor) = h.0.version;
    json!({
        "major": major.to_string(), "minor": minor.to_string(),
        "gitVersion": format!("v{major}.{minor}.0"), "gitCommit": "test-apiserver", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "none (test double)", "compiler": "rustc", "platform": "linux/amd64",
    })
}

fn group_list() -> Value {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut out = Vec::new();
    for k in KINDS.iter().filter(|k| k.group == group && k.version == version) {
        out.push(json!({
            "name": k.plural, "singularName": k.singular, "namespaced": k.namespaced, "kind": k.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": k.short_names,
        }));
        if k.status {
            out.push(json!({"name": format!("{}/status", k.plural), "singularName": "", "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    if out.is_empty() {
        return None;
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse().map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn filter_for(t: &Target, query: &HashMap<String, String>) -> Result<Filter, ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Filter { kind: t.kind, namespace: t.namespace.clone(), labels, fields })
}

fn sub_of(t: &Target) -> Result<Sub, ApiError> {
    match t.sub.as_deref() {
        None => Ok(Sub::Main),
        Some("status") if KINDS[t.kind].status => Ok(Sub::Status),
        Some(s) => Err(ApiError::no_route(&format!("subresource {s}"))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn object_request(
    h: &Handle,
    method: &Method,
    t: &Target,
    query: &HashMap<String, String>,
    content_type: &str,
    body: &[u8],
    render: Render,
    watch: bool,
    user_agent: &str,
) -> Result<Response<Body>, ApiError> {
    let k = &KINDS[t.kind];
    let ns = t.namespace.clone().unwrap_or_default();
    if k.namespaced && t.name.is_some() && t.namespace.is_none() {
        return Err(ApiError::no_route("a namespaced object needs a namespace"));
    }
    let sub = sub_of(t)?;
    let include = Include::parse(query.get("includeObject").map(String::as_str))?;
    let directive = if matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
        // The real server's default is `Warn`.
        Some(Directive::from_query(query.get("fieldValidation").map(String::as_str))?.unwrap_or(Directive::Warn))
    } else {
        None
    };
    // The manager of a write: `fieldManager`, else the user agent up to its
    // first `/`, as the real server names it.
    let writer = RequestWriter {
        manager: query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .cloned()
            .unwrap_or_else(|| user_agent.split('/').next().unwrap_or_default().chars().take(128).collect()),
        force: matches!(query.get("force").map(String::as_str), Some("true" | "1")),
    };
    match (method.as_str(), &t.name) {
        ("GET", None) if watch => start_watch(h, t, query, render, include, user_agent),
        ("GET", None) => list(h, t, query, render, include),
        ("GET", Some(name)) => {
            let st = h.store();
            let obj = st.get(t.kind, &ns, name)?;
            let body = match render {
                Render::Table => Columns::for_kind(&st, t.kind).table(
                    std::slice::from_ref(&obj),
                    json!({"resourceVersion": obj.pointer("/metadata/resourceVersion")}),
                    true,
                    include,
                ),
                r => render_one(&obj, r),
            };
            drop(st);
            Ok(respond(200, content_type_for(render), serde_json::to_vec(&body).unwrap_or_default()))
        }
        ("POST", None) => {
            if k.namespaced && t.namespace.is_none() {
                return Err(ApiError::method_not_allowed("create"));
            }
            let obj: Value = serde_json::from_slice(body)
                .or_else(|_| serde_saphyr::from_slice(body))
                .map_err(|e| ApiError::bad_request(format!("error decoding the body: {e}")))?;
            if dry_run(query) {
                // Checked, not stored (and not defaulted: a limit of the double).
                let warnings = match directive {
                    Some(d) => h.store().check_fields(t.kind, &obj, d)?,
                    None => Vec::new(),
                };
                return Ok(with_warnings(json_response(201, &obj), &warnings));
            }
            let mut st = h.store();
            let (created, warnings) = validated(&mut st, directive, writer, |st| st.create(t.kind, &ns, obj));
            st.reconcile();
            Ok(with_warnings(json_response(201, &created?), &warnings))
        }
        ("PUT", Some(name)) => {
            let obj: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding the body: {e}")))?;
            let mut st = h.store();
            let (updated, warnings) = validated(&mut st, directive, writer, |st| st.update(t.kind, &ns, name, obj, sub));
            st.reconcile();
            Ok(with_warnings(json_response(200, &updated?), &warnings))
        }
        ("PATCH", Some(name)) => {
            let mut st = h.store();
            let manager = query.get("fieldManager").map(String::as_str);
            let (patched, warnings) = validated(&mut st, directive, writer, |st| st.patch(t.kind, &ns, name, content_type, body, sub, manager));
            st.reconcile();
            let (obj, created) = patched?;
            Ok(with_warnings(json_response(if created { 201 } else { 200 }, &obj), &warnings))
        }
        ("DELETE", Some(name)) => {
            let opts = delete_options(query, body)?;
            let mut st = h.store();
            let obj = st.delete(t.kind, &ns, name, opts)?;
            st.reconcile();
            let still_there = st.get(t.kind, &ns, name).is_ok();
            Ok(json_response(if still_there { 202 } else { 200 }, &obj))
        }
        ("DELETE", None) => {
            let f = filter_for(t, query)?;
            let opts = delete_options(query, body)?;
            let mut st = h.store();
            let (items, _, _) = st.list(&f, None, None);
            let mut deleted = Vec::new();
            for o in items {
                let name = o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
                let ons = o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default().to_string();
                if let Ok(d) = st.delete(t.kind, &ons, &name, opts.clone()) {
                    deleted.push(d);
                }
            }
            st.reconcile();
            let rv = st.rv.to_string();
            Ok(json_response(200, &json!({"kind": format!("{}List", k.kind), "apiVersion": k.api_version(), "metadata": {"resourceVersion": rv}, "items": deleted})))
        }
        (m, _) => Err(ApiError::method_not_allowed(m)),
    }
}

/// Runs one write with the request's `fieldValidation` (see
/// [`super::validation`]) and field manager in force; returns its result and
/// the warnings it produced.
fn validated<T>(
    st: &mut Store,
    directive: Option<Directive>,
    writer: RequestWriter,
    write: impl FnOnce(&mut Store) -> Result<T, ApiError>,
) -> (Result<T, ApiError>, Vec<String>) {
    st.validation = directive;
    st.writer = Some(writer);
    st.warnings.clear();
    let r = write(st);
    st.validation = None;
    st.writer = None;
    (r, std::mem::take(&mut st.warnings))
}

/// Adds a `Warning: 299 - "..."` header per warning, as the real server does.
fn with_warnings(mut r: Response<Body>, warnings: &[String]) -> Response<Body> {
    for w in warnings {
        if let Ok(v) = format!("299 - {}", serde_json::Value::from(w.as_str())).parse() {
            r.headers_mut().append(hyper::header::WARNING, v);
        }
    }
    r
}

fn content_type_for(render: Render) -> &'static str {
    if render == Render::Table { "application/json;as=Table;v=v1;g=meta.k8s.io" } else { "application/json" }
}

fn dry_run(query: &HashMap<String, String>) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

fn delete_options(query: &HashMap<String, String>, body: &[u8]) -> Result<DeleteOptions, ApiError> {
    let b: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let policy = b.get("propagationPolicy").and_then(Value::as_str).or(query.get("propagationPolicy").map(String::as_str));
    let orphan = policy == Some("Orphan") || b.get("orphanDependents").and_then(Value::as_bool) == Some(true);
    let grace = b
        .get("gracePeriodSeconds")
        .and_then(Value::as_u64)
        .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()))
        .map(|g| if g == 0 { Grace::Immediate } else { Grace::For(Duration::from_secs(g)) });
    Ok(DeleteOptions {
        orphan,
        grace,
        uid: b.pointer("/preconditions/uid").and_then(Value::as_str).map(str::to_string),
        resource_version: b.pointer("/preconditions/resourceVersion").and_then(Value::as_str).map(str::to_string),
    })
}

fn list(h: &Handle, t: &Target, query: &HashMap<String, String>, render: Render, include: Include) -> Result<Response<Body>, ApiError> {
    let f = filter_for(t, query)?;
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let st = h.store();
    let (after, rv) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let tok: ContinueToken = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(c)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if tok.rv < st.floor {
                return Err(ApiError::gone("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list."));
            }
            (Some((tok.ns, tok.name)), tok.rv)
        }
        None => (None, st.rv),
    };
    if let Some(v) = query.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0") {
        parse_rv(v)?;
    }
    let (items, next, remaining) = st.list(&f, after.as_ref(), limit);
    let columns = (render == Render::Table).then(|| Columns::for_kind(&st, t.kind));
    drop(st);
    let k = &KINDS[t.kind];
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some((ns, name)) = next {
        let tok = serde_json::to_vec(&ContinueToken { rv, ns, name }).unwrap_or_default();
        meta["continue"] = json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tok));
        meta["remainingItemCount"] = json!(remaining);
    }
    let body = match render {
        Render::Full => json!({"kind": format!("{}List", k.kind), "apiVersion": k.api_version(), "metadata": meta, "items": items}),
        Render::Metadata => json!({
            "kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
            "items": items.iter().map(metadata_only).collect::<Vec<_>>(),
        }),
        Render::Table => match &columns {
            Some(c) => c.table(&items, meta, true, include),
            None => Value::Null,
        },
    };
    let mut resp = respond(200, content_type_for(render), serde_json::to_vec(&body).unwrap_or_default());
    resp.extensions_mut().insert(ListItems(items.len() as u64));
    Ok(resp)
}

/// How many objects a list response holds, for the traffic log.
#[derive(Clone, Copy)]
struct ListItems(u64);

/// An object as a non-Table rendering shows it.
fn render_one(obj: &Value, render: Render) -> Value {
    match render {
        Render::Metadata => metadata_only(obj),
        Render::Full | Render::Table => obj.clone(),
    }
}

fn event_line(etype: &str, obj: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": etype, "object": obj})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(t: &Target, render: Render, rv: u64, initial_end: bool) -> Value {
    let k = &KINDS[t.kind];
    let (kind, api_version) = match render {
        Render::Full => (k.kind.to_string(), k.api_version()),
        Render::Metadata => ("PartialObjectMetadata".to_string(), "meta.k8s.io/v1".to_string()),
        Render::Table => ("Table".to_string(), "meta.k8s.io/v1".to_string()),
    };
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind, "apiVersion": api_version, "metadata": meta})
}

type Chunk = Result<Bytes, std::io::Error>;

/// Where a watch's producer puts its events: each is stamped with the time
/// it goes out (see [`Handle::lag_watches`](super::Handle::lag_watches)) and
/// a forwarding task sends it to the client then, in order.
struct EventSink {
    tx: tokio::sync::mpsc::Sender<(tokio::time::Instant, Chunk)>,
    h: Handle,
    user_agent: String,
    /// The resource watched, for the traffic log.
    resource: String,
    /// When the last event goes out: no event overtakes another.
    last: tokio::time::Instant,
}

impl EventSink {
    /// Starts the forwarding task into `out`.
    fn new(h: Handle, user_agent: &str, resource: &str, out: tokio::sync::mpsc::Sender<Chunk>) -> Self {
        // Room for a lagging stream's backlog; beyond it the producer waits, as
        // it waits for a slow client.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Chunk)>(1024);
        tokio::spawn(async move {
            while let Some((at, chunk)) = rx.recv().await {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = out.closed() => return,
                }
                if out.send(chunk).await.is_err() {
                    return;
                }
            }
        });
        Self { tx, h, user_agent: user_agent.to_string(), resource: resource.to_string(), last: tokio::time::Instant::now() }
    }

    /// Sends a chunk at its time; `false` once the client is gone.
    async fn send(&mut self, chunk: Chunk) -> bool {
        if let Ok(bytes) = &chunk {
            self.h.count_traffic(&self.user_agent, &self.resource, |t| t.watch_bytes += bytes.len() as u64);
        }
        let due = tokio::time::Instant::now() + self.h.0.watch_delay(&self.user_agent);
        self.last = self.last.max(due);
        self.tx.send((self.last, chunk)).await.is_ok()
    }

    /// Sends an event line at its time; `false` once the client is gone.
    async fn event(&mut self, etype: &str, obj: &Value) -> bool {
        if !matches!(etype, "BOOKMARK" | "ERROR") {
            self.h.count_traffic(&self.user_agent, &self.resource, |t| t.watch_events += 1);
        }
        self.send(Ok(event_line(etype, obj))).await
    }

    /// Resolves when the client is gone.
    async fn closed(&self) {
        self.tx.closed().await
    }
}

fn start_watch(
    h: &Handle,
    t: &Target,
    query: &HashMap<String, String>,
    render: Render,
    include: Include,
    user_agent: &str,
) -> Result<Response<Body>, ApiError> {
    let f = filter_for(t, query)?;
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let send_initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = query.get("timeoutSeconds").and_then(|v| v.parse::<u64>().ok()).map(Duration::from_secs);
    let rv = query.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(256);
    let mut initial = Vec::new();
    let mut gone = None;
    let (cursor, columns) = {
        let st = h.store();
        let columns = (render == Render::Table).then(|| Columns::for_kind(&st, t.kind));
        let cursor = if rv.is_empty() || rv == "0" || send_initial {
            let (items, _, _) = st.list(&f, None, None);
            initial = items;
            st.rv
        } else {
            let n = parse_rv(&rv)?;
            if n < st.floor {
                gone = Some(format!("too old resource version: {n} ({})", st.floor));
            }
            n
        };
        (cursor, columns)
    };
    let h2 = h.clone();
    let t2 = t.clone();
    let mut encoder = EventEncoder { render, columns, include, headers_sent: false };
    let mut sink = EventSink::new(h.clone(), user_agent, KINDS[t.kind].plural, tx);
    tokio::spawn(async move {
        if let Some(msg) = gone {
            let _ = sink.event("ERROR", &ApiError::gone(msg).to_status()).await;
            return;
        }
        for o in &initial {
            let obj = encoder.encode(o);
            if !sink.event("ADDED", &obj).await {
                return;
            }
        }
        if send_initial && bookmarks && !sink.event("BOOKMARK", &bookmark(&t2, render, cursor, true)).await {
            return;
        }
        watch_loop(h2, t2, f, cursor, encoder, bookmarks, timeout, sink).await;
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let body = StreamBody::new(futures::StreamExt::map(stream, |c: Chunk| c.map(Frame::data))).boxed_unsync();
    let mut resp = Response::new(body);
    if let Ok(v) = content_type_for(render).parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// Renders a watch's objects; a Table's column definitions go with the first
/// event only, as the real server sends them.
struct EventEncoder {
    render: Render,
    columns: Option<Columns>,
    include: Include,
    headers_sent: bool,
}

impl EventEncoder {
    fn encode(&mut self, obj: &Value) -> Value {
        match (&self.columns, self.render) {
            (Some(c), Render::Table) => {
                let headers = !std::mem::replace(&mut self.headers_sent, true);
                c.table(std::slice::from_ref(obj), json!({"resourceVersion": obj.pointer("/metadata/resourceVersion")}), headers, self.include)
            }
            (_, r) => render_one(obj, r),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch_loop(
    h: Handle,
    t: Target,
    f: Filter,
    mut cursor: u64,
    mut encoder: EventEncoder,
    bookmarks: bool,
    timeout: Option<Duration>,
    mut sink: EventSink,
) {
    let mut changed = h.0.changed.clone();
    let mut closer = h.0.closer.subscribe();
    closer.borrow_and_update();
    let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(1800));
    let interval = h.0.bookmark_interval;
    let mut next_bookmark = tokio::time::Instant::now() + interval;
    loop {
        changed.borrow_and_update();
        let polled = {
            let st = h.store();
            st.events_since(&f, cursor).map(|evs| (evs, st.rv))
        };
        match polled {
            Ok((evs, rv)) => {
                for (etype, obj) in evs {
                    let obj = encoder.encode(&obj);
                    if !sink.event(etype.as_str(), &obj).await {
                        return;
                    }
                }
                cursor = rv;
            }
            Err(_) => {
                let st = ApiError::gone(format!("too old resource version: {cursor}")).to_status();
                let _ = sink.event("ERROR", &st).await;
                return;
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            r = closer.changed() => {
                let mode = if r.is_ok() { closer.borrow().1 } else { CloseMode::Clean };
                if mode == CloseMode::Abort {
                    let cut = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "watch broken by the test");
                    let _ = sink.send(Err(cut)).await;
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                if bookmarks {
                    let _ = sink.event("BOOKMARK", &bookmark(&t, encoder.render, cursor, false)).await;
                }
                return;
            }
            _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                next_bookmark = tokio::time::Instant::now() + interval;
                if !sink.event("BOOKMARK", &bookmark(&t, encoder.render, cursor, false)).await {
                    return;
                }
            }
            _ = sink.closed() => return,
        }
    }
}
