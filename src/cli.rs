//! The `walletq` command line: a thin edge over the library.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::Client;
use crate::configuration::{GatewaySettings, ServiceSettings, TopologySettings, WorkerSettings};
use crate::domain::{Money, Op, Status, UserId};
use crate::gateway::auth::{JwtSecret, mint_token};
use crate::ledger::{Ledger, Schema};
use crate::telemetry::{self, LogFormat};

/// Exit code when a waited-for request was rejected (2 is clap's usage error).
const EXIT_REJECTED: u8 = 3;
/// Exit code when no result came within `--wait`.
const EXIT_NO_RESULT: u8 = 4;
/// The benchmark's program, a crate of its own (bench/) that `walletq bench` runs.
const BENCH_PROGRAM: &str = "walletq-bench";

#[derive(Parser, Debug)]
#[command(name = "walletq", version, about = "Wallet withdrawals that are safe under any concurrency")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "WALLETQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the database when missing and run the migrations.
    Migrate {
        #[command(flatten)]
        services: ServiceSettings,
    },
    /// Declare the topology and process requests until SIGTERM or ctrl-c.
    Worker {
        #[command(flatten)]
        services: ServiceSettings,
        #[command(flatten)]
        topology: TopologySettings,
        #[command(flatten)]
        worker: WorkerSettings,
    },
    /// Publish a withdrawal (confirmed); with --wait, print its result.
    Withdraw(SubmitArgs),
    /// Publish a deposit (confirmed); with --wait, print its result.
    Deposit(SubmitArgs),
    /// Check the ledger's invariants; exits 1 with the offending rows on any violation.
    Audit {
        #[command(flatten)]
        services: ServiceSettings,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show partitions with their active worker, queue depth and unacked count, and the live workers.
    Status {
        #[command(flatten)]
        services: ServiceSettings,
        #[command(flatten)]
        topology: TopologySettings,
        /// A worker silent for this long is shown as gone.
        #[arg(long, env = "WALLETQ_MEMBER_TTL_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(200..=600_000))]
        member_ttl_ms: u64,
        /// RabbitMQ's management API (`http://user:password@host:15672`), to show the node
        /// leading each partition queue; off when unset.
        #[arg(long, env = "WALLETQ_MANAGEMENT_URL", hide_env_values = true)]
        management_url: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API until SIGTERM or ctrl-c. Needs WALLETQ_JWT_SECRET (at least 32
    /// bytes) to verify bearer tokens; see docs/HTTP.md.
    Gateway {
        #[command(flatten)]
        services: ServiceSettings,
        #[command(flatten)]
        gateway: GatewaySettings,
    },
    /// Print an HS256 bearer token for a user, signed with WALLETQ_JWT_SECRET (local use, tests).
    Token {
        /// The user the token speaks for (its `sub`).
        #[arg(long)]
        user: String,
        /// How long the token is valid, e.g. 30m, 1h, 7days.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
    },
    /// Measure walletq (and, with --compare, the approaches it replaces) under concurrent load.
    /// Runs `walletq-bench` (beside this executable, else on PATH) with every argument after
    /// `bench`; `walletq bench --help` shows its options.
    #[command(disable_help_flag = true)]
    Bench {
        /// The arguments of `walletq-bench`, passed through unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Print a user's balance and coupons.
    Balance {
        #[command(flatten)]
        services: ServiceSettings,
        #[arg(long)]
        user: String,
    },
}

#[derive(Args, Debug)]
struct SubmitArgs {
    #[command(flatten)]
    services: ServiceSettings,
    /// The wallet's owner.
    #[arg(long)]
    user: String,
    /// Amount as plain decimal text, e.g. 12.34.
    #[arg(long)]
    amount: String,
    /// Idempotency key; a fresh UUID when omitted.
    #[arg(long)]
    request_id: Option<String>,
    /// Seconds to wait for the result (0: publish only; at most 3600).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    wait: u64,
}

/// Parses the command line, runs the command, maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = cli.command {
        return run_bench(cli.log_format, &args);
    }
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("walletq: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("walletq: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate { services } => {
            Ledger::connect(&services.database_url, 1, services.ca_file.as_deref()).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker { services, topology, worker } => worker_until_signal(services, topology, worker).await,
        Command::Bench { .. } => unreachable!("`bench` runs walletq-bench before the runtime starts"),
        Command::Audit { services, json } => audit(&services, json).await,
        Command::Status { services, topology, member_ttl_ms, management_url, json } => {
            let management = management_url.as_deref();
            let status = crate::status::collect_with_leaders(&services, &topology, member_ttl_ms, management).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.to_table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway { services, gateway } => serve_gateway(&services, &gateway).await,
        Command::Token { user, ttl } => {
            let user = UserId::parse(&user).context("user id must be 1-64 characters of [A-Za-z0-9._:-]")?;
            println!("{}", mint_token(&JwtSecret::from_env()?, &user, ttl)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Withdraw(args) => submit(args, Op::Withdraw).await,
        Command::Deposit(args) => submit(args, Op::Deposit).await,
        Command::Balance { services, user } => balance(&services, &user).await,
    }
}

/// `walletq worker`: runs until SIGTERM or ctrl-c, then drains the batches in flight for at
/// most `--drain-timeout-ms`.
async fn worker_until_signal(
    services: ServiceSettings,
    topology: TopologySettings,
    worker: WorkerSettings,
) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let drain = Duration::from_millis(worker.drain_timeout_ms);
    let running = tokio::spawn(crate::worker::run_worker(services, topology, worker, shutdown.clone()));
    tokio::pin!(running);
    tokio::select! {
        finished = &mut running => return finished.context("worker task failed")?.map(|()| ExitCode::SUCCESS),
        signal = shutdown_signal() => signal?,
    }
    tracing::info!(drain_timeout_ms = drain.as_millis() as u64, "stopping: finishing the batches in flight");
    shutdown.cancel();
    match tokio::time::timeout(drain, &mut running).await {
        Ok(finished) => finished.context("worker task failed")?.map(|()| ExitCode::SUCCESS),
        Err(_) => {
            tracing::warn!("drain timeout passed; unacked messages will be redelivered");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `walletq audit`: exits 1 when any invariant is broken.
async fn audit(services: &ServiceSettings, json: bool) -> anyhow::Result<ExitCode> {
    let ledger = read_only_ledger(services).await?;
    let report = crate::ledger::audit::audit(ledger.pool()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for check in &report.checks {
            let verdict = if check.violations.is_empty() { "ok  " } else { "FAIL" };
            println!("{verdict} {} ({} rows checked)", check.name, check.checked);
            for violation in &check.violations {
                println!("       {violation}");
            }
        }
        println!("audit {}", if report.is_clean() { "clean" } else { "found violations" });
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `walletq gateway`: serves until SIGTERM or ctrl-c, then finishes the requests in flight.
async fn serve_gateway(services: &ServiceSettings, gateway: &GatewaySettings) -> anyhow::Result<ExitCode> {
    let secret = JwtSecret::from_env()?;
    let listener = tokio::net::TcpListener::bind(gateway.listen)
        .await
        .with_context(|| format!("listening on {}", gateway.listen))?;
    let app = crate::gateway::app(services, gateway, &secret).await?;
    crate::gateway::serve(listener, app, async {
        if let Err(error) = shutdown_signal().await {
            tracing::error!(error = %format!("{error:#}"), "signal handling failed; stopping");
        }
        tracing::info!("stopping: finishing the requests in flight");
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// `walletq balance`: the wallet, or a null balance when the user has none.
async fn balance(services: &ServiceSettings, user: &str) -> anyhow::Result<ExitCode> {
    let user = UserId::parse(user).context("user id must be 1-64 characters of [A-Za-z0-9._:-]")?;
    let ledger = read_only_ledger(services).await?;
    match ledger.wallet(&user).await? {
        Some(wallet) => println!("{}", serde_json::to_string_pretty(&wallet)?),
        None => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "user_id": user, "balance": null, "coupons": [] }))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// The ledger for commands that only read: no DDL, so the worker's role (or a read-only
/// one) is enough.
async fn read_only_ledger(services: &ServiceSettings) -> anyhow::Result<Ledger> {
    Ledger::connect_with(&services.database_url, 1, services.ca_file.as_deref(), Schema::Check).await
}

async fn submit(args: SubmitArgs, op: Op) -> anyhow::Result<ExitCode> {
    let amount = Money::parse_amount(&args.amount).map_err(|e| anyhow::anyhow!("amount {:?} {e}", args.amount))?;
    let services = &args.services;
    let client = Client::connect(&services.amqp_url, &services.namespace, services.ca_file.as_deref()).await?;
    let request = client.request(&args.user, op, amount, args.request_id.as_deref())?;
    if args.wait == 0 {
        client.submit(&request, None).await?;
        println!("{}", serde_json::json!({ "request_id": request.request_id, "published": true }));
        return Ok(ExitCode::SUCCESS);
    }
    let wait = Duration::from_secs(args.wait);
    match client.submit_and_wait_for(&request, wait).await? {
        Some(result) => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(if result.status == Status::Approved { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REJECTED) })
        }
        None => {
            eprintln!("walletq: no result for request {} within {wait:?}; it may still be applied", request.request_id);
            Ok(ExitCode::from(EXIT_NO_RESULT))
        }
    }
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl.as_secs() == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(ttl)
}

/// `walletq bench …`: replaces this process with `walletq-bench …` (so its output, signals
/// and exit code are the bench's own), or explains how to build it when it is missing.
fn run_bench(log_format: LogFormat, args: &[OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;

    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    let Some(program) = locate_bench(beside.as_deref(), std::env::var_os("PATH").as_deref()) else {
        eprintln!(
            "walletq: {BENCH_PROGRAM} is not installed (neither beside this executable nor on PATH); \
             build it with `cargo build --release -p walletq-bench`"
        );
        return ExitCode::FAILURE;
    };
    let mut command = std::process::Command::new(&program);
    command.args(args);
    // `walletq --log-format json bench …` keeps its meaning: the bench reads the same variable.
    if let Some(format) = log_format.to_possible_value() {
        command.env("WALLETQ_LOG_FORMAT", format.get_name());
    }
    let error = command.exec();
    eprintln!("walletq: cannot run {}: {error}", program.display());
    ExitCode::FAILURE
}

/// The `walletq-bench` executable: in `beside` (this executable's directory) first, then
/// in the directories of `path` (a PATH value), in order.
fn locate_bench(beside: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let on_path = path.into_iter().flat_map(std::env::split_paths);
    beside.map(Path::to_path_buf).into_iter().chain(on_path).map(|dir| dir.join(BENCH_PROGRAM)).find(|candidate| {
        std::fs::metadata(candidate).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result.context("waiting for ctrl-c")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn install(dir: &Path, mode: u32) -> PathBuf {
        std::fs::create_dir_all(dir).expect("a directory");
        let program = dir.join(BENCH_PROGRAM);
        std::fs::write(&program, "#!/bin/sh\n").expect("a program");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(mode)).expect("its mode");
        program
    }

    #[test]
    fn the_bench_beside_this_executable_wins_over_path_then_path_is_searched_in_order() {
        let root = std::env::temp_dir().join(format!("walletq-locate-{}", uuid::Uuid::new_v4().simple()));
        let (beside, first, second, plain) = (root.join("beside"), root.join("a"), root.join("b"), root.join("c"));
        std::fs::create_dir_all(&beside).expect("a directory");
        install(&plain, 0o644);
        let second_program = install(&second, 0o755);
        let path = std::env::join_paths([&first, &plain, &second]).expect("a PATH");
        assert_eq!(locate_bench(Some(&beside), Some(&path)), Some(second_program), "not executable: skipped");
        let beside_program = install(&beside, 0o755);
        assert_eq!(locate_bench(Some(&beside), Some(&path)), Some(beside_program));
        assert_eq!(locate_bench(None, None), None);
        assert_eq!(locate_bench(Some(&first), Some(&std::env::join_paths([&plain]).expect("a PATH"))), None);
        let _ = std::fs::remove_dir_all(&root);
    }
}
