//! walletq's benchmark (`walletq-bench`, also run as `walletq bench`): the same workload
//! through walletq and through the approaches it replaces, with the same number of
//! concurrent clients, measured end to end and checked for correctness. Each approach runs
//! in a fresh namespace and database of its own, removed afterwards.
//!
//! A crate of its own so the product never carries the bench's dependencies (plots,
//! tables, progress bars, histograms); it uses walletq only through its public API.

pub mod approaches;
pub mod cpu;
pub mod driver;
pub mod env;
pub mod model;
pub mod plot;
pub mod report;
pub mod stats;
pub mod workload;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use approaches::{Approach, Direct, accounts};
use driver::{Load, Measured, drive_direct, drive_queued};
use env::Environment;
use report::{BenchReport, Machine, RunReport, TableStyle};
use workload::{Scenario, Workload};

use walletq::configuration::{ServiceSettings, TopologySettings, WorkerSettings};

/// `walletq-bench` options (the same as `walletq bench`'s).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Where the services are.
    #[command(flatten)]
    pub services: ServiceSettings,
    /// The shape of the load.
    #[arg(long, value_enum, default_value_t = Scenario::Spread)]
    pub scenario: Scenario,
    /// Users (wallets); 10000 for spread and 1000 for mixed when omitted; hot has one.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub users: Option<u32>,
    /// Requests to send.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub requests: u32,
    /// Concurrent clients (confirming publishers for the queued approaches), as the seed's `ab -c100`.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub clients: u32,
    /// Offered load in requests per second over all clients; as fast as possible when omitted.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Run every approach, one after the other, and print one comparison table.
    #[arg(long, conflicts_with = "approach")]
    pub compare: bool,
    /// The approaches to run, comma-separated, when not comparing.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "walletq")]
    pub approach: Vec<Approach>,
    /// Write every measurement as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput over time and the latency distribution into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Look of the printed tables.
    #[arg(long, value_enum, default_value_t)]
    pub table_style: TableStyle,
    /// The walletq topology of the queued approaches.
    #[command(flatten)]
    pub topology: TopologySettings,
    /// walletq worker instances run in-process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// The walletq worker's tuning.
    #[command(flatten)]
    pub worker: WorkerSettings,
    /// PostgreSQL pool of the direct approaches; one connection per client (as many as the server can spare) when omitted.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub db_pool: Option<u32>,
    /// Sleep between attempts at a taken Redis lock (approach 2), in milliseconds; 1 was its
    /// best on the hot wallet (0: 1,039, 1: 1,176, 5: 1,134, 20: 609 req/s).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub redis_spin_ms: u64,
    /// Sleep between attempts at a taken lock row (approach 3), in milliseconds; 100 was its
    /// best on the hot wallet (1: 36, 5: 60, 20: 162, 50: 413, 100: 447 req/s): every failed
    /// insert leaves a dead row and index entry behind, so eager retries slow the holder down.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub lock_table_spin_ms: u64,
    /// Seed of the workload generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("a positive number of requests per second".into()),
    }
}

impl BenchArgs {
    /// The approaches this invocation runs, in order.
    pub fn approaches(&self) -> Vec<Approach> {
        if self.compare { Approach::ALL.to_vec() } else { self.approach.clone() }
    }

    fn users(&self) -> u32 {
        self.users.unwrap_or_else(|| self.scenario.default_users())
    }

    fn settings_json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.scenario,
            "users": if self.scenario == Scenario::Hot { 1 } else { self.users() },
            "requests": self.requests,
            "clients": self.clients,
            "rate": self.rate,
            "partitions": self.topology.partitions,
            "queue_type": self.topology.queue_type.as_str(),
            "workers": self.workers,
            "batch_max": self.worker.batch_max,
            "prefetch": self.worker.effective_prefetch(),
            "db_connections": self.worker.db_connections,
            "lock_ttl_ms": self.worker.lock_ttl_ms,
            "db_pool": self.db_pool,
            "redis_spin_ms": self.redis_spin_ms,
            "lock_table_spin_ms": self.lock_table_spin_ms,
            "seed": self.seed,
        })
    }
}

/// Runs every requested approach in turn; `on_run` sees each report as soon as it exists.
pub async fn run(args: &BenchArgs, mut on_run: impl FnMut(&RunReport)) -> anyhow::Result<BenchReport> {
    let workload = Arc::new(workload::generate(args.scenario, args.users(), args.requests, args.seed));
    let machine = Machine::describe(env::service_versions(&args.services).await);
    let mut runs = Vec::new();
    if args.scenario == Scenario::Payout {
        if let Some(direct) = args.approaches().into_iter().find(|a| !a.is_queued()) {
            anyhow::bail!(
                "the payout scenario runs through the queues only (walletq, broker-echo), not {}",
                direct.name()
            );
        }
    }
    for approach in args.approaches() {
        let env = Environment::fresh(&args.services, &args.topology)?;
        tracing::info!(approach = approach.name(), namespace = env.names.namespace(), "bench run starting");
        let measured = measure(args, approach, &workload, &env).await;
        let cleaned = env.cleanup(approach.is_queued()).await;
        let report = measured.with_context(|| format!("benchmarking {}", approach.name()))?;
        cleaned.with_context(|| format!("cleaning up after {}", approach.name()))?;
        on_run(&report);
        runs.push(report);
    }
    Ok(BenchReport { machine, settings: args.settings_json(), runs })
}

async fn measure(
    args: &BenchArgs,
    approach: Approach,
    workload: &Arc<Workload>,
    env: &Environment,
) -> anyhow::Result<RunReport> {
    let load = Load { clients: args.clients, rate: args.rate };
    let redis_spin = Duration::from_millis(args.redis_spin_ms);
    let lock_table_spin = Duration::from_millis(args.lock_table_spin_ms);
    let redis_url = env.services.redis_url.clone();
    let prefix = env.names.namespace().to_owned();
    let run = Run { args, workload, env, load };
    let mut batches = None;
    let (measured, finals, cpu, tasks_peak, db_pool) = match approach {
        Approach::Naive => run.measure(approach, |pool| async { Ok(approaches::naive::Naive::new(pool)) }).await?,
        Approach::RedisLock => {
            run.measure(approach, |pool| async move {
                approaches::redis_lock::RedisLock::connect(pool, &redis_url, &prefix, redis_spin).await
            })
            .await?
        }
        Approach::SqlLockTable => {
            run.measure(approach, |pool| approaches::sql_lock_table::SqlLockTable::create(pool, lock_table_spin))
                .await?
        }
        Approach::SelectForUpdate => {
            run.measure(approach, |pool| async { Ok(approaches::select_for_update::SelectForUpdate::new(pool)) })
                .await?
        }
        Approach::ConditionalUpdate => {
            run.measure(approach, |pool| async { Ok(approaches::conditional_update::ConditionalUpdate::new(pool)) })
                .await?
        }
        Approach::BrokerEcho => {
            let echo = approaches::broker_echo::BrokerEcho::start(env, &args.worker).await?;
            let (measured, cpu, tasks_peak) = run.queued(approach).await;
            echo.stop().await?;
            (measured?, None, cpu, tasks_peak, None)
        }
        Approach::Walletq => {
            let walletq =
                approaches::walletq::Walletq::start(env, &args.worker, args.workers, &workload.opening).await?;
            let (measured, cpu, tasks_peak) = run.queued(approach).await;
            let finals = walletq.final_cents().await;
            batches = walletq.batch_sizes().await.ok();
            walletq.stop().await?;
            (measured?, Some(finals?), cpu, tasks_peak, None)
        }
    };
    let mut report = build_report(args, approach, workload, measured, finals, cpu, tasks_peak);
    report.db_pool = db_pool;
    report.batches = batches;
    Ok(report)
}

type Measurement = (Measured, Option<HashMap<String, i64>>, Option<cpu::CpuShare>, usize, Option<u32>);

/// What a run needs: the options, the workload, its environment and the load.
struct Run<'a> {
    args: &'a BenchArgs,
    workload: &'a Arc<Workload>,
    env: &'a Environment,
    load: Load,
}

impl Run<'_> {
    /// Publishes the workload to the partition queues and collects the results, watched.
    async fn queued(&self, approach: Approach) -> (anyhow::Result<Measured>, Option<cpu::CpuShare>, usize) {
        let watch = Watch::start();
        let measured = drive_queued(
            &self.env.services.amqp_url,
            self.env.services.ca_file.as_deref(),
            &self.env.names,
            (Arc::new(self.workload.requests.clone()), &self.workload.after),
            &self.load,
            progress_bar(self.args, approach),
            approach.moves_money(),
        )
        .await;
        let (cpu, tasks_peak) = watch.stop();
        (measured, cpu, tasks_peak)
    }

    /// Creates the database and accounts, builds the approach on a pool sized to the
    /// clients, drives it, and reads the final balances.
    async fn measure<A, F, Fut>(&self, approach: Approach, make: F) -> anyhow::Result<Measurement>
    where
        A: Direct,
        F: FnOnce(PgPool) -> Fut,
        Fut: Future<Output = anyhow::Result<A>>,
    {
        let wanted = self.args.db_pool.unwrap_or(self.args.clients);
        let size = match self.args.db_pool {
            Some(size) => size,
            None => env::affordable_connections(&self.env.services.database_url, wanted).await?,
        };
        if size < wanted {
            tracing::info!(wanted, size, "PostgreSQL cannot spare a connection per client; the pool is smaller");
        }
        let pool = self.env.create_database(size).await?;
        accounts::create(&pool, &self.workload.opening).await?;
        let direct = Arc::new(make(pool.clone()).await?);
        let watch = Watch::start();
        let measured = drive_direct(
            direct,
            Arc::new(self.workload.requests.clone()),
            &self.load,
            progress_bar(self.args, approach),
        )
        .await;
        let (cpu, tasks_peak) = watch.stop();
        let finals = accounts::final_cents(&pool).await;
        pool.close().await;
        Ok((measured, Some(finals?), cpu, tasks_peak, Some(size)))
    }
}

/// Samples this process's tokio tasks and the machine's CPU over a run.
struct Watch {
    cpu_start: cpu::CpuSnapshot,
    tasks_peak: Arc<AtomicUsize>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start() -> Self {
        let tasks_peak = Arc::new(AtomicUsize::new(0));
        let peak = tasks_peak.clone();
        let sampler = tokio::spawn(async move {
            let metrics = tokio::runtime::Handle::current().metrics();
            loop {
                peak.fetch_max(metrics.num_alive_tasks(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Watch { cpu_start: cpu::CpuSnapshot::take(), tasks_peak, sampler }
    }

    fn stop(self) -> (Option<cpu::CpuShare>, usize) {
        self.sampler.abort();
        (self.cpu_start.share_until(&cpu::CpuSnapshot::take()), self.tasks_peak.load(Ordering::Relaxed))
    }
}

fn progress_bar(args: &BenchArgs, approach: Approach) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template("{prefix:>22} {wide_bar} {pos}/{len} {per_sec:>14} {elapsed_precise}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(u64::from(args.requests)).with_style(style).with_prefix(approach.label())
}

fn build_report(
    args: &BenchArgs,
    approach: Approach,
    workload: &Workload,
    measured: Measured,
    finals: Option<HashMap<String, i64>>,
    cpu: Option<cpu::CpuShare>,
    tokio_tasks_peak: usize,
) -> RunReport {
    let recorder = &measured.recorder;
    let correctness = finals.filter(|_| approach.moves_money()).map(|finals| {
        let opening: Vec<_> = workload.opening.iter().map(|(u, b)| (u.clone(), b.cents())).collect();
        model::check(&opening, &workload.requests, &recorder.verdicts(), &finals)
    });
    let verdicts = approach.moves_money();
    RunReport {
        approach,
        label: approach.label(),
        scenario: workload.scenario,
        queue_type: approach.is_queued().then(|| args.topology.queue_type.as_str().to_owned()),
        clients: args.clients,
        db_pool: None,
        rate: args.rate,
        requests: workload.requests.len() as u64,
        completed: recorder.completed(),
        errors: recorder.errors(),
        first_error: measured.first_error,
        elapsed_s: recorder.elapsed().as_secs_f64(),
        throughput_rps: recorder.throughput_rps(),
        withdrawals_rps: recorder.throughput_rps() * workload.withdrawals() as f64
            / workload.requests.len().max(1) as f64,
        latency: recorder.latency(),
        approved: verdicts.then(|| recorder.approved()),
        rejected: verdicts.then(|| recorder.rejected()),
        correctness,
        cpu,
        batches: None,
        tokio_tasks_peak,
        timeline_rps: recorder.timeline_rps(),
        timeline_max_latency_ms: recorder.timeline_max_latency(),
        latency_curve_ms: recorder.latency_curve(),
    }
}
