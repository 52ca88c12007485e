//! A half-open database link must not hold the ledger (and the worker's group-commit slot)
//! until the kernel gives up: `Ledger::apply_batch` ends within its transaction bound with
//! `LedgerError::TimedOut`, drops the connection, and the pool serves the next batch once
//! the link is back. PostgreSQL is reached through the fault relay (`fault.rs`).

use std::time::Duration;

use futures_util::future::join_all;
use sqlx::{Connection, PgConnection};
use walletq::domain::{Money, Op, Status, UserId};
use walletq::ledger::group::GroupCommitter;
use walletq::ledger::{Ledger, LedgerError};

use crate::fault::Relay;
use crate::support::{CleanupOnDrop, drop_database, eventually, isolated_services, request};

/// The transaction bound under test (the default is 45 s).
const BOUND: Duration = Duration::from_secs(2);
/// What the timeout may take beyond its bound (the runtime, the shared machine).
const SLACK: Duration = Duration::from_secs(2);

/// A relay to the PostgreSQL of `database_url`.
async fn relay_to(database_url: &str) -> Relay {
    let target = url::Url::parse(database_url).expect("a URL");
    Relay::start(&format!("{}:{}", target.host_str().expect("a host"), target.port_or_known_default().expect("a port")))
        .await
}

/// Waits until some backend of `direct`'s database waits for a lock.
async fn wait_until_blocked(direct: &Ledger) {
    eventually("the batch waiting for the held fence row", Duration::from_secs(10), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(direct.pool())
        .await
        .expect("pg_stat_activity");
        (waiting > 0).then_some(())
    })
    .await;
}

/// The keepalive idle time of every socket of this process connected to `port` (`None` for
/// a socket without keepalive).
fn keepalive_of_sockets_to(port: u16) -> Vec<Option<Duration>> {
    let entries = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd");
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<std::os::fd::RawFd>().ok()) else {
            continue;
        };
        // SAFETY: only borrowed for the getsockopt calls; a closed descriptor makes them fail.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        if socket.peer_addr().ok().and_then(|peer| peer.as_socket()).map(|peer| peer.port()) == Some(port) {
            let on = socket.keepalive().unwrap_or(false);
            found.push(on.then(|| socket.tcp_keepalive_time().ok()).flatten());
        }
    }
    found
}

#[tokio::test]
async fn a_stalled_database_link_times_the_transaction_out_and_the_pool_recovers() {
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let direct = Ledger::connect(&services.database_url, 1, None).await.expect("PostgreSQL must be reachable");
    let relay = relay_to(&services.database_url).await;
    let ledger = Ledger::connect(&relay.through(&services.database_url), 1, None)
        .await
        .expect("PostgreSQL through the relay")
        .with_transaction_timeout(BOUND);
    let keepalive = keepalive_of_sockets_to(relay.address().port());
    assert!(!keepalive.is_empty(), "the ledger's connection goes through the relay");
    assert!(
        keepalive.iter().all(|idle| *idle == Some(Duration::from_millis(walletq::ledger::TCP_KEEPALIVE_IDLE_MS))),
        "keepalive on every ledger socket: {keepalive:?}"
    );

    // Hold u's fence row from outside the relay, so the batch is mid-transaction (BEGIN sent,
    // fence statement waiting) when the link stalls.
    let mut holder = PgConnection::connect(&services.database_url).await.expect("a direct connection");
    sqlx::query("BEGIN").execute(&mut holder).await.expect("BEGIN");
    sqlx::query("INSERT INTO user_fences (user_id, fence) VALUES ('u', 1)")
        .execute(&mut holder)
        .await
        .expect("hold the fence row");
    let batch = [request("d1", "u", Op::Deposit, 1_000)];
    let fences = [(UserId::parse("u").expect("user id"), 2)];
    let started = tokio::time::Instant::now();
    let applying = tokio::spawn({
        let ledger = ledger.clone();
        let batch = batch.clone();
        let fences = fences.clone();
        async move { ledger.apply_batch(&batch, &fences).await }
    });
    wait_until_blocked(&direct).await;
    relay.stall();
    sqlx::query("ROLLBACK").execute(&mut holder).await.expect("release the fence row");

    let outcome = tokio::time::timeout(BOUND + SLACK + Duration::from_secs(10), applying)
        .await
        .expect("apply_batch returns instead of hanging on the stalled link")
        .expect("the batch task");
    let elapsed = started.elapsed();
    assert!(matches!(outcome, Err(LedgerError::TimedOut { .. })), "{outcome:?}");
    assert!(elapsed >= BOUND && elapsed < BOUND + SLACK, "timed out after {elapsed:?}, bound {BOUND:?}");

    relay.restore();
    let results = ledger.apply_batch(&batch, &fences).await.expect("the pool recovers once the link is back");
    assert_eq!(results[0].status, Status::Approved);
    assert!(!results[0].replayed, "the timed-out transaction was rolled back, not committed");
    let wallet = direct.wallet(&fences[0].0).await.expect("read").expect("a wallet");
    assert_eq!(wallet.balance, Money::from_cents(1_000).expect("money"));

    holder.close().await.expect("close");
    ledger.pool().close().await;
    direct.pool().close().await;
    drop(relay);
    drop_database(&services.namespace).await;
}

/// A merged group that the database did not answer in time fails as a whole: applied again
/// batch by batch, each would wait out a bound again while the link is still stalled.
#[tokio::test]
async fn a_group_the_database_did_not_answer_fails_at_once_rather_than_batch_by_batch() {
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let relay = relay_to(&services.database_url).await;
    let ledger = Ledger::connect(&relay.through(&services.database_url), 2, None)
        .await
        .expect("PostgreSQL through the relay")
        .with_transaction_timeout(BOUND);
    let committer = GroupCommitter::spawn(ledger.clone(), 1);
    eventually("two pooled connections through the relay", Duration::from_secs(10), || async {
        (relay.connections() == 2).then_some(())
    })
    .await;
    relay.stall();

    // Four partitions' batches on disjoint users: the first takes the one transaction slot
    // and times out; the others wait, are merged, and their acquire (which pings the pooled
    // connection over the stalled link) times out. Or all four are merged.
    let batches: Vec<_> = (0..4)
        .map(|i| {
            let user = format!("user{i}");
            (vec![request(format!("d{i}"), &user, Op::Deposit, 100)], vec![(UserId::parse(&user).expect("user id"), 1)])
        })
        .collect();
    let started = tokio::time::Instant::now();
    let outcomes = join_all(batches.iter().map(|(requests, fences)| committer.apply_batch(requests, fences))).await;
    let elapsed = started.elapsed();

    for outcome in &outcomes {
        let unanswered =
            matches!(outcome, Err(LedgerError::TimedOut { .. } | LedgerError::Database(sqlx::Error::PoolTimedOut)));
        assert!(unanswered, "{outcome:?}");
    }
    let two_groups = BOUND + walletq::ledger::ACQUIRE_TIMEOUT + SLACK;
    assert!(elapsed < two_groups, "one bound per group, not one per batch: {elapsed:?}");

    drop(committer);
    relay.restore();
    ledger.pool().close().await;
    drop(relay);
    drop_database(&services.namespace).await;
}
