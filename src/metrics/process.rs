//! The standard `process_*` metrics (CPU seconds, memory, file descriptors, threads, start time),
//! read from `/proc/self` on every scrape.
//!
//! Rendered as text beside the recorder's output rather than recorded through it: the
//! `metrics` crate's counters are integers, and `process_cpu_seconds_total` is a counter of
//! fractional seconds. Without `/proc` (not Linux) nothing is rendered.

use std::fmt::Write as _;
use std::sync::OnceLock;

/// The `prefix` label of the series, set once by [`super::install`].
pub(super) static PREFIX: OnceLock<String> = OnceLock::new();

/// `AT_CLKTCK` in the auxiliary vector: the unit of the CPU times in `/proc/self/stat`.
const AT_CLKTCK: u64 = 17;

/// What a scrape reports; each value is absent when it could not be read.
#[derive(Debug, Default, PartialEq)]
pub struct Sample {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, bytes.
    pub resident_bytes: Option<f64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<f64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<f64>,
    /// OS threads.
    pub threads: Option<f64>,
    /// When the process started, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl Sample {
    /// Reads `/proc/self`.
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let ticks = clock_ticks().unwrap_or(100.0);
        let stat = read("/proc/self/stat").and_then(|text| parse_stat(&text, ticks));
        let status = read("/proc/self/status").unwrap_or_default();
        let boot_time = read("/proc/stat").and_then(|text| field(&text, "btime"));
        Self {
            cpu_seconds: stat.as_ref().map(|s| s.cpu_seconds),
            resident_bytes: field(&status, "VmRSS:").map(|kib| kib * 1024.0),
            virtual_bytes: field(&status, "VmSize:").map(|kib| kib * 1024.0),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|entries| entries.count() as f64),
            max_fds: read("/proc/self/limits").and_then(|text| max_open_files(&text)),
            threads: field(&status, "Threads:"),
            start_time_seconds: stat
                .zip(boot_time)
                .map(|(stat, boot)| boot + stat.started_after_boot),
        }
    }

    /// The Prometheus text exposition of the sample, each series labelled `prefix`.
    pub fn render(&self, prefix: &str, out: &mut String) {
        let prefix = prefix.replace('\\', "\\\\").replace('"', "\\\"");
        let families = [
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                self.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                self.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                self.virtual_bytes,
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                self.open_fds,
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                self.max_fds,
            ),
            (
                "process_threads",
                "gauge",
                "Number of OS threads in the process.",
                self.threads,
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                self.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in families {
            if let Some(value) = value {
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{prefix=\"{prefix}\"}} {value}\n\n"
                );
            }
        }
    }
}

/// The recorder's exposition followed by the process metrics of this moment.
pub fn render_with(mut exposition: String) -> String {
    let prefix = PREFIX.get().map_or("", String::as_str);
    if !exposition.is_empty() && !exposition.ends_with("\n\n") {
        exposition.push('\n');
    }
    Sample::read().render(prefix, &mut exposition);
    exposition
}

/// The times of `/proc/self/stat` that matter here.
#[derive(Debug, PartialEq)]
struct Stat {
    cpu_seconds: f64,
    started_after_boot: f64,
}

/// Fields 14 (utime), 15 (stime) and 22 (starttime) of `/proc/self/stat`, in clock ticks. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(text: &str, ticks_per_second: f64) -> Option<Stat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 (state) is at index 0: field n is at n - 3.
    let number = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
    Some(Stat {
        cpu_seconds: (number(14)? + number(15)?) / ticks_per_second,
        started_after_boot: number(22)? / ticks_per_second,
    })
}

/// The first number after `name` at the start of a line (`VmRSS:   1234 kB`, `btime 1700000000`).
fn field(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The soft limit of the `Max open files` line of `/proc/self/limits`.
fn max_open_files(text: &str) -> Option<f64> {
    field(text, "Max open files")
}

/// The kernel's clock ticks per second, from the auxiliary vector (what `sysconf(_SC_CLK_TCK)`
/// answers), without unsafe code.
fn clock_ticks() -> Option<f64> {
    static TICKS: OnceLock<Option<f64>> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let auxv = std::fs::read("/proc/self/auxv").ok()?;
        auxv_value(&auxv, AT_CLKTCK).map(|ticks| ticks as f64)
    })
}

/// The value of `key` in an auxiliary vector of native-endian 64-bit pairs.
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let word = |bytes: &[u8]| u64::from_ne_bytes(bytes.try_into().unwrap_or([0; 8]));
        (word(&pair[..8]) == key).then(|| word(&pair[8..]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A name with spaces and a parenthesis, as a process may call itself.
        let text = "4242 (dia ler) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 \
                    7 0 12345 3000000 500 18446744073709551615";
        assert_eq!(
            parse_stat(text, 100.0),
            Some(Stat {
                cpu_seconds: 3.0,
                started_after_boot: 123.45
            })
        );
        assert_eq!(parse_stat("garbage", 100.0), None);
    }

    #[test]
    fn fields_limits_and_auxv() {
        assert_eq!(
            field("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048.0)
        );
        assert_eq!(field("cpu 1 2\nbtime 1700000000\n", "btime"), Some(1.7e9));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        let mut auxv = Vec::new();
        for (key, value) in [(6u64, 4096u64), (AT_CLKTCK, 100), (0, 0)] {
            auxv.extend_from_slice(&key.to_ne_bytes());
            auxv.extend_from_slice(&value.to_ne_bytes());
        }
        assert_eq!(auxv_value(&auxv, AT_CLKTCK), Some(100));
        assert_eq!(auxv_value(&auxv, 99), None);
    }

    #[test]
    fn this_process_is_read_and_rendered() {
        let sample = Sample::read();
        assert!(sample.cpu_seconds.is_some_and(|s| s >= 0.0), "{sample:?}");
        assert!(sample.resident_bytes.is_some_and(|b| b > 1e5), "{sample:?}");
        assert!(sample.open_fds.is_some_and(|n| n >= 3.0), "{sample:?}");
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
        let started = sample.start_time_seconds.expect("start time");
        assert!(
            started > now - 86_400.0 && started <= now + 1.0,
            "{started} vs {now}"
        );
        let mut text = String::new();
        sample.render("a\"b", &mut text);
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("process_open_fds{prefix=\"a\\\"b\"} "),
            "{text}"
        );
    }
}
