//! Running it: poison messages, audit, metrics and health endpoints, status.

use std::process::Command;
use std::time::Duration;

use walletq::configuration::{QueueType, TopologySettings};
use walletq::domain::{Money, Op, Reason, Status};

use crate::support::{
    TestApp, eventually, free_port, http_get, request, spawn_app, spawn_app_with, spawn_worker_process_with,
};

#[tokio::test]
async fn a_request_the_database_always_refuses_is_rejected_after_bounded_attempts() {
    let mut app = spawn_app().await;
    sqlx::query(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.request_id = 'poison' THEN RAISE EXCEPTION 'refused by the test trigger'; END IF;
           RETURN NEW;
         END $$",
    )
    .execute(&app.pool)
    .await
    .expect("trigger function");
    sqlx::query("CREATE TRIGGER refuse_poison BEFORE INSERT ON requests FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
        .execute(&app.pool)
        .await
        .expect("trigger");

    app.publish_all(&[
        request("before", "ivan", Op::Deposit, 1_000),
        request("poison", "ivan", Op::Deposit, 500),
        request("after", "ivan", Op::Deposit, 100),
    ])
    .await;
    let results = app.next_results(3).await;
    let ids: Vec<_> = results.iter().map(|(_, r)| r.request_id.as_ref().map(|i| i.as_str().to_owned())).collect();
    assert_eq!(ids, vec![Some("before".into()), Some("poison".into()), Some("after".into())], "order kept");
    let poison = &results[1].1;
    assert_eq!(poison.status, Status::Rejected);
    assert_eq!(poison.reason, Some(Reason::InvalidRequest));
    let detail = poison.detail.as_deref().unwrap_or_default();
    assert!(detail.contains("not applied after 5 attempts"), "{detail}");
    assert!(detail.contains("refused by the test trigger"), "{detail}");
    assert_eq!(results[2].1.balance, Money::from_cents(1_100));
    assert_eq!(app.count("SELECT count(*) FROM requests WHERE request_id = 'poison'").await, 0);

    let mut dead = app.consume(&app.names.dead_queue()).await;
    let delivery = TestApp::next_delivery(&mut dead).await;
    assert_eq!(delivery.data, request("poison", "ivan", Op::Deposit, 500).to_json());
    app.cleanup().await;
}

#[tokio::test]
async fn audit_is_clean_then_names_the_rows_that_break_an_invariant() {
    let mut app = spawn_app().await;
    app.publish_all(&[request("a-1", "judy", Op::Deposit, 5_000), request("a-2", "judy", Op::Withdraw, 1_000)]).await;
    app.next_results(2).await;

    let audit = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_walletq"))
            .arg("audit")
            .args(args)
            .env("DATABASE_URL", &app.services.database_url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run walletq audit")
    };
    let clean = audit(&[]);
    let text = String::from_utf8_lossy(&clean.stdout).to_string();
    assert!(clean.status.success(), "{text}");
    assert!(text.contains("audit clean"), "{text}");
    assert!(text.contains("(2 rows checked)"), "{text}");

    sqlx::query("UPDATE wallets SET balance = balance + 1 WHERE user_id = 'judy'")
        .execute(&app.pool)
        .await
        .expect("corrupt a balance");
    let dirty = audit(&[]);
    let text = String::from_utf8_lossy(&dirty.stdout).to_string();
    assert_eq!(dirty.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL every balance equals the sum of its ledger entries"), "{text}");
    assert!(text.contains("judy: balance 41.00, ledger sum 40.00"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&audit(&["--json"]).stdout).expect("json report");
    assert!(json["checks"].as_array().is_some_and(|c| c.len() >= 6));
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_serves_metrics_health_readiness_and_status() {
    let mut app = spawn_app_with(TopologySettings { partitions: 4, queue_type: QueueType::Classic }, false).await;
    let address = format!("127.0.0.1:{}", free_port());
    let worker = spawn_worker_process_with(&app, &[("WALLETQ_METRICS_ADDR", address.as_str())]);

    eventually("/readyz answering 200", Duration::from_secs(20), || async {
        http_get(&address, "/readyz").await.filter(|(status, _)| *status == 200)
    })
    .await;
    assert_eq!(http_get(&address, "/healthz").await.map(|(s, _)| s), Some(200));

    app.publish_all(&[request("m-1", "kim", Op::Deposit, 100), request("m-2", "kim", Op::Withdraw, 500)]).await;
    app.next_results(2).await;
    let metrics = eventually("request counters in /metrics", Duration::from_secs(10), || async {
        http_get(&address, "/metrics")
            .await
            .map(|(_, body)| body)
            .filter(|b| b.contains("walletq_requests_total") && b.contains("walletq_batch_duration_seconds_bucket"))
    })
    .await;
    assert!(metrics.contains(r#"walletq_requests_total{op="deposit",status="approved",reason="none"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"reason="insufficient_funds"} 1"#), "{metrics}");
    assert!(metrics.contains("walletq_batch_duration_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("walletq_partitions_owned 4"), "{metrics}");

    // Partition reports follow within a heartbeat of the worker taking the partitions.
    let status = eventually("status naming the active worker of every partition", Duration::from_secs(10), || {
        let status = status_of(&app, 4);
        async move {
            let all_active = status["partitions"].as_array()?.iter().all(|p| p["active_worker"].is_string());
            all_active.then_some(status)
        }
    })
    .await;
    let workers = status["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 1);
    let partitions = status["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 4);
    for partition in partitions {
        assert_eq!(partition["active_worker"], workers[0]["worker_id"], "{partition}");
        assert_eq!(partition["depth"], 0);
    }
    let table = status_table(&app, 4);
    assert!(table.contains("1 live worker(s)"), "{table}");

    // The CLI producer: publish, wait for the result, exit code by status; then the balance.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_walletq"))
            .args(args)
            .env("DATABASE_URL", &app.services.database_url)
            .env("AMQP_URL", &app.services.amqp_url)
            .env("WALLETQ_NAMESPACE", &app.services.namespace)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run walletq")
    };
    let deposit = cli(&["deposit", "--user", "lee", "--amount", "150", "--request-id", "cli-1", "--wait", "20"]);
    let printed: serde_json::Value = serde_json::from_slice(&deposit.stdout).expect("result json");
    assert_eq!(deposit.status.code(), Some(0), "{printed}");
    assert_eq!(printed["status"], "approved");
    assert_eq!(printed["balance"], "150.00");
    assert_eq!(printed["coupon"]["kind"], "red_packet_10");
    let refused = cli(&["withdraw", "--user", "lee", "--amount", "150.01", "--wait", "20"]);
    assert_eq!(refused.status.code(), Some(3), "{}", String::from_utf8_lossy(&refused.stdout));
    let balance = cli(&["balance", "--user", "lee"]);
    assert!(balance.status.success(), "{}", String::from_utf8_lossy(&balance.stderr));
    let wallet: serde_json::Value = serde_json::from_slice(&balance.stdout).expect("wallet json");
    assert_eq!(wallet["balance"], "150.00");
    assert_eq!(wallet["coupons"][0]["kind"], "red_packet_10");
    let bad = cli(&["withdraw", "--user", "lee", "--amount", "1.001"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("more than 2 decimal places"));

    // Killed before the cleanup: a live worker would declare the deleted queues again.
    drop(worker);
    app.cleanup().await;
}

#[tokio::test]
async fn status_says_plainly_when_no_worker_is_alive() {
    let app = spawn_app_with(TopologySettings { partitions: 2, queue_type: QueueType::Classic }, false).await;
    let table = status_table(&app, 2);
    assert!(table.contains("no worker is alive") && table.contains("walletq worker"), "{table}");
    assert!(!table.contains("live worker(s)"), "{table}");
    app.cleanup().await;
}

/// `walletq status` for the app's namespace, with `extra` arguments; its stdout.
fn status_output(app: &crate::support::TestApp, partitions: u16, extra: &[&str]) -> Vec<u8> {
    let output = Command::new(env!("CARGO_BIN_EXE_walletq"))
        .args(["status", "--partitions", &partitions.to_string()])
        .args(extra)
        .env("AMQP_URL", &app.services.amqp_url)
        .env("REDIS_URL", &app.services.redis_url)
        .env("WALLETQ_NAMESPACE", &app.services.namespace)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run walletq status");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// `walletq status --json` for the app's namespace.
fn status_of(app: &crate::support::TestApp, partitions: u16) -> serde_json::Value {
    serde_json::from_slice(&status_output(app, partitions, &["--json"])).expect("status json")
}

/// `walletq status`'s table for the app's namespace.
fn status_table(app: &crate::support::TestApp, partitions: u16) -> String {
    String::from_utf8_lossy(&status_output(app, partitions, &[])).into_owned()
}

/// The last processed time of the partition that has one.
fn last_processed(status: &serde_json::Value) -> Option<serde_json::Value> {
    status["partitions"].as_array()?.iter().map(|p| p["last_processed_at"].clone()).find(|at| at.is_string())
}

#[tokio::test]
async fn status_names_the_active_router_and_keeps_a_partitions_last_time_across_a_handover() {
    let mut app = spawn_app_with(TopologySettings { partitions: 2, queue_type: QueueType::Classic }, false).await;
    let first = crate::support::spawn_worker_process(&app);
    app.publish_all(&[request("hand-1", "kim", Op::Deposit, 100)]).await;
    app.next_results(1).await;
    let before = eventually("the router and the partition reported", Duration::from_secs(15), || {
        let status = status_of(&app, 2);
        async move { (status["active_router"].is_string() && last_processed(&status).is_some()).then_some(status) }
    })
    .await;
    let first_id = before["workers"][0]["worker_id"].clone();
    assert_eq!(before["active_router"], first_id, "{before}");
    let last = last_processed(&before);

    assert!(first.terminate().await.success());
    let _second = crate::support::spawn_worker_process(&app);
    let after = eventually("a second worker owning every partition", Duration::from_secs(30), || {
        let status = status_of(&app, 2);
        let first_id = first_id.clone();
        async move {
            let partitions = status["partitions"].as_array()?;
            let taken = partitions.iter().all(|p| p["active_worker"].is_string() && p["active_worker"] != first_id);
            taken.then_some(status)
        }
    })
    .await;
    assert_eq!(last_processed(&after), last, "the new owner keeps the last processed time: {after}");
    app.cleanup().await;
}
