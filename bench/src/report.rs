//! What a bench run reports: one [`RunReport`] per approach, printed as tables and written
//! as JSON.

use std::collections::HashMap;

use comfy_table::presets::{ASCII_MARKDOWN, UTF8_FULL_CONDENSED};
use comfy_table::{CellAlignment, ColumnConstraint, Table, Width};
use serde::Serialize;

use super::approaches::Approach;
use super::approaches::walletq::BatchSizes;
use super::cpu::CpuShare;
use super::model::Correctness;
use super::stats::LatencySummary;
use super::workload::Scenario;

/// The measurements of one approach.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Which approach ran.
    pub approach: Approach,
    /// The approach's name in tables.
    pub label: String,
    /// The shape of the load.
    pub scenario: Scenario,
    /// Queue type of the partition queues (queued approaches).
    pub queue_type: Option<String>,
    /// Concurrent clients.
    pub clients: u32,
    /// PostgreSQL connections of the direct approaches' pool.
    pub db_pool: Option<u32>,
    /// Offered load in requests per second; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// Requests sent.
    pub requests: u64,
    /// Requests answered.
    pub completed: u64,
    /// Requests that failed (no answer, an error).
    pub errors: u64,
    /// The first error met.
    pub first_error: Option<String>,
    /// Wall-clock time of the run.
    pub elapsed_s: f64,
    /// Answered requests per second.
    pub throughput_rps: f64,
    /// Withdrawals per second: the throughput times the share of withdrawals (withdraw and
    /// capture requests) among the requests. A payout is two requests and one withdrawal.
    pub withdrawals_rps: f64,
    /// End-to-end latency percentiles.
    pub latency: LatencySummary,
    /// Verdict counts (absent for the broker echo, which gives none).
    pub approved: Option<u64>,
    /// Requests refused.
    pub rejected: Option<u64>,
    /// The final balances against the model (absent for the broker echo).
    pub correctness: Option<Correctness>,
    /// Cores used during the run, by process group.
    pub cpu: Option<CpuShare>,
    /// How walletq cut the requests into batches.
    pub batches: Option<BatchSizes>,
    /// Most tokio tasks alive at once in this process during the run.
    pub tokio_tasks_peak: usize,
    /// `(seconds, completions per second)`.
    pub timeline_rps: Vec<(f64, f64)>,
    /// `(seconds since start, longest latency ms)` per bucket of the timeline.
    pub timeline_max_latency_ms: Vec<(f64, f64)>,
    /// `(percentile, milliseconds)`.
    pub latency_curve_ms: Vec<(f64, f64)>,
}

impl RunReport {
    /// Whether an approach that claims correctness failed the check.
    pub fn broke_its_promise(&self) -> bool {
        self.approach.claims_correctness() && self.correctness.as_ref().is_some_and(|c| !c.balances_correct)
    }
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, when readable.
    pub memory_gib: Option<u64>,
    /// Kernel release, when readable.
    pub kernel: Option<String>,
    /// Each service's version.
    pub services: HashMap<String, String>,
}

impl Machine {
    /// Reads what the machine says about itself; unknown parts are left out.
    pub fn describe(services: HashMap<String, String>) -> Self {
        let memory_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
            let kib: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib.div_ceil(1024 * 1024))
        });
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|k| k.trim().to_owned()),
            services,
        }
    }
}

/// Everything a `walletq bench` invocation measured, as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The machine the numbers come from.
    pub machine: Machine,
    /// The command's settings, as given.
    pub settings: serde_json::Value,
    /// One report per approach run.
    pub runs: Vec<RunReport>,
}

/// Table look: boxes for terminals, Markdown for documents.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableStyle {
    /// Box-drawing tables for terminals.
    #[default]
    Boxes,
    /// Markdown tables for documents.
    Markdown,
}

fn table(style: TableStyle) -> Table {
    let mut table = Table::new();
    table.load_style(match style {
        TableStyle::Boxes => UTF8_FULL_CONDENSED,
        TableStyle::Markdown => ASCII_MARKDOWN,
    });
    table
}

/// Requests per second, rounded, with thousands separators.
pub fn format_rate(rps: f64) -> String {
    let whole = rps.round().max(0.0) as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Milliseconds with precision that suits their size.
pub fn format_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "NO" }
}

/// The details of one run, one measurement per row.
pub fn run_table(run: &RunReport, style: TableStyle) -> Table {
    let mut table = table(style);
    table.set_header(vec![run.label.clone(), format!("{} scenario", run.scenario.as_str())]);
    let mut row = |name: &str, value: String| {
        table.add_row(vec![name.to_owned(), value]);
    };
    row("clients", run.clients.to_string());
    if let Some(db_pool) = run.db_pool {
        row("PostgreSQL pool", format!("{db_pool} connections"));
    }
    row("offered rate", run.rate.map_or("as fast as possible".into(), |r| format!("{} req/s", format_rate(r))));
    if let Some(queue_type) = &run.queue_type {
        row("queue type", queue_type.clone());
    }
    row("completed", format!("{} of {} ({} errors)", run.completed, run.requests, run.errors));
    if let Some(error) = &run.first_error {
        row("first error", error.clone());
    }
    row("elapsed", format!("{:.2} s", run.elapsed_s));
    row("throughput", format!("{} req/s", format_rate(run.throughput_rps)));
    row("withdrawals", format!("{} /s", format_rate(run.withdrawals_rps)));
    let l = &run.latency;
    row(
        "latency p50 / p90 / p99",
        format!("{} / {} / {}", format_ms(l.p50_ms), format_ms(l.p90_ms), format_ms(l.p99_ms)),
    );
    row("latency p99.9 / max", format!("{} / {}", format_ms(l.p999_ms), format_ms(l.max_ms)));
    if let (Some(approved), Some(rejected)) = (run.approved, run.rejected) {
        row("approved / rejected", format!("{approved} / {rejected}"));
    }
    if let Some(c) = &run.correctness {
        row("overdrafts / lost updates", format!("{} / {}", c.overdrafts, c.lost_updates));
        row("final balances correct", format!("{} ({} users wrong)", yes_no(c.balances_correct), c.users_wrong));
    }
    if let Some(cpu) = &run.cpu {
        row(
            "cores used",
            format!(
                "bench+worker {:.2}, postgres {:.2}, rabbitmq {:.2}, redis {:.2}, irq {:.2}, other {:.2}, idle {:.2}",
                cpu.this_process, cpu.postgres, cpu.rabbitmq, cpu.redis, cpu.interrupts, cpu.other, cpu.idle
            ),
        );
    }
    if let Some(b) = &run.batches {
        row("batches", format!("{} (mean {:.1} requests, largest {})", b.batches, b.mean, b.largest));
    }
    row("tokio tasks (peak)", run.tokio_tasks_peak.to_string());
    table
}

/// One row per approach: the `--compare` table.
pub fn compare_table(runs: &[RunReport], style: TableStyle) -> Table {
    let mut table = table(style);
    table.set_header(vec![
        "approach",
        "requests/s",
        "p50",
        "p99",
        "overdrafts",
        "lost updates",
        "final balance correct",
    ]);
    for run in runs {
        let (overdrafts, lost, correct) = match &run.correctness {
            Some(c) => (c.overdrafts.to_string(), c.lost_updates.to_string(), yes_no(c.balances_correct).to_owned()),
            None => ("–".into(), "–".into(), "n/a".into()),
        };
        let mut cells = vec![
            run.label.clone(),
            format_rate(run.throughput_rps),
            format_ms(run.latency.p50_ms),
            format_ms(run.latency.p99_ms),
            overdrafts,
            lost,
            correct,
        ];
        if run.errors > 0 {
            cells[0] = format!("{} ({} errors)", run.label, run.errors);
        }
        table.add_row(cells);
    }
    for index in 1..=5 {
        if let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    if let Some(column) = table.column_mut(0) {
        column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(12)));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(approach: Approach, rps: f64, correctness: Option<Correctness>) -> RunReport {
        RunReport {
            approach,
            label: approach.label(),
            scenario: Scenario::Hot,
            queue_type: None,
            clients: 100,
            db_pool: None,
            rate: None,
            requests: 1_000,
            completed: 1_000,
            errors: 0,
            first_error: None,
            elapsed_s: 1.0,
            throughput_rps: rps,
            withdrawals_rps: rps,
            latency: LatencySummary { p50_ms: 1.234, p99_ms: 45.67, ..LatencySummary::default() },
            approved: correctness.as_ref().map(|_| 500),
            rejected: correctness.as_ref().map(|_| 500),
            correctness,
            cpu: None,
            batches: None,
            tokio_tasks_peak: 3,
            timeline_rps: vec![],
            timeline_max_latency_ms: vec![],
            latency_curve_ms: vec![],
        }
    }

    #[test]
    fn numbers_are_readable() {
        assert_eq!(format_rate(1234567.4), "1,234,567");
        assert_eq!(format_rate(999.5), "1,000");
        assert_eq!(format_rate(12.0), "12");
        assert_eq!(format_ms(1.234), "1.23 ms");
        assert_eq!(format_ms(45.67), "45.7 ms");
        assert_eq!(format_ms(1234.5), "1234 ms");
    }

    #[test]
    fn the_compare_table_shows_every_column() {
        let naive = Correctness { overdrafts: 12, lost_updates: 13, users_wrong: 1, ..Correctness::default() };
        let good = Correctness { balances_correct: true, ..Correctness::default() };
        let runs = [
            sample(Approach::Naive, 3000.0, Some(naive)),
            sample(Approach::BrokerEcho, 20000.0, None),
            sample(Approach::Walletq, 15000.0, Some(good)),
        ];
        let text = compare_table(&runs, TableStyle::Markdown).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("requests/s") && lines[0].contains("final balance correct"), "{text}");
        let naive_line = lines.iter().find(|l| l.contains("1 naive")).unwrap();
        assert!(naive_line.contains("3,000") && naive_line.contains("12") && naive_line.contains("NO"), "{naive_line}");
        let echo_line = lines.iter().find(|l| l.contains("6 broker-echo")).unwrap();
        assert!(echo_line.contains("n/a") && echo_line.contains("–"), "{echo_line}");
        let walletq_line = lines.iter().find(|l| l.contains("7 walletq")).unwrap();
        assert!(walletq_line.contains("15,000") && walletq_line.contains("yes"), "{walletq_line}");
        assert!(walletq_line.contains("1.23 ms") && walletq_line.contains("45.7 ms"));
    }

    #[test]
    fn only_approaches_that_promise_correctness_can_break_it() {
        let wrong = Correctness { users_wrong: 1, ..Correctness::default() };
        assert!(!sample(Approach::Naive, 1.0, Some(wrong.clone())).broke_its_promise());
        assert!(sample(Approach::Walletq, 1.0, Some(wrong)).broke_its_promise());
        assert!(!sample(Approach::BrokerEcho, 1.0, None).broke_its_promise());
    }

    #[test]
    fn the_run_table_names_its_approach_and_verdicts() {
        let run =
            sample(Approach::Walletq, 15000.0, Some(Correctness { balances_correct: true, ..Default::default() }));
        let text = run_table(&run, TableStyle::Boxes).to_string();
        assert!(text.contains("7 walletq") && text.contains("15,000 req/s") && text.contains("500 / 500"), "{text}");
    }
}
