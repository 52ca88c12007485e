//! Withdrawal limits enforced in the serialized write path: the seed's race cannot get past
//! them, the window rolls, holds count and give back, and operators set them from the CLI.

use futures_util::future::join_all;
use walletq::configuration::{LimitSettings, QueueType, TopologySettings};
use walletq::domain::{Command, Money, Op, Reason, Request, RequestId, RequestResult, Status, UserId};
use walletq::ledger::Ledger;
use walletq::ledger::limits::LimitChange;

use crate::support::model::{cents, command};
use crate::support::{CleanupOnDrop, drop_database, isolated_services, request, spawn_app_with};

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user id")
}

/// 500 withdrawals of 1.00 from `user`, published by 100 clients at once.
fn withdrawals(user: &str) -> Vec<Request> {
    (0..500).map(|i| request(format!("{user}-w{i:03}"), user, Op::Withdraw, 100)).collect()
}

fn count(results: &std::collections::HashMap<String, RequestResult>, user: &str, status: Status) -> usize {
    results.values().filter(|r| r.user_id.as_ref().map(UserId::as_str) == Some(user) && r.status == status).count()
}

#[tokio::test]
async fn the_seed_race_cannot_get_past_any_limit() {
    let mut app = spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Quorum }, false).await;
    let mut settings = app.worker_settings();
    settings.limits = LimitSettings { limit_daily_count: Some(3), ..LimitSettings::default() };
    app.start_worker_with(settings);
    let ledger = Ledger::connect(&app.services.database_url, 1, None).await.expect("ledger");
    for (name, change) in [
        (
            "amount",
            LimitChange { daily_amount: Some(cents(5_000)), daily_count: Some(10_000), ..LimitChange::default() },
        ),
        ("count", LimitChange { daily_count: Some(7), ..LimitChange::default() }),
        (
            "largest",
            LimitChange { per_withdrawal: Some(cents(150)), daily_count: Some(10_000), ..LimitChange::default() },
        ),
    ] {
        ledger.set_limits(&user(name), change, Some("test")).await.expect("set limits");
    }
    let users = ["amount", "count", "largest", "default"];
    let deposits: Vec<Request> = users.iter().map(|u| request(format!("{u}-d"), u, Op::Deposit, 1_000_000)).collect();
    app.publish_all(&deposits).await;
    app.results_by_id(deposits.len()).await;

    let mut all: Vec<Request> = users.iter().flat_map(|u| withdrawals(u)).collect();
    all.extend((0..20).map(|i| request(format!("largest-big{i}"), "largest", Op::Withdraw, 200)));
    join_all(all.chunks(all.len().div_ceil(100)).map(|chunk| app.publish_all(chunk))).await;
    let results = app.results_by_id(all.len()).await;

    assert_eq!(count(&results, "amount", Status::Approved), 50, "daily_amount 50.00");
    assert_eq!(count(&results, "count", Status::Approved), 7, "daily_count 7");
    assert_eq!(count(&results, "largest", Status::Approved), 500, "every 1.00 fits per_withdrawal 1.50");
    assert_eq!(count(&results, "default", Status::Approved), 3, "the worker's default daily_count 3");
    let refused: Vec<&RequestResult> = results.values().filter(|r| r.status == Status::Rejected).collect();
    assert_eq!(refused.len(), 450 + 493 + 20 + 497);
    assert!(refused.iter().all(|r| r.reason == Some(Reason::LimitExceeded)), "only limits refuse");
    let big = &results["largest-big0"];
    assert_eq!(big.detail.as_deref(), Some("per_withdrawal 1.50 exceeded: 2.00 asked"));
    let balance = big.balance.expect("a refusal shows the current balance");
    assert!(cents(950_000) <= balance && balance <= cents(1_000_000), "{balance}");
    let refused_amount = results
        .values()
        .find(|r| r.user_id.as_ref().map(UserId::as_str) == Some("amount") && r.status == Status::Rejected);
    let detail = refused_amount.and_then(|r| r.detail.clone()).unwrap_or_default();
    assert!(detail.starts_with("daily_amount 50.00 reached: 0.00 left until "), "{detail}");
    let audit = walletq::ledger::audit::audit(&app.pool).await.expect("audit");
    assert!(audit.is_clean(), "{:?}", audit.checks.iter().filter(|c| !c.violations.is_empty()).collect::<Vec<_>>());
    ledger.pool().close().await;
    app.cleanup().await;
}

/// Moves every trace of the past (usage buckets, request and hold times) back by 25 hours:
/// the test's clock. 25 hours keeps minute and hour buckets on their boundaries.
async fn a_day_passes(ledger: &Ledger) {
    for statement in [
        "UPDATE limit_usage SET bucket_start = bucket_start - interval '25 hours'",
        "UPDATE requests SET processed_at = processed_at - interval '25 hours'",
        "UPDATE holds SET created_at = created_at - interval '25 hours', closed_at = closed_at - interval '25 hours',
                          expires_at = expires_at - interval '25 hours'",
    ] {
        sqlx::query(statement).execute(ledger.pool()).await.expect("moving the clock");
    }
}

async fn apply(ledger: &Ledger, fence: &mut i64, batch: &[Request]) -> Vec<RequestResult> {
    *fence += 1;
    ledger.apply_batch(batch, &[(batch[0].user_id.clone(), *fence)]).await.expect("a batch")
}

#[tokio::test]
async fn the_window_rolls_and_released_or_expired_holds_give_their_allowance_back() {
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let ledger = Ledger::connect(&services.database_url, 2, None).await.expect("PostgreSQL must be reachable");
    let ledger = ledger.with_default_limits(walletq::domain::Limits {
        daily_amount: Some(cents(5_000)),
        daily_count: Some(4),
        ..Default::default()
    });
    let fence = &mut 0;
    let hold = |id: &str, amount: i64, timeout_s| command(id, "u", Command::Hold { amount: cents(amount), timeout_s });
    let hold_id = |id: &str| RequestId::parse(id).expect("id");
    apply(&ledger, fence, &[request("d", "u", Op::Deposit, 100_000)]).await;

    let first = apply(&ledger, fence, &[request("w1", "u", Op::Withdraw, 3_000), hold("h1", 2_000, 600)]).await;
    assert!(first.iter().all(|r| r.status == Status::Approved));
    let full = apply(&ledger, fence, &[request("w2", "u", Op::Withdraw, 1)]).await;
    assert_eq!(full[0].reason, Some(Reason::LimitExceeded));
    let release = command("r1", "u", Command::Release { hold_id: hold_id("h1") });
    let freed = apply(&ledger, fence, &[release, request("w3", "u", Op::Withdraw, 2_000)]).await;
    assert_eq!(freed[1].status, Status::Approved, "the released hold gave its 20.00 back: {:?}", freed[1]);
    let view = ledger.limits_view(&user("u")).await.expect("view");
    assert_eq!(
        (view.used_amount, view.used_count, view.left_amount, view.left_count),
        (cents(5_000), 2, Some(Money::ZERO), Some(2))
    );

    a_day_passes(&ledger).await;
    let rolled = apply(&ledger, fence, &[hold("h2", 5_000, 1)]).await;
    assert_eq!(rolled[0].status, Status::Approved, "after 24 hours the allowance is back: {:?}", rolled[0]);
    let expires_at = rolled[0].expires_at.expect("expires_at");
    tokio::time::sleep((expires_at - chrono::Utc::now()).to_std().unwrap_or_default()).await;
    let after_expiry = apply(&ledger, fence, &[request("w4", "u", Op::Withdraw, 5_000)]).await;
    assert_eq!(after_expiry[0].status, Status::Approved, "the expired hold gave its 50.00 back: {:?}", after_expiry[0]);
    let audit = walletq::ledger::audit::audit(ledger.pool()).await.expect("audit");
    assert!(audit.is_clean(), "{:?}", audit.checks.iter().filter(|c| !c.violations.is_empty()).collect::<Vec<_>>());
    ledger.pool().close().await;
    drop_database(&services.namespace).await;
}

#[tokio::test]
async fn operators_set_show_and_clear_limits_and_each_change_is_recorded() {
    let services = isolated_services();
    let _database = CleanupOnDrop::database(&services.namespace);
    let ledger = Ledger::connect(&services.database_url, 1, None).await.expect("PostgreSQL must be reachable");
    let walletq = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_walletq"))
            .args(args)
            .env("DATABASE_URL", &services.database_url)
            .env_remove("WALLETQ_LIMIT_DAILY_COUNT")
            .output()
            .expect("run walletq");
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("JSON output")
    };
    let set = walletq(&["limits", "set", "--user", "ann", "--daily-amount", "500", "--note", "risk review 42"]);
    assert_eq!(set["own"]["daily_amount"], "500.00");
    walletq(&["limits", "set", "--user", "ann", "--per-withdrawal", "100"]);
    let shown = walletq(&["limits", "show", "--user", "ann", "--limit-daily-count", "9"]);
    let limits = &shown["limits"];
    assert_eq!(
        (&limits["in_force"]["daily_amount"], &limits["in_force"]["per_withdrawal"]),
        (&"500.00".into(), &"100.00".into())
    );
    assert_eq!(
        (&limits["in_force"]["daily_count"], &limits["own"]["daily_count"]),
        (&9.into(), &serde_json::Value::Null)
    );
    assert_eq!(limits["left_amount"], "500.00");
    walletq(&["limits", "clear", "--user", "ann", "--note", "review closed"]);
    assert!(ledger.own_limits(&user("ann")).await.expect("read").is_none());
    let notes: Vec<(Option<String>, bool)> =
        sqlx::query_as("SELECT note, cleared FROM wallet_limit_changes WHERE user_id = 'ann' ORDER BY change_id")
            .fetch_all(ledger.pool())
            .await
            .expect("history");
    assert_eq!(
        notes,
        vec![(Some("risk review 42".into()), false), (None, false), (Some("review closed".into()), true)]
    );
    let balance = walletq(&["balance", "--user", "ann", "--limit-daily-amount", "70"]);
    assert_eq!(
        (&balance["balance"], &balance["limits"]["in_force"]["daily_amount"]),
        (&serde_json::Value::Null, &"70.00".into())
    );
    ledger.pool().close().await;
    drop_database(&services.namespace).await;
}
