//! A service that cannot be reached is said in one line that names the service, its address
//! (never the password) and the likely fix, at once rather than after a pool timeout.

use std::process::Command;
use std::time::{Duration, Instant};

use walletq::ledger::{Ledger, Schema};
use walletq::reach::{Service, ServiceError};

use crate::support::{env_or, free_port};

/// A password that must never be printed.
const SECRET: &str = "s3cret-never-shown";

/// Runs `walletq args…` with `env`; its exit code, stderr, and how long it took.
fn walletq(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_walletq"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .env("WALLETQ_NAMESPACE", "walletq-conn-errors")
        .output()
        .expect("run the walletq binary");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned(), started.elapsed())
}

fn with_path(base: &str, user: Option<(&str, &str)>, port: Option<u16>, path: Option<&str>) -> String {
    let mut url = url::Url::parse(base).expect("a URL");
    if let Some((user, password)) = user {
        url.set_username(user).expect("user");
        url.set_password(Some(password)).expect("password");
    }
    if let Some(port) = port {
        url.set_port(Some(port)).expect("port");
    }
    if let Some(path) = path {
        url.set_path(path);
    }
    url.to_string()
}

/// A command, the URL it is given, and what its one line of error must say.
struct Case {
    args: Vec<&'static str>,
    variable: &'static str,
    url: String,
    expected: Vec<String>,
}

/// One case per failure: refused port, unknown role, another service's URL, missing
/// database (for `balance` and `audit`), refused AMQP login, unknown host, Redis refused.
fn cases() -> Vec<Case> {
    let database = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq");
    let amqp = env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let redis = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let closed = free_port();
    let closed_text = format!("127.0.0.1:{closed}");
    let case = |args: &[&'static str], (variable, url): (&'static str, String), expected: Vec<String>| Case {
        args: args.to_vec(),
        variable,
        url,
        expected,
    };
    vec![
        case(
            &["balance", "--user", "alice"],
            ("DATABASE_URL", with_path(&database, Some(("postgres", SECRET)), Some(closed), None)),
            vec!["PostgreSQL".into(), "connection refused".into(), closed_text.clone(), "DATABASE_URL".into()],
        ),
        case(
            &["audit"],
            ("DATABASE_URL", with_path(&database, Some(("nobody", SECRET)), None, None)),
            vec!["PostgreSQL".into(), "login refused for user \"nobody\"".into(), "DATABASE_URL".into()],
        ),
        case(
            &["balance", "--user", "alice"],
            ("DATABASE_URL", format!("mysql://root:{SECRET}@127.0.0.1:3306/walletq")),
            vec!["not a PostgreSQL URL".into(), "postgres://".into()],
        ),
        case(
            &["balance", "--user", "alice"],
            ("DATABASE_URL", with_path(&database, None, None, Some("/walletq_never_created_15"))),
            vec!["database \"walletq_never_created_15\" does not exist".into(), "walletq migrate".into()],
        ),
        case(
            &["audit"],
            ("DATABASE_URL", with_path(&database, None, None, Some("/walletq_never_created_15"))),
            vec!["walletq migrate".into()],
        ),
        case(
            &["deposit", "--user", "alice", "--amount", "1"],
            ("AMQP_URL", with_path(&amqp, Some(("guest", SECRET)), None, None)),
            vec!["RabbitMQ".into(), "login refused for user \"guest\"".into(), "AMQP_URL".into()],
        ),
        case(
            &["deposit", "--user", "alice", "--amount", "1"],
            ("AMQP_URL", with_path(&amqp, None, Some(closed), None)),
            vec!["RabbitMQ".into(), "connection refused".into(), closed_text.clone()],
        ),
        case(
            &["status"],
            ("REDIS_URL", with_path(&redis, None, Some(closed), None)),
            vec!["Redis".into(), "connection refused".into(), closed_text.clone(), "REDIS_URL".into()],
        ),
        case(
            &["balance", "--user", "alice"],
            ("DATABASE_URL", format!("postgres://postgres:{SECRET}@no-such-host.invalid:5432/walletq")),
            vec!["cannot resolve the host".into(), "no-such-host.invalid:5432".into()],
        ),
    ]
}

#[tokio::test]
async fn each_unreachable_service_is_one_line_with_its_address_and_the_fix() {
    for Case { args, variable, url, expected } in cases() {
        let (code, stderr, took) = walletq(&args, &[(variable, &url)]);
        let case = format!("{args:?} with {variable}={}", url.replace(SECRET, "***"));
        assert_eq!(code, Some(1), "{case}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{case}: one line, no client dump: {stderr}");
        assert!(!stderr.contains(SECRET), "{case}: the password was printed: {stderr}");
        assert!(!stderr.contains('\u{1b}'), "{case}: no colour when stderr is not a terminal: {stderr:?}");
        for needle in expected {
            assert!(stderr.contains(&needle), "{case}: expected {needle:?} in {stderr}");
        }
        assert!(took < Duration::from_secs(4), "{case}: took {took:?}, not at once");
    }
}

#[tokio::test]
async fn the_library_reports_a_refused_connection_by_variant() {
    let database = env_or("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/walletq");
    let port = free_port();
    let url = with_path(&database, None, Some(port), None);
    let error = Ledger::connect_with(&url, 1, None, Schema::Check).await.err().expect("nothing listens there");
    match ServiceError::find(&error) {
        Some(ServiceError::Refused { service: Service::PostgreSql, address }) => {
            assert_eq!(address, &format!("127.0.0.1:{port}"))
        }
        other => panic!("expected a refused PostgreSQL connection, got {other:?} from {error:#}"),
    }
}
