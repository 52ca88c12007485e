//! The `walletq` command line: a thin edge over the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::Client;
use crate::bench::report::{compare_table, run_table};
use crate::bench::{BenchArgs, plot};
use crate::configuration::{GatewaySettings, ServiceSettings, TopologySettings, WorkerSettings};
use crate::domain::{Money, Op, Status, UserId};
use crate::gateway::auth::{JwtSecret, mint_token};
use crate::ledger::{Ledger, Schema};
use crate::telemetry::{self, LogFormat};

/// Exit code when a waited-for request was rejected (2 is clap's usage error).
const EXIT_REJECTED: u8 = 3;
/// Exit code when no result came within `--wait`.
const EXIT_NO_RESULT: u8 = 4;
/// Exit code when a bench run of an approach that promises correctness ended with wrong balances.
const EXIT_INCORRECT: u8 = 5;

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
    Bench(Box<BenchArgs>),
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
        Command::Worker { services, topology, worker } => {
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
        Command::Bench(args) => bench(&args).await,
        Command::Audit { services, json } => {
            let ledger = read_only_ledger(&services).await?;
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
        Command::Status { services, topology, member_ttl_ms, json } => {
            let status = crate::status::collect(&services, &topology, member_ttl_ms).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.to_table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway { services, gateway } => {
            let secret = JwtSecret::from_env()?;
            let listener = tokio::net::TcpListener::bind(gateway.listen)
                .await
                .with_context(|| format!("listening on {}", gateway.listen))?;
            let app = crate::gateway::app(&services, &gateway, &secret).await?;
            crate::gateway::serve(listener, app, async {
                if let Err(error) = shutdown_signal().await {
                    tracing::error!(error = %format!("{error:#}"), "signal handling failed; stopping");
                }
                tracing::info!("stopping: finishing the requests in flight");
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { user, ttl } => {
            let user = UserId::parse(&user).context("user id must be 1-64 characters of [A-Za-z0-9._:-]")?;
            println!("{}", mint_token(&JwtSecret::from_env()?, &user, ttl)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Withdraw(args) => submit(args, Op::Withdraw).await,
        Command::Deposit(args) => submit(args, Op::Deposit).await,
        Command::Balance { services, user } => {
            let user = UserId::parse(&user).context("user id must be 1-64 characters of [A-Za-z0-9._:-]")?;
            let ledger = read_only_ledger(&services).await?;
            match ledger.wallet(&user).await? {
                Some(wallet) => println!("{}", serde_json::to_string_pretty(&wallet)?),
                None => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "user_id": user, "balance": null, "coupons": [] })
                    )?
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
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

async fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let style = args.table_style;
    let report = crate::bench::run(args, |run| println!("{}\n", run_table(run, style))).await?;
    if report.runs.len() > 1 {
        println!("{}", compare_table(&report.runs, style));
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).context("encoding the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "walletq bench: {} scenario, {} requests, {} clients{}, {} queues x {}",
            args.scenario.as_str(),
            args.requests,
            args.clients,
            args.rate.map(|r| format!(" at {r} req/s")).unwrap_or_default(),
            args.topology.queue_type.as_str(),
            args.topology.partitions,
        );
        plot::write_svg(path, &title, &report.runs)?;
    }
    let broken: Vec<&str> = report.runs.iter().filter(|r| r.broke_its_promise()).map(|r| r.label.as_str()).collect();
    if !broken.is_empty() {
        eprintln!("walletq: final balances are wrong for {}", broken.join(", "));
        return Ok(ExitCode::from(EXIT_INCORRECT));
    }
    Ok(ExitCode::SUCCESS)
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
