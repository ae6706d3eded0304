//! Errors: [`ApiError`] is what the server answers (a `Status` object), and
//! [`Error`] is what the in-process handle returns.

use serde_json::{Value, json};

use super::resources::ResourceKind;

/// An error answer of the API server, rendered as a `meta.k8s.io/v1` `Status`
/// with the same `reason` and `code` as the real server gives.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason`, e.g. `NotFound`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, if any.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, kind: &ResourceKind, name: &str) -> Self {
        let mut d = json!({"name": name, "kind": kind.plural});
        if !kind.group.is_empty() {
            d["group"] = json!(kind.group);
        }
        self.details = Some(d);
        self
    }

    /// `404 NotFound`: `pods "x" not found`.
    pub fn not_found(kind: &ResourceKind, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", kind.qualified_plural())).with_details(kind, name)
    }

    /// `409 AlreadyExists`.
    pub fn already_exists(kind: &ResourceKind, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", kind.qualified_plural()))
            .with_details(kind, name)
    }

    /// `409 Conflict` for a stale `resourceVersion` or a failed precondition.
    pub fn conflict(kind: &ResourceKind, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {why}", kind.qualified_plural()),
        )
        .with_details(kind, name)
    }

    /// `422 Invalid` from a preformatted `field: message`.
    pub fn invalid(kind: &ResourceKind, name: &str, field_message: &str) -> Self {
        let mut e = Self::new(422, "Invalid", format!("{} \"{name}\" is invalid: {field_message}", qualified_kind(kind)));
        e.details = Some(json!({"name": name, "group": kind.group, "kind": kind.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": field_message}]}));
        e
    }

    /// `422 Invalid` from field errors, as `errors.NewInvalid` renders them:
    /// `Service "x" is invalid: [spec.ports[1].name: Required value, ...]`
    /// (no brackets for one error), a cause per error. `errors` must not be empty.
    pub fn invalid_fields(kind: &ResourceKind, name: &str, errors: &[FieldError]) -> Self {
        let all = match errors {
            [one] => one.to_string(),
            many => format!("[{}]", many.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
        };
        let mut e = Self::new(422, "Invalid", format!("{} \"{name}\" is invalid: {all}", qualified_kind(kind)));
        let causes: Vec<Value> =
            errors.iter().map(|f| json!({"reason": f.kind.reason(), "message": f.body(), "field": f.field})).collect();
        e.details = Some(json!({"name": name, "group": kind.group, "kind": kind.kind, "causes": causes}));
        e
    }

    /// `400 BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `405 MethodNotAllowed`.
    pub fn method_not_allowed(verb: &str) -> Self {
        Self::new(405, "MethodNotAllowed", format!("the server does not allow this method on the requested resource ({verb})"))
    }

    /// `404 NotFound` for a path nothing is served at.
    pub fn no_route(path: &str) -> Self {
        Self::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    }

    /// `410 Expired`: a resourceVersion or continue token older than the server keeps.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// `415 UnsupportedMediaType`.
    pub fn unsupported_media_type(ct: &str) -> Self {
        Self::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"))
    }

    /// An injected failure with any code (500, 503, 429, …).
    pub fn injected(code: u16) -> Self {
        let (reason, message) = match code {
            429 => ("TooManyRequests", "Too many requests, please try again later."),
            500 => ("InternalError", "Internal error occurred: injected by the test API server"),
            503 => ("ServiceUnavailable", "The server is currently unable to handle the request"),
            504 => ("Timeout", "The server was unable to return a response in the time allotted"),
            _ => ("InternalError", "injected failure"),
        };
        let mut e = Self::new(code, reason, message);
        if code == 429 {
            e.details = Some(json!({"retryAfterSeconds": 1}));
        }
        e
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// `Kind.group` as `schema.GroupKind` prints it (`Service`, `WeightedService.codesink.net`).
fn qualified_kind(kind: &ResourceKind) -> String {
    if kind.group.is_empty() { kind.kind.to_string() } else { format!("{}.{}", kind.kind, kind.group) }
}

/// What is wrong with a field (`field.ErrorType` of k8s.io/apimachinery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// `Required value`.
    Required,
    /// `Invalid value`.
    Invalid,
    /// `Invalid value`, of the wrong JSON type.
    TypeInvalid,
    /// `Unsupported value` (not in an enum).
    NotSupported,
    /// `Duplicate value`.
    Duplicate,
    /// `Forbidden`.
    Forbidden,
    /// `Too long`.
    TooLong,
    /// `Too many`.
    TooMany,
}

impl FieldErrorKind {
    /// `Status.details.causes[].reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Required => "FieldValueRequired",
            Self::Invalid => "FieldValueInvalid",
            Self::TypeInvalid => "FieldValueTypeInvalid",
            Self::NotSupported => "FieldValueNotSupported",
            Self::Duplicate => "FieldValueDuplicate",
            Self::Forbidden => "FieldValueForbidden",
            Self::TooLong => "FieldValueTooLong",
            Self::TooMany => "FieldValueTooMany",
        }
    }

    fn words(self) -> &'static str {
        match self {
            Self::Required => "Required value",
            Self::Invalid | Self::TypeInvalid => "Invalid value",
            Self::NotSupported => "Unsupported value",
            Self::Duplicate => "Duplicate value",
            Self::Forbidden => "Forbidden",
            Self::TooLong => "Too long",
            Self::TooMany => "Too many",
        }
    }
}

/// One field error, as `field.Error` prints: `spec.ports[1].port: Invalid
/// value: 0: must be between 1 and 65535, inclusive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// What is wrong.
    pub kind: FieldErrorKind,
    /// The field's path, e.g. `spec.ports[1].port`.
    pub field: String,
    /// The bad value as Go prints it (`"x"` for strings, `70000` for numbers);
    /// `None` for the kinds that print none (required, forbidden, too long).
    pub value: Option<String>,
    /// Why, e.g. `must be between 1 and 65535, inclusive`.
    pub detail: String,
}

impl FieldError {
    /// An error with a value.
    pub fn new(kind: FieldErrorKind, field: impl Into<String>, value: &Value, detail: impl Into<String>) -> Self {
        Self { kind, field: field.into(), value: Some(go_value(value)), detail: detail.into() }
    }

    /// An error without a value (`Required value: detail`, `Forbidden: detail`).
    pub fn bare(kind: FieldErrorKind, field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { kind, field: field.into(), value: None, detail: detail.into() }
    }

    /// `ErrorBody()`: the message without the field.
    pub fn body(&self) -> String {
        let mut s = self.kind.words().to_string();
        if let Some(v) = &self.value {
            s = format!("{s}: {v}");
        }
        if !self.detail.is_empty() {
            s = format!("{s}: {}", self.detail);
        }
        s
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// A JSON value as Go's `%v`/`%q` print it in field errors: strings quoted,
/// numbers and booleans bare, `null` as `"null"`, anything else as JSON.
pub(crate) fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "\"null\"".to_string(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => other.to_string(),
    }
}

/// An error of the in-process handle or of starting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the operation, as it would over HTTP.
    #[error("the API server refused: {0}")]
    Api(#[from] ApiError),
    /// A manifest is not valid YAML.
    #[error("manifest is not valid YAML")]
    Yaml(#[from] serde_saphyr::Error),
    /// A manifest object names a kind the server does not serve.
    #[error("unsupported kind {api_version}/{kind} in manifest")]
    UnsupportedKind {
        /// Its apiVersion.
        api_version: String,
        /// Its kind.
        kind: String,
    },
    /// A manifest object lacks a required field.
    #[error("manifest object lacks {0}")]
    Incomplete(&'static str),
    /// Reading a manifest file or binding the listener failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A URL cannot be parsed.
    #[error("invalid URL {0:?}")]
    Url(String),
    /// Building a kube client failed.
    #[error("building a kube client")]
    Kube(#[from] kube::Error),
    /// A CIDR in the configuration cannot be parsed.
    #[error("invalid CIDR {0:?} (want a.b.c.d/n, or a:b::/n for IPv6)")]
    Cidr(String),
    /// A User-Agent cannot be sent as a header value.
    #[error("invalid User-Agent {0:?}")]
    UserAgent(String),
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
