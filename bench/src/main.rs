//! The `walletq-bench` command line (also reached as `walletq bench`): runs the bench,
//! prints its tables, writes the JSON report and the plot, and maps the outcome to an exit
//! code.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use walletq::telemetry::{self, LogFormat};
use walletq_bench::report::{compare_table, run_table};
use walletq_bench::{BenchArgs, plot};

/// Exit code when a bench run of an approach that promises correctness ended with wrong balances.
const EXIT_INCORRECT: u8 = 5;

#[derive(Parser, Debug)]
#[command(
    name = "walletq-bench",
    version,
    about = "Measure walletq (and, with --compare, the approaches it replaces) under concurrent load"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "WALLETQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    args: Box<BenchArgs>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("walletq-bench: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(&cli.args)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("walletq-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let style = args.table_style;
    let report = walletq_bench::run(args, |run| println!("{}\n", run_table(run, style))).await?;
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
        eprintln!("walletq-bench: final balances are wrong for {}", broken.join(", "));
        return Ok(ExitCode::from(EXIT_INCORRECT));
    }
    Ok(ExitCode::SUCCESS)
}
