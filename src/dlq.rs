//! `dialer dlq`: counts, shows and replays dead-lettered jobs.
//!
//! Replay moves one message at a time: publish to the jobs queue with a confirm, then ack the
//! dead letter, so a crash mid-replay loses nothing (at worst one job is replayed twice).

use anyhow::Context as _;
use lapin::options::{BasicAckOptions, BasicGetOptions};

use crate::broker::headers::{self, DeadLetter};
use crate::broker::{self, JOBS_ROUTING_KEY, Publisher, Topology};
use crate::config::BrokerSettings;
use crate::telemetry::mask_phone;

/// Characters of a body `dlq show` prints.
const SHOWN_BODY_CHARS: usize = 300;
/// A run of at least this many digits (with separators) is taken for a phone number in a body
/// that is not a job: 7 is the shortest subscriber number in common use.
const PHONE_LIKE_DIGITS: usize = 7;
/// Job fields whose digits are times, not numbers: left readable.
const TIME_FIELDS: [&str; 2] = ["notBefore", "expiresAt"];

/// What to do with the dead-letter queue.
#[derive(Clone, Debug)]
pub enum Action {
    /// Print how many jobs are dead-lettered.
    Count,
    /// Print up to `limit`, leaving them in place; phone numbers masked unless `show_numbers`.
    Show {
        /// How many.
        limit: u32,
        /// Print phone numbers in full.
        show_numbers: bool,
    },
    /// Send some back to the jobs queue.
    Replay(Replay),
}

/// Which dead letters a replay sends back.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// At most this many; `None`: every one that was there when the replay started.
    pub limit: Option<u32>,
    /// Only these job ids (`x-dialer-job-id`; all when empty).
    pub job_ids: Vec<String>,
    /// Only these outcomes (`x-dialer-outcome`; all when empty).
    pub outcomes: Vec<crate::event::Outcome>,
    /// Print what would be replayed, replay nothing.
    pub dry_run: bool,
}

impl Replay {
    fn wants(&self, job_id: Option<&str>, outcome: Option<&str>) -> bool {
        (self.job_ids.is_empty() || job_id.is_some_and(|id| self.job_ids.iter().any(|w| w == id)))
            && (self.outcomes.is_empty()
                || outcome.is_some_and(|o| self.outcomes.iter().any(|w| w.as_str() == o)))
    }
}

/// Runs `action` against the dead-letter queue of `broker`'s prefix.
pub async fn run(broker: BrokerSettings, action: Action) -> anyhow::Result<()> {
    let topology = Topology::new(&broker.prefix, broker.queue_type);
    let connection = broker::connect(&broker.amqp_url, "dialer dlq").await?;
    let publisher = Publisher::open(&connection).await?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    let queue = topology.dead_letter_queue.as_str();
    let count = broker::queue_depth(&channel, queue)
        .await
        .with_context(|| {
            format!("{queue} does not exist: run `dialer topology` or a worker first")
        })?;
    match action {
        Action::Count => println!("{count} jobs in {queue}"),
        Action::Show {
            limit,
            show_numbers,
        } => {
            for _ in 0..limit.min(count) {
                let Some(message) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                let dead = DeadLetter::read(&message.delivery.properties);
                println!(
                    "job {}  outcome {}  attempts {}  at {}\n  {}: {}\n  body: {}",
                    dead.job_id.as_deref().unwrap_or("-"),
                    dead.outcome,
                    dead.attempts,
                    dead.at,
                    dead.error_kind,
                    dead.error,
                    shown_body(&message.delivery.data, show_numbers)
                );
            }
            // Unacked messages go back to the queue, in order, when the channel closes.
            let _ = channel.close(200, "shown".into()).await;
            println!("({count} jobs in {queue}; shown ones left in place)");
        }
        Action::Replay(replay) => {
            // Only the `count` messages that were there at the start are looked at: a replayed
            // job that is dead-lettered again joins the tail and is not met again in this run.
            // Messages passed over stay unacknowledged, so `basic_get` does not return them
            // twice; closing the channel puts them back in place, in order.
            let limit = replay.limit.unwrap_or(u32::MAX);
            let mut replayed = 0u32;
            let mut examined = 0u32;
            let mut seen = std::collections::HashSet::new();
            while replayed < limit && examined < count {
                let Some(message) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                examined += 1;
                let delivery = &message.delivery;
                let dead = DeadLetter::read(&delivery.properties);
                // Belt and braces for a queue another client requeues into meanwhile: the same
                // job and body are never sent twice by one run.
                let identity = (dead.job_id.clone(), delivery.data.clone());
                if !replay.wants(dead.job_id.as_deref(), Some(dead.outcome.as_str()))
                    || !seen.insert(identity)
                {
                    continue;
                }
                if replay.dry_run {
                    println!(
                        "would replay job {} (outcome {})",
                        dead.job_id.as_deref().unwrap_or("-"),
                        dead.outcome
                    );
                    replayed += 1;
                    continue;
                }
                let properties =
                    headers::replayed(&delivery.properties, time::OffsetDateTime::now_utc());
                // Through the internal route: the only one on which the worker believes the
                // replay mark (a CRM cannot write to it).
                publisher
                    .publish(
                        &topology.internal_exchange,
                        JOBS_ROUTING_KEY,
                        &delivery.data,
                        properties,
                        true,
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "replaying to the jobs queue through {} (declared by `dialer topology` or a worker of this version; the user needs write permission on it)",
                            topology.internal_exchange
                        )
                    })?;
                delivery
                    .ack(BasicAckOptions { multiple: false })
                    .await
                    .context("removing the replayed job from the dead-letter queue")?;
                replayed += 1;
            }
            let _ = channel.close(200, "replayed".into()).await;
            let jobs = crate::output::count(replayed, "job", "jobs");
            if replay.dry_run {
                println!("dry run: would replay {jobs} from {queue}; nothing was changed");
            } else {
                println!(
                    "replayed {jobs} from {queue} to {}; {} of the {count} there at the start left in place",
                    topology.jobs_queue,
                    count.saturating_sub(replayed)
                );
            }
        }
    }
    let _ = connection.close(200, "dlq done".into()).await;
    Ok(())
}

/// The body as `dlq show` prints it, cut short. Unless `show_numbers`, phone numbers are masked
/// as in logs: a job's `phoneNumber` always, and anything that looks like a phone number in
/// its other strings (attributes, labels) or in a body that is not JSON.
fn shown_body(body: &[u8], show_numbers: bool) -> String {
    let text = String::from_utf8_lossy(body);
    let shown = if show_numbers {
        text.into_owned()
    } else {
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(mut value) => {
                mask_json(&mut value, None);
                value.to_string()
            }
            Err(_) => mask_phone_like(&text),
        }
    };
    shown.chars().take(SHOWN_BODY_CHARS).collect()
}

fn mask_json(value: &mut serde_json::Value, key: Option<&str>) {
    match value {
        serde_json::Value::String(s) => match key {
            Some("phoneNumber") => *s = mask_phone(s),
            Some(k) if TIME_FIELDS.contains(&k) => {}
            _ => *s = mask_phone_like(s),
        },
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| mask_json(v, None)),
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                mask_json(v, Some(k.as_str()));
            }
        }
        _ => {}
    }
}

/// Masks every run of digits (an optional leading `+`, the separators of a written number
/// inside) holding at least [`PHONE_LIKE_DIGITS`] digits.
fn mask_phone_like(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if !starts {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < chars.len()
            && (chars[end].is_ascii_digit()
                || matches!(chars[end], ' ' | '-' | '.' | '(' | ')' | '/'))
        {
            end += 1;
        }
        // A run ends on a digit: trailing separators are not part of the number.
        while end > i + 1 && !chars[end - 1].is_ascii_digit() {
            end -= 1;
        }
        let run: String = chars[i..end].iter().collect();
        if run.chars().filter(char::is_ascii_digit).count() >= PHONE_LIKE_DIGITS {
            out.push_str(&mask_phone(&run));
        } else {
            out.push_str(&run);
        }
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_masked_unless_asked() {
        let body = br#"{"jobId":"j-1","phoneNumber":"+14155552671","notBefore":"2026-03-01T09:30:00Z","attributes":{"mobile":"call 020 7183 8750 today","crm":"L-42"}}"#;
        let masked = shown_body(body, false);
        assert!(masked.contains("+14*******71"), "{masked}");
        assert!(!masked.contains("5552671"), "{masked}");
        assert!(!masked.contains("7183 8750"), "{masked}");
        assert!(masked.contains("2026-03-01T09:30:00Z"), "{masked}");
        assert!(
            masked.contains("L-42") && masked.contains("j-1"),
            "{masked}"
        );
        let full = shown_body(body, true);
        assert!(full.contains("+14155552671"), "{full}");

        let not_json = shown_body(b"phone: +44 20 7183 8750, ref 42", false);
        assert!(!not_json.contains("7183"), "{not_json}");
        assert!(
            not_json.starts_with("phone: +4") && not_json.ends_with(", ref 42"),
            "{not_json}"
        );
        assert_eq!(shown_body(&[b'x'; 400], false).len(), SHOWN_BODY_CHARS);
    }
}
