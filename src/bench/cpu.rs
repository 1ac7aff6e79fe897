//! CPU use over a measurement, from `/proc`: this process's, and the whole machine's (the
//! broker and anything else running count there), so a figure can say whether CPU was what
//! limited it. Linux only; elsewhere the figures are absent.

use std::time::Duration;

use serde::Serialize;

/// Length of a clock tick in `/proc` (USER_HZ is 100 on every Linux configuration in use).
const TICK: Duration = Duration::from_millis(10);

/// CPU counters at one instant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuSnapshot {
    process: Option<u64>,
    machine: Option<(u64, u64)>,
}

/// CPU used between two snapshots.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CpuUse {
    /// Share of all cores that were busy (100 % = every core, the whole time).
    pub(crate) machine_busy_percent: Option<f64>,
    /// CPU time the whole machine spent, microseconds per job.
    pub(crate) machine_us_per_job: Option<f64>,
    /// CPU time of the bench process (worker, simulator, event consumer), microseconds per job.
    pub(crate) process_us_per_job: Option<f64>,
}

impl CpuSnapshot {
    /// Reads the counters now.
    pub(crate) fn now() -> CpuSnapshot {
        CpuSnapshot {
            process: process_ticks(),
            machine: machine_ticks(),
        }
    }

    /// What was used since `self`, spread over `jobs`.
    pub(crate) fn used_since(&self, jobs: usize) -> CpuUse {
        let later = CpuSnapshot::now();
        let per_job = |ticks: u64| ticks as f64 * TICK.as_secs_f64() * 1e6 / jobs.max(1) as f64;
        let machine = self
            .machine
            .zip(later.machine)
            .map(|((busy0, all0), (busy1, all1))| {
                (busy1.saturating_sub(busy0), all1.saturating_sub(all0))
            });
        CpuUse {
            machine_busy_percent: machine
                .filter(|(_, all)| *all > 0)
                .map(|(busy, all)| busy as f64 * 100.0 / all as f64),
            machine_us_per_job: machine.map(|(busy, _)| per_job(busy)),
            process_us_per_job: self
                .process
                .zip(later.process)
                .map(|(before, after)| per_job(after.saturating_sub(before))),
        }
    }
}

/// How busy the machine is over `window` (percent of all cores): the bench warns when it
/// starts on a machine that is busy with something else.
pub(crate) async fn machine_busy_percent(window: Duration) -> Option<f64> {
    let before = CpuSnapshot::now();
    tokio::time::sleep(window).await;
    before.used_since(1).machine_busy_percent
}

/// User + system ticks of this process, from `/proc/self/stat`.
fn process_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which may hold spaces: split after its `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// (busy, total) ticks of all cores, from the `cpu` line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // idle and iowait are the 4th and 5th values.
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}
