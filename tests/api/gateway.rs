//! The HTTP gateway, through a real gateway (in-process, port 0) in front of a real worker.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use walletq::configuration::{GatewaySettings, ServiceSettings};
use walletq::domain::UserId;
use walletq::gateway::auth::{Claims, JwtSecret, mint_token};

use crate::fault::Relay;
use crate::support::{RESULT_TIMEOUT, TestApp, spawn_app};

mod holds;

const PROBLEM_JSON: &str = "application/problem+json";
/// The operation keys of an OpenAPI path item.
const HTTP_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// A gateway serving on 127.0.0.1:0 in this process.
struct TestGateway {
    base: String,
    http: reqwest::Client,
    secret: JwtSecret,
    secret_text: String,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn spawn_gateway(services: &ServiceSettings) -> TestGateway {
    let secret_text = format!("test-secret-{}", uuid::Uuid::new_v4().simple());
    let secret = JwtSecret::new(secret_text.clone()).expect("a long enough secret");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let address = listener.local_addr().expect("local address");
    let limits = walletq::configuration::LimitSettings { limit_daily_count: Some(50), ..Default::default() };
    let settings = GatewaySettings { listen: address, db_connections: 4, limits, ..GatewaySettings::default() };
    let app = walletq::gateway::app(services, &settings, &secret).await.expect("gateway app");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(walletq::gateway::serve(listener, app, shutdown.clone().cancelled_owned()));
    TestGateway {
        base: format!("http://{address}"),
        http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("HTTP client"),
        secret,
        secret_text,
        shutdown,
        task,
    }
}

impl TestGateway {
    fn token(&self, user: &str) -> String {
        mint_token(&self.secret, &UserId::parse(user).expect("user id"), Duration::from_secs(600)).expect("token")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, user: &str, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.url(path))
            .bearer_auth(self.token(user))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("POST")
    }

    async fn get(&self, path: &str, user: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(self.token(user)).send().await.expect("GET")
    }

    /// Polls `location` until the request is no longer pending.
    async fn result_of(&self, location: &str, user: &str) -> Value {
        let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
        loop {
            let response = self.get(location, user).await;
            assert_eq!(response.status(), StatusCode::OK, "GET {location}");
            let body: Value = response.json().await.expect("JSON");
            if body["status"] != "pending" {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "{location} still pending after {RESULT_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("gateway task").expect("gateway stopped cleanly");
    }
}

/// Status, headers and JSON body of a response.
async fn parts(response: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// Asserts an RFC 9457 problem of the given status and type whose detail mentions `needle`.
fn assert_problem(
    (status, headers, body): &(StatusCode, reqwest::header::HeaderMap, Value),
    expected: StatusCode,
    kind: &str,
    needle: &str,
) {
    assert_eq!(*status, expected, "{body}");
    assert_eq!(header(headers, "content-type"), PROBLEM_JSON, "{body}");
    assert_eq!(body["type"], format!("urn:walletq:problem:{kind}"), "{body}");
    assert_eq!(body["status"], expected.as_u16(), "{body}");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(needle), "detail {detail:?} should mention {needle:?}");
}

async fn balance(gateway: &TestGateway, user: &str) -> Value {
    let (status, _, body) = parts(gateway.get("/v1/wallet", user).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], user);
    body["balance"].clone()
}

#[tokio::test]
async fn submissions_are_accepted_then_applied_for_the_tokens_user_only() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;

    let (status, headers, body) =
        parts(gateway.post("/v1/deposits", "alice", r#"{"amount":"300.00"}"#, &[]).await).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "pending");
    let request_id = body["request_id"].as_str().expect("request_id").to_owned();
    let location = header(&headers, "location").to_owned();
    assert_eq!(location, format!("/v1/requests/{request_id}"));

    let result = gateway.result_of(&location, "alice").await;
    assert_eq!(result["status"], "approved", "{result}");
    assert_eq!(result["request_id"], request_id);
    assert_eq!(result["op"], "deposit");
    assert_eq!(result["amount"], "300.00");
    assert_eq!(result["balance"], "300.00");
    assert_eq!(result["coupon"]["kind"], "spend_300_save_50");

    // A JSON number is read exactly from its text.
    let (status, _, body) =
        parts(gateway.post("/v1/withdrawals", "alice", r#"{"amount":0.1}"#, &[("prefer", "wait=20")]).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["status"], &body["amount"], &body["balance"]),
        (&json!("approved"), &json!("0.10"), &json!("299.90"))
    );

    let (status, _, wallet) = parts(gateway.get("/v1/wallet", "alice").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(wallet["balance"], "299.90");
    assert_eq!(wallet["coupons"].as_array().map(Vec::len), Some(1));
    // The limits in force (the gateway's defaults: a daily count of 50) and what is left.
    assert_eq!(
        (&wallet["limits"]["in_force"]["daily_count"], &wallet["limits"]["used_count"]),
        (&json!(50), &json!(1))
    );
    assert_eq!(wallet["limits"]["left_count"], 49, "{wallet}");

    // Bob can neither read Alice's request nor see or spend her wallet.
    let stolen = parts(gateway.get(&location, "bob").await).await;
    assert_problem(&stolen, StatusCode::NOT_FOUND, "not-found", "no request");
    assert_eq!(balance(&gateway, "bob").await, Value::Null);
    let (status, _, body) =
        parts(gateway.post("/v1/withdrawals", "bob", r#"{"amount":"1.00"}"#, &[("prefer", "wait=20")]).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((&body["status"], &body["reason"]), (&json!("rejected"), &json!("no_wallet")));
    let named =
        parts(gateway.post("/v1/withdrawals", "bob", r#"{"amount":"1.00","user_id":"alice"}"#, &[]).await).await;
    assert_problem(&named, StatusCode::BAD_REQUEST, "invalid-body", "token's subject");
    assert_eq!(balance(&gateway, "alice").await, "299.90");
    app.assert_ledger_matches_balance("alice").await;
    assert_eq!(app.count("SELECT count(*) FROM requests WHERE user_id = 'bob'").await, 1);

    gateway.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn prefer_wait_answers_200_with_the_result_or_202_when_it_is_late() {
    let mut app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;

    let (status, headers, body) =
        parts(gateway.post("/v1/deposits", "carol", r#"{"amount":"50"}"#, &[("prefer", "wait=20")]).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(header(&headers, "preference-applied"), "wait=20");
    assert_eq!(
        (&body["status"], &body["balance"], &body["replayed"]),
        (&json!("approved"), &json!("50.00"), &json!(false))
    );

    // Without a worker no result can come: after the wait the answer is 202 and the request
    // stays queued until a worker is back.
    app.stop_worker().await;
    let started = std::time::Instant::now();
    let (status, headers, body) = parts(
        gateway.post("/v1/withdrawals", "carol", r#"{"amount":"20"}"#, &[("prefer", "respond-async, wait=1")]).await,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited");
    assert_eq!(header(&headers, "preference-applied"), "wait=1");
    let location = header(&headers, "location").to_owned();
    let (status, _, pending) = parts(gateway.get(&location, "carol").await).await;
    assert_eq!((status, &pending["status"]), (StatusCode::OK, &json!("pending")));

    app.start_worker();
    let result = gateway.result_of(&location, "carol").await;
    assert_eq!((&result["status"], &result["balance"]), (&json!("approved"), &json!("30.00")));

    gateway.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn replaying_an_idempotency_key_returns_the_same_request_and_debits_once() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    let wait = ("prefer", "wait=20");
    let (status, _, _) = parts(gateway.post("/v1/deposits", "dave", r#"{"amount":"10"}"#, &[wait]).await).await;
    assert_eq!(status, StatusCode::OK);

    let key = ("idempotency-key", "order-1");
    let (status, _, first) =
        parts(gateway.post("/v1/withdrawals", "dave", r#"{"amount":"4"}"#, &[key, wait]).await).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        (&first["status"], &first["balance"], &first["replayed"]),
        (&json!("approved"), &json!("6.00"), &json!(false))
    );
    let request_id = first["request_id"].as_str().expect("request_id").to_owned();

    // Replays, waited for and not, sequential and concurrent: the same request every time.
    let (status, _, again) =
        parts(gateway.post("/v1/withdrawals", "dave", r#"{"amount":"4.00"}"#, &[key, wait]).await).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!((&again["request_id"], &again["replayed"]), (&json!(request_id), &json!(true)));
    assert_eq!((&again["balance"], &again["processed_at"]), (&first["balance"], &first["processed_at"]));
    // Without `Prefer: wait`, a key whose request was applied long ago answers its current
    // state at once: 200 with the stored result, not `202 pending`.
    let keys = [key];
    let replays = (0..10).map(|_| gateway.post("/v1/withdrawals", "dave", r#"{"amount":"4"}"#, &keys));
    for response in futures_util::future::join_all(replays).await {
        let (status, _, body) = parts(response).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((&body["request_id"], &body["status"]), (&json!(request_id), &json!("approved")));
        assert_eq!((&body["replayed"], &body["processed_at"]), (&json!(true), &first["processed_at"]));
    }
    // A key not applied yet is published and answers 202 until its result is stored.
    let (status, headers, pending) =
        parts(gateway.post("/v1/withdrawals", "dave", r#"{"amount":"1"}"#, &[("idempotency-key", "order-2")]).await)
            .await;
    assert_eq!((status, &pending["status"]), (StatusCode::ACCEPTED, &json!("pending")), "{pending}");
    assert!(header(&headers, "location").starts_with("/v1/requests/"));
    // Sent again with a wait, it is the same request: applied once.
    let (status, _, later) = parts(
        gateway.post("/v1/withdrawals", "dave", r#"{"amount":"1"}"#, &[("idempotency-key", "order-2"), wait]).await,
    )
    .await;
    assert_eq!((status, &later["balance"]), (StatusCode::OK, &json!("5.00")), "{later}");

    // The key is scoped to its user: Eve's "order-1" is another request.
    let (_, _, eve) = parts(gateway.post("/v1/withdrawals", "eve", r#"{"amount":"4"}"#, &[key, wait]).await).await;
    assert_ne!(eve["request_id"], json!(request_id));
    assert_eq!(eve["reason"], "no_wallet");

    // Reusing a key for another amount is a conflict: nothing moves.
    let (status, _, conflict) =
        parts(gateway.post("/v1/withdrawals", "dave", r#"{"amount":"5"}"#, &[key, wait]).await).await;
    assert_eq!(status, StatusCode::OK, "{conflict}");
    assert_eq!((&conflict["status"], &conflict["reason"]), (&json!("rejected"), &json!("conflict")));

    assert_eq!(balance(&gateway, "dave").await, "5.00");
    app.assert_ledger_matches_balance("dave").await;
    let debits = app.count("SELECT count(*) FROM ledger_entries WHERE user_id = 'dave' AND delta < 0").await;
    assert_eq!(debits, 2, "order-1 debited once, order-2 once");
    let stored = gateway.result_of(&format!("/v1/requests/{request_id}"), "dave").await;
    assert_eq!((&stored["amount"], &stored["replayed"]), (&json!("4.00"), &json!(false)));

    gateway.stop().await;
    app.cleanup().await;
}

/// A submission body and headers, with the status, problem type and detail it must get.
type BodyCase<'a> = (String, Vec<(&'a str, &'a str)>, StatusCode, &'a str, &'a str);

fn signed(secret: &[u8], algorithm: Algorithm, sub: &str, exp_offset_s: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims { sub: sub.into(), iat: Some(now), nbf: None, exp: now.saturating_add_signed(exp_offset_s) };
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &EncodingKey::from_secret(secret)).expect("token")
}

/// An HS256 token for alice whose `iat`, `nbf` and `exp` are these offsets from now, in seconds.
fn timed(secret: &[u8], iat_s: Option<i64>, nbf_s: Option<i64>, exp_s: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let at = |offset_s: i64| now.saturating_add_signed(offset_s);
    let claims = Claims { sub: "alice".into(), iat: iat_s.map(at), nbf: nbf_s.map(at), exp: at(exp_s) };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).expect("token")
}

#[tokio::test]
async fn every_error_is_a_problem_document() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    let http = &gateway.http;
    let secret = gateway.secret_text.as_bytes();
    let withdrawals = gateway.url("/v1/withdrawals");

    // 401: missing, malformed, forged, expired, wrong algorithm, bad subject.
    let unsigned = parts(http.post(&withdrawals).body(r#"{"amount":"1"}"#).send().await.expect("POST")).await;
    assert_problem(&unsigned, StatusCode::UNAUTHORIZED, "unauthorized", "Authorization");
    assert!(header(&unsigned.1, "www-authenticate").starts_with("Bearer"));
    let basic = http.get(gateway.url("/v1/wallet")).header("authorization", "Basic YTpi").send().await.expect("GET");
    assert_problem(&parts(basic).await, StatusCode::UNAUTHORIZED, "unauthorized", "Bearer <token>");
    for (token, needle) in [
        (signed(b"another-secret-of-at-least-32-bytes!", Algorithm::HS256, "alice", 600), "signature"),
        (signed(secret, Algorithm::HS256, "alice", -3600), "expired"),
        (signed(secret, Algorithm::HS512, "alice", 600), "HS256"),
        (signed(secret, Algorithm::HS256, "not a user", 600), "`sub`"),
        ("garbage".to_owned(), "not a valid JWT"),
        // Not before: refused until then (30 s of leeway); iat in the future; lifetimes over
        // the default maximum of 24 h, counted from iat or, without it, from now.
        (timed(secret, Some(0), Some(3_600), 7_200), "not valid yet"),
        (timed(secret, Some(3_600), None, 7_200), "`iat` is in the future"),
        (timed(secret, Some(0), None, 86_401), "maximum of 86400 s"),
        (timed(secret, Some(-3_600), None, 86_399), "maximum of 86400 s"),
        (timed(secret, None, None, 86_400 + 120), "maximum of 86400 s"),
    ] {
        let response = http.get(gateway.url("/v1/wallet")).bearer_auth(&token).send().await.expect("GET");
        let refused = parts(response).await;
        assert_problem(&refused, StatusCode::UNAUTHORIZED, "unauthorized", needle);
        assert!(!refused.2["detail"].as_str().unwrap_or_default().contains(&token), "the token is not echoed");
    }
    for token in [timed(secret, Some(0), Some(-60), 600), timed(secret, None, Some(10), 86_400)] {
        let response = http.get(gateway.url("/v1/wallet")).bearer_auth(&token).send().await.expect("GET");
        assert_eq!(response.status(), StatusCode::OK, "nbf passed or within the leeway, lifetime within the maximum");
    }

    // 400, 413, 415, 422: the body and headers of a submission.
    let long_key = "k".repeat(65);
    let cases: Vec<BodyCase> = vec![
        ("{".into(), vec![], StatusCode::BAD_REQUEST, "invalid-body", "JSON object"),
        ("".into(), vec![], StatusCode::BAD_REQUEST, "invalid-body", "EOF"),
        (r#"["5"]"#.into(), vec![], StatusCode::BAD_REQUEST, "invalid-body", "not an object"),
        (r#"{"value":"1"}"#.into(), vec![], StatusCode::BAD_REQUEST, "invalid-body", "unknown field `value`"),
        (r#"{"amount":"abc"}"#.into(), vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "plain decimal"),
        (r#"{"amount":1.005}"#.into(), vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "2 decimal places"),
        (r#"{"amount":"-1"}"#.into(), vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "plain decimal"),
        (r#"{"amount":0}"#.into(), vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "greater than 0"),
        (r#"{"amount":"1000000000.01"}"#.into(), vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "at most"),
        (
            format!(r#"{{"amount":"1","pad":"{}"}}"#, "x".repeat(17 * 1024)),
            vec![],
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "16384-byte limit",
        ),
        (
            r#"{"amount":"1"}"#.into(),
            vec![("idempotency-key", "has spaces")],
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "1-64 characters",
        ),
        (
            r#"{"amount":"1"}"#.into(),
            vec![("idempotency-key", long_key.as_str())],
            StatusCode::BAD_REQUEST,
            "invalid-idempotency-key",
            "1-64 characters",
        ),
    ];
    for (body, headers, status, kind, needle) in &cases {
        let response = gateway.post("/v1/withdrawals", "alice", body, headers).await;
        assert_problem(&parts(response).await, *status, kind, needle);
    }
    let text = http
        .post(gateway.url("/v1/deposits"))
        .bearer_auth(gateway.token("alice"))
        .header("content-type", "text/plain")
        .body("amount=1")
        .send()
        .await
        .expect("POST");
    assert_problem(&parts(text).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "text/plain");

    // 404: unknown ids (made up, or in the gateway's format but never minted) and routes; 405.
    for id in ["nope", &format!("g{}", "0".repeat(48)), &"x".repeat(300)] {
        let response = gateway.get(&format!("/v1/requests/{id}"), "alice").await;
        assert_problem(&parts(response).await, StatusCode::NOT_FOUND, "not-found", "no request");
    }
    let response = gateway.get("/v2/wallet", "alice").await;
    assert_problem(&parts(response).await, StatusCode::NOT_FOUND, "no-such-route", "GET /v2/wallet");
    let response = http.delete(gateway.url("/v1/wallet")).send().await.expect("DELETE");
    let deleted = parts(response).await;
    assert_problem(&deleted, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "DELETE");
    assert!(header(&deleted.1, "allow").contains("GET"), "405 names the allowed methods: {:?}", deleted.1);

    assert_eq!(app.count("SELECT count(*) FROM requests").await, 0, "no bad request reached the ledger");
    gateway.stop().await;
    app.cleanup().await;
}

/// Sends `request` as is on a new connection and returns the status, the head and the body
/// of the answer (read until the gateway closes the connection).
async fn raw_exchange(gateway: &TestGateway, request: &str) -> (u16, String, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = gateway.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write the request");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    read.expect("the gateway answers and closes in time").expect("read the answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer.as_str(), ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

#[tokio::test]
async fn errors_of_the_http_layer_are_problem_documents_too() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    let http = &gateway.http;
    let wallet = gateway.url("/v1/wallet");

    // 431: header fields over 16 KiB in all, or over 100 of them (hyper's own limits are higher).
    let big = http.get(&wallet).bearer_auth(gateway.token("ida")).header("x-padding", "p".repeat(20_000));
    let refused = parts(big.send().await.expect("GET")).await;
    assert_problem(&refused, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers-too-large", "16384 bytes");
    let mut many = http.get(&wallet).bearer_auth(gateway.token("ida"));
    for n in 0..120 {
        many = many.header(format!("x-field-{n}"), "v");
    }
    let refused = parts(many.send().await.expect("GET")).await;
    assert_problem(&refused, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers-too-large", "at most 100 fields");
    let fine = http.get(&wallet).bearer_auth(gateway.token("ida")).header("x-padding", "p".repeat(8_000));
    assert_eq!(fine.send().await.expect("GET").status(), StatusCode::OK, "8 KB of headers is fine");

    // 413 from the declared length alone, before any body is read; 408 when the body stalls.
    let declared = "POST /v1/deposits HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
                    content-length: 1000000\r\nconnection: close\r\n\r\n";
    let (status, head, body) = raw_exchange(&gateway, declared).await;
    assert_eq!((status, body["status"].as_u64()), (413, Some(413)), "{head}{body}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert_eq!(body["type"], "urn:walletq:problem:body-too-large");
    let stalled = "POST /v1/deposits HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
                   content-length: 20\r\nconnection: close\r\n\r\n{\"amo";
    let started = std::time::Instant::now();
    let (status, head, body) = raw_exchange(&gateway, stalled).await;
    assert_eq!((status, body["status"].as_u64()), (408, Some(408)), "{head}{body}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert_eq!(body["type"], "urn:walletq:problem:request-timeout");
    assert!(started.elapsed() >= walletq::gateway::http::BODY_READ_TIMEOUT, "it waited for the body");

    // 404 and 405 without a token: the routing answers come first, as problem documents.
    let unknown = parts(http.post(gateway.url("/v1/nothing")).send().await.expect("POST")).await;
    assert_problem(&unknown, StatusCode::NOT_FOUND, "no-such-route", "POST /v1/nothing");
    let put = parts(http.put(gateway.url("/v1/deposits")).send().await.expect("PUT")).await;
    assert_problem(&put, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "PUT");

    assert_eq!(app.count("SELECT count(*) FROM requests").await, 0, "nothing reached the ledger");
    gateway.stop().await;
    app.cleanup().await;
}

/// A TCP relay to RabbitMQ that can be cut (open connections dropped, new ones refused)
/// and restored: the broker "goes down" for the gateway only.
struct BrokerRelay {
    address: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl BrokerRelay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let address = listener.local_addr().expect("relay address");
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, connections) = (up.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().expect("relay list").push(relay);
                }
            }
        });
        BrokerRelay { address, up, connections, accept }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for relay in self.connections.lock().expect("relay list").drain(..) {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for BrokerRelay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn a_broker_outage_answers_503_with_retry_after_and_recovers() {
    let app = spawn_app().await;
    let mut broker = url::Url::parse(&app.services.amqp_url).expect("AMQP URL");
    let upstream = SocketAddr::new(
        broker.host_str().unwrap_or("127.0.0.1").parse().expect("an IP broker host"),
        broker.port().unwrap_or(5672),
    );
    let relay = BrokerRelay::start(upstream).await;
    broker.set_port(Some(relay.address.port())).expect("port");
    let services = ServiceSettings { amqp_url: broker.to_string(), ..app.services.clone() };
    let gateway = spawn_gateway(&services).await;
    let wait = ("prefer", "wait=20");

    let (status, _, body) = parts(gateway.post("/v1/deposits", "frank", r#"{"amount":"5"}"#, &[wait]).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(gateway.get("/readyz", "frank").await.status(), StatusCode::OK);

    relay.cut();
    let key = ("idempotency-key", "during-the-outage");
    let refused = parts(gateway.post("/v1/withdrawals", "frank", r#"{"amount":"1"}"#, &[key, wait]).await).await;
    assert_problem(&refused, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable", "retry");
    assert!(header(&refused.1, "retry-after").parse::<u64>().is_ok_and(|s| s > 0), "{:?}", refused.1);
    let not_ready = parts(gateway.get("/readyz", "frank").await).await;
    assert_problem(&not_ready, StatusCode::SERVICE_UNAVAILABLE, "not-ready", "broker");
    assert!(header(&not_ready.1, "retry-after").parse::<u64>().is_ok());
    assert_eq!(gateway.get("/healthz", "frank").await.status(), StatusCode::OK, "alive while the broker is down");
    assert_eq!(balance(&gateway, "frank").await, "5.00", "reads need only the database");

    relay.restore();
    let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
    while gateway.get("/readyz", "frank").await.status() != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "the gateway did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client retries with the same key once the broker is back: applied once.
    let (status, _, body) =
        parts(gateway.post("/v1/withdrawals", "frank", r#"{"amount":"1"}"#, &[key, wait]).await).await;
    assert_eq!((status, &body["status"], &body["balance"]), (StatusCode::OK, &json!("approved"), &json!("4.00")));

    // A namespace whose queues no worker has declared yet: not ready, and nothing is published.
    let elsewhere = ServiceSettings { namespace: format!("{}x", app.services.namespace), ..app.services.clone() };
    let lonely = spawn_gateway(&elsewhere).await;
    let not_ready = parts(lonely.get("/readyz", "frank").await).await;
    assert_problem(&not_ready, StatusCode::SERVICE_UNAVAILABLE, "not-ready", "start a worker");
    let early = parts(lonely.post("/v1/deposits", "frank", r#"{"amount":"5"}"#, &[]).await).await;
    assert_problem(&early, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable", "start a worker");

    lonely.stop().await;
    gateway.stop().await;
    drop(relay);
    app.cleanup().await;
}

#[tokio::test]
async fn health_metrics_and_the_openapi_document_match_the_router() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    let http = &gateway.http;

    let (status, _, health) = parts(http.get(gateway.url("/healthz")).send().await.expect("GET")).await;
    assert_eq!((status, &health["status"]), (StatusCode::OK, &json!("ok")));
    let (status, _, ready) = parts(http.get(gateway.url("/readyz")).send().await.expect("GET")).await;
    assert_eq!((status, &ready["status"]), (StatusCode::OK, &json!("ok")), "{ready}");

    let (status, _, spec) = parts(http.get(gateway.url("/openapi.json")).send().await.expect("GET")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{spec}");
    assert_eq!(spec["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let keys = item.as_object().expect("path item").keys();
            let methods = keys.filter(|key| HTTP_METHODS.contains(&key.as_str()));
            methods.map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = walletq::gateway::routes()
        .into_iter()
        .map(|(verb, path)| (verb.as_str().to_owned(), path.to_owned()))
        .collect();
    assert_eq!(documented, served, "the OpenAPI document lists exactly the router's routes");
    assert!(served.len() >= 8, "{served:?}");

    // And the router really serves each of them (no fallback 404 or 405).
    for (method, path) in &served {
        let url = gateway.url(&path.replace("{id}", "some-id").replace("{hold_id}", "some-id"));
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = http.request(method, url).bearer_auth(gateway.token("gina")).send().await.expect("request");
        let (status, _, body) = parts(response).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}: {body}");
        assert_ne!(body["type"], "urn:walletq:problem:no-such-route", "{path} is routed");
    }

    let metrics = http.get(gateway.url("/metrics")).send().await.expect("GET");
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(header(metrics.headers(), "content-type").starts_with("text/plain"));
    let text = metrics.text().await.expect("metrics text");
    let counted = |route: &str, status: &str| {
        text.lines().any(|line| {
            line.starts_with("walletq_gateway_requests_total{")
                && line.contains(&format!("route=\"{route}\""))
                && line.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(counted("/healthz", "200"), "{text}");
    assert!(counted("/v1/requests/{id}", "404"), "by route template, not by raw path: {text}");
    assert!(counted("/v1/withdrawals", "400"), "the probe's empty body: {text}");
    assert!(text.contains("walletq_gateway_request_duration_seconds"), "{text}");

    gateway.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_token_command_mints_tokens_the_gateway_accepts() {
    let app: TestApp = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    let token = |args: &[&str], secret: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_walletq"));
        command.arg("token").args(args).env_remove("WALLETQ_JWT_SECRET").env("RUST_LOG", "warn");
        if let Some(secret) = secret {
            command.env("WALLETQ_JWT_SECRET", secret);
        }
        command.output().expect("run walletq token")
    };

    let minted = token(&["--user", "hana", "--ttl", "5m"], Some(&gateway.secret_text));
    assert!(minted.status.success(), "{}", String::from_utf8_lossy(&minted.stderr));
    let jwt = String::from_utf8(minted.stdout).expect("UTF-8").trim().to_owned();
    let response = gateway.http.get(gateway.url("/v1/wallet")).bearer_auth(&jwt).send().await.expect("GET");
    let (status, _, wallet) = parts(response).await;
    assert_eq!((status, &wallet["user_id"]), (StatusCode::OK, &json!("hana")), "{wallet}");

    for (args, secret, needle) in [
        (&["--user", "hana"][..], None, "WALLETQ_JWT_SECRET must be set"),
        (&["--user", "hana"], Some("short"), "at least 32 bytes"),
        (&["--user", "hana", "--ttl", "0s"], Some(gateway.secret_text.as_str()), "at least 1s"),
        (&["--user", "not valid"], Some(gateway.secret_text.as_str()), "user id"),
    ] {
        let output = token(args, secret);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} should fail");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains(&gateway.secret_text), "the secret is never printed");
    }

    gateway.stop().await;
    app.cleanup().await;
}

/// The fault relay in front of the service at `url`'s host and port.
async fn relay_to(url: &str) -> Relay {
    let target = url::Url::parse(url).expect("a URL");
    Relay::start(&format!("{}:{}", target.host_str().expect("a host"), target.port_or_known_default().expect("a port")))
        .await
}

/// What an answer may take beyond the gateway's own bound (the runtime, the shared machine).
const SLACK: Duration = Duration::from_secs(3);

/// `GET path`, failing the test unless it is answered within `bound`; returns the answer and
/// how long it took.
async fn get_within(gateway: &TestGateway, path: &str, user: &str, bound: Duration) -> (Parts, Duration) {
    let started = tokio::time::Instant::now();
    let response = tokio::time::timeout(bound, gateway.get(path, user))
        .await
        .unwrap_or_else(|_| panic!("GET {path} not answered within {bound:?}"));
    (parts(response).await, started.elapsed())
}

type Parts = (StatusCode, reqwest::header::HeaderMap, Value);

/// Polls `path` until it answers 200, within [`RESULT_TIMEOUT`].
async fn until_ok(gateway: &TestGateway, path: &str, user: &str) -> Value {
    let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
    loop {
        let (status, _, body) = parts(gateway.get(path, user).await).await;
        if status == StatusCode::OK {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "GET {path} still {status} after the restore: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// docs/HTTP.md: reads answer `503 database-unavailable` with `Retry-After` while PostgreSQL
/// is unreachable, whether the link is reset (cut) or silent (stalled), within the pool's
/// acquire bound rather than hanging; and answer again once it is back.
#[tokio::test]
async fn a_database_outage_answers_503_database_unavailable_within_a_bound_and_recovers() {
    let app = spawn_app().await;
    let relay = relay_to(&app.services.database_url).await;
    let services = ServiceSettings { database_url: relay.through(&app.services.database_url), ..app.services.clone() };
    let gateway = spawn_gateway(&services).await;
    let user = "dora";

    let (status, _, body) =
        parts(gateway.post("/v1/deposits", user, r#"{"amount":"7"}"#, &[("prefer", "wait=20")]).await).await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &json!("approved")), "{body}");
    let location = format!("/v1/requests/{}", body["request_id"].as_str().expect("a request id"));
    // A read waits at most ACQUIRE_TIMEOUT for a connection: a stalled pooled connection
    // fails its ping, a new one its connect, within that.
    let bound = walletq::ledger::ACQUIRE_TIMEOUT + SLACK;

    for (fault, break_link) in [("stall", Relay::stall as fn(&Relay)), ("cut", Relay::cut)] {
        break_link(&relay);
        for path in [location.as_str(), "/v1/wallet"] {
            let (refused, took) = get_within(&gateway, path, user, bound).await;
            assert_problem(&refused, StatusCode::SERVICE_UNAVAILABLE, "database-unavailable", "retry");
            assert!(
                header(&refused.1, "retry-after").parse::<u64>().is_ok_and(|s| s > 0),
                "{fault}: {path}: {:?}",
                refused.1
            );
            eprintln!("{fault}: GET {path} answered 503 in {took:?}");
        }
        assert_eq!(gateway.get("/healthz", user).await.status(), StatusCode::OK, "alive while the database is down");

        relay.restore();
        let result = until_ok(&gateway, &location, user).await;
        assert_eq!((&result["status"], &result["balance"]), (&json!("approved"), &json!("7.00")), "{fault}");
        let wallet = until_ok(&gateway, "/v1/wallet", user).await;
        assert_eq!(wallet["balance"], "7.00", "{fault}");
    }

    gateway.stop().await;
    drop(relay);
    app.cleanup().await;
}

/// docs/HTTP.md: a publish the broker does not confirm answers `503 broker-unavailable`
/// ("… or the publish not confirmed") within the publisher's confirm bound
/// (`CONFIRM_TIMEOUT`, 30 s) rather than hanging; once the link is back, the client's retry
/// with the same Idempotency-Key succeeds and the request is applied once.
///
/// The gateway's link is opened with AMQP heartbeats off (`heartbeat=0`): with them on, a
/// stalled link is declared dead after two missed heartbeats (about 20 s with the default
/// 10 s) and the publish fails by that first, which would not exercise the confirm bound.
#[tokio::test]
async fn an_unconfirmed_publish_answers_503_broker_unavailable_within_the_confirm_bound() {
    let app = spawn_app().await;
    let relay = relay_to(&app.services.amqp_url).await;
    let mut amqp_url = url::Url::parse(&relay.through(&app.services.amqp_url)).expect("a URL");
    amqp_url.query_pairs_mut().append_pair("heartbeat", "0");
    let services = ServiceSettings { amqp_url: amqp_url.to_string(), ..app.services.clone() };
    let gateway = spawn_gateway(&services).await;
    let user = "gus";
    let wait = ("prefer", "wait=20");

    let (status, _, body) = parts(gateway.post("/v1/deposits", user, r#"{"amount":"9"}"#, &[wait]).await).await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &json!("approved")), "{body}");

    // The link stays open and takes the publish; no confirm ever comes back.
    relay.stall();
    let key = ("idempotency-key", "never-confirmed");
    let bound = walletq::broker::CONFIRM_TIMEOUT + SLACK;
    let started = tokio::time::Instant::now();
    let response = tokio::time::timeout(bound, gateway.post("/v1/withdrawals", user, r#"{"amount":"2"}"#, &[key]))
        .await
        .unwrap_or_else(|_| panic!("an unconfirmed publish not answered within {bound:?}"));
    let took = started.elapsed();
    let refused = parts(response).await;
    assert_problem(&refused, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable", "Idempotency-Key");
    assert!(header(&refused.1, "retry-after").parse::<u64>().is_ok_and(|s| s > 0), "{:?}", refused.1);
    let by_the_confirm_bound = walletq::broker::CONFIRM_TIMEOUT - Duration::from_secs(1);
    assert!(took >= by_the_confirm_bound, "answered in {took:?}: before the confirm bound, not by it");
    eprintln!("the unconfirmed publish answered 503 in {took:?}");

    // Back: the retry with the same key is applied once, whether or not the held publish
    // reached the queue after the restore.
    relay.restore();
    let deadline = tokio::time::Instant::now() + RESULT_TIMEOUT;
    let body = loop {
        let (status, _, body) =
            parts(gateway.post("/v1/withdrawals", user, r#"{"amount":"2"}"#, &[key, wait]).await).await;
        if status == StatusCode::OK {
            break body;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "no confirmed publish after the restore: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((&body["status"], &body["balance"]), (&json!("approved"), &json!("7.00")), "{body}");
    assert_eq!(balance(&gateway, user).await, "7.00", "applied once");

    gateway.stop().await;
    drop(relay);
    app.cleanup().await;
}

#[tokio::test]
async fn a_refused_broker_login_is_said_as_such_not_as_an_outage() {
    let app = spawn_app().await;
    let mut wrong = url::Url::parse(&app.services.amqp_url).expect("AMQP URL");
    wrong.set_password(Some("not-the-password")).expect("password");
    let services = ServiceSettings { amqp_url: wrong.to_string(), ..app.services.clone() };
    let gateway = spawn_gateway(&services).await;
    let refused = parts(gateway.post("/v1/deposits", "gina", r#"{"amount":"5"}"#, &[]).await).await;
    assert_problem(&refused, StatusCode::SERVICE_UNAVAILABLE, "broker-unavailable", "refused the gateway's login");
    let detail = refused.2["detail"].as_str().unwrap_or_default();
    assert!(!detail.contains("not-the-password") && !detail.contains("unreachable"), "{detail}");
    let not_ready = parts(gateway.get("/readyz", "gina").await).await;
    assert_problem(&not_ready, StatusCode::SERVICE_UNAVAILABLE, "not-ready", "refused the gateway's login");
    gateway.stop().await;
    app.cleanup().await;
}
