//! The rows of ARCHITECTURE.md's "Crash between any two steps" table, one test each, with
//! real worker processes. A worker's link to one service goes through the fault relay
//! (`fault.rs`), so a test can slow, stall or cut it at a chosen moment, and SIGKILL or
//! SIGSTOP the process there. Each test awaits conditions (what is stored, what arrived on
//! the reply queue, what is in Redis, what the worker logged), never a fixed sleep.

use std::process::Stdio;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Op, Request, RequestResult, Status};

use crate::fault::Relay;
use crate::support::{
    SequentialModel, TestApp, assert_matches_model, eventually, request, spawn_app_with, spawn_worker_process,
    spawn_worker_process_logging, spawn_worker_process_with,
};

/// The lock TTL `spawn_worker_process_with` gives workers unless a test overrides it.
const TEST_LOCK_TTL: Duration = Duration::from_millis(2_000);
/// Longest wait for anything a test awaits.
const WITHIN: Duration = Duration::from_secs(60);

/// A relay to the `host:port` of `url`.
async fn relay_to(url: &str) -> Relay {
    let url = url::Url::parse(url).expect("a URL");
    Relay::start(&format!("{}:{}", url.host_str().expect("a host"), url.port_or_known_default().expect("a port"))).await
}

async fn app(partitions: u16) -> TestApp {
    spawn_app_with(TopologySettings { partitions, queue_type: QueueType::Quorum }, false).await
}

async fn stored_count(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM requests").await
}

/// Waits until `at_least` requests are stored (committed), polling every 50 ms.
async fn until_stored(app: &TestApp, at_least: i64) {
    eventually(&format!("{at_least} requests stored"), WITHIN, || async {
        (stored_count(app).await >= at_least).then_some(())
    })
    .await;
}

async fn redis(app: &TestApp) -> redis::aio::MultiplexedConnection {
    redis::Client::open(app.services.redis_url.as_str())
        .expect("Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be reachable")
}

/// The remaining TTL of `user`'s lock key (`<namespace>:lock:<user>`, src/lock.rs), in ms;
/// `None` when there is no lock.
async fn lock_pttl(app: &TestApp, user: &str) -> Option<i64> {
    let mut redis = redis(app).await;
    let key = format!("{}:lock:{user}", app.names.namespace());
    let pttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut redis).await.expect("PTTL");
    (pttl >= 0).then_some(pttl)
}

/// (ready messages, consumers) of `queue`, as the broker counts them.
async fn queue_state(app: &TestApp, queue: &str) -> (u32, u32) {
    let channel = app.connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let queue = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.expect("queue");
    let _ = channel.close(200, "OK".into()).await;
    (queue.message_count(), queue.consumer_count())
}

/// Exactly one stored result per request, matching the sequential model in order; one
/// ledger entry per approval; the ledger sums equal the balances; the audit is clean.
async fn assert_applied_once(app: &TestApp, requests: &[Request]) {
    let stored = app.stored_results().await;
    assert_eq!(stored.len(), requests.len(), "one stored result per request: {stored:?}");
    let mut model = SequentialModel::default();
    let mut approvals = 0;
    for r in requests {
        let expected = model.apply(r);
        approvals += i64::from(expected.0 == Status::Approved);
        assert_matches_model(&stored[r.request_id.as_str()], expected);
    }
    assert_eq!(app.count("SELECT count(*) FROM ledger_entries").await, approvals, "one ledger entry per approval");
    for user in requests.iter().map(|r| r.user_id.as_str()) {
        app.assert_ledger_matches_balance(user).await;
        let expected = model.balance(user).map(|cents| walletq::domain::Money::from_cents(cents).expect("money"));
        assert_eq!(app.balance(user).await, expected, "balance of {user}");
    }
    let report = walletq::ledger::audit::audit(&app.pool).await.expect("audit");
    assert!(report.is_clean(), "audit: {report:?}");
}

/// A replay carries the stored result unchanged, `processed_at` included, with
/// `replayed: true`.
fn assert_replay_of(reply: &RequestResult, stored: &RequestResult) {
    assert!(reply.replayed, "a replay, not a second application: {reply:?}");
    assert_eq!(reply.processed_at, stored.processed_at, "the original processed_at");
    let mut unflagged = reply.clone();
    unflagged.replayed = false;
    assert_eq!(&unflagged, stored, "the replay is the stored result");
}

/// Row "after `COMMIT`, before any result is published": the worker's AMQP link is slow
/// (every chunk held `DELAY_MS`), so its result is still on the way when the commit is
/// visible; it is killed there, and its link cut so the bytes in the relay never arrive.
/// A fresh worker gets the redelivery and answers it with the stored result, as a replay.
#[tokio::test]
async fn crash_after_commit_before_any_result_is_answered_by_a_replay_of_the_stored_result() {
    const DELAY_MS: u64 = 1_500;
    let mut app = app(2).await;
    let amqp = relay_to(&app.services.amqp_url).await;
    let amqp_url = amqp.through(&app.services.amqp_url);
    let mut first = spawn_worker_process_with(&app, &[("AMQP_URL", &amqp_url)]);
    let requests = [request("r1-dep", "r1", Op::Deposit, 10_000), request("r1-wd", "r1", Op::Withdraw, 2_500)];
    app.publish_all(&requests[..1]).await;
    let warm = app.next_results(1).await;
    assert_eq!(warm[0].1.status, Status::Approved, "the worker serves the user");

    amqp.delay(DELAY_MS);
    app.publish_all(&requests[1..]).await;
    until_stored(&app, 2).await;
    assert!(app.try_next_result().is_none(), "no result published yet: the crash point is before any");
    let started = Instant::now();
    first.kill();
    // The relay may still hold the worker's publish: a dead process's bytes never arrive.
    amqp.cut();

    let fresh = spawn_worker_process(&app);
    let stored = app.stored_results().await;
    let reply = app.next_results(1).await.remove(0).1;
    assert_eq!(reply.request_id.as_ref().map(|id| id.as_str()), Some("r1-wd"));
    assert_replay_of(&reply, &stored["r1-wd"]);
    println!("crash after COMMIT: the replay arrived {:?} after the kill", started.elapsed());
    // Another copy may follow (the router's ingress ack travelled the same slow link, so it
    // may forward the request again): whatever it is, nothing is applied twice.
    assert_applied_once(&app, &requests).await;

    drop(fresh);
    drop(first);
    app.cleanup().await;
}

/// Row "after some or all results were published, before the ack": the worker's AMQP link
/// is slow, so the result reaches the reply queue a whole round trip before the worker can
/// have seen its confirm and acked. The worker is killed as the result arrives (and its
/// link cut, so no late ack arrives): the redelivered copy is answered with a replay
/// equal to the stored result.
#[tokio::test]
async fn crash_after_the_results_before_the_ack_redelivers_and_replays_the_stored_result() {
    const DELAY_MS: u64 = 1_500;
    let mut app = app(2).await;
    let amqp = relay_to(&app.services.amqp_url).await;
    let amqp_url = amqp.through(&app.services.amqp_url);
    let mut first = spawn_worker_process_with(&app, &[("AMQP_URL", &amqp_url)]);
    let requests = [request("r4-dep", "r4", Op::Deposit, 10_000), request("r4-wd", "r4", Op::Withdraw, 2_500)];
    app.publish_all(&requests[..1]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved, "the worker serves the user");

    amqp.delay(DELAY_MS);
    app.publish_all(&requests[1..]).await;
    let original = app.next_results(1).await.remove(0).1;
    first.kill();
    amqp.cut();
    assert!(!original.replayed, "the first answer is the application: {original:?}");
    let stored = app.stored_results().await;
    assert_eq!(&original, &stored["r4-wd"], "the published result is the stored one");

    let started = Instant::now();
    let fresh = spawn_worker_process(&app);
    let reply = app.next_results(1).await.remove(0).1;
    assert_eq!(reply.request_id.as_ref().map(|id| id.as_str()), Some("r4-wd"), "the unacked request came back");
    assert_replay_of(&reply, &stored["r4-wd"]);
    println!("crash before the ack: the replay arrived {:?} after the kill", started.elapsed());
    assert_applied_once(&app, &requests).await;

    drop(fresh);
    drop(first);
    app.cleanup().await;
}

/// Row "after the ack, before the locks are released". The worker's lock TTL is long (12 s)
/// so the wait is measurable; its PostgreSQL link is slow (each chunk held `DELAY_MS`), so
/// the commit is visible before the worker hears of it, and the test stalls its Redis link
/// then: the worker publishes, acks, and its release is stuck. It is killed once it logged
/// the release (after the ack, src/worker/batch.rs). Nothing is redelivered, and the next
/// request for the user, served by a fresh worker, is applied once the old lock expired.
#[tokio::test]
async fn crash_after_the_ack_before_the_release_redelivers_nothing_and_only_delays_the_user() {
    const DELAY_MS: u64 = 500;
    const OLD_TTL: Duration = Duration::from_secs(12);
    const MARGIN: Duration = Duration::from_secs(3);
    let mut app = app(1).await;
    let (database, redis_relay) = (relay_to(&app.services.database_url).await, relay_to(&app.services.redis_url).await);
    let (database_url, redis_url) =
        (database.through(&app.services.database_url), redis_relay.through(&app.services.redis_url));
    let log_path = std::env::temp_dir().join(format!("walletq-{}-worker.log", app.names.namespace()));
    let log = std::fs::File::create(&log_path).expect("a log file");
    let ttl = OLD_TTL.as_millis().to_string();
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("REDIS_URL", redis_url.as_str()),
        ("WALLETQ_LOCK_TTL_MS", ttl.as_str()),
        ("RUST_LOG", "warn,walletq::worker::batch=debug"),
    ];
    let mut first = spawn_worker_process_logging(&app, &env, Stdio::from(log));
    let requests = [
        request("r3-dep", "r3", Op::Deposit, 10_000),
        request("r3-wd", "r3", Op::Withdraw, 2_500),
        request("r3-next", "r3", Op::Withdraw, 1_000),
    ];
    app.publish_all(&requests[..1]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved, "the worker serves the user");
    // The warm-up batch's release is logged after its ack, so maybe after its result arrived.
    eventually("the warm-up batch's release is logged", WITHIN, || async {
        (releases_logged(&log_path) == 1).then_some(())
    })
    .await;

    database.delay(DELAY_MS);
    app.publish_all(&requests[1..2]).await;
    until_stored(&app, 2).await;
    redis_relay.stall();
    let applied = app.next_results(1).await.remove(0).1;
    assert!(!applied.replayed && applied.status == Status::Approved, "{applied:?}");
    eventually("the worker logs the release after its ack", WITHIN, || async {
        (releases_logged(&log_path) == 2).then_some(())
    })
    .await;
    first.kill();
    redis_relay.cut();
    let killed = Instant::now();
    let remaining = lock_pttl(&app, "r3").await.expect("the crashed worker's lock was never released");
    println!("crash after the ack: the old lock has {remaining} ms left");

    // Nothing is redelivered: once the broker dropped the dead consumer, the queue is empty.
    let queue = app.names.partition_queue(0);
    eventually("the broker drops the killed consumer", WITHIN, || async {
        (queue_state(&app, &queue).await.1 == 0).then_some(())
    })
    .await;
    assert_eq!(queue_state(&app, &queue).await.0, 0, "the acked request is not redelivered");

    let fresh = spawn_worker_process(&app);
    app.publish_all(&requests[2..]).await;
    let next = app.next_results(1).await.remove(0).1;
    let waited = killed.elapsed();
    println!("the next request waited {waited:?} after the crash (old lock TTL {OLD_TTL:?}, {remaining} ms left)");
    assert_eq!(next.request_id.as_ref().map(|id| id.as_str()), Some("r3-next"), "no replay came before it");
    assert!(!next.replayed);
    assert!(waited >= Duration::from_millis(remaining as u64), "not before the old lock expired: {waited:?}");
    assert!(waited <= OLD_TTL + MARGIN, "at most the lock TTL and a margin: {waited:?}");
    assert_applied_once(&app, &requests).await;

    drop(fresh);
    drop(first);
    let _ = std::fs::remove_file(&log_path);
    app.cleanup().await;
}

/// Lines of the worker's log that announce a release of user locks.
fn releases_logged(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().matches("releasing its user locks").count()
}

/// Row "locks kept until the batch is acked" (issue 16, defect 2): with the worker's AMQP
/// link slow enough that its result reaches the broker more than a lock TTL after the
/// commit, the user's lock key exists the whole time the result is unpublished; before the
/// fix the keeper stopped when the transaction returned and the lock expired meanwhile.
#[tokio::test]
async fn the_user_lock_is_kept_while_the_results_are_published() {
    const DELAY_MS: u64 = 3_500;
    let mut app = app(2).await;
    let amqp = relay_to(&app.services.amqp_url).await;
    let amqp_url = amqp.through(&app.services.amqp_url);
    let worker = spawn_worker_process_with(&app, &[("AMQP_URL", &amqp_url)]);
    let requests = [request("r5-dep", "r5", Op::Deposit, 10_000), request("r5-wd", "r5", Op::Withdraw, 2_500)];
    app.publish_all(&requests[..1]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved, "the worker serves the user");

    amqp.delay(DELAY_MS);
    app.publish_all(&requests[1..]).await;
    until_stored(&app, 2).await;
    let committed = Instant::now();
    // Watched every 50 ms until the result arrives: the lock must be there at each look.
    let reply = loop {
        if let Some(result) = app.try_next_result() {
            break result;
        }
        let held = lock_pttl(&app, "r5").await;
        assert!(held.is_some(), "the lock expired {:?} after the commit, its result unpublished", committed.elapsed());
        assert!(committed.elapsed() < WITHIN, "no result within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let unpublished = committed.elapsed();
    println!("the result arrived {unpublished:?} after the commit; the lock was held throughout");
    assert!(unpublished > TEST_LOCK_TTL, "the window outlasted a lock TTL: {unpublished:?}");
    assert_eq!(reply.request_id.as_ref().map(|id| id.as_str()), Some("r5-wd"));
    assert!(!reply.replayed);
    eventually("the lock released after the ack", WITHIN, || async {
        lock_pttl(&app, "r5").await.is_none().then_some(())
    })
    .await;
    assert_applied_once(&app, &requests).await;

    drop(worker);
    app.cleanup().await;
}

/// Row "a stalled worker whose locks expired mid-transaction", end to end. Worker A's
/// PostgreSQL link is slow (each chunk held `DELAY_MS`): once its `BEGIN` has reached the
/// server, its fence statement is at least a round trip away, and the test stalls the link
/// there and freezes A (SIGSTOP: its lock keeper stops, the locks expire after the 2 s TTL).
/// A's AMQP link (a second relay) is cut, so the broker returns A's unacked delivery; worker
/// B takes the partition, the locks with newer fencing tokens, and applies the request.
/// Then A's link is restored and A thawed: its fence statement meets B's newer fence and is
/// refused (`LedgerError::StaleFence`, seen in A's log). A is stopped after acquiring its
/// connection, not before: a pool acquire (5 s bound) would time out as A thaws, since the
/// clock runs while a process is stopped; the transaction's own bound is 45 s.
#[tokio::test]
async fn a_stalled_worker_whose_lock_expired_is_refused_by_the_fence_after_a_newer_holder_wrote() {
    const DELAY_MS: u64 = 1_500;
    let mut app = app(2).await;
    let (database, amqp) = (relay_to(&app.services.database_url).await, relay_to(&app.services.amqp_url).await);
    let (database_url, amqp_url) = (database.through(&app.services.database_url), amqp.through(&app.services.amqp_url));
    let log_path = std::env::temp_dir().join(format!("walletq-{}-stalled.log", app.names.namespace()));
    let log = std::fs::File::create(&log_path).expect("a log file");
    let env = [("DATABASE_URL", database_url.as_str()), ("AMQP_URL", amqp_url.as_str())];
    let stalled = spawn_worker_process_logging(&app, &env, Stdio::from(log));
    let requests = [request("r2-dep", "r2", Op::Deposit, 10_000), request("r2-wd", "r2", Op::Withdraw, 2_500)];
    app.publish_all(&requests[..1]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved, "A serves the user");

    database.delay(DELAY_MS);
    app.publish_all(&requests[1..]).await;
    let a_lock_ms = eventually("A takes the lock", WITHIN, || async { lock_pttl(&app, "r2").await }).await;
    let began = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state = 'idle in transaction' AND query = 'BEGIN'";
    eventually("A's BEGIN reaches the server", WITHIN, || async { (app.count(began).await == 1).then_some(()) }).await;
    database.stall();
    stalled.pause();
    assert_eq!(app.count(began).await, 1, "A's fence statement has not reached the server");
    assert_eq!(stored_count(&app).await, 1, "nothing of the second request committed");
    println!("A froze mid-transaction holding the lock ({a_lock_ms} ms left)");
    amqp.cut();

    let newer = spawn_worker_process(&app);
    let applied = app.next_results(1).await.remove(0).1;
    assert_eq!(applied.request_id.as_ref().map(|id| id.as_str()), Some("r2-wd"));
    assert!(!applied.replayed, "B applies the request: {applied:?}");
    let stored = app.stored_results().await;
    assert_eq!(&applied, &stored["r2-wd"]);

    database.restore();
    stalled.resume();
    eventually("A's write is refused by the fence", WITHIN, || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains("fencing token for user r2 is older than one already written").then_some(())
    })
    .await;
    assert_applied_once(&app, &requests).await;
    assert_eq!(&app.stored_results().await["r2-wd"], &applied, "B's result is the one stored");
    // Any later copy of the request (none is expected: A never acked, B did) is a replay.
    if let Some(copy) = app.try_next_result() {
        assert_replay_of(&copy, &applied);
    }

    drop(newer);
    drop(stalled);
    let _ = std::fs::remove_file(&log_path);
    app.cleanup().await;
}
