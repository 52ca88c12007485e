//! Where the CPU went during a run, from `/proc` (Linux; empty elsewhere): cores used by
//! this process (load generator and in-process worker), PostgreSQL, RabbitMQ, Redis and
//! everything else (other builds and tests on a shared machine).

use std::collections::HashMap;

use serde::Serialize;

/// Cores used on average by each group over an interval (2.0 = two cores busy).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuShare {
    /// Cores used by the bench process itself (load generator and in-process workers).
    pub this_process: f64,
    /// Cores used by PostgreSQL.
    pub postgres: f64,
    /// Cores used by RabbitMQ.
    pub rabbitmq: f64,
    /// Cores used by Redis.
    pub redis: f64,
    /// Interrupt and softirq handling (loopback networking lands here).
    pub interrupts: f64,
    /// Cores used by every other process.
    pub other: f64,
    /// Cores left idle.
    pub idle: f64,
}

/// Cumulative CPU ticks at one moment.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// All CPUs: busy, interrupt (irq + softirq) and idle (incl. iowait) ticks.
    busy: u64,
    interrupts: u64,
    idle: u64,
    cpus: usize,
    groups: HashMap<&'static str, u64>,
}

const GROUPS: [&str; 4] = ["this_process", "postgres", "rabbitmq", "redis"];

/// The group a process belongs to, by its command name.
fn group_of(pid: u32, comm: &str) -> Option<&'static str> {
    if pid == std::process::id() {
        return Some("this_process");
    }
    match comm {
        "postgres" => Some("postgres"),
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => Some("rabbitmq"),
        "redis-server" => Some("redis"),
        _ => None,
    }
}

/// `(comm, utime + stime)` from the text of `/proc/<pid>/stat`.
fn parse_process_stat(text: &str) -> Option<(&str, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = &text[open + 1..close];
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // After the comm: state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// `(busy, interrupts, idle, cpus)` ticks from the text of `/proc/stat`.
fn parse_system_stat(text: &str) -> Option<(u64, u64, u64, usize)> {
    let mut lines = text.lines();
    let total: Vec<u64> = lines.next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let cpus = lines.filter(|l| l.starts_with("cpu")).count();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let idle = total.get(3)? + total.get(4).unwrap_or(&0);
    let interrupts = total.get(5).unwrap_or(&0) + total.get(6).unwrap_or(&0);
    let busy = total.iter().take(8).sum::<u64>() - idle;
    Some((busy, interrupts, idle, cpus.max(1)))
}

impl CpuSnapshot {
    /// Reads `/proc` now; an empty snapshot where it cannot.
    pub fn take() -> Self {
        let Some((busy, interrupts, idle, cpus)) =
            std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_system_stat)
        else {
            return CpuSnapshot::default();
        };
        let mut groups: HashMap<&'static str, u64> = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                if let Some((comm, ticks)) = parse_process_stat(&text) {
                    if let Some(group) = group_of(pid, comm) {
                        *groups.entry(group).or_default() += ticks;
                    }
                }
            }
        }
        CpuSnapshot { busy, interrupts, idle, cpus, groups }
    }

    /// The average use of each group between `self` and the later snapshot `end`.
    pub fn share_until(&self, end: &CpuSnapshot) -> Option<CpuShare> {
        let busy = end.busy.checked_sub(self.busy)?;
        let interrupts = end.interrupts.checked_sub(self.interrupts)?;
        let idle = end.idle.checked_sub(self.idle)?;
        let ticks_per_core = (busy + idle) as f64 / end.cpus as f64;
        if ticks_per_core <= 0.0 {
            return None;
        }
        let cores = |ticks: u64| ticks as f64 / ticks_per_core;
        let used = |group: &str| {
            end.groups.get(group).copied().unwrap_or(0).saturating_sub(self.groups.get(group).copied().unwrap_or(0))
        };
        let known: u64 = GROUPS.iter().map(|g| used(g)).sum();
        Some(CpuShare {
            this_process: cores(used("this_process")),
            postgres: cores(used("postgres")),
            rabbitmq: cores(used("rabbitmq")),
            redis: cores(used("redis")),
            interrupts: cores(interrupts),
            other: cores(busy.saturating_sub(known + interrupts)),
            idle: cores(idle),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_lines() {
        let text = "1234 (beam.smp) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 30 0";
        assert_eq!(parse_process_stat(text), Some(("beam.smp", 300)));
        let odd = "7 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 1 2 0 0";
        assert_eq!(parse_process_stat(odd), Some(("a) b (c)", 3)));
        let system = "cpu  100 0 50 800 50 7 3 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\n";
        assert_eq!(parse_system_stat(system), Some((160, 10, 850, 2)));
    }

    #[test]
    fn shares_are_in_cores() {
        let start = CpuSnapshot { busy: 0, interrupts: 0, idle: 0, cpus: 2, groups: HashMap::from([("postgres", 10)]) };
        let end = CpuSnapshot {
            busy: 150,
            interrupts: 20,
            idle: 50,
            cpus: 2,
            groups: HashMap::from([("postgres", 60), ("this_process", 50)]),
        };
        let share = start.share_until(&end).unwrap();
        assert_eq!(share.postgres, 0.5);
        assert_eq!(share.this_process, 0.5);
        assert_eq!(share.interrupts, 0.2);
        assert!((share.other - 0.3).abs() < 1e-9);
        assert_eq!(share.idle, 0.5);
    }
}
