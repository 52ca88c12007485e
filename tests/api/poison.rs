//! Messages the AMQP client cannot decode (properties or headers that are not valid UTF-8,
//! which RabbitMQ accepts and lapin refuses) are set aside in the dead-letter queue within a
//! bounded time; every valid request around them gets its result, in per-user order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use walletq::domain::{Op, Status};

use crate::support::raw_amqp::{Published, RawProperty, RawPublisher, header_table_with_key};
use crate::support::{eventually, request, spawn_app};

/// Longest a valid request may wait behind the poison messages (measured: see docs/LIMITS.md).
const POISON_WAIT_MAX: Duration = Duration::from_secs(20);

/// Bytes that are not UTF-8.
const NOT_UTF8: &[u8] = b"\xff\xfe";

/// The poison shapes: one undecodable property or header each.
fn poison_shapes() -> Vec<(&'static str, RawProperty)> {
    vec![
        ("app_id", RawProperty::AppId(NOT_UTF8.to_vec())),
        ("type", RawProperty::Type(NOT_UTF8.to_vec())),
        ("message_id", RawProperty::MessageId(NOT_UTF8.to_vec())),
        ("correlation_id", RawProperty::CorrelationId(NOT_UTF8.to_vec())),
        ("reply_to", RawProperty::ReplyTo(NOT_UTF8.to_vec())),
        ("content_type", RawProperty::ContentType(NOT_UTF8.to_vec())),
        ("user_id", RawProperty::UserId(NOT_UTF8.to_vec())),
        ("header key", RawProperty::Headers(header_table_with_key(NOT_UTF8))),
    ]
}

/// `host:port`, user and password of an `amqp://` URL.
pub(crate) fn amqp_address(url: &str) -> (String, String, String) {
    let url = url::Url::parse(url).expect("AMQP_URL must be a URL");
    let address = format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(5672));
    let password = url.password().unwrap_or("guest").to_owned();
    (address, url.username().to_owned(), password)
}

#[tokio::test]
async fn poison_messages_are_set_aside_and_valid_requests_flow_in_order() {
    let mut app = spawn_app().await;
    let (address, user, password) = amqp_address(&app.services.amqp_url);
    let mut raw = RawPublisher::connect(&address, &user, &password).await.expect("raw AMQP connection");
    let users: Vec<String> = (0..20).map(|u| format!("pz-{u}")).collect();
    let shapes = poison_shapes();
    let mut published_at: HashMap<String, Instant> = HashMap::new();
    let mut accepted_poison = 0;
    for round in 0..=shapes.len() {
        let batch: Vec<_> =
            users.iter().map(|u| request(format!("{u}-r{round}"), u, Op::Deposit, 100 + round as i64)).collect();
        app.publish_all(&batch).await;
        let now = Instant::now();
        published_at.extend(batch.iter().map(|r| (r.request_id.as_str().to_owned(), now)));
        let Some((shape, property)) = shapes.get(round) else { continue };
        let poison_user = format!("poison-{round}");
        let body =
            format!(r#"{{"request_id":"poison-{round}","user_id":"{poison_user}","op":"deposit","amount":"1.00"}}"#);
        let exchange = app.names.requests_exchange();
        let outcome = raw.publish(&exchange, &poison_user, std::slice::from_ref(property), body.as_bytes()).await;
        match outcome {
            Ok(Published::Acked) => accepted_poison += 1,
            // The broker itself refuses some (user_id must be the connection's user).
            Ok(refused) => {
                eprintln!("poison {shape}: the broker refused it ({refused:?})");
                raw = RawPublisher::connect(&address, &user, &password).await.expect("raw AMQP connection");
            }
            Err(error) => panic!("publishing poison {shape}: {error}"),
        }
    }
    // The router forwards again what it had not acked when a poison message closed its
    // connection: those copies come back as replays, after the first result.
    let expected = users.len() * (shapes.len() + 1);
    let mut waited_max = Duration::ZERO;
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen: HashMap<String, walletq::domain::RequestResult> = HashMap::new();
    while seen.len() < expected {
        for (_, result) in app.next_results(1).await {
            let id = result.request_id.as_ref().expect("request id").as_str().to_owned();
            assert_eq!(result.status, Status::Approved, "{id}");
            if result.replayed {
                let first = seen.get(&id).expect("a replay comes after the first result");
                assert_eq!(first.balance, result.balance, "a replay repeats the stored result of {id}");
                continue;
            }
            assert!(!seen.contains_key(&id), "{id} applied twice");
            waited_max = waited_max.max(published_at[&id].elapsed());
            let user = result.user_id.as_ref().expect("user id").as_str().to_owned();
            order.entry(user).or_default().push(id.clone());
            seen.insert(id, result);
        }
    }
    for (user, ids) in &order {
        let expected: Vec<String> = (0..=shapes.len()).map(|round| format!("{user}-r{round}")).collect();
        assert_eq!(ids, &expected, "results of {user} in the order sent");
    }
    let dead_queue = app.names.dead_queue();
    let channel = app.connection.create_channel().await.expect("channel");
    let dead = eventually("every poison message in the dead-letter queue", POISON_WAIT_MAX, || {
        let (channel, queue) = (channel.clone(), dead_queue.clone());
        async move {
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            let declared = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.ok()?;
            (declared.message_count() as usize >= accepted_poison).then_some(declared.message_count())
        }
    })
    .await;
    eprintln!(
        "poison: {accepted_poison} of {} shapes accepted by the broker, {dead} dead-lettered; valid requests waited at most {waited_max:?}",
        shapes.len()
    );
    assert!(accepted_poison >= 6, "the broker accepts most poison shapes");
    assert_eq!(dead as usize, accepted_poison, "exactly the poison messages are dead-lettered");
    assert!(waited_max < POISON_WAIT_MAX, "valid requests waited {waited_max:?}");
    let stored: i64 = app.count("SELECT count(*) FROM requests WHERE request_id LIKE 'poison-%'").await;
    assert_eq!(stored, 0, "no poison message was applied");
    let report = walletq::ledger::audit::audit(&app.pool).await.expect("audit");
    assert!(report.is_clean(), "audit: {report:?}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_routing_key_that_is_not_the_user_is_refused_and_order_holds() {
    let mut app = spawn_app().await;
    let reply = app.reply_queue.clone();
    // Routing key "q-1", user "m-1": before, applied to m-1 in q-1's partition.
    let misrouted = br#"{"request_id":"misrouted-1","user_id":"m-1","op":"deposit","amount":"5.00"}"#;
    app.publish_raw("q-1", misrouted, Some(&reply)).await;
    // An empty routing key (a producer that forgot it) is refused the same way.
    let empty = br#"{"request_id":"misrouted-2","user_id":"m-1","op":"deposit","amount":"6.00"}"#;
    app.publish_raw("", empty, Some(&reply)).await;
    app.publish_all(&[request("routed-1", "m-1", Op::Deposit, 700)]).await;
    let results = app.results_by_id(3).await;
    for id in ["misrouted-1", "misrouted-2"] {
        let result = &results[id];
        assert_eq!(result.status, Status::Rejected, "{id}");
        assert_eq!(result.reason, Some(walletq::domain::Reason::InvalidRequest), "{id}");
        let detail = result.detail.as_deref().unwrap_or_default();
        assert!(detail.contains("is not the request's user_id \"m-1\""), "{id}: {detail}");
    }
    assert_eq!(results["routed-1"].status, Status::Approved);
    assert_eq!(results["routed-1"].balance.map(|b| b.cents()), Some(700), "only the routed deposit was applied");
    // Not stored, so the ids stay usable with the right routing key.
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reply_to_naming_walletqs_own_queues_never_receives_a_result() {
    let mut app = spawn_app().await;
    let own = [app.names.ingress_queue(), app.names.partition_queue(1), app.names.dead_queue()];
    for (n, queue) in own.iter().enumerate() {
        let body = format!(r#"{{"request_id":"loop-{n}","user_id":"rt-{n}","op":"deposit","amount":"1.00"}}"#);
        app.publish_raw(&format!("rt-{n}"), body.as_bytes(), Some(queue)).await;
    }
    // Their results go to the results queue instead.
    let mut results = app.consume(&app.names.results_queue()).await;
    let mut ids = Vec::new();
    for _ in 0..own.len() {
        let delivery = crate::support::TestApp::next_delivery(&mut results).await;
        let result: walletq::domain::RequestResult = serde_json::from_slice(&delivery.data).expect("result");
        assert_eq!(result.status, Status::Approved);
        ids.push(result.request_id.expect("id").as_str().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["loop-0", "loop-1", "loop-2"]);
    // Nothing was dead-lettered: no result came back through the request queues.
    app.publish_all(&[request("after-loops", "rt-9", Op::Deposit, 100)]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved);
    assert_eq!(app.count("SELECT count(*) FROM requests").await, 4, "every request applied exactly once");
    let channel = app.connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let dead = channel.queue_declare(app.names.dead_queue().as_str().into(), passive, FieldTable::default()).await;
    assert_eq!(dead.expect("dead queue").message_count(), 0, "no result was read as a request and dead-lettered");
    app.cleanup().await;
}
