//! Malformed input: a clear rejection, dead-lettered intact, and the partition keeps flowing.

use walletq::domain::{Op, Reason, Status};

use crate::support::{TestApp, request, spawn_app};

#[tokio::test]
async fn malformed_messages_are_rejected_dead_lettered_and_never_block() {
    let mut app = spawn_app().await;
    let huge = format!(
        r#"{{"request_id":"big","user_id":"frank","op":"deposit","amount":"1","pad":"{}"}}"#,
        "x".repeat(70_000)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "not a JSON object"),
        (br#"{"request_id":"m1","user_id":"frank","op":"deposit"}"#.to_vec(), "missing field `amount`"),
        (br#"{"request_id":"m2","user_id":"frank","op":"borrow","amount":"1"}"#.to_vec(), "`op` must be"),
        (br#"{"request_id":"m3","user_id":"frank","op":"deposit","amount":"-1"}"#.to_vec(), "plain decimal"),
        (
            br#"{"request_id":"m4","user_id":"frank","op":"deposit","amount":1.005}"#.to_vec(),
            "more than 2 decimal places",
        ),
        (br#"{"request_id":"m5","user_id":"frank","op":"deposit","amount":"1000000000.01"}"#.to_vec(), "at most"),
        (br#"{"request_id":"m6","user_id":"frank","op":"deposit","amount":"0"}"#.to_vec(), "greater than 0"),
        (br#"{"request_id":"m 7","user_id":"frank","op":"deposit","amount":"1"}"#.to_vec(), "`request_id` must be"),
        (huge.into_bytes(), "over the 65536-byte limit"),
    ];
    let reply = app.reply_queue.clone();
    for (body, _) in &cases {
        app.publish_raw("frank", body, Some(&reply)).await;
    }
    // Same routing key, so the same partition: it must keep flowing after the bad ones.
    app.publish_all(&[request("after-the-bad-ones", "frank", Op::Deposit, 500)]).await;

    let results = app.next_results(cases.len() + 1).await;
    for ((_, result), (_, needle)) in results.iter().zip(&cases) {
        assert_eq!(result.status, Status::Rejected);
        assert_eq!(result.reason, Some(Reason::InvalidRequest));
        assert_eq!(result.balance, None);
        let detail = result.detail.as_deref().unwrap_or_default();
        assert!(detail.contains(needle), "detail {detail:?} should mention {needle:?}");
    }
    assert_eq!(results[1].1.request_id.as_ref().map(|r| r.as_str()), Some("m1"));
    let last = &results[cases.len()].1;
    assert_eq!(last.status, Status::Approved, "the partition kept flowing");

    // Dead-lettered with the original bodies, in order.
    let mut dead = app.consume(&app.names.dead_queue()).await;
    for (body, _) in &cases {
        let delivery = TestApp::next_delivery(&mut dead).await;
        assert_eq!(&delivery.data, body, "dead letter keeps the original body");
    }
    // Invalid requests are not stored: a corrected request may reuse the id.
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 1);
    app.publish_all(&[request("m1", "frank", Op::Deposit, 100)]).await;
    let corrected = &app.next_results(1).await[0].1;
    assert_eq!(corrected.status, Status::Approved);
    assert!(!corrected.replayed);
    app.cleanup().await;
}

#[tokio::test]
async fn results_without_reply_to_go_to_the_results_queue() {
    let app = spawn_app().await;
    app.publish_raw("gina", br#"{"request_id":"no-reply","user_id":"gina","op":"deposit","amount":"2"}"#, None).await;
    let mut results = app.consume(&app.names.results_queue()).await;
    let delivery = TestApp::next_delivery(&mut results).await;
    let result: walletq::domain::RequestResult = serde_json::from_slice(&delivery.data).expect("result");
    assert_eq!(result.status, Status::Approved);
    // No correlation_id nor message_id on the request: the request_id stands in.
    assert_eq!(delivery.properties.correlation_id().as_ref().map(|c| c.as_str()), Some("no-reply"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_vanished_reply_queue_never_stalls_the_worker() {
    let mut app = spawn_app().await;
    let body = br#"{"request_id":"orphan","user_id":"hank","op":"deposit","amount":"3"}"#;
    app.publish_raw("hank", body, Some("walletq-test-no-such-queue")).await;
    app.publish_all(&[request("after-orphan", "hank", Op::Deposit, 100)]).await;
    let result = &app.next_results(1).await[0].1;
    assert_eq!(result.request_id.as_ref().map(|r| r.as_str()), Some("after-orphan"));
    assert_eq!(result.balance.map(|b| b.to_string()), Some("4.00".into()));
    assert_eq!(app.count("SELECT count(*) FROM requests WHERE request_id = 'orphan'").await, 1);
    app.cleanup().await;
}
