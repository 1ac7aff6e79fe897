//! Every `x-dialer-*` header in one place: their names, the typed marks a delivery may carry
//! (counters, a replay), the headers written on delayed and dead-lettered jobs, and the rule
//! that decides when a delivery's marks are believed.
//!
//! The marks steer the worker (a counter makes a message "the same job again", a replay mark
//! sets a decision aside), so they are honoured only on deliveries that reached the jobs queue
//! through the internal route, which only the dialer can write to (docs/jobs-and-events.md,
//! "Trust"). On anything else they are ignored, as if absent.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Every header the dialer writes starts with this; a replay strips them all.
pub const PREFIX: &str = "x-dialer-";
/// Place-call requests sent for the job, across delays (on delayed and dead-lettered jobs).
pub const ATTEMPTS: &str = "x-dialer-attempts";
/// Failures that count toward `DIALER_MAX_ATTEMPTS` (429s do not), on delayed jobs.
pub const TRIES: &str = "x-dialer-tries";
/// Set by `dialer dlq replay`: a person asked for this dead-lettered job to be tried again.
pub const REPLAYED_AT: &str = "x-dialer-replayed-at";
/// Dead letters: the job id (void when unknown).
pub const JOB_ID: &str = "x-dialer-job-id";
/// Dead letters: the outcome (`rejected`, `failed`, `unknown`).
pub const OUTCOME: &str = "x-dialer-outcome";
/// Dead letters: the event's `error.kind`.
pub const ERROR_KIND: &str = "x-dialer-error-kind";
/// Dead letters: the event's `error.message`.
pub const ERROR: &str = "x-dialer-error";
/// Dead letters: when, RFC 3339.
pub const DEAD_LETTERED_AT: &str = "x-dialer-dead-lettered-at";
/// On delayed jobs: when the worker sent the job to its delay tier, milliseconds since the
/// Unix epoch (the start of `dialer_retry_wait_seconds`).
pub const DELAYED_AT_MS: &str = "x-dialer-delayed-at-ms";

/// The job's creation time in milliseconds since the Unix epoch, set by the publisher (or by
/// RabbitMQ's timestamp interceptor, `message_interceptors.incoming.set_header_timestamp`,
/// which writes the same header): the start of `dialer_queue_wait_seconds` at millisecond
/// resolution, where the AMQP `timestamp` property has whole seconds only.
pub const TIMESTAMP_IN_MS: &str = "timestamp_in_ms";

/// Counters larger than this are read as this: the worker's own never come near it (a job ends
/// after a handful of attempts), and it leaves room to add to them without overflowing.
const MAX_COUNTER: u32 = 1_000_000;

/// The counters a job carries across delays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Place-call requests sent so far (the event's `attempts`).
    pub attempts: u32,
    /// Failures counted toward `DIALER_MAX_ATTEMPTS` so far.
    pub tries: u32,
}

/// What the dialer marked on a delivery, as far as it is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// The counters, when the job came back from a delay tier.
    pub counters: Option<Counters>,
    /// When a person replayed it from the dead-letter queue.
    pub replayed_at: Option<String>,
    /// When the worker sent it to a delay tier, milliseconds since the Unix epoch.
    pub delayed_at_ms: Option<u64>,
}

impl Marks {
    /// Reads the marks of a delivery. `trusted` says whether it came through the internal
    /// route; when it did not, the marks are ignored ([`Marks::present`] tells whether there
    /// were any, for a log line).
    pub fn read(properties: &BasicProperties, trusted: bool) -> Self {
        if !trusted {
            return Self::default();
        }
        let counters = header_u32(properties, ATTEMPTS).map(|attempts| Counters {
            attempts: attempts.min(MAX_COUNTER),
            tries: header_u32(properties, TRIES).unwrap_or(0).min(MAX_COUNTER),
        });
        Self {
            counters,
            replayed_at: header_str(properties, REPLAYED_AT),
            delayed_at_ms: header_u64(properties, DELAYED_AT_MS),
        }
    }

    /// Whether a delivery carries any `x-dialer-*` header (for a warning when they are ignored).
    pub fn present(properties: &BasicProperties) -> bool {
        properties.headers().as_ref().is_some_and(|headers| {
            headers
                .inner()
                .keys()
                .any(|name| name.as_str().starts_with(PREFIX))
        })
    }
}

/// Why a job was dead-lettered, written beside its original headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job id, when known.
    pub job_id: Option<String>,
    /// The outcome.
    pub outcome: String,
    /// The event's `error.kind`.
    pub error_kind: String,
    /// The event's `error.message`.
    pub error: String,
    /// Place-call requests sent.
    pub attempts: u32,
    /// When (RFC 3339); read back by `dialer dlq show`.
    pub at: String,
}

impl DeadLetter {
    /// The properties of the dead letter: the original ones, the sender's `x-dialer-*` headers
    /// dropped, ours added.
    pub fn properties(&self, original: &BasicProperties) -> BasicProperties {
        with_marks(
            original,
            vec![
                (
                    JOB_ID,
                    self.job_id.clone().map(text).unwrap_or(AMQPValue::Void),
                ),
                (OUTCOME, text(self.outcome.clone())),
                (ERROR_KIND, text(self.error_kind.clone())),
                (ERROR, text(self.error.clone())),
                (ATTEMPTS, AMQPValue::LongLongInt(self.attempts.into())),
                (DEAD_LETTERED_AT, text(self.at.clone())),
            ],
        )
    }

    /// Reads the headers of a dead letter (`-` for what is missing).
    pub fn read(properties: &BasicProperties) -> Self {
        let field = |name| header_str(properties, name).unwrap_or_else(|| "-".to_owned());
        Self {
            job_id: header_str(properties, JOB_ID),
            outcome: field(OUTCOME),
            error_kind: field(ERROR_KIND),
            error: field(ERROR),
            attempts: header_u32(properties, ATTEMPTS).unwrap_or(0),
            at: field(DEAD_LETTERED_AT),
        }
    }
}

/// Properties of a job sent through a delay tier at `at_ms` (milliseconds since the Unix
/// epoch): the original ones with our counters and the time.
pub fn delayed(original: &BasicProperties, counters: Counters, at_ms: u64) -> BasicProperties {
    with_marks(
        original,
        vec![
            (ATTEMPTS, AMQPValue::LongLongInt(counters.attempts.into())),
            (TRIES, AMQPValue::LongLongInt(counters.tries.into())),
            (
                DELAYED_AT_MS,
                AMQPValue::LongLongInt(i64::try_from(at_ms).unwrap_or(i64::MAX)),
            ),
        ],
    )
}

/// When the job was created, in milliseconds since the Unix epoch: the [`TIMESTAMP_IN_MS`]
/// header when it holds a number, else the AMQP `timestamp` property (whole seconds).
pub fn created_at_ms(properties: &BasicProperties) -> Option<u64> {
    header_u64(properties, TIMESTAMP_IN_MS).or_else(|| {
        properties
            .timestamp()
            .and_then(|seconds| seconds.checked_mul(1000))
    })
}

/// Now, in milliseconds since the Unix epoch, as [`TIMESTAMP_IN_MS`] and [`DELAYED_AT_MS`]
/// carry it.
pub fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Properties of a replayed dead letter: the worker's headers go (a replayed job starts
/// counting afresh) and the replay mark says a person asked for another try.
pub fn replayed(original: &BasicProperties, at: OffsetDateTime) -> BasicProperties {
    let at = at.format(&Rfc3339).unwrap_or_default();
    with_marks(original, vec![(REPLAYED_AT, text(at))])
}

/// Now, as dead-letter headers carry it.
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// The properties with every `x-dialer-*` header removed and `marks` added; other headers kept.
fn with_marks(properties: &BasicProperties, marks: Vec<(&str, AMQPValue)>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(original) = properties.headers() {
        for (name, value) in original.inner() {
            if !name.as_str().starts_with(PREFIX) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
    for (name, value) in marks {
        headers.insert(ShortString::from(name), value);
    }
    properties.clone().with_headers(headers)
}

/// Reads a non-negative integer header that fits 32 bits; see [`header_int`].
fn header_u32(properties: &BasicProperties, name: &str) -> Option<u32> {
    u32::try_from(header_int(properties, name)?).ok()
}

/// Reads a non-negative integer header that fits 64 bits; see [`header_int`].
fn header_u64(properties: &BasicProperties, name: &str) -> Option<u64> {
    u64::try_from(header_int(properties, name)?).ok()
}

/// Reads an integer header (any AMQP integer type, or digits in a string).
fn header_int(properties: &BasicProperties, name: &str) -> Option<i128> {
    let headers = properties.headers().as_ref()?;
    let value = headers.inner().get(name)?;
    let number: i128 = match value {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => (*v).into(),
        AMQPValue::Timestamp(v) => (*v).into(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok()?,
        _ => return None,
    };
    Some(number)
}

/// Reads a string header.
fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A string as an AMQP header value.
fn text(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(headers: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(ShortString::from(name), value);
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn marks_are_read_only_when_trusted() {
        let forged = with(vec![
            (ATTEMPTS, AMQPValue::LongLongInt(4_294_967_295)),
            (TRIES, AMQPValue::LongLongInt(2)),
            (REPLAYED_AT, text("2026-01-01T00:00:00Z")),
        ]);
        assert_eq!(Marks::read(&forged, false), Marks::default());
        assert!(Marks::present(&forged));
        let believed = Marks::read(&forged, true);
        assert_eq!(
            believed.counters,
            Some(Counters {
                attempts: MAX_COUNTER,
                tries: 2
            }),
            "a counter is capped so adding to it cannot wrap"
        );
        assert_eq!(
            believed.replayed_at.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert!(!Marks::present(&with(vec![("crm", text("x"))])));
        assert!(!Marks::present(&BasicProperties::default()));
    }

    #[test]
    fn integers_of_any_type_and_no_negatives() {
        for (value, expected) in [
            (AMQPValue::ShortShortUInt(3), Some(3)),
            (AMQPValue::LongInt(7), Some(7)),
            (AMQPValue::LongInt(-1), None),
            (text(" 12 "), Some(12)),
            (text("x"), None),
            (AMQPValue::Boolean(true), None),
        ] {
            let props = with(vec![(ATTEMPTS, value.clone())]);
            assert_eq!(header_u32(&props, ATTEMPTS), expected, "{value:?}");
        }
    }

    #[test]
    fn the_creation_time_prefers_the_millisecond_header() {
        let seconds = BasicProperties::default().with_timestamp(1_700_000_000);
        assert_eq!(created_at_ms(&seconds), Some(1_700_000_000_000));
        for value in [
            AMQPValue::LongLongInt(1_700_000_000_123),
            AMQPValue::Timestamp(1_700_000_000_123),
            text("1700000000123"),
        ] {
            let mut table = FieldTable::default();
            table.insert(TIMESTAMP_IN_MS.into(), value.clone());
            let both = seconds.clone().with_headers(table);
            assert_eq!(created_at_ms(&both), Some(1_700_000_000_123), "{value:?}");
        }
        // Unreadable or negative: the AMQP timestamp still counts; neither: unknown.
        let bad = with(vec![(TIMESTAMP_IN_MS, AMQPValue::LongLongInt(-5))]);
        assert_eq!(created_at_ms(&bad), None);
        assert_eq!(
            created_at_ms(&bad.with_timestamp(2)),
            Some(2000),
            "falls back to the property"
        );
        assert_eq!(created_at_ms(&BasicProperties::default()), None);
        let now = now_ms();
        assert!(now > 1_700_000_000_000 && now < 4_000_000_000_000, "{now}");
    }

    #[test]
    fn our_headers_replace_the_senders_and_others_are_kept() {
        let original = with(vec![
            ("crm", text("keep me")),
            (REPLAYED_AT, text("forged")),
            (ATTEMPTS, AMQPValue::LongLongInt(9)),
        ]);
        let delayed = delayed(
            &original,
            Counters {
                attempts: 2,
                tries: 1,
            },
            1_700_000_000_123,
        );
        assert_eq!(
            Marks::read(&delayed, true).delayed_at_ms,
            Some(1_700_000_000_123)
        );
        assert_eq!(Marks::read(&delayed, false).delayed_at_ms, None);
        assert_eq!(header_str(&delayed, "crm").as_deref(), Some("keep me"));
        assert_eq!(header_str(&delayed, REPLAYED_AT), None);
        assert_eq!(
            Marks::read(&delayed, true).counters,
            Some(Counters {
                attempts: 2,
                tries: 1
            })
        );

        let replayed = replayed(&delayed, OffsetDateTime::UNIX_EPOCH);
        let marks = Marks::read(&replayed, true);
        assert_eq!(marks.counters, None, "a replay starts counting afresh");
        assert_eq!(marks.replayed_at.as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(header_str(&replayed, "crm").as_deref(), Some("keep me"));

        let dead = DeadLetter {
            job_id: Some("j-1".into()),
            outcome: "failed".into(),
            error_kind: "refused".into(),
            error: "no".into(),
            attempts: 3,
            at: "2026-01-01T00:00:00Z".into(),
        };
        let props = dead.properties(&original);
        assert_eq!(DeadLetter::read(&props), dead);
        assert_eq!(header_str(&props, REPLAYED_AT), None);
        assert_eq!(header_str(&props, "crm").as_deref(), Some("keep me"));
        let unknown = DeadLetter {
            job_id: None,
            ..dead
        };
        assert_eq!(DeadLetter::read(&unknown.properties(&original)), unknown);
    }
}
