//! `dialer enqueue`: publishes dial jobs from NDJSON (a file or stdin) to the jobs queue with
//! publisher confirms. Each line is checked with the worker's own parser first, so a typo is
//! reported here with its line number instead of turning into a `rejected` event later.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::BasicProperties;

use crate::broker::{self, Publisher, Topology};
use crate::config::BrokerSettings;
use crate::job::parse_job;

/// Publishes awaiting confirms concurrently: one at a time would cap at the broker's round trip.
const CONFIRM_WINDOW: usize = 256;

/// Reads `input` (stdin when `None` or `-`) and publishes every valid line.
pub async fn run(
    broker: BrokerSettings,
    input: Option<PathBuf>,
    validate: bool,
) -> anyhow::Result<()> {
    let lines = read_lines(input.as_ref())?;
    let topology = Topology::new(&broker.prefix, broker.queue_type);
    let mut jobs = Vec::with_capacity(lines.len());
    let mut invalid = 0usize;
    for (number, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let job_id = if validate {
            match parse_job(line.as_bytes(), None) {
                Ok(job) => Some(job.job_id.as_str().to_owned()),
                Err(rejection) => {
                    eprintln!("line {}: not published: {}", number + 1, rejection.message);
                    invalid += 1;
                    continue;
                }
            }
        } else {
            None
        };
        jobs.push((line.as_bytes(), job_id));
    }

    let connection = broker::connect(&broker.amqp_url, "dialer enqueue").await?;
    let publisher = Publisher::open(&connection).await?;
    topology.declare(publisher.channel()).await?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let total = jobs.len();
    let mut published = 0usize;
    let mut results = futures_util::stream::iter(jobs.into_iter().map(|(body, job_id)| {
        let publisher = publisher.clone();
        let queue = topology.jobs_queue.clone();
        async move {
            let mut properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_timestamp(
                    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp())
                        .unwrap_or_default(),
                );
            if let Some(id) = job_id {
                properties = properties.with_message_id(id.into());
            }
            publisher.publish("", &queue, body, properties, true).await
        }
    }))
    .buffered(CONFIRM_WINDOW);
    while let Some(result) = results.next().await {
        result.with_context(|| format!("after {published} of {total} jobs were confirmed"))?;
        published += 1;
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!("published {published}/{total}");
            last_report = Instant::now();
        }
    }
    drop(results);
    let _ = connection.close(200, "enqueue done".into()).await;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "published {published} jobs to {} in {seconds:.1} s, each confirmed by the broker{}",
        topology.jobs_queue,
        if invalid > 0 {
            format!("; {invalid} invalid lines not published")
        } else {
            String::new()
        }
    );
    if invalid > 0 {
        anyhow::bail!("{invalid} invalid lines were not published (see above)");
    }
    Ok(())
}

fn read_lines(input: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let lines: Result<Vec<String>, std::io::Error> = match input {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            std::io::BufReader::new(file).lines().collect()
        }
        _ => std::io::stdin().lock().lines().collect(),
    };
    lines.context("cannot read the jobs (expected UTF-8 NDJSON: one JSON object per line)")
}
