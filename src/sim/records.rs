//! What the simulator saw: requests, place-call attempts, placed calls and counters, kept compact
//! while serving and turned into the public record types only when someone asks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::http::Method;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// One request to `/api/v2/*` or `/oauth/token`, recorded when it arrived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestRecord {
    /// Arrival time, RFC 3339.
    pub at: String,
    /// Arrival time in milliseconds since the simulator started.
    pub at_ms: u64,
    /// HTTP method.
    pub method: String,
    /// Request path, without the query string.
    pub path: String,
    /// HTTP status answered; 0 while unanswered (or never answered: a hung request).
    pub status: u16,
    /// The `ININ-Correlation-Id` answered (API requests only).
    pub correlation_id: Option<String>,
}

/// One `POST /api/v2/conversations/calls/user/{userId}` request, whatever its fate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallAttempt {
    /// Arrival time, RFC 3339.
    pub at: String,
    /// Arrival time in milliseconds since the simulator started.
    pub at_ms: u64,
    /// The `{userId}` of the path, as sent.
    pub user_id: String,
    /// `phoneNumber` of the body, when it could be read.
    pub phone_number: Option<String>,
    /// `attributes` of the body, when they could be read.
    pub attributes: Option<BTreeMap<String, String>>,
    /// HTTP status answered; 0 when the request was left hanging.
    pub status: u16,
    /// The request was deliberately never answered.
    pub hung: bool,
    /// The error `code` answered, if it was an error.
    pub code: Option<String>,
    /// The conversation created, when the call was placed.
    pub conversation_id: Option<String>,
    /// The `ININ-Correlation-Id` of the answer.
    pub correlation_id: String,
}

/// A call the simulator created (a 200 to a place-call request).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacedCall {
    /// Arrival time of the request, RFC 3339.
    pub at: String,
    /// Arrival time in milliseconds since the simulator started.
    pub at_ms: u64,
    /// The conversation id answered.
    pub conversation_id: String,
    /// The agent's user id (canonical UUID form).
    pub user_id: String,
    /// The number dialled.
    pub phone_number: String,
    /// `callerId` of the request.
    pub caller_id: Option<String>,
    /// `callerIdName` of the request.
    pub caller_id_name: Option<String>,
    /// `attributes` of the request (empty when none were sent).
    pub attributes: BTreeMap<String, String>,
    /// The `ININ-Correlation-Id` of the answer.
    pub correlation_id: String,
}

/// Counters since the start (or the last reset).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimStats {
    /// Requests to `/api/v2/*`.
    pub api_requests: u64,
    /// Requests to `/oauth/token`.
    pub token_requests: u64,
    /// Tokens issued.
    pub tokens_granted: u64,
    /// Token requests refused (400 or 401).
    pub tokens_refused: u64,
    /// Place-call requests, whatever their outcome.
    pub call_attempts: u64,
    /// Calls created.
    pub calls_placed: u64,
    /// Place-call requests left hanging.
    pub hung: u64,
    /// 429 answers on the API (rate limit and injected).
    pub rate_limited: u64,
    /// Place-call requests that got an injected fault (error or hang).
    pub faults_injected: u64,
    /// API answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
}

/// A request as stored while serving: no formatting, no per-field strings beyond the path.
#[derive(Clone, Debug)]
pub(super) struct RequestEntry {
    at: Duration,
    method: Method,
    path: Box<str>,
    status: u16,
    correlation_id: Option<Uuid>,
}

/// A place-call attempt as stored while serving.
#[derive(Debug)]
pub(super) struct AttemptEntry {
    pub(super) at: Duration,
    pub(super) user_id: Box<str>,
    pub(super) phone_number: Option<String>,
    pub(super) attributes: Option<BTreeMap<String, String>>,
    pub(super) status: u16,
    pub(super) hung: bool,
    pub(super) code: Option<&'static str>,
    pub(super) conversation_id: Option<Uuid>,
    pub(super) correlation_id: Uuid,
}

/// A placed call as stored: also what `GET /api/v2/conversations/calls/{id}` describes.
#[derive(Debug)]
pub(super) struct PlacedEntry {
    pub(super) at: Duration,
    pub(super) conversation_id: Uuid,
    pub(super) user_id: String,
    pub(super) phone_number: String,
    pub(super) caller_id: Option<String>,
    pub(super) caller_id_name: Option<String>,
    pub(super) attributes: BTreeMap<String, String>,
    pub(super) agent_participant_id: Uuid,
    pub(super) customer_participant_id: Uuid,
    pub(super) correlation_id: Uuid,
}

/// Everything recorded. Lives behind one std `Mutex` in the server state.
#[derive(Debug, Default)]
pub(super) struct Journal {
    /// Sequence number of `requests[0]`; a reset moves it on so that requests still in flight
    /// across the reset do not fill in somebody else's status.
    first_seq: u64,
    requests: Vec<RequestEntry>,
    attempts: Vec<AttemptEntry>,
    placed: Vec<PlacedEntry>,
    conversations: HashMap<Uuid, usize>,
    stats: SimStats,
}

impl Journal {
    /// Records a request at arrival; returns its sequence number for [`Journal::answered`].
    pub(super) fn arrived(
        &mut self,
        at: Duration,
        method: &Method,
        path: &str,
        correlation_id: Option<Uuid>,
    ) -> u64 {
        if correlation_id.is_some() {
            self.stats.api_requests += 1;
        } else {
            self.stats.token_requests += 1;
        }
        let seq = self.first_seq + self.requests.len() as u64;
        self.requests.push(RequestEntry {
            at,
            method: method.clone(),
            path: path.into(),
            status: 0,
            correlation_id,
        });
        seq
    }

    /// Fills in the status of a recorded request and counts it.
    pub(super) fn answered(&mut self, seq: u64, status: u16) {
        let Some(entry) = seq
            .checked_sub(self.first_seq)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.requests.get_mut(i))
        else {
            return; // recorded before a reset
        };
        entry.status = status;
        if entry.correlation_id.is_some() {
            *self.stats.by_status.entry(status).or_default() += 1;
            if status == 429 {
                self.stats.rate_limited += 1;
            }
        }
    }

    /// Counts a token request's outcome.
    pub(super) fn token_outcome(&mut self, granted: bool) {
        if granted {
            self.stats.tokens_granted += 1;
        } else {
            self.stats.tokens_refused += 1;
        }
    }

    /// Counts an injected fault.
    pub(super) fn fault_injected(&mut self) {
        self.stats.faults_injected += 1;
    }

    /// Records a place-call attempt.
    pub(super) fn attempt(&mut self, entry: AttemptEntry) {
        self.stats.call_attempts += 1;
        if entry.hung {
            self.stats.hung += 1;
        }
        self.attempts.push(entry);
    }

    /// Records a placed call (its attempt is recorded separately).
    pub(super) fn placed(&mut self, entry: PlacedEntry) {
        self.stats.calls_placed += 1;
        self.conversations
            .insert(entry.conversation_id, self.placed.len());
        self.placed.push(entry);
    }

    /// A placed call by conversation id.
    pub(super) fn conversation(&self, id: &Uuid) -> Option<&PlacedEntry> {
        self.conversations.get(id).and_then(|&i| self.placed.get(i))
    }

    /// Forgets all records and counters.
    pub(super) fn reset(&mut self) {
        let next_seq = self.first_seq + self.requests.len() as u64;
        *self = Journal {
            first_seq: next_seq,
            ..Journal::default()
        };
    }

    /// The counters.
    pub(super) fn stats(&self) -> SimStats {
        self.stats.clone()
    }

    /// Copies the request entries out, so that formatting happens outside the lock.
    pub(super) fn request_snapshot(&self) -> Vec<RequestEntry> {
        self.requests.clone()
    }

    /// The attempts as public records.
    pub(super) fn attempt_records(&self, clock: &Clock) -> Vec<CallAttempt> {
        self.attempts
            .iter()
            .map(|a| CallAttempt {
                at: clock.rfc3339(a.at),
                at_ms: millis(a.at),
                user_id: a.user_id.to_string(),
                phone_number: a.phone_number.clone(),
                attributes: a.attributes.clone(),
                status: a.status,
                hung: a.hung,
                code: a.code.map(str::to_owned),
                conversation_id: a.conversation_id.map(|c| c.to_string()),
                correlation_id: a.correlation_id.to_string(),
            })
            .collect()
    }

    /// The placed calls as public records.
    pub(super) fn placed_records(&self, clock: &Clock) -> Vec<PlacedCall> {
        self.placed
            .iter()
            .map(|p| PlacedCall {
                at: clock.rfc3339(p.at),
                at_ms: millis(p.at),
                conversation_id: p.conversation_id.to_string(),
                user_id: p.user_id.clone(),
                phone_number: p.phone_number.clone(),
                caller_id: p.caller_id.clone(),
                caller_id_name: p.caller_id_name.clone(),
                attributes: p.attributes.clone(),
                correlation_id: p.correlation_id.to_string(),
            })
            .collect()
    }
}

/// Turns a request snapshot into public records.
pub(super) fn request_records(snapshot: Vec<RequestEntry>, clock: &Clock) -> Vec<RequestRecord> {
    snapshot
        .into_iter()
        .map(|r| RequestRecord {
            at: clock.rfc3339(r.at),
            at_ms: millis(r.at),
            method: r.method.as_str().to_owned(),
            path: r.path.into_string(),
            status: r.status,
            correlation_id: r.correlation_id.map(|c| c.to_string()),
        })
        .collect()
}

/// The simulator's clock: a monotonic one for durations and rate windows, anchored to the
/// wall clock once so that records can carry RFC 3339 times.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    started: tokio::time::Instant,
    started_wall: OffsetDateTime,
}

impl Clock {
    /// Starts the clock now.
    pub(super) fn start() -> Clock {
        Clock {
            started: tokio::time::Instant::now(),
            started_wall: OffsetDateTime::now_utc(),
        }
    }

    /// Time since the start.
    pub(super) fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The wall-clock time of an offset since the start.
    pub(super) fn rfc3339(&self, at: Duration) -> String {
        (self.started_wall + at)
            .format(&Rfc3339)
            .unwrap_or_default()
    }
}

/// Milliseconds of a duration, saturating (a simulator does not run for 584 million years).
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
