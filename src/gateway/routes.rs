//! The API: submit withdrawals and deposits, read a request's result and the wallet. The
//! hold routes (`super::holds`) submit through [`publish`] too.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::Shared;
use super::auth::User;
use super::ids::IdempotencyKey;
use super::problem::{Problem, ProblemKind};
use crate::domain::request::truncate;
use crate::domain::{Command, Coupon, Op, Request, RequestId, RequestResult, Status, UserId, parse_json_amount};
use crate::ledger::holds::ActiveHold;
use crate::ledger::limits::LimitsView;

/// Largest request body accepted, in bytes.
pub const BODY_MAX_BYTES: usize = 16 * 1024;
/// Longest `Prefer: wait=N` honoured, in seconds; larger values are capped.
pub const WAIT_MAX_S: u64 = 30;
/// The `Idempotency-Key` request header.
pub(super) static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The `Prefer` request header (RFC 7240).
pub(super) static PREFER: HeaderName = HeaderName::from_static("prefer");
/// The `Preference-Applied` response header (RFC 7240).
pub(super) static PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// The body of a withdrawal or deposit.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the body; it is parsed by `parse_amount_body`
pub(super) struct AmountBody {
    /// Plain decimal amount, more than 0 and at most 1000000000.00, at most 2 decimals. A JSON
    /// string is preferred; a JSON number is also read exactly from its text (`12.34`), never
    /// through floating point. No other field is accepted: the user is the token's subject.
    #[schema(example = "12.34")]
    amount: String,
}

/// Where a request is: `pending` until the worker has stored its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// Accepted, no result stored yet.
    Pending,
    /// Applied.
    Approved,
    /// Not applied; `reason` says why.
    Rejected,
}

/// A coupon granted by a deposit.
#[derive(ToSchema)]
#[allow(dead_code)] // schema of `domain::Coupon`
pub(super) struct CouponSchema {
    #[schema(example = "WQ-0123456789ABCDEF")]
    code: String,
    /// `red_packet_10`, `spend_300_save_50` or `lifetime_20_off`.
    #[schema(example = "spend_300_save_50")]
    kind: String,
}

/// A request and, once processed, its result.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestView {
    /// The request id (also in `Location: /v1/requests/{request_id}`).
    #[schema(example = "g6f1e0c5b8a4d3e2f1a0b9c8d7e6f5a4b0123456789abcdef")]
    pub request_id: String,
    /// Pending, approved or rejected.
    pub status: RequestStatus,
    /// `withdraw`, `deposit`, `hold`, `capture` or `release`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "withdraw")]
    pub op: Option<Op>,
    /// The amount, as a 2-decimal string (of a capture: what it took; of a release: the hold's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "12.34")]
    pub amount: Option<String>,
    /// Why a request was rejected: `insufficient_funds`, `limit_exceeded`, `no_wallet`,
    /// `invalid_request`, `conflict`, or for a capture or release `unknown_hold`,
    /// `hold_closed`, `hold_expired`, `amount_exceeds_hold`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reason: Option<String>,
    /// For an invalid request: what is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Balance after the request (or the current balance of a rejected one).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "287.66")]
    pub balance: Option<String>,
    /// The sum of the wallet's active holds, beside `balance`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "40.00")]
    pub held: Option<String>,
    /// `balance − held`: what a withdrawal or a hold may take.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "247.66")]
    pub available: Option<String>,
    /// The hold of a hold, capture or release request: for a hold, its own `request_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub hold_id: Option<String>,
    /// When the hold of an approved hold request expires unless captured or released first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The coupon a deposit granted.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<CouponSchema>)]
    pub coupon: Option<Coupon>,
    /// True when this answer repeats the stored result of an earlier identical request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<bool>,
    /// When the request was applied; `None` while pending.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
}

impl RequestView {
    fn pending(request_id: &RequestId) -> Self {
        RequestView {
            request_id: request_id.as_str().to_owned(),
            status: RequestStatus::Pending,
            op: None,
            amount: None,
            reason: None,
            detail: None,
            balance: None,
            held: None,
            available: None,
            hold_id: None,
            expires_at: None,
            coupon: None,
            replayed: None,
            processed_at: None,
        }
    }

    fn done(request_id: &RequestId, result: RequestResult) -> Self {
        RequestView {
            request_id: request_id.as_str().to_owned(),
            status: match result.status {
                Status::Approved => RequestStatus::Approved,
                Status::Rejected => RequestStatus::Rejected,
            },
            op: result.op,
            amount: result.amount.map(|a| a.to_string()),
            reason: result.reason.map(|r| r.as_str().to_owned()),
            detail: result.detail,
            balance: result.balance.map(|b| b.to_string()),
            held: result.held.map(|h| h.to_string()),
            available: result.available.map(|a| a.to_string()),
            hold_id: result.hold_id.map(|h| h.as_str().to_owned()),
            expires_at: result.expires_at,
            coupon: result.coupon,
            replayed: Some(result.replayed),
            processed_at: Some(result.processed_at),
        }
    }
}

/// A wallet: balance, holds and coupons of the token's user.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WalletView {
    /// The token's user.
    #[schema(value_type = String, example = "alice")]
    pub user_id: UserId,
    /// `null` until the first deposit creates the wallet.
    #[schema(value_type = Option<String>, example = "300.00")]
    pub balance: Option<String>,
    /// The sum of the active holds (`null` without a wallet).
    #[schema(value_type = Option<String>, example = "40.00")]
    pub held: Option<String>,
    /// `balance − held`: what a withdrawal or a hold may take (`null` without a wallet).
    #[schema(value_type = Option<String>, example = "260.00")]
    pub available: Option<String>,
    /// The active holds, soonest to expire first (at most 100).
    pub holds: Vec<ActiveHold>,
    /// The coupons granted to this wallet, oldest first.
    #[schema(value_type = Vec<CouponSchema>)]
    pub coupons: Vec<Coupon>,
    /// The withdrawal limits in force and what is left of each (docs/PROTOCOL.md, Limits).
    pub limits: LimitsView,
}

/// Submit a withdrawal from the token's user's wallet.
#[utoipa::path(
    post, path = "/v1/withdrawals", tag = "requests",
    request_body = AmountBody,
    params(SubmitHeaders),
    responses(SubmitResponses),
    security(("bearer" = []))
)]
pub(super) async fn post_withdrawal(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    submit(&shared, user, Op::Withdraw, &headers, body).await
}

/// Submit a deposit to the token's user's wallet (creating it; may grant a coupon).
#[utoipa::path(
    post, path = "/v1/deposits", tag = "requests",
    request_body = AmountBody,
    params(SubmitHeaders),
    responses(SubmitResponses),
    security(("bearer" = []))
)]
pub(super) async fn post_deposit(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    submit(&shared, user, Op::Deposit, &headers, body).await
}

/// The answers to a submission.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documents the responses built by `submit`
pub(super) enum SubmitResponses {
    /// Processed within `Prefer: wait` (approved or rejected).
    #[response(status = 200)]
    Processed(RequestView),
    /// Published (confirmed by the broker); poll `Location`.
    #[response(status = 202, headers(("Location" = String, description = "/v1/requests/{request_id}")))]
    Accepted(RequestView),
    /// Malformed body or Idempotency-Key.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// Missing, invalid or expired token.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The body did not arrive within 10 s.
    #[response(status = 408, content_type = "application/problem+json")]
    Timeout(Problem),
    /// Body over 16 KiB.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// Body is not JSON.
    #[response(status = 415, content_type = "application/problem+json")]
    NotJson(Problem),
    /// Amount (or a hold's `timeout_s`) not acceptable.
    #[response(status = 422, content_type = "application/problem+json")]
    BadAmount(Problem),
    /// Header fields over 16 KiB or 100 fields.
    #[response(status = 431, content_type = "application/problem+json")]
    HeadersTooLarge(Problem),
    /// Broker unavailable (see Retry-After); retry with the same Idempotency-Key.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// Headers of a submission.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documents the headers read by `submit`
pub(super) struct SubmitHeaders {
    /// 1-64 characters of `[A-Za-z0-9._:-]`, scoped to the user: the same key replays the same
    /// request (applied once). A fresh key is made when absent.
    #[param(rename = "Idempotency-Key", example = "order-1234")]
    idempotency_key: Option<String>,
    /// `wait=N` (seconds, capped at 30): answer 200 with the result if it comes in time.
    #[param(rename = "Prefer", example = "wait=10")]
    prefer: Option<String>,
}

async fn submit(
    shared: &Shared,
    user: UserId,
    op: Op,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    check_content_type(headers)?;
    let body = body.map_err(body_problem)?;
    let amount = parse_amount_body(&body)?;
    let command = match op {
        Op::Deposit => Command::Deposit { amount },
        _ => Command::Withdraw { amount },
    };
    publish(shared, user, command, headers).await
}

/// Publishes `command` for `user` under the request id minted from the user and the
/// `Idempotency-Key`; answers `202`, or `200` with the result within `Prefer: wait`.
pub(super) async fn publish(
    shared: &Shared,
    user: UserId,
    command: Command,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    let key = idempotency_key(headers)?;
    let repeated = headers.contains_key(&IDEMPOTENCY_KEY);
    let request = Request::new(shared.ids.mint(&user, &key), user, command);
    let wait = preferred_wait(headers);
    if repeated && let Some(result) = already_applied(shared, &request).await {
        // A repeated key answers the request's current state, as an idempotent retry does.
        return Ok(Json(RequestView::done(&request.request_id, result)).into_response());
    }

    let client = shared.link.client().await.map_err(|down| Problem::new(ProblemKind::BrokerUnavailable, down.0))?;
    let unpublished = |error: anyhow::Error| {
        tracing::warn!(error = %format!("{error:#}"), request_id = %request.request_id, "publishing failed");
        Problem::new(
            ProblemKind::BrokerUnavailable,
            "the request could not be published; retry with the same Idempotency-Key",
        )
    };
    let Some(wait) = wait else {
        // Results nobody waits for go to this gateway's reply queue and are dropped there;
        // they are stored, and read back by GET /v1/requests/{id}.
        client.submit(&request, Some(client.reply_queue())).await.map_err(unpublished)?;
        return Ok(accepted(&request.request_id, None));
    };
    match client.submit_and_wait_for(&request, wait).await.map_err(unpublished)? {
        Some(result) => {
            let mut response = Json(RequestView::done(&request.request_id, result)).into_response();
            response.headers_mut().insert(PREFERENCE_APPLIED.clone(), wait_header(wait));
            Ok(response)
        }
        None => Ok(accepted(&request.request_id, Some(wait))),
    }
}

/// The stored result of `request` when its id was applied already with the same body (a
/// retry; compared as the worker compares it), marked as a replay. `None` when it is new, was
/// sent with another body (the worker answers that with `conflict`), or the database cannot
/// say: then it is published, which is always safe.
async fn already_applied(shared: &Shared, request: &Request) -> Option<RequestResult> {
    let stored = match shared.ledger.stored_request(&request.request_id).await {
        Ok(stored) => stored?,
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "cannot look up a repeated Idempotency-Key; publishing it");
            return None;
        }
    };
    stored.request.same_body(request).then_some(RequestResult { replayed: true, ..stored.result })
}

fn accepted(request_id: &RequestId, wait: Option<Duration>) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(RequestView::pending(request_id))).into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/requests/{request_id}")) {
        headers.insert(header::LOCATION, location);
    }
    if let Some(wait) = wait {
        headers.insert(PREFERENCE_APPLIED.clone(), wait_header(wait));
    }
    response
}

fn wait_header(wait: Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("wait={}", wait.as_secs())).unwrap_or(HeaderValue::from_static("wait"))
}

/// `Prefer: wait=N` (RFC 7240), capped at [`WAIT_MAX_S`]; other preferences are ignored.
fn preferred_wait(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(&PREFER)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|preference| {
            let (name, value) = preference.split(';').next()?.split_once('=')?;
            name.trim().eq_ignore_ascii_case("wait").then(|| value.trim().trim_matches('"').parse::<u64>().ok())?
        })
        .next()
        .filter(|seconds| *seconds > 0)
        .map(|seconds| Duration::from_secs(seconds.min(WAIT_MAX_S)))
}

fn idempotency_key(headers: &HeaderMap) -> Result<IdempotencyKey, Problem> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(IdempotencyKey::fresh()),
        (Some(value), None) => value.to_str().ok().and_then(IdempotencyKey::parse).ok_or_else(|| {
            Problem::new(
                ProblemKind::InvalidIdempotencyKey,
                "Idempotency-Key must be 1-64 characters of [A-Za-z0-9._:-]",
            )
        }),
        (Some(_), Some(_)) => {
            Err(Problem::new(ProblemKind::InvalidIdempotencyKey, "send at most one Idempotency-Key header"))
        }
    }
}

pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value.to_str().unwrap_or_default().split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json")) {
        Ok(())
    } else {
        Err(Problem::new(
            ProblemKind::UnsupportedMediaType,
            format!("Content-Type must be application/json, got {:?}", truncate(&essence)),
        ))
    }
}

pub(super) fn body_problem(rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(ProblemKind::BodyTooLarge, format!("the body is over the {BODY_MAX_BYTES}-byte limit"))
    } else {
        Problem::new(ProblemKind::InvalidBody, format!("the body could not be read: {}", rejection.body_text()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AmountField<'a> {
    #[serde(borrow)]
    amount: &'a RawValue,
}

fn parse_amount_body(body: &[u8]) -> Result<crate::domain::Money, Problem> {
    let text =
        std::str::from_utf8(body).map_err(|_| Problem::new(ProblemKind::InvalidBody, "the body is not UTF-8"))?;
    let invalid = |why: &dyn std::fmt::Display| {
        Problem::new(
            ProblemKind::InvalidBody,
            format!(r#"the body must be a JSON object {{"amount": "12.34"}}: {why}"#),
        )
    };
    // A derived struct would also take an array (`[1]`) as its fields in order.
    if !text.trim_start().starts_with('{') && !text.trim().is_empty() {
        return Err(invalid(&"it is not an object"));
    }
    let field: AmountField = serde_json::from_str(text).map_err(|e| {
        if e.to_string().contains("unknown field") {
            invalid(&format!("{e} (the body names only the amount; the user is the token's subject)"))
        } else {
            invalid(&e)
        }
    })?;
    parse_json_amount(field.amount).map_err(|e| {
        Problem::new(ProblemKind::InvalidAmount, format!("`amount` {e}, got {}", truncate(field.amount.get())))
    })
}

/// Get a request: `pending` until processed, then its result. Only the token's own requests
/// are visible; any other id is 404.
#[utoipa::path(
    get, path = "/v1/requests/{id}", tag = "requests",
    params(("id" = String, Path, description = "A request id returned by a submission")),
    responses(
        (status = 200, description = "Pending, or the result", body = RequestView),
        (status = 401, description = "Missing, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such request of this user", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_request(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RequestView>, Problem> {
    let id = id.map(|Path(id)| id).unwrap_or_default();
    let unknown = || Problem::new(ProblemKind::NotFound, format!("this user has no request {:?}", truncate(&id)));
    if !shared.ids.belongs_to(&id, &user) {
        return Err(unknown());
    }
    let request_id = RequestId::parse(&id).ok_or_else(unknown)?;
    match shared.ledger.stored_result(&request_id).await.map_err(database_problem)? {
        None => Ok(Json(RequestView::pending(&request_id))),
        // Stored results carry their user: check it too, whatever the id says.
        Some(result) if result.user_id.as_ref() == Some(&user) => Ok(Json(RequestView::done(&request_id, result))),
        Some(_) => Err(unknown()),
    }
}

/// Get the token's user's wallet: balance, held, available, active holds and coupons.
#[utoipa::path(
    get, path = "/v1/wallet", tag = "wallet",
    responses(
        (status = 200, description = "The wallet (figures null before the first deposit)", body = WalletView),
        (status = 401, description = "Missing, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_wallet(
    State(shared): State<Arc<Shared>>,
    User(user): User,
) -> Result<Json<WalletView>, Problem> {
    let wallet = shared.ledger.wallet(&user).await.map_err(database_problem)?;
    let limits = shared.ledger.limits_view(&user).await.map_err(database_problem)?;
    Ok(Json(match wallet {
        Some(wallet) => WalletView {
            user_id: user,
            balance: Some(wallet.balance.to_string()),
            held: Some(wallet.held.to_string()),
            available: Some(wallet.available.to_string()),
            holds: wallet.holds,
            coupons: wallet.coupons,
            limits,
        },
        None => WalletView {
            user_id: user,
            balance: None,
            held: None,
            available: None,
            holds: Vec::new(),
            coupons: Vec::new(),
            limits,
        },
    }))
}

pub(super) fn database_problem(error: anyhow::Error) -> Problem {
    tracing::warn!(error = %format!("{error:#}"), "database read failed");
    Problem::new(ProblemKind::DatabaseUnavailable, "the database is unavailable; retry later")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn prefer_wait_is_parsed_and_capped() {
        let wait = |value: &str| preferred_wait(&headers(&[("prefer", value)])).map(|d| d.as_secs());
        assert_eq!(wait("wait=5"), Some(5));
        assert_eq!(wait("respond-async, wait=10"), Some(10));
        assert_eq!(wait("Wait = 7"), Some(7));
        assert_eq!(wait("wait=3600"), Some(WAIT_MAX_S));
        assert_eq!(wait("wait=0"), None);
        assert_eq!(wait("wait=soon"), None);
        assert_eq!(wait("return=minimal"), None);
        assert_eq!(preferred_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn amounts_are_exact_and_bodies_strict() {
        assert_eq!(parse_amount_body(br#"{"amount":"12.34"}"#).map(|m| m.cents()).ok(), Some(1234));
        assert_eq!(parse_amount_body(br#"{"amount":0.1}"#).map(|m| m.cents()).ok(), Some(10));
        assert_eq!(parse_amount_body(br#"{"amount":1.10}"#).map(|m| m.cents()).ok(), Some(110));
        for (body, kind, needle) in [
            (&br#"{"amount":1.005}"#[..], ProblemKind::InvalidAmount, "more than 2 decimal places"),
            (br#"{"amount":"abc"}"#, ProblemKind::InvalidAmount, "plain decimal"),
            (br#"{"amount":1e2}"#, ProblemKind::InvalidAmount, "plain decimal"),
            (br#"{"amount":0}"#, ProblemKind::InvalidAmount, "greater than 0"),
            (br#"{"amount":"1","user_id":"bob"}"#, ProblemKind::InvalidBody, "token's subject"),
            (br#"{"amount":"1","amount":"2"}"#, ProblemKind::InvalidBody, "duplicate field"),
            (br#"{}"#, ProblemKind::InvalidBody, "missing field `amount`"),
            (b"", ProblemKind::InvalidBody, "EOF"),
            (b"[1]", ProblemKind::InvalidBody, "not an object"),
            (b" [\"1\"]", ProblemKind::InvalidBody, "not an object"),
            (b"\"1\"", ProblemKind::InvalidBody, "not an object"),
            (b"\xff", ProblemKind::InvalidBody, "UTF-8"),
        ] {
            let problem = parse_amount_body(body).unwrap_err();
            assert_eq!(problem.type_uri, kind.type_uri(), "{body:?}");
            assert!(problem.detail.contains(needle), "{body:?}: {}", problem.detail);
        }
    }
}
