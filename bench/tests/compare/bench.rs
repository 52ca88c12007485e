//! `walletq-bench --compare` (what `walletq bench --compare` runs), small: every approach
//! runs against the real services and the correctness flags of the report say what each
//! approach did to the money. Not timed.

use std::process::Command;

use crate::env_or;

#[test]
fn compare_reports_every_approach_and_only_the_naive_one_can_be_wrong() {
    let dir = std::env::temp_dir().join(format!("walletq-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let (json, plot) = (dir.join("report.json"), dir.join("plot.svg"));
    let output = Command::new(env!("CARGO_BIN_EXE_walletq-bench"))
        .args(["--compare", "--scenario", "hot", "--requests", "200", "--clients", "20"])
        .args(["--partitions", "2", "--queue-type", "classic", "--quiet", "--table-style", "markdown"])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .env("DATABASE_URL", env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq"))
        .env("AMQP_URL", env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
        .env("REDIS_URL", env_or("REDIS_URL", "redis://127.0.0.1:6379"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run walletq-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("| approach") && stdout.contains("final balance correct"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    let runs = report["runs"].as_array().expect("runs");
    let names: Vec<&str> = runs.iter().filter_map(|r| r["approach"].as_str()).collect();
    assert_eq!(
        names,
        ["naive", "redis-lock", "sql-lock-table", "select-for-update", "conditional-update", "broker-echo", "walletq"]
    );
    for run in runs {
        let name = run["approach"].as_str().unwrap_or_default();
        assert_eq!(run["completed"], 200, "{name} completed every request");
        assert_eq!(run["errors"], 0, "{name} had no errors");
        assert!(run["throughput_rps"].as_f64().is_some_and(|r| r > 0.0), "{name} throughput");
        assert!(run["latency"]["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{name} p99");
        match name {
            "broker-echo" => assert!(run["correctness"].is_null(), "the echo moves no money"),
            "naive" => {
                // How badly it races varies; its books still follow the model: every approval
                // beyond the money is a debit some other client overwrote.
                let c = &run["correctness"];
                assert!(c["lost_updates"].as_u64() >= c["overdrafts"].as_u64(), "{c}");
                assert_eq!(run["approved"].as_u64().zip(run["rejected"].as_u64()).map(|(a, r)| a + r), Some(200));
            }
            _ => {
                let c = &run["correctness"];
                assert_eq!(c["balances_correct"], true, "{name}: {c}");
                assert_eq!((c["overdrafts"].as_u64(), c["lost_updates"].as_u64()), (Some(0), Some(0)), "{name}");
                // The hot wallet holds exactly half of what is asked.
                assert_eq!((run["approved"].as_u64(), run["rejected"].as_u64()), (Some(100), Some(100)), "{name}");
            }
        }
    }
    let svg = std::fs::read_to_string(&plot).expect("the plot");
    assert!(svg.starts_with("<svg") && svg.contains("7 walletq"), "an SVG naming the approaches");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--scenario payout` through walletq: every hold is approved and then captured (the
/// capture published once the hold's approval arrived), the books balance, and the report
/// counts one withdrawal per two requests. A direct approach refuses the scenario.
#[test]
fn payout_holds_then_captures_every_withdrawal() {
    let dir = std::env::temp_dir().join(format!("walletq-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let json = dir.join("report.json");
    let run = |approach: &str| {
        Command::new(env!("CARGO_BIN_EXE_walletq-bench"))
            .args(["--scenario", "payout", "--users", "20", "--requests", "300", "--clients", "10"])
            .args(["--partitions", "2", "--queue-type", "classic", "--quiet", "--approach", approach])
            .arg("--json")
            .arg(&json)
            .env("DATABASE_URL", env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq"))
            .env("AMQP_URL", env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
            .env("REDIS_URL", env_or("REDIS_URL", "redis://127.0.0.1:6379"))
            .env("RUST_LOG", "warn")
            .output()
            .expect("run walletq-bench")
    };
    let output = run("walletq");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).expect("JSON");
    let run_report = &report["runs"][0];
    assert_eq!((run_report["completed"].as_u64(), run_report["errors"].as_u64()), (Some(300), Some(0)));
    assert_eq!((run_report["approved"].as_u64(), run_report["rejected"].as_u64()), (Some(300), Some(0)));
    assert_eq!(run_report["correctness"]["balances_correct"], true, "{}", run_report["correctness"]);
    let (requests, withdrawals) = (run_report["throughput_rps"].as_f64(), run_report["withdrawals_rps"].as_f64());
    assert!(requests.zip(withdrawals).is_some_and(|(r, w)| w > 0.0 && (r - 2.0 * w).abs() < 1e-6 * r), "{run_report}");

    let refused = run("select-for-update");
    assert!(!refused.status.success(), "a direct approach cannot run payouts");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("payout"));
    let _ = std::fs::remove_dir_all(&dir);
}
