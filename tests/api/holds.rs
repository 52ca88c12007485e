//! Two-phase withdrawals: holds, captures, releases and expiries, through the ledger and the
//! whole pipeline, against the real services.

use std::time::Duration;

use futures_util::future::join_all;
use walletq::domain::{Command, Money, Op, Reason, Request, RequestId, RequestResult, Status, UserId};
use walletq::ledger::Ledger;

use crate::support::model::{cents, command};
use crate::support::{CleanupOnDrop, drop_database, isolated_services, request, spawn_app};

fn capture(id: &str, user: &str, hold: &str, amount: Option<i64>) -> Request {
    let hold_id = RequestId::parse(hold).expect("hold id");
    command(id, user, Command::Capture { hold_id, amount: amount.map(cents) })
}

fn release(id: &str, user: &str, hold: &str) -> Request {
    command(id, user, Command::Release { hold_id: RequestId::parse(hold).expect("hold id") })
}

fn hold(id: &str, user: &str, amount_cents: i64, timeout_s: u32) -> Request {
    command(id, user, Command::Hold { amount: cents(amount_cents), timeout_s })
}

/// A ledger on a database of its own, and a fencing token that only grows.
struct Books {
    ledger: Ledger,
    fence: i64,
    namespace: String,
    _cleanup: CleanupOnDrop,
}

impl Books {
    async fn open() -> Self {
        let services = isolated_services();
        let cleanup = CleanupOnDrop::database(&services.namespace);
        let ledger = Ledger::connect(&services.database_url, 2, None).await.expect("PostgreSQL must be reachable");
        Books { ledger, fence: 0, namespace: services.namespace, _cleanup: cleanup }
    }

    /// Applies one batch of one user's requests, as a worker holding its lock would.
    async fn apply(&mut self, requests: &[Request]) -> Vec<RequestResult> {
        self.fence += 1;
        let user = requests[0].user_id.clone();
        self.ledger.apply_batch(requests, &[(user, self.fence)]).await.expect("the batch")
    }

    async fn one(&mut self, request: Request) -> RequestResult {
        self.apply(&[request]).await.remove(0)
    }

    async fn assert_audit_clean(&self) {
        let audit = walletq::ledger::audit::audit(self.ledger.pool()).await.expect("audit");
        assert!(
            audit.is_clean(),
            "audit: {:?}",
            audit.checks.iter().filter(|c| !c.violations.is_empty()).collect::<Vec<_>>()
        );
    }

    async fn close(self) {
        self.ledger.pool().close().await;
        drop_database(&self.namespace).await;
    }
}

fn figures(result: &RequestResult) -> (Option<i64>, Option<i64>, Option<i64>) {
    (result.balance.map(Money::cents), result.held.map(Money::cents), result.available.map(Money::cents))
}

#[tokio::test]
async fn a_partial_capture_takes_part_releases_the_rest_and_writes_one_entry() {
    let mut books = Books::open().await;
    books.one(request("d", "u", Op::Deposit, 10_000)).await;
    let placed = books.one(hold("h", "u", 4_000, 60)).await;
    assert_eq!((placed.status, figures(&placed)), (Status::Approved, (Some(10_000), Some(4_000), Some(6_000))));
    assert_eq!(placed.hold_id.as_ref().map(RequestId::as_str), Some("h"));
    assert!(placed.expires_at.is_some_and(|at| (at - placed.processed_at).num_seconds() == 60));

    let captured = books.one(capture("c", "u", "h", Some(1_500))).await;
    assert_eq!((captured.status, captured.amount), (Status::Approved, Some(cents(1_500))));
    assert_eq!(figures(&captured), (Some(8_500), Some(0), Some(8_500)));
    let again = books.one(capture("c2", "u", "h", None)).await;
    assert_eq!(again.reason, Some(Reason::HoldClosed), "only one capture per hold");
    let released = books.one(release("r", "u", "h")).await;
    assert_eq!(released.reason, Some(Reason::HoldClosed), "a release after the capture");

    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE request_id = 'c'")
        .fetch_one(books.ledger.pool())
        .await
        .expect("count");
    assert_eq!(entries, 1);
    let wallet = books.ledger.wallet(&UserId::parse("u").expect("user")).await.expect("read").expect("wallet");
    assert_eq!((wallet.balance, wallet.held, wallet.holds.len()), (cents(8_500), Money::ZERO, 0));
    books.assert_audit_clean().await;
    books.close().await;
}

#[tokio::test]
async fn captures_and_releases_refuse_what_they_must() {
    let mut books = Books::open().await;
    books.one(request("d-u", "u", Op::Deposit, 10_000)).await;
    books.one(request("d-v", "v", Op::Deposit, 10_000)).await;
    books.one(hold("h", "u", 6_000, 60)).await;
    let withdrawal = books.one(request("w", "u", Op::Withdraw, 5_000)).await;
    assert_eq!(
        (withdrawal.reason, figures(&withdrawal)),
        (Some(Reason::InsufficientFunds), (Some(10_000), Some(6_000), Some(4_000)))
    );
    assert_eq!(books.one(hold("h2", "u", 4_001, 60)).await.reason, Some(Reason::InsufficientFunds));
    assert_eq!(books.one(capture("c-more", "u", "h", Some(6_001))).await.reason, Some(Reason::AmountExceedsHold));
    let other = books.one(release("r-v", "v", "h")).await;
    assert_eq!(other.reason, Some(Reason::UnknownHold), "another user's hold is unknown");
    assert_eq!(figures(&other), (Some(10_000), Some(0), Some(10_000)), "the other user's own wallet");
    assert_eq!(
        books.one(release("r-none", "u", "d-u")).await.reason,
        Some(Reason::UnknownHold),
        "a deposit is no hold"
    );
    assert_eq!(books.one(hold("h-none", "nobody", 100, 60)).await.reason, Some(Reason::NoWallet));
    let released = books.one(release("r", "u", "h")).await;
    assert_eq!(
        (released.status, released.amount, figures(&released)),
        (Status::Approved, Some(cents(6_000)), (Some(10_000), Some(0), Some(10_000)))
    );
    assert_eq!(books.one(capture("c", "u", "h", None)).await.reason, Some(Reason::HoldClosed));
    books.assert_audit_clean().await;
    books.close().await;
}

#[tokio::test]
async fn replays_and_conflicts_of_every_new_op() {
    let mut books = Books::open().await;
    books.one(request("d", "u", Op::Deposit, 10_000)).await;
    let firsts = books
        .apply(&[
            hold("h", "u", 1_000, 60),
            hold("h2", "u", 1_000, 60),
            capture("c", "u", "h", None),
            release("r", "u", "h2"),
        ])
        .await;
    let replays = books
        .apply(&[
            hold("h", "u", 1_000, 60),
            hold("h2", "u", 1_000, 60),
            capture("c", "u", "h", None),
            release("r", "u", "h2"),
        ])
        .await;
    for (first, replay) in firsts.iter().zip(&replays) {
        assert_eq!(replay, &RequestResult { replayed: true, ..first.clone() });
    }
    let conflicts = books
        .apply(&[
            hold("h", "u", 1_000, 61),
            capture("c", "u", "h", Some(1_000)),
            release("r", "u", "h"),
            capture("h2", "u", "h", None),
        ])
        .await;
    for conflict in &conflicts {
        assert_eq!(conflict.reason, Some(Reason::Conflict), "{conflict:?}");
    }
    books.assert_audit_clean().await;
    books.close().await;
}

/// The hold's time runs on the database's clock: wait for it to pass `expires_at`.
async fn wait_past(expires_at: chrono::DateTime<chrono::Utc>) {
    let left = (expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_capture_and_an_expiry_race_and_whatever_is_applied_first_wins() {
    let mut books = Books::open().await;
    books.one(request("d", "u", Op::Deposit, 10_000)).await;
    let early = books.one(hold("early", "u", 1_000, 1)).await;
    let captured = books.one(capture("c-early", "u", "early", None)).await;
    assert_eq!(captured.status, Status::Approved, "captured before its expires_at, the capture wins");

    let late = books.one(hold("late", "u", 2_000, 1)).await;
    wait_past(late.expires_at.expect("expires_at")).await;
    let refused = books.one(capture("c-late", "u", "late", None)).await;
    assert_eq!(refused.reason, Some(Reason::HoldExpired), "expired first, the expiry wins");
    assert_eq!(figures(&refused), (Some(9_000), Some(0), Some(9_000)));
    assert_eq!(books.one(release("r-late", "u", "late")).await.reason, Some(Reason::HoldExpired));
    let states: Vec<(String, String, bool)> =
        sqlx::query_as("SELECT hold_id, state, expiry_result IS NOT NULL FROM holds ORDER BY hold_id")
            .fetch_all(books.ledger.pool())
            .await
            .expect("holds");
    assert_eq!(states, vec![("early".into(), "captured".into(), false), ("late".into(), "expired".into(), true)]);
    assert!(early.expires_at.is_some());
    books.assert_audit_clean().await;
    books.close().await;
}

#[tokio::test]
async fn the_seed_race_with_holds_reserves_exactly_300_and_capturing_them_spends_the_wallet() {
    let mut app = spawn_app().await;
    app.publish_all(&[request("seed-deposit", "alice", Op::Deposit, 30_000)]).await;
    assert_eq!(app.next_results(1).await[0].1.status, Status::Approved);

    // 500 holds of 1.00 from 100 clients at once.
    let holds: Vec<Request> = (0..500).map(|i| hold(&format!("h-{i:03}"), "alice", 100, 600)).collect();
    join_all(holds.chunks(5).map(|chunk| app.publish_all(chunk))).await;
    let results = app.results_by_id(500).await;
    let approved: Vec<&str> =
        holds.iter().map(|h| h.request_id.as_str()).filter(|id| results[*id].status == Status::Approved).collect();
    assert_eq!(approved.len(), 300);
    assert!(results.values().all(|r| r.status == Status::Approved || r.reason == Some(Reason::InsufficientFunds)));

    let captures: Vec<Request> = approved.iter().map(|id| capture(&format!("c-{id}"), "alice", id, None)).collect();
    join_all(captures.chunks(3).map(|chunk| app.publish_all(chunk))).await;
    let captured = app.results_by_id(captures.len()).await;
    assert!(captured.values().all(|r| r.status == Status::Approved), "every capture is approved");
    let (balance, held): (rust_decimal::Decimal, rust_decimal::Decimal) =
        sqlx::query_as("SELECT balance, held FROM wallets WHERE user_id = 'alice'")
            .fetch_one(&app.pool)
            .await
            .expect("wallet");
    assert_eq!((Money::from_decimal(balance), Money::from_decimal(held)), (Some(Money::ZERO), Some(Money::ZERO)));
    assert_eq!(app.count("SELECT count(*) FROM ledger_entries WHERE delta < 0").await, 300);
    app.assert_ledger_matches_balance("alice").await;
    app.cleanup().await;
}

#[tokio::test]
async fn an_expired_hold_is_announced_to_its_reply_queue_within_2_s() {
    let mut app = spawn_app().await;
    app.publish_all(&[request("d", "bob", Op::Deposit, 5_000), hold("short", "bob", 2_000, 1)]).await;
    let placed = app.results_by_id(2).await.remove("short").expect("the hold's result");
    let expires_at = placed.expires_at.expect("expires_at");

    let (properties, expired) = app.next_results(1).await.remove(0);
    assert_eq!((expired.op, expired.status), (Some(Op::Expire), Status::Approved));
    assert_eq!(expired.hold_id.as_ref().map(RequestId::as_str), Some("short"));
    assert_eq!(expired.amount, Some(cents(2_000)));
    assert_eq!(figures(&expired), (Some(5_000), Some(0), Some(5_000)));
    let late = chrono::Utc::now() - expires_at;
    assert!(late < chrono::Duration::seconds(2), "published {late} after expires_at");
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("short"));
    let sent: bool = sqlx::query_scalar("SELECT expiry_sent FROM holds WHERE hold_id = 'short'")
        .fetch_one(&app.pool)
        .await
        .expect("hold");
    assert!(sent || app.try_next_result().is_none());
    app.cleanup().await;
}
