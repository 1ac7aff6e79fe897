//! Logging: one subscriber for the process, text or JSON, filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Parses `DIALER_LOG_FORMAT`.
pub fn parse_log_format(raw: &str) -> Result<LogFormat, crate::config::ConfigError> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "text" | "" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(crate::config::ConfigError {
            variable: "DIALER_LOG_FORMAT",
            flag: "log-format",
            problem: format!("{other:?} is not a log format; expected text or json"),
        }),
    }
}

/// The filter used when `RUST_LOG` is not set: `base` for the dialer's own lines; the AMQP
/// client's own lines (which repeat, less clearly, what the dialer then reports) only with
/// `-v`, and everything at debug with `-vv`.
pub fn default_filter(base: &str, verbose: u8) -> String {
    match verbose {
        0 => format!("{base},lapin=off"),
        1 => base.to_owned(),
        _ => "debug".to_owned(),
    }
}

/// Installs the global subscriber; logs go to stderr so stdout stays for command output.
/// `default_filter` applies when `RUST_LOG` is not set.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal and never with NO_COLOR: a log file or a pipe gets plain text.
        .with_ansi(crate::output::stderr_colour());
    // Fails only if a subscriber is already set (tests); keeping the first is right.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Masks a phone number for logs: country code and last two digits only (`+44*******71`).
pub fn mask_phone(number: &str) -> String {
    let digits: Vec<char> = number.chars().collect();
    if digits.len() <= 5 {
        return "*".repeat(digits.len());
    }
    let keep_head = if number.starts_with('+') { 3 } else { 1 };
    let tail = digits.len() - 2;
    digits
        .iter()
        .enumerate()
        .map(|(i, c)| if i < keep_head || i >= tail { *c } else { '*' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_masked() {
        assert_eq!(mask_phone("+14155552671"), "+14*******71");
        assert_eq!(mask_phone("0123"), "****");
        assert!(!mask_phone("+442071838750").contains("1838"));
    }
}
