//! RFC 9457 problem details: every error the gateway answers is `application/problem+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// Seconds a client is told to wait (`Retry-After`) when a service behind the gateway is down.
pub const RETRY_AFTER_S: u64 = 2;

/// Each kind of problem the gateway reports: a status, a stable `type` and a `title`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The body is not the JSON the route expects.
    InvalidBody,
    /// The Idempotency-Key header is not a valid key.
    InvalidIdempotencyKey,
    /// No valid bearer token.
    Unauthorized,
    /// No such request or resource for this user.
    NotFound,
    /// No route at this path.
    NoSuchRoute,
    /// The route exists, not with this method.
    MethodNotAllowed,
    /// The body is over the gateway's limit.
    BodyTooLarge,
    /// The body did not arrive in time.
    RequestTimeout,
    /// The header fields are over the gateway's limit.
    HeadersTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The amount is not a valid amount of money.
    InvalidAmount,
    /// A hold's `timeout_s` is not a whole number of seconds in range.
    InvalidTimeout,
    /// RabbitMQ cannot be reached or did not confirm the publish.
    BrokerUnavailable,
    /// PostgreSQL cannot be reached.
    DatabaseUnavailable,
    /// A service the gateway needs is not ready (`/readyz`).
    NotReady,
    /// An error answered by the HTTP layer rather than by a handler: `type` is
    /// `about:blank` and `title` the status's reason phrase (RFC 9457 §4.2.1).
    Http(StatusCode),
}

impl ProblemKind {
    fn describe(self) -> (StatusCode, &'static str, &'static str) {
        use ProblemKind::*;
        match self {
            InvalidBody => (StatusCode::BAD_REQUEST, "invalid-body", "The body is not a valid JSON request"),
            InvalidIdempotencyKey => {
                (StatusCode::BAD_REQUEST, "invalid-idempotency-key", "The Idempotency-Key header is not valid")
            }
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "A valid bearer token is required"),
            NotFound => (StatusCode::NOT_FOUND, "not-found", "No such request"),
            NoSuchRoute => (StatusCode::NOT_FOUND, "no-such-route", "No such resource"),
            MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "The method is not allowed on this resource")
            }
            BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "The body is too large"),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request-timeout", "The request was not received in time"),
            HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                "The request's header fields are too large",
            ),
            UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "The body must be application/json")
            }
            InvalidAmount => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "The amount is not acceptable"),
            InvalidTimeout => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid-timeout", "The hold's timeout is not acceptable")
            }
            BrokerUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable", "The message broker is unavailable")
            }
            DatabaseUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "database-unavailable", "The database is unavailable")
            }
            NotReady => (StatusCode::SERVICE_UNAVAILABLE, "not-ready", "The gateway is not ready"),
            Http(status) => (status, "about:blank", status.canonical_reason().unwrap_or("Error")),
        }
    }

    /// The HTTP status of this kind.
    pub fn status(self) -> StatusCode {
        self.describe().0
    }

    /// The problem `type` URI, e.g. `urn:walletq:problem:invalid-amount`.
    pub fn type_uri(self) -> String {
        match self {
            ProblemKind::Http(_) => "about:blank".to_owned(),
            _ => format!("urn:walletq:problem:{}", self.describe().1),
        }
    }
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({
    "type": "urn:walletq:problem:invalid-amount",
    "title": "The amount is not acceptable",
    "status": 422,
    "detail": "`amount` has more than 2 decimal places, got 1.005"
}))]
pub struct Problem {
    /// Stable identifier of the kind of problem (`urn:walletq:problem:…`, or `about:blank`
    /// for an error of the HTTP layer, whose `title` is then the status's reason phrase).
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, and what to do about it.
    pub detail: String,
    #[serde(skip)]
    #[schema(ignore)]
    kind: Option<ProblemKind>,
}

impl Problem {
    /// A problem of `kind` with a human-readable `detail`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        let (status, _, title) = kind.describe();
        Problem {
            type_uri: kind.type_uri(),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            kind: Some(kind),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let kind = self.kind;
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        match kind {
            Some(ProblemKind::Unauthorized) => {
                // RFC 6750: tell the client which scheme is expected.
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"walletq\""));
            }
            Some(ProblemKind::BrokerUnavailable | ProblemKind::DatabaseUnavailable | ProblemKind::NotReady) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_carry_status_type_and_headers() {
        let response = Problem::new(ProblemKind::BrokerUnavailable, "down").into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let response = Problem::new(ProblemKind::Unauthorized, "no token").into_response();
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        let problem = Problem::new(ProblemKind::InvalidAmount, "bad");
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(json["type"], "urn:walletq:problem:invalid-amount");
        assert_eq!(json["status"], 422);
        assert!(json.get("kind").is_none());
    }
}
