//! `dialer enqueue`: publishes dial jobs from NDJSON or CSV (a file or stdin) to the jobs queue
//! with publisher confirms.
//!
//! Every line is checked with the worker's own parser before anything is published, and by
//! default one bad line stops the whole file: publishing the good lines and then rerunning the
//! fixed file would turn them into `duplicate`s. `--skip-invalid` publishes the rest instead and
//! lists the bad lines. Lines are numbered as an editor numbers them (a CSV header is line 1).

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use lapin::BasicProperties;
use serde_json::{Map, Value};

use crate::broker::{self, Publisher, Topology, headers};
use crate::config::BrokerSettings;
use crate::job::{FIELDS, parse_job};
use crate::output::{self, count};

/// Publishes awaiting confirms concurrently: one at a time would cap at the broker's round trip.
const CONFIRM_WINDOW: usize = 256;

/// What the input is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Ndjson,
    /// A header row of job field names (`attributes.NAME` for attributes), one job per row.
    Csv,
}

/// How `dialer enqueue` reads and checks its input.
#[derive(Clone, Debug)]
pub struct Options {
    /// The file (stdin when `None` or `-`).
    pub input: Option<PathBuf>,
    /// NDJSON or CSV; `None`: CSV for a `.csv` file, else NDJSON.
    pub format: Option<Format>,
    /// Check every line with the worker's parser first (off: publish as they are).
    pub validate: bool,
    /// Publish the valid lines even if some are not.
    pub skip_invalid: bool,
}

/// One job ready to publish, with the line it came from.
#[derive(Debug)]
struct Line {
    number: usize,
    body: Vec<u8>,
    job_id: Option<String>,
}

/// A line that will not be published, and why.
#[derive(Debug)]
struct Bad {
    number: usize,
    problem: String,
}

/// Reads, checks and publishes the jobs of `options` to `broker`'s jobs queue.
pub async fn run(broker: BrokerSettings, options: Options) -> anyhow::Result<()> {
    let text = read_input(options.input.as_deref())?;
    let format = options.format.unwrap_or_else(|| {
        match options.input.as_deref().and_then(Path::extension) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => Format::Csv,
            _ => Format::Ndjson,
        }
    });
    let records = match format {
        Format::Ndjson => ndjson_records(&text),
        Format::Csv => csv_records(&text)?,
    };
    let (jobs, bad) = check(records, options.validate);
    for line in &bad {
        eprintln!("line {}: {}", line.number, line.problem);
    }
    if !bad.is_empty() && !options.skip_invalid {
        bail!(
            "{} invalid, so nothing was published; fix {} or pass --skip-invalid to publish the other {}",
            count(bad.len() as u64, "line is", "lines are"),
            if bad.len() == 1 { "it" } else { "them" },
            count(jobs.len() as u64, "job", "jobs"),
        );
    }
    if jobs.is_empty() {
        bail!("no jobs to publish in the input");
    }

    let topology = Topology::new(&broker.prefix, broker.queue_type);
    let connection = broker::connect(&broker.amqp_url, "dialer enqueue").await?;
    let publisher = Publisher::open(&connection).await?;
    topology.declare(publisher.channel()).await?;
    let total = jobs.len();
    let bar = progress_bar(total as u64);
    let started = Instant::now();
    let mut published = 0usize;
    let mut results = futures_util::stream::iter(jobs.into_iter().map(|line| {
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
            properties = with_creation_ms(properties);
            if let Some(id) = line.job_id {
                properties = properties.with_message_id(id.into());
            }
            publisher
                .publish("", &queue, &line.body, properties, true)
                .await
                .with_context(|| format!("line {}", line.number))
        }
    }))
    .buffered(CONFIRM_WINDOW);
    while let Some(result) = results.next().await {
        if let Err(error) = result {
            bar.abandon();
            return Err(error.context(format!(
                "stopped after {} of {total} were confirmed (those are in the queue; the rest were not confirmed)",
                count(published as u64, "job", "jobs")
            )));
        }
        published += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    drop(results);
    let _ = connection.close(200, "enqueue done".into()).await;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "published {} to {} in {seconds:.1} s ({:.0}/s), each confirmed by the broker{}",
        count(published as u64, "job", "jobs"),
        topology.jobs_queue,
        published as f64 / seconds.max(1e-3),
        if bad.is_empty() {
            String::new()
        } else {
            format!(
                "; {} skipped (listed above)",
                count(bad.len() as u64, "invalid line", "invalid lines")
            )
        }
    );
    Ok(())
}

/// A bar on stderr when it is a terminal; nothing otherwise (a log is no place for one).
fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if !output::stderr_is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{wide_bar} {pos}/{len} jobs confirmed, eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

fn read_input(input: Option<&Path>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    match input {
        Some(path) if path.as_os_str() != "-" => {
            bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the jobs from stdin")?;
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        anyhow::anyhow!("line {line}: not UTF-8; the input must be UTF-8 (NDJSON or CSV)")
    })?;
    // Spreadsheet exports often start with a byte-order mark.
    Ok(text
        .strip_prefix('\u{feff}')
        .map(str::to_owned)
        .unwrap_or(text))
}

/// One record per non-blank line, with its line number.
fn ndjson_records(text: &str) -> Vec<Result<(usize, String), Bad>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| Ok((i + 1, line.to_owned())))
        .collect()
}

/// The header row names job fields (`jobId`, `phoneNumber`, …) or attributes
/// (`attributes.crmLead`); each row becomes a JSON job, empty cells left out.
fn csv_records(text: &str) -> anyhow::Result<Vec<Result<(usize, String), Bad>>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .context("line 1: cannot read the CSV header row")?
        .clone();
    let mut columns = Vec::with_capacity(headers.len());
    for (i, name) in headers.iter().enumerate() {
        let column = if let Some(attribute) = name.strip_prefix("attributes.") {
            if attribute.is_empty() {
                bail!(
                    "line 1, column {}: \"attributes.\" needs an attribute name after the dot",
                    i + 1
                );
            }
            Column::Attribute(attribute.to_owned())
        } else if FIELDS.contains(&name) && name != "attributes" {
            Column::Field(name.to_owned())
        } else {
            let fields: Vec<&str> = FIELDS
                .iter()
                .copied()
                .filter(|f| *f != "attributes")
                .collect();
            bail!(
                "line 1, column {}: {name:?} is not a job field; the header row takes {} and attributes.NAME",
                i + 1,
                fields.join(", ")
            );
        };
        columns.push(column);
    }
    let mut records = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                let number = error.position().map_or(0, |p| p.line() as usize);
                let problem = match error.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("{len} cells; the header row has {expected_len}")
                    }
                    _ => format!("not CSV: {error}"),
                };
                records.push(Err(Bad { number, problem }));
                continue;
            }
        };
        let number = record.position().map_or(0, |p| p.line() as usize);
        let mut job = Map::new();
        let mut attributes = Map::new();
        for (column, cell) in columns.iter().zip(record.iter()) {
            if cell.is_empty() {
                continue;
            }
            match column {
                Column::Attribute(name) => {
                    attributes.insert(name.clone(), Value::String(cell.to_owned()));
                }
                // An integer field: a number when it reads as one, else the text, which the
                // job parser then names as the wrong type.
                Column::Field(name) if name == "priority" => {
                    let value = cell
                        .parse::<i64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| Value::String(cell.to_owned()));
                    job.insert(name.clone(), value);
                }
                Column::Field(name) => {
                    job.insert(name.clone(), Value::String(cell.to_owned()));
                }
            }
        }
        if !attributes.is_empty() {
            job.insert("attributes".into(), Value::Object(attributes));
        }
        records.push(Ok((number, Value::Object(job).to_string())));
    }
    Ok(records)
}

enum Column {
    Field(String),
    Attribute(String),
}

/// Splits records into jobs to publish and bad lines. A job id seen on an earlier line is bad
/// too: the worker would answer the second one `duplicate` and never dial it.
fn check(records: Vec<Result<(usize, String), Bad>>, validate: bool) -> (Vec<Line>, Vec<Bad>) {
    let mut jobs = Vec::with_capacity(records.len());
    let mut bad = Vec::new();
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for record in records {
        let (number, body) = match record {
            Ok(record) => record,
            Err(problem) => {
                bad.push(problem);
                continue;
            }
        };
        if !validate {
            jobs.push(Line {
                number,
                body: body.into_bytes(),
                job_id: None,
            });
            continue;
        }
        match parse_job(body.as_bytes(), None) {
            Ok(job) => {
                let id = job.job_id.as_str().to_owned();
                if let Some(first) = first_seen.get(&id) {
                    bad.push(Bad {
                        number,
                        problem: format!("jobId {id} is already on line {first}"),
                    });
                    continue;
                }
                first_seen.insert(id.clone(), number);
                jobs.push(Line {
                    number,
                    body: body.into_bytes(),
                    job_id: Some(id),
                });
            }
            Err(rejection) => bad.push(Bad {
                number,
                problem: one_numbering(&rejection.message),
            }),
        }
    }
    (jobs, bad)
}

/// The JSON parser numbers lines within the one line it was given ("at line 1 column 9"): only
/// the column means anything here, next to the file's own line number.
fn one_numbering(message: &str) -> String {
    match message.rfind(" at line 1 column ") {
        Some(at) => format!("{} at column {}", &message[..at], &message[at + 18..]),
        None => message.to_owned(),
    }
}

/// The job's creation time in milliseconds (docs/jobs-and-events.md, "Publishing a job"): the
/// worker measures the queue wait from it, where the AMQP `timestamp` has whole seconds.
fn with_creation_ms(properties: BasicProperties) -> BasicProperties {
    let mut table = lapin::types::FieldTable::default();
    table.insert(
        headers::TIMESTAMP_IN_MS.into(),
        lapin::types::AMQPValue::LongLongInt(i64::try_from(headers::now_ms()).unwrap_or(i64::MAX)),
    );
    properties.with_headers(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn a_json_error_carries_one_line_number() {
        let records = ndjson_records(&format!(
            "{{\"jobId\":\"a\",\"agentUserId\":\"{AGENT}\",\"phoneNumber\":\"+14155552671\"}}\n\n{{\"jobId\": \n"
        ));
        let (jobs, bad) = check(records, true);
        assert_eq!(jobs.len(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].number, 3);
        assert!(!bad[0].problem.contains("line"), "{}", bad[0].problem);
        assert!(bad[0].problem.contains("column"), "{}", bad[0].problem);
    }

    #[test]
    fn csv_rows_become_jobs_with_attributes() {
        let csv = format!(
            "jobId,agentUserId,phoneNumber,priority,attributes.crmLead,label\n\
             a-1,{AGENT},+14155552671,5,L1,\n\
             a-2,{AGENT},+14155552672,,,\"x, y\"\n"
        );
        let (jobs, bad) = check(csv_records(&csv).unwrap(), true);
        assert!(bad.is_empty(), "{bad:?}");
        let first: Value = serde_json::from_slice(&jobs[0].body).unwrap();
        assert_eq!(first["priority"], 5);
        assert_eq!(first["attributes"]["crmLead"], "L1");
        assert!(first.get("label").is_none());
        let second: Value = serde_json::from_slice(&jobs[1].body).unwrap();
        assert_eq!(second["label"], "x, y");
        assert!(second.get("attributes").is_none());
        assert_eq!((jobs[0].number, jobs[1].number), (2, 3));
    }

    #[test]
    fn a_csv_header_that_is_not_a_field_is_named() {
        let error = csv_records("jobId,phone\n").unwrap_err().to_string();
        assert!(
            error.contains("column 2") && error.contains("\"phone\""),
            "{error}"
        );
    }

    #[test]
    fn a_short_csv_row_and_a_repeated_job_id_are_bad_lines() {
        let csv = format!(
            "jobId,agentUserId,phoneNumber\nb-1,{AGENT},+14155552671\nb-2,{AGENT}\nb-1,{AGENT},+14155552671\n"
        );
        let (jobs, bad) = check(csv_records(&csv).unwrap(), true);
        assert_eq!(jobs.len(), 1);
        let lines: Vec<usize> = bad.iter().map(|b| b.number).collect();
        assert_eq!(lines, [3, 4], "{bad:?}");
        assert!(bad[1].problem.contains("already on line 2"), "{bad:?}");
    }
}
