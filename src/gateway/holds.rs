//! The hold routes: place a hold, capture or release it, read it. Submissions go through
//! [`routes::publish`] exactly as withdrawals and deposits do (`Idempotency-Key`,
//! `Prefer: wait`, `202`/`200`); a hold's id is the request id minted for its `hold` request.
//!
//! A `{hold_id}` in a path is checked like `GET /v1/requests/{id}` checks its id: one the
//! gateway did not mint for the token's user is `404` at once, without a publish or a read, so
//! another user's hold and a made-up id are answered alike.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::Shared;
use super::auth::User;
use super::problem::{Problem, ProblemKind};
use super::routes::{self, SubmitHeaders, SubmitResponses};
use crate::domain::request::truncate;
use crate::domain::{Command, HOLD_TIMEOUT_DEFAULT_S, HOLD_TIMEOUT_MAX_S, Money, RequestId, UserId, parse_json_amount};
use crate::ledger::holds::StoredHold;

/// The body of `POST /v1/holds`.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the body; it is parsed by `parse_hold_body`
pub(super) struct HoldBody {
    /// Plain decimal amount to reserve, as for a withdrawal (more than 0, at most
    /// 1000000000.00, at most 2 decimals; a JSON string preferred, a number read exactly).
    #[schema(example = "40.00")]
    amount: String,
    /// Seconds until the hold expires unless captured or released first: an integer from 1
    /// to 604800 (7 days); 900 when absent or `null`.
    #[schema(example = 600, minimum = 1, maximum = 604_800)]
    timeout_s: Option<u32>,
}

/// The body of `POST /v1/holds/{hold_id}/capture`: empty, `{}` or `{"amount": …}`.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the body; it is parsed by `parse_capture_body`
pub(super) struct CaptureBody {
    /// How much of the hold to take, at most its amount; the rest is released. Absent or
    /// `null`: all of it.
    #[schema(example = "25.00")]
    amount: Option<String>,
}

/// A hold of the token's user, active or closed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HoldView {
    /// The hold's id: the `request_id` of its `hold` request.
    #[schema(example = "g6f1e0c5b8a4d3e2f1a0b9c8d7e6f5a4b0123456789abcdef")]
    pub hold_id: String,
    /// The money it reserves (or reserved), as a 2-decimal string.
    #[schema(example = "40.00")]
    pub amount: String,
    /// `active`, `captured`, `released` or `expired`. An active hold past `expires_at` is
    /// expired within about 0.5 s while a worker serves its user.
    #[schema(example = "captured")]
    pub state: String,
    /// What its capture took; only when captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "25.00")]
    pub captured: Option<String>,
    /// When the hold was placed.
    pub created_at: DateTime<Utc>,
    /// When it expires (or expired) unless captured or released first.
    pub expires_at: DateTime<Utc>,
    /// When it was captured, released or expired; absent while active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<DateTime<Utc>>,
    /// The capture or release request that closed it (read it at `/v1/requests/{id}`);
    /// absent while active and when it expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub closed_by: Option<String>,
}

impl From<StoredHold> for HoldView {
    fn from(hold: StoredHold) -> Self {
        HoldView {
            hold_id: hold.hold_id.as_str().to_owned(),
            amount: hold.amount.to_string(),
            state: hold.state.as_str().to_owned(),
            captured: hold.captured.map(|c| c.to_string()),
            created_at: hold.created_at,
            expires_at: hold.expires_at,
            closed_at: hold.closed_at,
            closed_by: hold.closed_by.map(|id| id.as_str().to_owned()),
        }
    }
}

/// Place a hold on the token's user's wallet: reserve `amount` until it is captured,
/// released or expires. The result's `hold_id` (= its `request_id`) names the hold.
#[utoipa::path(
    post, path = "/v1/holds", tag = "holds",
    request_body = HoldBody,
    params(SubmitHeaders),
    responses(SubmitResponses),
    security(("bearer" = []))
)]
pub(super) async fn post_hold(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    routes::check_content_type(&headers)?;
    let body = body.map_err(routes::body_problem)?;
    let command = parse_hold_body(&body)?;
    routes::publish(&shared, user, command, &headers).await
}

/// Capture a hold of the token's user: take `amount` (all of it when absent) out of the
/// wallet and release the rest. Refusals (`hold_closed`, `hold_expired`,
/// `amount_exceeds_hold`, `unknown_hold`) are results, like `insufficient_funds`.
#[utoipa::path(
    post, path = "/v1/holds/{hold_id}/capture", tag = "holds",
    request_body(content = Option<CaptureBody>, description = "Optional: no body, `{}` or `{\"amount\": …}`"),
    params(("hold_id" = String, Path, description = "The hold's id"), SubmitHeaders),
    responses(
        SubmitResponses,
        (status = 404, description = "No such hold of this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn post_capture(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    hold_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let hold_id = own_hold_id(&shared, &user, hold_id)?;
    routes::check_content_type(&headers)?;
    let body = body.map_err(routes::body_problem)?;
    let amount = parse_capture_body(&body)?;
    routes::publish(&shared, user, Command::Capture { hold_id, amount }, &headers).await
}

/// Release a hold of the token's user: its money is available again.
#[utoipa::path(
    post, path = "/v1/holds/{hold_id}/release", tag = "holds",
    request_body(content = Option<Object>, description = "Optional: no body or `{}`"),
    params(("hold_id" = String, Path, description = "The hold's id"), SubmitHeaders),
    responses(
        SubmitResponses,
        (status = 404, description = "No such hold of this user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn post_release(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    hold_id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let hold_id = own_hold_id(&shared, &user, hold_id)?;
    routes::check_content_type(&headers)?;
    let body = body.map_err(routes::body_problem)?;
    parse_release_body(&body)?;
    routes::publish(&shared, user, Command::Release { hold_id }, &headers).await
}

/// Get a hold of the token's user: amount, state, what was captured, when it expires. A
/// hold not placed yet (pending, or refused: see `/v1/requests/{hold_id}`) and another
/// user's hold are both 404.
#[utoipa::path(
    get, path = "/v1/holds/{hold_id}", tag = "holds",
    params(("hold_id" = String, Path, description = "The hold's id")),
    responses(
        (status = 200, description = "The hold", body = HoldView),
        (status = 401, description = "Missing, invalid or expired token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such hold of this user", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable (see Retry-After)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_hold(
    State(shared): State<Arc<Shared>>,
    User(user): User,
    hold_id: Result<Path<String>, PathRejection>,
) -> Result<Json<HoldView>, Problem> {
    let hold_id = own_hold_id(&shared, &user, hold_id)?;
    match shared.ledger.hold(&user, &hold_id).await.map_err(routes::database_problem)? {
        Some(hold) => Ok(Json(hold.into())),
        None => Err(no_such_hold(hold_id.as_str())),
    }
}

fn no_such_hold(id: &str) -> Problem {
    Problem::new(ProblemKind::NotFound, format!("this user has no hold {:?}", truncate(id)))
}

/// The path's hold id when the gateway minted it for `user`; else 404, whatever the id.
fn own_hold_id(
    shared: &Shared,
    user: &UserId,
    hold_id: Result<Path<String>, PathRejection>,
) -> Result<RequestId, Problem> {
    let id = hold_id.map(|Path(id)| id).unwrap_or_default();
    if !shared.ids.belongs_to(&id, user) {
        return Err(no_such_hold(&id));
    }
    RequestId::parse(&id).ok_or_else(|| no_such_hold(&id))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldFields<'a> {
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(borrow, default)]
    timeout_s: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureFields<'a> {
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// How a body may be shaped, for the messages of [`parse_object`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `{"amount": …, "timeout_s": …}`; never empty.
    Hold,
    /// `{"amount": …}`, `{}` or no body.
    Capture,
    /// `{}` or no body.
    Release,
}

impl Shape {
    fn example(self) -> &'static str {
        match self {
            Shape::Hold => r#"a JSON object {"amount": "40.00", "timeout_s": 600}"#,
            Shape::Capture => r#"empty, {} or a JSON object {"amount": "25.00"}"#,
            Shape::Release => "empty or {}",
        }
    }
}

/// Reads a body as the JSON object of `shape`: strictly (no other field, no duplicate, no
/// array); an empty body is `{}` for the shapes that allow it.
fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8], shape: Shape) -> Result<T, Problem> {
    let text =
        std::str::from_utf8(body).map_err(|_| Problem::new(ProblemKind::InvalidBody, "the body is not UTF-8"))?;
    let invalid = |why: &dyn std::fmt::Display| {
        Problem::new(ProblemKind::InvalidBody, format!("the body must be {}: {why}", shape.example()))
    };
    let text = match text.trim() {
        "" if shape != Shape::Hold => "{}",
        trimmed => trimmed,
    };
    // A derived struct would also take an array (`[1]`) as its fields in order.
    if !text.starts_with('{') && !text.is_empty() {
        return Err(invalid(&"it is not an object"));
    }
    serde_json::from_str(text).map_err(|e| {
        if e.to_string().contains("unknown field") {
            invalid(&format!("{e} (the user is the token's subject, the hold is in the path)"))
        } else {
            invalid(&e)
        }
    })
}

fn parse_amount(raw: &RawValue) -> Result<Money, Problem> {
    parse_json_amount(raw)
        .map_err(|e| Problem::new(ProblemKind::InvalidAmount, format!("`amount` {e}, got {}", truncate(raw.get()))))
}

fn parse_hold_body(body: &[u8]) -> Result<Command, Problem> {
    let fields: HoldFields = parse_object(body, Shape::Hold)?;
    let amount = parse_amount(fields.amount)?;
    let timeout_s = fields.timeout_s.map_or(Ok(HOLD_TIMEOUT_DEFAULT_S), parse_timeout)?;
    Ok(Command::Hold { amount, timeout_s })
}

/// `timeout_s`: a JSON integer from 1 to [`HOLD_TIMEOUT_MAX_S`], as the worker reads it.
fn parse_timeout(raw: &RawValue) -> Result<u32, Problem> {
    raw.get().parse::<u32>().ok().filter(|s| (1..=HOLD_TIMEOUT_MAX_S).contains(s)).ok_or_else(|| {
        let got = truncate(raw.get());
        let detail = format!("`timeout_s` must be an integer from 1 to {HOLD_TIMEOUT_MAX_S} (seconds), got {got}");
        Problem::new(ProblemKind::InvalidTimeout, detail)
    })
}

fn parse_capture_body(body: &[u8]) -> Result<Option<Money>, Problem> {
    let fields: CaptureFields = parse_object(body, Shape::Capture)?;
    fields.amount.map(parse_amount).transpose()
}

fn parse_release_body(body: &[u8]) -> Result<(), Problem> {
    parse_object::<NoFields>(body, Shape::Release).map(|NoFields {}| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem_of<T: std::fmt::Debug>(outcome: Result<T, Problem>) -> (String, String) {
        let problem = outcome.expect_err("a problem");
        (problem.type_uri, problem.detail)
    }

    #[test]
    fn hold_bodies_take_an_amount_and_an_optional_timeout() {
        let hold = |body: &str| parse_hold_body(body.as_bytes()).ok();
        let cents = |c| Money::from_cents(c).expect("money");
        assert_eq!(hold(r#"{"amount":"40"}"#), Some(Command::Hold { amount: cents(4_000), timeout_s: 900 }));
        assert_eq!(hold(r#"{"amount":0.1,"timeout_s":5}"#), Some(Command::Hold { amount: cents(10), timeout_s: 5 }));
        assert_eq!(
            hold(r#"{"amount":"1","timeout_s":null}"#),
            Some(Command::Hold { amount: cents(100), timeout_s: 900 })
        );
        for (body, kind, needle) in [
            (r#"{"amount":"1","timeout_s":0}"#, ProblemKind::InvalidTimeout, "from 1 to 604800"),
            (r#"{"amount":"1","timeout_s":604801}"#, ProblemKind::InvalidTimeout, "got 604801"),
            (r#"{"amount":"1","timeout_s":"60"}"#, ProblemKind::InvalidTimeout, "an integer"),
            (r#"{"amount":"1","timeout_s":1.5}"#, ProblemKind::InvalidTimeout, "an integer"),
            (r#"{"amount":"1.005"}"#, ProblemKind::InvalidAmount, "2 decimal places"),
            (r#"{"amount":"1","hold_id":"x"}"#, ProblemKind::InvalidBody, "unknown field"),
            (r#"{"timeout_s":60}"#, ProblemKind::InvalidBody, "missing field `amount`"),
            ("", ProblemKind::InvalidBody, "EOF"),
            ("[1]", ProblemKind::InvalidBody, "not an object"),
        ] {
            let (type_uri, detail) = problem_of(parse_hold_body(body.as_bytes()));
            assert_eq!(type_uri, kind.type_uri(), "{body}: {detail}");
            assert!(detail.contains(needle), "{body}: {detail}");
        }
    }

    #[test]
    fn capture_and_release_bodies_may_be_empty() {
        let capture = |body: &str| parse_capture_body(body.as_bytes()).map(|a| a.map(Money::cents)).ok();
        assert_eq!(capture(""), Some(None));
        assert_eq!(capture(" {} "), Some(None));
        assert_eq!(capture(r#"{"amount":null}"#), Some(None));
        assert_eq!(capture(r#"{"amount":"25.5"}"#), Some(Some(2_550)));
        assert!(parse_release_body(b"").is_ok());
        assert!(parse_release_body(b"{}").is_ok());
        for (outcome, kind, needle) in [
            (problem_of(parse_capture_body(br#"{"amount":"-1"}"#)), ProblemKind::InvalidAmount, "got \"-1\""),
            (problem_of(parse_capture_body(br#"{"hold_id":"h"}"#)), ProblemKind::InvalidBody, "unknown field"),
            (problem_of(parse_capture_body(b"null")), ProblemKind::InvalidBody, "not an object"),
            (problem_of(parse_release_body(br#"{"amount":"1"}"#)), ProblemKind::InvalidBody, "empty or {}"),
            (problem_of(parse_release_body(b"\xff")), ProblemKind::InvalidBody, "UTF-8"),
        ] {
            assert_eq!(outcome.0, kind.type_uri(), "{}", outcome.1);
            assert!(outcome.1.contains(needle), "{}", outcome.1);
        }
    }
}
