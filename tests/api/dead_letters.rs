//! `walletq dead`: a dead letter is listed, shown, requeued and applied; a requeue that is
//! interrupted before the broker's confirm loses nothing.

use std::process::{Command, Output};

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use walletq::broker::declare_topology;
use walletq::domain::Status;

use crate::support::{RESULT_TIMEOUT, TestApp, eventually, spawn_app};

/// Runs the `walletq` binary on the app's services and namespace.
fn walletq(app: &TestApp, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walletq"))
        .args(args)
        .env("DATABASE_URL", &app.services.database_url)
        .env("AMQP_URL", &app.services.amqp_url)
        .env("REDIS_URL", &app.services.redis_url)
        .env("WALLETQ_NAMESPACE", &app.services.namespace)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the walletq binary")
}

fn json_of(output: &Output) -> Value {
    assert!(output.status.success(), "walletq failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// Waits until `<ns>.dead` holds `depth` ready messages: messages a `walletq dead` process
/// fetched and did not ack come back when its connection closes, which a quorum queue
/// applies a moment after the process has exited.
async fn until_dead_depth(app: &TestApp, depth: u32, why: &str) {
    eventually(why, RESULT_TIMEOUT, || async { (dead_depth(app).await == depth).then_some(()) }).await;
}

async fn dead_depth(app: &TestApp) -> u32 {
    let channel = app.connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let queue = channel.queue_declare(app.names.dead_queue().as_str().into(), passive, FieldTable::default()).await;
    let depth = queue.expect("the dead-letter queue").message_count();
    let _ = channel.close(200, "OK".into()).await;
    depth
}

#[tokio::test]
async fn a_dead_letter_is_listed_shown_requeued_and_applied_and_an_interrupted_requeue_loses_nothing() {
    let mut app = spawn_app().await;
    // A valid deposit published with the wrong routing key: refused as misrouted and
    // dead-lettered, not stored. Requeued, it goes by its user and is applied.
    let body = br#"{"request_id":"dl-req-1","user_id":"dl-alice","op":"deposit","amount":"42.00"}"#;
    app.publish_raw("not-dl-alice", body, Some(&app.reply_queue.clone())).await;
    let refused = app.next_results(1).await.remove(0).1;
    assert_eq!(refused.status, Status::Rejected);
    until_dead_depth(&app, 1, "the dead letter").await;

    let listed = json_of(&walletq(&app, &["dead", "list", "--json"]));
    let letters = listed.as_array().expect("a list");
    assert_eq!(letters.len(), 1, "{listed:#}");
    let letter = &letters[0];
    assert_eq!(letter["reason"], "rejected");
    assert_eq!(letter["user_id"], "dl-alice");
    assert_eq!(letter["request_id"], "dl-req-1");
    assert_eq!(
        letter["queue"].as_str().map(|q| q.starts_with(&format!("{}.requests.", app.names.namespace()))),
        Some(true)
    );
    assert!(
        letter["dead_lettered_at"].is_string() && letter["preview"].as_str().is_some_and(|p| p.contains("dl-req-1"))
    );
    assert!(letter["problem"].is_null(), "the body is a valid request: {letter:#}");
    let id = letter["id"].as_str().expect("an id").to_owned();
    let table = walletq(&app, &["dead", "list", "--limit", "5"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&id), "the table lists the id");

    let shown = json_of(&walletq(&app, &["dead", "show", &id]));
    assert_eq!(shown["body"].as_str().map(str::as_bytes), Some(&body[..]));
    until_dead_depth(&app, 1, "list and show leave the queue as it was").await;
    let unknown = walletq(&app, &["dead", "show", "0000000000000000"]);
    assert_eq!(unknown.status.code(), Some(1));

    // Interrupted: with the requests exchange gone the publish is never confirmed (the
    // channel is closed), so the message is not removed from the dead-letter queue.
    let setup = app.connection.create_channel().await.expect("channel");
    setup
        .exchange_delete(app.names.requests_exchange().as_str().into(), ExchangeDeleteOptions::default())
        .await
        .expect("delete the requests exchange");
    let failed = walletq(&app, &["dead", "requeue", &id]);
    assert_eq!(failed.status.code(), Some(1), "{}", String::from_utf8_lossy(&failed.stderr));
    until_dead_depth(&app, 1, "a requeue that was not confirmed leaves the message where it was").await;
    let setup = app.connection.create_channel().await.expect("channel");
    declare_topology(&setup, &app.names, &app.topology).await.expect("topology again");

    let requeued = walletq(&app, &["dead", "requeue", &id]);
    assert!(requeued.status.success(), "{}", String::from_utf8_lossy(&requeued.stderr));
    assert!(String::from_utf8_lossy(&requeued.stdout).contains("dl-req-1"));
    assert_eq!(dead_depth(&app).await, 0, "removed once confirmed");
    let applied = app.next_results(1).await.remove(0).1;
    assert_eq!((applied.status, applied.balance.map(|b| b.to_string())), (Status::Approved, Some("42.00".to_owned())));
    assert_eq!(app.balance("dl-alice").await.map(|b| b.to_string()), Some("42.00".to_owned()));
    let none = walletq(&app, &["dead", "requeue", "--all"]);
    assert!(none.status.success() && none.stdout.is_empty(), "nothing left to requeue");
    assert!(app.try_next_result().is_none(), "one result per requeue");
    app.cleanup().await;
}
