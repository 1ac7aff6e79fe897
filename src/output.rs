//! What the commands print and how: whether a stream is a terminal, colour, plurals, and a
//! reader that went away (`dialer events | head -1`) treated as the end of the output.

use std::io::IsTerminal as _;

/// Whether ANSI colour may go to stderr: only to a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>: any non-empty value).
pub fn stderr_colour() -> bool {
    std::io::stderr().is_terminal() && !no_color()
}

/// Whether ANSI colour may go to stdout: the same rule as for stderr.
pub fn stdout_colour() -> bool {
    stdout_is_terminal() && !no_color()
}

/// Whether stdout is a terminal (tables and progress bars) rather than a pipe or file (NDJSON).
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Whether stderr is a terminal (progress bars go there).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty())
}

/// `1 job`, `3 jobs`: a count with its noun in the right number.
pub fn count(n: impl Into<u64>, singular: &str, plural: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// Whether `error` (anywhere in its chain) is a write into a closed pipe.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, each cause once: errors that already quote their
/// source in their own message (`connecting to …: Connection refused`) are not repeated.
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Installs a panic hook that turns the standard library's panic on a closed stdout
/// (`println!` into `head` after it exited) into a quiet exit 141, as a shell reports a
/// process ended by SIGPIPE; every other panic keeps the default report. The commands that
/// stream (`events`, `dlq show`) handle the closed pipe themselves and exit 0; this covers
/// every other `println!`.
pub fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_agree_with_the_count() {
        assert_eq!(count(1u32, "job", "jobs"), "1 job");
        assert_eq!(count(0u32, "job", "jobs"), "0 jobs");
        assert_eq!(count(3u32, "line", "lines"), "3 lines");
    }

    #[test]
    fn a_cause_quoted_by_its_context_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        #[derive(Debug, thiserror::Error)]
        #[error("connecting to amqp://127.0.0.1: {source}")]
        struct Quoting {
            source: std::io::Error,
        }
        let error = anyhow::Error::new(Quoting { source: io }).context("dialer events");
        assert_eq!(
            error_chain(&error),
            "dialer events: connecting to amqp://127.0.0.1: Connection refused"
        );
    }

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let error = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("printing an event");
        assert!(is_broken_pipe(&error));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
