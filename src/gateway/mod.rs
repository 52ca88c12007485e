//! The HTTP gateway: an asynchronous API in front of the request queue.
//!
//! Web and mobile back ends submit withdrawals, deposits and holds for the user of a verified
//! bearer token; the gateway publishes them (confirmed) and answers `202` with a request id
//! to poll, or `200` with the result when asked to wait (`Prefer: wait=N`). One shared
//! [`crate::Client`] per process multiplexes every waiting request over one reply queue.
//! See docs/HTTP.md for the API.

pub mod auth;
mod holds;
pub mod http;
pub mod ids;
mod link;
mod ops;
pub mod problem;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::handler::Handler;
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{MethodFilter, on};
use metrics_exporter_prometheus::PrometheusHandle;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use crate::configuration::{GatewaySettings, ServiceSettings};
use crate::ledger::{Ledger, Schema};
use auth::{HasVerifier, JwtSecret, Verifier};
pub use holds::HoldView;
pub use http::serve;
use ids::RequestIds;
use link::BrokerLink;
use problem::{Problem, ProblemKind};
pub use routes::{BODY_MAX_BYTES, RequestStatus, RequestView, WAIT_MAX_S, WalletView};

/// What every handler shares.
pub struct Shared {
    verifier: Verifier,
    ids: RequestIds,
    link: BrokerLink,
    ledger: Ledger,
    metrics: PrometheusHandle,
    openapi_json: String,
}

impl HasVerifier for Arc<Shared> {
    fn verifier(&self) -> &Verifier {
        &self.verifier
    }
}

/// Connects the database (created and migrated when needed) and builds the router. The
/// broker is connected on first use and again after it was lost, so the gateway starts and
/// answers `503` while the broker is down.
pub async fn app(services: &ServiceSettings, settings: &GatewaySettings, secret: &JwtSecret) -> anyhow::Result<Router> {
    let schema = if settings.no_migrate { Schema::Check } else { Schema::Migrate };
    let ledger =
        Ledger::connect_with(&services.database_url, settings.db_connections, services.ca_file.as_deref(), schema)
            .await?
            .with_default_limits(settings.limits.into());
    let link = BrokerLink::new(&services.amqp_url, &services.namespace, services.ca_file.clone());
    if link.client().await.is_err() {
        tracing::warn!("starting without the broker; submissions answer 503 until it is reachable");
    }
    let shared = Shared {
        verifier: Verifier::new(secret, settings.jwt_max_ttl),
        ids: RequestIds::new(secret),
        link,
        ledger,
        metrics: crate::telemetry::prometheus()?,
        openapi_json: ApiDoc::openapi().to_json().context("rendering the OpenAPI document")?,
    };
    Ok(router(Arc::new(shared)))
}

/// An HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    /// HTTP GET.
    Get,
    /// HTTP POST.
    Post,
}

impl Verb {
    /// The method name, e.g. `GET`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
        }
    }
}

/// The router under construction and the table of what it serves.
struct Routes {
    router: Router<Arc<Shared>>,
    table: Vec<(Verb, &'static str)>,
}

impl Routes {
    fn add<H, T>(mut self, verb: Verb, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<Shared>>,
        T: 'static,
    {
        self.router = self.router.route(path, on(verb.filter(), handler));
        self.table.push((verb, path));
        self
    }
}

/// Every route, the single place both the router and [`routes`] come from.
fn api() -> Routes {
    Routes { router: Router::new(), table: Vec::new() }
        .add(Verb::Post, "/v1/withdrawals", routes::post_withdrawal)
        .add(Verb::Post, "/v1/deposits", routes::post_deposit)
        .add(Verb::Get, "/v1/requests/{id}", routes::get_request)
        .add(Verb::Get, "/v1/wallet", routes::get_wallet)
        .add(Verb::Post, "/v1/holds", holds::post_hold)
        .add(Verb::Post, "/v1/holds/{hold_id}/capture", holds::post_capture)
        .add(Verb::Post, "/v1/holds/{hold_id}/release", holds::post_release)
        .add(Verb::Get, "/v1/holds/{hold_id}", holds::get_hold)
        .add(Verb::Get, "/healthz", ops::healthz)
        .add(Verb::Get, "/readyz", ops::readyz)
        .add(Verb::Get, "/metrics", ops::metrics)
        .add(Verb::Get, "/openapi.json", ops::openapi_json)
}

/// The method and path template of every route the router serves (checked against the
/// OpenAPI document by the tests).
pub fn routes() -> Vec<(Verb, &'static str)> {
    api().table
}

fn router(shared: Arc<Shared>) -> Router {
    api()
        .router
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        // Innermost first: the body limit of the extractors, then bounded body reads, the
        // header limit, the problem-document net, and the request counter outermost (it
        // sees every answer as sent).
        .layer(DefaultBodyLimit::max(BODY_MAX_BYTES))
        .layer(middleware::from_fn(http::read_body))
        .layer(middleware::from_fn(http::limit_headers))
        .layer(middleware::map_response(http::problem_errors))
        .layer(middleware::from_fn(count_requests))
        .with_state(shared)
}

async fn no_route(method: Method, uri: Uri) -> Problem {
    Problem::new(ProblemKind::NoSuchRoute, format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Problem {
    Problem::new(ProblemKind::MethodNotAllowed, format!("{method} is not allowed on {}", uri.path()))
}

/// Counts requests by route template, method and status, and times them.
async fn count_requests(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("walletq_gateway_requests_total", "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!("walletq_gateway_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "walletq gateway",
        description = "Asynchronous wallet withdrawals, deposits and holds for the user of a bearer token. See docs/HTTP.md."
    ),
    paths(
        routes::post_withdrawal,
        routes::post_deposit,
        routes::get_request,
        routes::get_wallet,
        holds::post_hold,
        holds::post_capture,
        holds::post_release,
        holds::get_hold,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi_json,
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "requests", description = "Submit withdrawals and deposits; read their results"),
        (name = "wallet", description = "The token's user's wallet"),
        (name = "holds", description = "Two-phase withdrawals: place a hold, capture or release it, read it"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        scheme.description = Some(
            "HS256 JWT signed with WALLETQ_JWT_SECRET; `sub` is the user; `exp` required; `nbf` and `iat` checked; \
             lifetime at most --jwt-max-ttl (24h by default)"
                .into(),
        );
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}
