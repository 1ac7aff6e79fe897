//! The figures of one run: the JSON document and the table printed for people.

use std::fmt::Write as _;

use serde::Serialize;

use super::ceiling::Ceiling;
use super::cpu::CpuUse;
use super::dialer::{Overhead, RatePrecision, SlowGenesys, StoreThroughputs, Throughput};
use super::fleet::{AdaptiveGoodput, FleetPrecision};
use super::memory::Memory;
use super::simcap::SimCapacity;

/// Goals from issue 4, reported against (figures, not pass/fail).
pub(crate) mod goals {
    /// (2)/(1).
    pub(crate) const THROUGHPUT_RATIO: f64 = 0.7;
    /// (3) achieved / R.
    pub(crate) const PRECISION: f64 = 0.99;
    /// (4) p99 of the worker's share, ms.
    pub(crate) const OVERHEAD_P99_MS: f64 = 2.0;
    /// (5) achieved / bound.
    pub(crate) const SLOW_RATIO: f64 = 0.95;
    /// (6) peak RSS, MiB.
    pub(crate) const PEAK_RSS_MIB: f64 = 64.0;
    /// (8): the fleet sends at least this share of its budget.
    pub(crate) const FLEET_PRECISION: f64 = 0.95;
    /// (9): goodput at least this share of the limit found.
    pub(crate) const ADAPTIVE_GOODPUT: f64 = 0.9;
    /// (9): at most this share of 429s.
    pub(crate) const ADAPTIVE_429: f64 = 0.02;
}

/// Everything one `dialer bench` run measured.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Report {
    /// The dialer's version.
    pub(crate) version: &'static str,
    /// `release` or `debug`: debug figures are not comparable.
    pub(crate) build: &'static str,
    /// Whether this was the `--quick` smoke run.
    pub(crate) quick: bool,
    /// CPU cores the machine offers.
    pub(crate) cores: usize,
    /// The broker (password removed).
    pub(crate) broker: String,
    /// Type of the jobs queues.
    pub(crate) queue_type: String,
    /// When the run started (RFC 3339).
    pub(crate) started_at: String,
    /// How busy the machine was (percent of all cores) just before the run: others' load skews figures.
    pub(crate) busy_before_percent: Option<f64>,
    /// How long the whole run took.
    pub(crate) seconds: f64,
    /// (1): the median round.
    pub(crate) ceiling: Option<Ceiling>,
    /// (2): the median round.
    pub(crate) throughput: Option<Throughput>,
    /// (2) with the default file decision store instead of memory.
    pub(crate) throughput_file_store: Option<Throughput>,
    /// (10): (2) with each decision store.
    pub(crate) stores: Option<StoreThroughputs>,
    /// (2)/(1): the median of the rounds' ratios.
    pub(crate) throughput_ratio: Option<f64>,
    /// (1) of each round, jobs/s.
    pub(crate) ceiling_rounds: Vec<f64>,
    /// (2) of each round, jobs/s.
    pub(crate) throughput_rounds: Vec<f64>,
    /// (2)/(1) of each round.
    pub(crate) throughput_ratio_rounds: Vec<f64>,
    /// (3).
    pub(crate) rate: Option<RatePrecision>,
    /// (4).
    pub(crate) overhead: Option<Overhead>,
    /// (5).
    pub(crate) slow_genesys: Option<SlowGenesys>,
    /// (6).
    pub(crate) memory: Option<Memory>,
    /// (7).
    pub(crate) simulator: Option<SimCapacity>,
    /// (8) with Redis.
    pub(crate) fleet_redis: Option<FleetPrecision>,
    /// (8) in share mode.
    pub(crate) fleet_share: Option<FleetPrecision>,
    /// (9).
    pub(crate) adaptive: Option<AdaptiveGoodput>,
    /// Where the rate chart was written.
    pub(crate) chart: Option<String>,
    /// Measurements that failed, with why.
    pub(crate) failures: Vec<String>,
}

/// `; machine 97 % busy, 180 us CPU/job (bench process 90)`, or nothing off Linux.
fn cpu_note(cpu: &CpuUse) -> String {
    match (
        cpu.machine_busy_percent,
        cpu.machine_us_per_job,
        cpu.process_us_per_job,
    ) {
        (Some(busy), Some(machine), Some(process)) => format!(
            "; machine {busy:.0} % busy, {machine:.0} us CPU/job (bench process {process:.0})"
        ),
        _ => String::new(),
    }
}

/// `median of 7100, 9800, 8800; ` when there were several rounds.
fn rounds_note(values: &[f64], decimals: usize) -> String {
    if values.len() < 2 {
        return String::new();
    }
    let list: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    format!("median of {}; ", list.join(", "))
}

/// `meets` / `misses`.
fn verdict(ok: bool) -> &'static str {
    if ok { "meets" } else { "MISSES" }
}

impl Report {
    /// The table, one row per measurement that ran.
    pub(crate) fn table(&self) -> String {
        let mut rows: Vec<[String; 4]> = Vec::new();
        if let Some(c) = &self.ceiling {
            rows.push([
                "1 broker ceiling (bare lapin loop)".into(),
                format!("{:.0} jobs/s", c.jobs_per_sec),
                format!(
                    "{}{} jobs, prefetch {}, job {} B, event {} B{}",
                    rounds_note(&self.ceiling_rounds, 0),
                    c.jobs,
                    c.prefetch,
                    c.job_bytes,
                    c.event_bytes,
                    cpu_note(&c.cpu)
                ),
                String::new(),
            ]);
        }
        if let Some(t) = &self.throughput {
            let (figure, goal) = match self.throughput_ratio {
                Some(ratio) => (
                    format!("{:.0} jobs/s = {ratio:.2} x (1)", t.jobs_per_sec),
                    format!(
                        ">= {:.2} x (1): {}",
                        goals::THROUGHPUT_RATIO,
                        verdict(ratio >= goals::THROUGHPUT_RATIO)
                    ),
                ),
                None => (
                    format!("{:.0} jobs/s", t.jobs_per_sec),
                    "(1) not run".into(),
                ),
            };
            rows.push([
                "2 dialer throughput".into(),
                figure,
                format!(
                    "{}{} jobs, concurrency {}{}",
                    rounds_note(&self.throughput_ratio_rounds, 2),
                    t.jobs,
                    t.concurrency,
                    cpu_note(&t.cpu)
                ),
                goal,
            ]);
        }
        if let Some(t) = &self.throughput_file_store {
            rows.push([
                "2b dialer throughput, file store".into(),
                format!("{:.0} jobs/s", t.jobs_per_sec),
                format!(
                    "the default embedded decision store (memory above); {} jobs, concurrency {}{}",
                    t.jobs,
                    t.concurrency,
                    cpu_note(&t.cpu)
                ),
                "for sizing; no goal".into(),
            ]);
        }
        if let Some(r) = &self.rate {
            let ok = r.precision >= goals::PRECISION
                && r.max_in_any_second as u32 <= r.bound_per_second
                && r.too_many_requests == 0;
            rows.push([
                format!(
                    "3 rate precision (R = {}/s, burst {})",
                    r.limit_per_sec, r.burst
                ),
                format!(
                    "{:.3} of R; max {} in any 1 s; {} x 429",
                    r.precision, r.max_in_any_second, r.too_many_requests
                ),
                format!(
                    "{:.0} s backlog, {} requests, largest gap {} ms, simulator limit {}/s",
                    r.seconds, r.requests, r.max_gap_ms, r.simulator_limit_per_sec
                ),
                format!(
                    ">= {:.2}, <= {} in 1 s, 0 x 429: {}",
                    goals::PRECISION,
                    r.bound_per_second,
                    verdict(ok)
                ),
            ]);
        }
        if let Some(o) = &self.overhead {
            rows.push([
                "4 overhead, delivery -> Genesys".into(),
                format!(
                    "p50 {:.2} ms, p99 {:.2} ms",
                    o.delivery_to_genesys.p50_ms, o.delivery_to_genesys.p99_ms
                ),
                format!(
                    "{} jobs {:.0} ms apart; broker publish->delivery p50/p99 {:.2}/{:.2} ms, publish->Genesys {:.2}/{:.2} ms",
                    o.delivery_to_genesys.samples,
                    o.interval_ms,
                    o.publish_to_delivery.p50_ms,
                    o.publish_to_delivery.p99_ms,
                    o.publish_to_genesys.p50_ms,
                    o.publish_to_genesys.p99_ms,
                ),
                format!(
                    "p99 <= {:.0} ms: {}",
                    goals::OVERHEAD_P99_MS,
                    verdict(o.delivery_to_genesys.p99_ms <= goals::OVERHEAD_P99_MS)
                ),
            ]);
        }
        if let Some(s) = &self.slow_genesys {
            rows.push([
                format!(
                    "5 slow Genesys ({} ms, C = {})",
                    s.latency_ms, s.concurrency
                ),
                format!("{:.1} jobs/s = {:.3} x bound", s.jobs_per_sec, s.ratio),
                format!(
                    "bound min(R = {}, C/latency = {:.1}) = {:.1}/s; {} jobs",
                    s.limit_per_sec,
                    f64::from(s.concurrency) * 1000.0 / s.latency_ms as f64,
                    s.bound_per_sec,
                    s.jobs
                ),
                format!(
                    ">= {:.2}: {}",
                    goals::SLOW_RATIO,
                    verdict(s.ratio >= goals::SLOW_RATIO)
                ),
            ]);
        }
        if let Some(m) = &self.memory {
            rows.push([
                format!("6 memory, {} jobs in flight", m.concurrency),
                format!("peak RSS {:.1} MiB", m.peak_rss_mib),
                format!(
                    "idle {:.1} MiB; `dialer run` child, {} ms latency, {} jobs, up to {} requests open",
                    m.idle_rss_mib, m.latency_ms, m.jobs, m.max_open_requests
                ),
                format!(
                    "<= {:.0} MiB: {}",
                    goals::PEAK_RSS_MIB,
                    verdict(m.peak_rss_mib <= goals::PEAK_RSS_MIB)
                ),
            ]);
        }
        if let Some(s) = &self.simulator {
            let versus = self
                .throughput
                .as_ref()
                .map(|t| format!("{:.1} x (2)", s.requests_per_sec / t.jobs_per_sec))
                .unwrap_or_default();
            rows.push([
                "7 simulator capacity".into(),
                format!("{:.0} requests/s", s.requests_per_sec),
                format!(
                    "{} clients, {:.1} s, {} errors",
                    s.clients, s.seconds, s.errors
                ),
                versus,
            ]);
        }
        for f in [&self.fleet_redis, &self.fleet_share].into_iter().flatten() {
            let ok = f.precision >= goals::FLEET_PRECISION
                && f.max_in_any_second as u32 <= f.bound_per_second;
            rows.push([
                format!(
                    "8 fleet precision, {} (R = {}/s, burst {})",
                    f.mode, f.limit_per_sec, f.burst
                ),
                format!(
                    "sum {:.3} of R; max {} in any 1 s",
                    f.precision, f.max_in_any_second
                ),
                format!(
                    "3 `dialer run` processes, fleet scope, {:.0} s backlog, {} requests",
                    f.seconds, f.requests
                ),
                format!(
                    ">= {:.2}, <= {} in 1 s: {}",
                    goals::FLEET_PRECISION,
                    f.bound_per_second,
                    verdict(ok)
                ),
            ]);
        }
        if let Some(a) = &self.adaptive {
            let ok =
                a.goodput_ratio >= goals::ADAPTIVE_GOODPUT && a.share_429 < goals::ADAPTIVE_429;
            rows.push([
                format!(
                    "9 adaptive goodput (budget {}/s, limit {}/s)",
                    a.budget_per_sec, a.simulator_limit_per_sec
                ),
                format!(
                    "{:.3} of the limit; {:.2} % 429s",
                    a.goodput_ratio,
                    a.share_429 * 100.0
                ),
                format!(
                    "3 processes with Redis, client-wide simulator limit; after the first {:.0} s, {:.0} s, {} requests",
                    a.warm_up_seconds, a.seconds, a.requests
                ),
                format!(
                    ">= {:.2}, < {:.0} % 429s: {}",
                    goals::ADAPTIVE_GOODPUT,
                    goals::ADAPTIVE_429 * 100.0,
                    verdict(ok)
                ),
            ]);
        }
        if let Some(st) = &self.stores {
            rows.push([
                "10 throughput by decision store".into(),
                format!(
                    "memory {:.0}, file {:.0}, postgres {:.0} jobs/s",
                    st.memory.jobs_per_sec, st.file.jobs_per_sec, st.postgres.jobs_per_sec
                ),
                format!(
                    "{} jobs each, concurrency {}; PostgreSQL {}{}",
                    st.postgres.jobs,
                    st.postgres.concurrency,
                    st.database,
                    cpu_note(&st.postgres.cpu)
                ),
                "for sizing; no goal".into(),
            ]);
        }
        let headers = ["measure", "figure", "conditions", "goal"];
        let widths: Vec<usize> = (0..4)
            .map(|i| {
                rows.iter()
                    .map(|row| row[i].chars().count())
                    .chain([headers[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let line = |out: &mut String, cells: [&str; 4]| {
            let mut text = String::new();
            for (cell, width) in cells.iter().zip(&widths) {
                let _ = write!(text, "{cell:<width$}  ");
            }
            let _ = writeln!(out, "{}", text.trim_end());
        };
        line(&mut out, headers);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&mut out, [&rule[0], &rule[1], &rule[2], &rule[3]]);
        for row in &rows {
            line(&mut out, [&row[0], &row[1], &row[2], &row[3]]);
        }
        for failure in &self.failures {
            let _ = writeln!(out, "FAILED: {failure}");
        }
        out
    }
}
