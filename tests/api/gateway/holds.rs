//! Holds through the gateway: place, capture, read, release, replay, refuse.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::{TestGateway, assert_problem, parts, spawn_gateway};
use crate::support::spawn_app;

const WAIT: (&str, &str) = ("prefer", "wait=20");

/// POSTs `body` to `path` for `user` with an Idempotency-Key, waiting for the result (200).
async fn waited(gateway: &TestGateway, path: &str, user: &str, body: &str, key: &str) -> Value {
    let (status, _, result) = parts(gateway.post(path, user, body, &[("idempotency-key", key), WAIT]).await).await;
    assert_eq!(status, StatusCode::OK, "POST {path}: {result}");
    result
}

async fn hold_state(gateway: &TestGateway, hold_id: &str, user: &str) -> Value {
    let (status, _, hold) = parts(gateway.get(&format!("/v1/holds/{hold_id}"), user).await).await;
    assert_eq!(status, StatusCode::OK, "{hold}");
    assert_eq!(hold["hold_id"], hold_id);
    hold
}

fn seconds_between(from: &Value, to: &Value) -> i64 {
    let at = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a timestamp")).expect("RFC 3339");
    (at(to) - at(from)).num_seconds()
}

#[tokio::test]
async fn a_hold_is_placed_captured_in_part_read_and_replayed_through_http() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    waited(&gateway, "/v1/deposits", "hana", r#"{"amount":"100"}"#, "topup-1").await;

    let placed = waited(&gateway, "/v1/holds", "hana", r#"{"amount":"40","timeout_s":600}"#, "payout-1").await;
    assert_eq!((&placed["status"], &placed["op"]), (&json!("approved"), &json!("hold")), "{placed}");
    let hold_id = placed["request_id"].as_str().expect("request_id").to_owned();
    assert_eq!(placed["hold_id"], hold_id, "a hold's id is its request id");
    assert_eq!(
        (&placed["amount"], &placed["balance"], &placed["held"], &placed["available"]),
        (&json!("40.00"), &json!("100.00"), &json!("40.00"), &json!("60.00"))
    );
    assert_eq!(seconds_between(&placed["processed_at"], &placed["expires_at"]), 600, "{placed}");

    let (status, _, wallet) = parts(gateway.get("/v1/wallet", "hana").await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((&wallet["held"], &wallet["available"]), (&json!("40.00"), &json!("60.00")), "{wallet}");
    assert_eq!(wallet["holds"], json!([{"hold_id": hold_id, "amount": "40.00", "expires_at": placed["expires_at"]}]));
    let active = hold_state(&gateway, &hold_id, "hana").await;
    assert_eq!((&active["state"], &active["amount"]), (&json!("active"), &json!("40.00")), "{active}");
    assert!(active.get("captured").is_none() && active.get("closed_at").is_none(), "{active}");

    // Another user can neither read the hold nor capture or release it: 404, as for a made-up id.
    for (response, what) in [
        (gateway.get(&format!("/v1/holds/{hold_id}"), "ivan").await, "GET as ivan"),
        (gateway.post(&format!("/v1/holds/{hold_id}/capture"), "ivan", "{}", &[WAIT]).await, "capture as ivan"),
        (gateway.post(&format!("/v1/holds/{hold_id}/release"), "ivan", "", &[WAIT]).await, "release as ivan"),
        (gateway.get("/v1/holds/payout-1", "hana").await, "an id the gateway never minted"),
    ] {
        let refused = parts(response).await;
        assert_problem(&refused, StatusCode::NOT_FOUND, "not-found", "no hold");
        assert!(!refused.2.to_string().contains("40.00"), "{what}: {}", refused.2);
    }

    let capture = format!("/v1/holds/{hold_id}/capture");
    let captured = waited(&gateway, &capture, "hana", r#"{"amount":"25"}"#, "payout-1:capture").await;
    assert_eq!((&captured["status"], &captured["op"]), (&json!("approved"), &json!("capture")), "{captured}");
    assert_eq!((&captured["hold_id"], &captured["amount"]), (&json!(hold_id), &json!("25.00")));
    assert_eq!(
        (&captured["balance"], &captured["held"], &captured["available"]),
        (&json!("75.00"), &json!("0.00"), &json!("75.00"))
    );
    let closed = hold_state(&gateway, &hold_id, "hana").await;
    assert_eq!((&closed["state"], &closed["captured"]), (&json!("captured"), &json!("25.00")), "{closed}");
    assert_eq!(closed["closed_by"], captured["request_id"]);

    // The same keys replay the same requests: nothing is held or taken twice.
    let again = waited(&gateway, "/v1/holds", "hana", r#"{"amount":"40.00","timeout_s":600}"#, "payout-1").await;
    assert_eq!((&again["request_id"], &again["replayed"]), (&json!(hold_id), &json!(true)), "{again}");
    assert_eq!(again["expires_at"], placed["expires_at"]);
    let recaptured = waited(&gateway, &capture, "hana", r#"{"amount":"25.00"}"#, "payout-1:capture").await;
    assert_eq!((&recaptured["request_id"], &recaptured["replayed"]), (&captured["request_id"], &json!(true)));
    // A second capture under another key is refused: one capture per hold.
    let twice = waited(&gateway, &capture, "hana", "", "payout-1:capture-2").await;
    assert_eq!((&twice["status"], &twice["reason"]), (&json!("rejected"), &json!("hold_closed")), "{twice}");
    // A key repeated with another body is not answered from the stored result: another
    // timeout, or a capture of another hold, is a conflict, and nothing moves.
    let longer = waited(&gateway, "/v1/holds", "hana", r#"{"amount":"40","timeout_s":601}"#, "payout-1").await;
    assert_eq!((&longer["reason"], &longer["replayed"]), (&json!("conflict"), &json!(false)), "{longer}");
    let other = waited(&gateway, "/v1/holds", "hana", r#"{"amount":"5"}"#, "payout-1b").await;
    let other_id = other["hold_id"].as_str().expect("hold_id").to_owned();
    let misnamed =
        waited(&gateway, &format!("/v1/holds/{other_id}/capture"), "hana", r#"{"amount":"25"}"#, "payout-1:capture")
            .await;
    assert_eq!((&misnamed["reason"], &misnamed["replayed"]), (&json!("conflict"), &json!(false)), "{misnamed}");
    assert_eq!(hold_state(&gateway, &other_id, "hana").await["state"], "active");
    waited(&gateway, &format!("/v1/holds/{other_id}/release"), "hana", "", "payout-1b:release").await;

    let (_, _, wallet) = parts(gateway.get("/v1/wallet", "hana").await).await;
    assert_eq!((&wallet["balance"], &wallet["held"], &wallet["holds"]), (&json!("75.00"), &json!("0.00"), &json!([])));
    app.assert_ledger_matches_balance("hana").await;
    let debits = app.count("SELECT count(*) FROM ledger_entries WHERE user_id = 'hana' AND delta < 0").await;
    assert_eq!(debits, 1, "one capture, one ledger entry");

    gateway.stop().await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_hold_is_released_without_a_body_and_bad_bodies_are_problems() {
    let app = spawn_app().await;
    let gateway = spawn_gateway(&app.services).await;
    waited(&gateway, "/v1/deposits", "jun", r#"{"amount":"50"}"#, "topup-1").await;

    let placed = waited(&gateway, "/v1/holds", "jun", r#"{"amount":"30"}"#, "payout-2").await;
    let hold_id = placed["hold_id"].as_str().expect("hold_id").to_owned();
    assert_eq!(seconds_between(&placed["processed_at"], &placed["expires_at"]), 900, "the default timeout");
    let too_much = waited(&gateway, "/v1/holds", "jun", r#"{"amount":"20.01"}"#, "payout-3").await;
    assert_eq!((&too_much["reason"], &too_much["available"]), (&json!("insufficient_funds"), &json!("20.00")));
    let (status, _, _) =
        parts(gateway.get(&format!("/v1/holds/{}", too_much["request_id"].as_str().expect("id")), "jun").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused hold is no hold");

    // No body and no Content-Type at all.
    let release = gateway.url(&format!("/v1/holds/{hold_id}/release"));
    let response = gateway
        .http
        .post(&release)
        .bearer_auth(gateway.token("jun"))
        .header("idempotency-key", "payout-2:release")
        .header("prefer", "wait=20")
        .send()
        .await
        .expect("POST");
    let (status, _, released) = parts(response).await;
    assert_eq!(status, StatusCode::OK, "{released}");
    assert_eq!((&released["status"], &released["op"]), (&json!("approved"), &json!("release")), "{released}");
    assert_eq!((&released["amount"], &released["available"]), (&json!("30.00"), &json!("50.00")));
    let closed = hold_state(&gateway, &hold_id, "jun").await;
    assert_eq!((&closed["state"], &closed["closed_by"]), (&json!("released"), &released["request_id"]), "{closed}");
    let replay = waited(&gateway, &format!("/v1/holds/{hold_id}/release"), "jun", "{}", "payout-2:release").await;
    assert_eq!((&replay["request_id"], &replay["replayed"]), (&released["request_id"], &json!(true)), "{replay}");
    let late = waited(&gateway, &format!("/v1/holds/{hold_id}/capture"), "jun", "{}", "payout-2:capture").await;
    assert_eq!(late["reason"], "hold_closed", "{late}");

    let capture = format!("/v1/holds/{hold_id}/capture");
    let release = format!("/v1/holds/{hold_id}/release");
    for (path, body, status, kind, needle) in [
        (
            "/v1/holds",
            r#"{"amount":"1","timeout_s":0}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-timeout",
            "from 1 to",
        ),
        (
            "/v1/holds",
            r#"{"amount":"1","timeout_s":"60"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-timeout",
            "got \"60\"",
        ),
        ("/v1/holds", r#"{"amount":"0"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "greater than 0"),
        ("/v1/holds", r#"{"amount":"1","user_id":"x"}"#, StatusCode::BAD_REQUEST, "invalid-body", "unknown field"),
        ("/v1/holds", "", StatusCode::BAD_REQUEST, "invalid-body", "EOF"),
        (&capture, r#"{"amount":"1.005"}"#, StatusCode::UNPROCESSABLE_ENTITY, "invalid-amount", "2 decimal places"),
        (&capture, r#"{"hold_id":"x"}"#, StatusCode::BAD_REQUEST, "invalid-body", "unknown field"),
        (&capture, "[]", StatusCode::BAD_REQUEST, "invalid-body", "not an object"),
        (&release, r#"{"amount":"1"}"#, StatusCode::BAD_REQUEST, "invalid-body", "empty or {}"),
    ] {
        let response = gateway.post(path, "jun", body, &[("idempotency-key", "bad"), WAIT]).await;
        assert_problem(&parts(response).await, status, kind, needle);
    }
    let unknown_requests = app.count("SELECT count(*) FROM requests WHERE user_id = 'jun'").await;
    assert_eq!(unknown_requests, 5, "deposit, two holds, release, late capture: no bad body reached the ledger");

    gateway.stop().await;
    app.cleanup().await;
}
