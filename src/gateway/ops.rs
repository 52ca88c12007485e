//! Operations endpoints: liveness, readiness, Prometheus metrics and the OpenAPI document.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::Shared;
use super::problem::{Problem, ProblemKind};

/// The answer of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Health {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: the broker is connected, the request queues are declared and the database answers.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "What is not ready (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub(super) async fn readyz(State(shared): State<Arc<Shared>>) -> Result<Json<Health>, Problem> {
    let mut problems = Vec::new();
    if let Err(down) = shared.link.client().await {
        problems.push(down.0);
    }
    if let Err(error) = sqlx::query("SELECT 1").execute(shared.ledger.pool()).await {
        tracing::warn!(%error, "readiness: database check failed");
        problems.push("the database does not answer".into());
    }
    if problems.is_empty() {
        Ok(Json(Health { status: "ok" }))
    } else {
        Err(Problem::new(ProblemKind::NotReady, problems.join("; ")))
    }
}

/// Prometheus metrics of this process, in the text exposition format.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"))
)]
pub(super) async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let mut response = shared.metrics.render().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
pub(super) async fn openapi_json(State(shared): State<Arc<Shared>>) -> Response {
    let mut response = shared.openapi_json.clone().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
