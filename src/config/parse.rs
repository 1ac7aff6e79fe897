//! Small value parsers shared by every setting: durations (`10s`, `500ms`) and rates (`4/s`, `300/min`).

use std::num::NonZeroU32;
use std::time::Duration;

/// A number of events allowed per period, e.g. `4/s` or `300/min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// A rate of `count` per `per`; `None` when either is zero.
    pub fn new(count: u32, per: Duration) -> Option<Self> {
        let count = NonZeroU32::new(count)?;
        (!per.is_zero()).then_some(Self { count, per })
    }

    /// Events per second, for display and arithmetic.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count.get()) / self.per.as_secs_f64()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per.as_secs() {
            1 => write!(f, "{}/s", self.count),
            60 => write!(f, "{}/min", self.count),
            3600 => write!(f, "{}/h", self.count),
            _ => write!(f, "{} per {:?}", self.count, self.per),
        }
    }
}

const RATE_ACCEPTS: &str =
    "expected N/s, N/min or N/h with N a whole number of at least 1, e.g. 4/s";

/// Parses `N/s`, `N/sec`, `N/min`, `N/m`, `N/h`.
pub fn parse_rate(raw: &str) -> Result<Rate, String> {
    let bad = || format!("{raw:?} is not a rate; {RATE_ACCEPTS}");
    let (count, unit) = raw.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim().to_ascii_lowercase().as_str() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    Rate::new(count, per).ok_or_else(bad)
}

const DURATION_ACCEPTS: &str = "expected a number with a unit: ms, s, m or h (e.g. 500ms, 10s, 2m)";

/// Parses `500ms`, `10s`, `2m`, `1h`, `1.5s`; a bare number means seconds.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let text = raw.trim();
    let bad = || format!("{raw:?} is not a duration; {DURATION_ACCEPTS}");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "" | "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(number * seconds_per_unit).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("4/s").unwrap(),
            Rate::new(4, Duration::from_secs(1)).unwrap()
        );
        assert_eq!(
            parse_rate(" 300 / min ").unwrap(),
            Rate::new(300, Duration::from_secs(60)).unwrap()
        );
        assert_eq!(parse_rate("10/h").unwrap().per, Duration::from_secs(3600));
        for bad in ["", "4", "0/s", "4/d", "-1/s", "x/s", "4/"] {
            assert!(parse_rate(bad).unwrap_err().contains("N/s"), "{bad}");
        }
        assert_eq!(parse_rate("300/min").unwrap().to_string(), "300/min");
        assert!((parse_rate("300/min").unwrap().per_second() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        for bad in ["", "s", "10 parsecs", "-1s", "1e3s"] {
            assert!(
                parse_duration(bad).unwrap_err().contains("ms, s, m or h"),
                "{bad}"
            );
        }
    }
}
