//! The `walletq` command line: a thin edge over the library.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::Client;
use crate::configuration::{
    GatewaySettings, LimitSettings, ServiceSettings, TopologySettings, WorkerSettings, parse_limit_amount,
};
use crate::domain::{self, HOLD_TIMEOUT_MAX_S, Money, RequestId, Status, UserId};
use crate::gateway::auth::{JwtSecret, mint_token};
use crate::ledger::limits::LimitChange;
use crate::ledger::{Ledger, Schema};
use crate::reach::ServiceError;
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
    /// Reserve money (the first step of a two-phase withdrawal); with --wait, print its result.
    Hold(HoldArgs),
    /// Take a hold's money out of the wallet (all, or --amount of it; the rest is released).
    Capture(CaptureArgs),
    /// Give a hold's money back.
    Release(ReleaseArgs),
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
    /// Print a user's balance, held and available money, active holds, limits and coupons.
    Balance {
        #[command(flatten)]
        services: ServiceSettings,
        /// The wallet's owner (a user id: 1-64 characters of [A-Za-z0-9._:-]).
        #[arg(long)]
        user: String,
        #[command(flatten)]
        limits: LimitSettings,
    },
    /// Set, show or clear a user's own withdrawal limits (an operator's command: it needs
    /// the schema owner's database role; workers, producers and gateway users cannot).
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// See and recover the dead-lettered messages of `<namespace>.dead`.
    Dead {
        #[command(flatten)]
        services: ServiceSettings,
        #[command(subcommand)]
        command: DeadCommand,
    },
}

#[derive(Subcommand, Debug)]
enum LimitsCommand {
    /// Set the given limits for a user (the others are kept); applies to batches that start
    /// after it commits.
    Set {
        #[command(flatten)]
        services: ServiceSettings,
        /// The wallet's owner.
        #[arg(long)]
        user: String,
        /// Largest single withdrawal or hold, e.g. 500.00.
        #[arg(long, value_parser = parse_limit_amount)]
        per_withdrawal: Option<Money>,
        /// Most money that may leave the wallet in any rolling 24 hours.
        #[arg(long, value_parser = parse_limit_amount)]
        daily_amount: Option<Money>,
        /// Most withdrawals and holds in any rolling 24 hours.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i32::MAX as i64))]
        daily_count: Option<u32>,
        /// Why, recorded with the change (for the audit trail).
        #[arg(long)]
        note: Option<String>,
    },
    /// Show a user's own limits, the limits in force and what is left of each.
    Show {
        #[command(flatten)]
        services: ServiceSettings,
        /// The wallet's owner.
        #[arg(long)]
        user: String,
        #[command(flatten)]
        defaults: LimitSettings,
    },
    /// Remove a user's own limits: the defaults apply again.
    Clear {
        #[command(flatten)]
        services: ServiceSettings,
        /// The wallet's owner.
        #[arg(long)]
        user: String,
        /// Why, recorded with the change.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DeadCommand {
    /// List dead letters, oldest first: id, time and reason (x-death), user, request id,
    /// what is wrong, and the start of the body. The queue is left as it was.
    List {
        /// Most messages listed.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print one dead letter in full (JSON), by the id `list` shows.
    Show {
        /// The id `list` shows.
        id: String,
    },
    /// Publish dead letters again through the requests exchange (with publisher confirms),
    /// and remove each from the dead-letter queue only once the broker confirmed it.
    Requeue {
        /// Ids as `list` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
    },
}

/// What every request command takes: where, whose wallet, its id, and how long to wait.
#[derive(Args, Debug)]
struct SendArgs {
    #[command(flatten)]
    services: ServiceSettings,
    /// The wallet's owner.
    #[arg(long)]
    user: String,
    /// Idempotency key (for a hold, also the hold's id); a fresh UUID when omitted.
    #[arg(long)]
    request_id: Option<String>,
    /// Seconds to wait for the result (0: publish only; at most 3600).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    wait: u64,
}

#[derive(Args, Debug)]
struct SubmitArgs {
    #[command(flatten)]
    send: SendArgs,
    /// Amount as plain decimal text, e.g. 12.34.
    #[arg(long)]
    amount: String,
}

#[derive(Args, Debug)]
struct HoldArgs {
    #[command(flatten)]
    send: SendArgs,
    /// Amount to reserve, as plain decimal text, e.g. 12.34.
    #[arg(long)]
    amount: String,
    /// How long the hold lasts unless captured or released first, e.g. 90s, 15m, 2h (1 s to 7 days).
    #[arg(long, default_value = "15m", value_parser = parse_hold_timeout)]
    timeout: u32,
}

#[derive(Args, Debug)]
struct CaptureArgs {
    #[command(flatten)]
    send: SendArgs,
    /// The hold: the request id of its `hold`.
    #[arg(long)]
    hold: String,
    /// Amount to take, at most the hold's; the whole hold when omitted.
    #[arg(long)]
    amount: Option<String>,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    #[command(flatten)]
    send: SendArgs,
    /// The hold: the request id of its `hold`.
    #[arg(long)]
    hold: String,
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
            // A service that cannot be reached is said in one line, with what to check.
            match ServiceError::find(&error) {
                Some(unreachable) => eprintln!("walletq: {unreachable}"),
                None => eprintln!("walletq: {error:#}"),
            }
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
        Command::Withdraw(args) => {
            send(args.send, domain::Command::Withdraw { amount: parse_amount(&args.amount)? }).await
        }
        Command::Deposit(args) => {
            send(args.send, domain::Command::Deposit { amount: parse_amount(&args.amount)? }).await
        }
        Command::Hold(args) => {
            send(args.send, domain::Command::Hold { amount: parse_amount(&args.amount)?, timeout_s: args.timeout })
                .await
        }
        Command::Capture(args) => {
            let amount = args.amount.as_deref().map(parse_amount).transpose()?;
            send(args.send, domain::Command::Capture { hold_id: parse_hold_id(&args.hold)?, amount }).await
        }
        Command::Release(args) => {
            send(args.send, domain::Command::Release { hold_id: parse_hold_id(&args.hold)? }).await
        }
        Command::Balance { services, user, limits } => balance(&services, &user, limits).await,
        Command::Limits(command) => limits(command).await,
        Command::Dead { services, command } => dead(&services, command).await,
    }
}

/// `walletq dead list|show|requeue`.
async fn dead(services: &ServiceSettings, command: DeadCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadCommand::List { limit, json } => {
            let mut letters = crate::dead::list(services, limit).await?;
            if json {
                letters.iter_mut().for_each(|letter| letter.body = None);
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print!("{}", crate::dead::to_table(&letters));
            }
        }
        DeadCommand::Show { id } => match crate::dead::show(services, &id).await? {
            Some(letter) => println!("{}", serde_json::to_string_pretty(&letter)?),
            None => anyhow::bail!(
                "no dead letter {id:?} in {}.dead (`walletq dead list` shows the ids)",
                services.namespace
            ),
        },
        DeadCommand::Requeue { ids, all } => {
            let selection = if all { crate::dead::Selection::All } else { crate::dead::Selection::Ids(ids.clone()) };
            let requeued = crate::dead::requeue(services, &selection).await?;
            for letter in &requeued {
                println!("requeued {} (request {})", letter.id, letter.request_id.as_deref().unwrap_or("-"));
            }
            let missing: Vec<&String> = ids.iter().filter(|id| !requeued.iter().any(|l| &l.id == *id)).collect();
            if !missing.is_empty() {
                anyhow::bail!("not in {}.dead: {missing:?}", services.namespace);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
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

/// `walletq balance`: the wallet, or a null balance when the user has none, with its limits.
async fn balance(services: &ServiceSettings, user: &str, defaults: LimitSettings) -> anyhow::Result<ExitCode> {
    let user = parse_user(user)?;
    let ledger = read_only_ledger(services).await?.with_default_limits(defaults.into());
    let limits = ledger.limits_view(&user).await?;
    let shown = match ledger.wallet(&user).await? {
        Some(wallet) => serde_json::to_string_pretty(&WithLimits { wallet, limits })?,
        None => {
            let wallet =
                NoWallet { user_id: &user, balance: None, held: None, available: None, holds: [], coupons: [] };
            serde_json::to_string_pretty(&WithLimits { wallet, limits })?
        }
    };
    println!("{shown}");
    Ok(ExitCode::SUCCESS)
}

fn parse_user(user: &str) -> anyhow::Result<UserId> {
    UserId::parse(user).context("user id must be 1-64 characters of [A-Za-z0-9._:-]")
}

/// `walletq limits set|show|clear`.
async fn limits(command: LimitsCommand) -> anyhow::Result<ExitCode> {
    let (services, user) = match &command {
        LimitsCommand::Set { services, user, .. }
        | LimitsCommand::Show { services, user, .. }
        | LimitsCommand::Clear { services, user, .. } => (services, parse_user(user)?),
    };
    let ledger = read_only_ledger(services).await?;
    match command {
        LimitsCommand::Set { per_withdrawal, daily_amount, daily_count, note, .. } => {
            let change = LimitChange { per_withdrawal, daily_amount, daily_count };
            anyhow::ensure!(
                per_withdrawal.is_some() || daily_amount.is_some() || daily_count.is_some(),
                "give at least one of --per-withdrawal, --daily-amount, --daily-count"
            );
            let own = ledger.set_limits(&user, change, note.as_deref()).await?;
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "user_id": user, "own": own }))?);
        }
        LimitsCommand::Show { defaults, .. } => {
            let view = ledger.with_default_limits(defaults.into()).limits_view(&user).await?;
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "user_id": user, "limits": view }))?);
        }
        LimitsCommand::Clear { note, .. } => {
            ledger.clear_limits(&user, note.as_deref()).await?;
            println!("{}", serde_json::json!({ "user_id": user, "cleared": true }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `balance` of a user without a wallet: [`crate::ledger::StoredWallet`]'s keys, in order.
#[derive(serde::Serialize)]
struct NoWallet<'a> {
    user_id: &'a UserId,
    balance: Option<()>,
    held: Option<()>,
    available: Option<()>,
    holds: [(); 0],
    coupons: [(); 0],
}

/// `balance`'s output: the wallet's keys, then its limits.
#[derive(serde::Serialize)]
struct WithLimits<W> {
    #[serde(flatten)]
    wallet: W,
    limits: crate::ledger::limits::LimitsView,
}

/// The ledger for commands that only read: no DDL, so the worker's role (or a read-only
/// one) is enough.
async fn read_only_ledger(services: &ServiceSettings) -> anyhow::Result<Ledger> {
    Ledger::connect_with(&services.database_url, 1, services.ca_file.as_deref(), Schema::Check).await
}

fn parse_amount(text: &str) -> anyhow::Result<Money> {
    Money::parse_amount(text).map_err(|e| anyhow::anyhow!("amount {text:?} {e}"))
}

fn parse_hold_id(text: &str) -> anyhow::Result<RequestId> {
    RequestId::parse(text).with_context(|| format!("hold id {text:?} is not 1-64 characters of [A-Za-z0-9._:-]"))
}

fn parse_hold_timeout(text: &str) -> Result<u32, String> {
    let timeout = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    u32::try_from(timeout.as_secs())
        .ok()
        .filter(|s| (1..=HOLD_TIMEOUT_MAX_S).contains(s) && timeout.subsec_nanos() == 0)
        .ok_or_else(|| format!("must be whole seconds from 1s to 7days, got {text}"))
}

/// Publishes a request (confirmed); with `wait` > 0 prints its result, with the exit code of
/// its status.
async fn send(args: SendArgs, command: domain::Command) -> anyhow::Result<ExitCode> {
    let SendArgs { services, user, request_id, wait } = args;
    let client = Client::connect(&services.amqp_url, &services.namespace, services.ca_file.as_deref()).await?;
    let request = client.command(&user, command, request_id.as_deref())?;
    if wait == 0 {
        client.submit(&request, None).await?;
        println!("{}", serde_json::json!({ "request_id": request.request_id, "published": true }));
        return Ok(ExitCode::SUCCESS);
    }
    let wait = Duration::from_secs(wait);
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
