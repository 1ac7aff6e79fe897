//! The published JSON Schemas and examples in `docs/` agree with each other and with the code
//! that reads jobs and writes events.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dialer::event::{EventError, Outcome, ResultEvent};
use dialer::job::{Agent, parse_job};
use serde_json::{Value, json};
use time::macros::datetime;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compiles a schema from `docs/schemas` as Draft 2020-12, with `format` checked too.
fn compile(name: &str) -> jsonschema::Validator {
    let schema = read_json(&docs().join("schemas").join(name));
    if let Err(error) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("{name} is not a valid Draft 2020-12 schema: {error}");
    }
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

/// The validator of `docs/schemas/result-event.schema.json`, for tests of what the worker publishes.
pub(crate) fn event_schema() -> jsonschema::Validator {
    compile("result-event.schema.json")
}

/// The validator of `docs/schemas/dial-job.schema.json`.
pub(crate) fn job_schema() -> jsonschema::Validator {
    compile("dial-job.schema.json")
}

/// Every schema error of `instance`, one line each, empty when it is valid.
pub(crate) fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// `docs/examples/*<suffix>`, by file name.
fn examples(suffix: &str) -> BTreeMap<String, Value> {
    let dir = docs().join("examples");
    let found: BTreeMap<String, Value> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            name.ends_with(suffix).then(|| (name, read_json(&path)))
        })
        .collect();
    assert!(found.len() >= 3, "only {} {suffix} examples", found.len());
    found
}

fn job_body(job: &Value) -> Vec<u8> {
    serde_json::to_vec(job).unwrap()
}

fn minimal_job() -> Value {
    json!({
        "jobId": "job-1",
        "agentUserId": "8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
        "phoneNumber": "+14155552671",
    })
}

fn job_with(changes: Value) -> Value {
    let mut job = minimal_job();
    for (name, value) in changes.as_object().unwrap() {
        job[name] = value.clone();
    }
    job
}

#[test]
fn the_schemas_are_valid_draft_2020_12() {
    job_schema();
    event_schema();
}

#[test]
fn every_example_job_matches_the_schema_and_is_accepted() {
    let schema = job_schema();
    for (name, job) in examples(".job.json") {
        assert_eq!(schema_errors(&schema, &job), Vec::<String>::new(), "{name}");
        if let Err(rejection) = parse_job(&job_body(&job), None) {
            panic!("{name} is rejected: {rejection}");
        }
    }
}

#[test]
fn every_example_event_matches_the_schema_and_is_what_the_code_writes() {
    let schema = event_schema();
    let mut outcomes = Vec::new();
    for (name, example) in examples(".event.json") {
        assert_eq!(
            schema_errors(&schema, &example),
            Vec::<String>::new(),
            "{name}"
        );
        let event = ResultEvent::from_json(&serde_json::to_vec(&example).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Written back, it is the same JSON: the example is exactly what the worker would send.
        let written: Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(written, example, "{name}");
        outcomes.push(event.outcome);
    }
    for outcome in Outcome::ALL {
        assert!(
            outcomes.contains(&outcome),
            "no example event for {outcome}"
        );
    }
}

#[test]
fn events_built_in_code_match_the_schema_for_every_outcome() {
    let schema = event_schema();
    let job = parse_job(
        &job_body(&job_with(json!({"attributes": {"crmLeadId": "7"}}))),
        None,
    )
    .unwrap();
    let user_id = match job.agent {
        Agent::UserId(id) => id.to_string(),
        Agent::Email(_) => unreachable!("the job names a user id"),
    };
    let rejection = parse_job(b"{\"jobId\": \"job-2\", \"phone\": 1}", None).unwrap_err();
    for outcome in Outcome::ALL {
        let error = match outcome {
            Outcome::Placed => None,
            Outcome::Rejected => Some(EventError::from_rejection(&rejection)),
            _ => Some(EventError {
                kind: "refused".into(),
                message: "Genesys answered 400 bad.request: invalid phone number".into(),
                http_status: Some(400),
                code: Some("bad.request".into()),
                correlation_id: Some("6c2b1f0e-7a8d-4e3b-9c1a-2d3e4f5a6b7c".into()),
            }),
        };
        let event = ResultEvent {
            job_id: Some(job.job_id.as_str().to_owned()),
            outcome,
            conversation_id: (outcome == Outcome::Placed)
                .then(|| "2f0e8a34-5b6c-4d7e-8f90-a1b2c3d4e5f6".into()),
            agent_user_id: Some(user_id.clone()),
            phone_number: Some(job.phone_number.e164().to_owned()),
            attempts: 2,
            error,
            attributes: Some(job.attributes.clone()),
            received_at: datetime!(2026-03-01 09:30:00.123456789 +01:00),
            completed_at: time::OffsetDateTime::now_utc(),
            worker: "worker-1".into(),
        };
        let json: Value = serde_json::from_slice(&event.to_json()).unwrap();
        assert_eq!(
            schema_errors(&schema, &json),
            Vec::<String>::new(),
            "{outcome}: {json}"
        );
    }

    // A body that could not be read at all: no job id, nothing known but the error.
    let unreadable = parse_job(b"\xff", None).unwrap_err();
    let event = ResultEvent {
        job_id: unreadable.job_id.clone(),
        outcome: Outcome::Rejected,
        conversation_id: None,
        agent_user_id: None,
        phone_number: None,
        attempts: 0,
        error: Some(EventError::from_rejection(&unreadable)),
        attributes: None,
        received_at: time::OffsetDateTime::now_utc(),
        completed_at: time::OffsetDateTime::now_utc(),
        worker: "worker-1".into(),
    };
    let json: Value = serde_json::from_slice(&event.to_json()).unwrap();
    assert_eq!(json["jobId"], Value::Null);
    assert_eq!(
        schema_errors(&schema, &json),
        Vec::<String>::new(),
        "{json}"
    );
}

#[test]
fn the_event_schema_holds_the_contract_rules() {
    let schema = event_schema();
    let placed = read_json(&docs().join("examples/placed.event.json"));
    let failed = read_json(&docs().join("examples/failed.event.json"));
    let broken = |mut event: Value, change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        change(event.as_object_mut().unwrap());
        event
    };
    for (what, event) in [
        (
            "placed without conversationId",
            broken(placed.clone(), &|e| {
                e.remove("conversationId");
            }),
        ),
        (
            "placed with an error",
            broken(placed.clone(), &|e| {
                e.insert("error".into(), failed["error"].clone());
            }),
        ),
        (
            "failed without an error",
            broken(failed.clone(), &|e| {
                e.remove("error");
            }),
        ),
        (
            "failed with a conversationId",
            broken(failed.clone(), &|e| {
                e.insert("conversationId".into(), placed["conversationId"].clone());
            }),
        ),
        (
            "no jobId at all",
            broken(placed.clone(), &|e| {
                e.remove("jobId");
            }),
        ),
        (
            "an outcome not in the contract",
            broken(failed.clone(), &|e| {
                e.insert("outcome".into(), "retrying".into());
            }),
        ),
        (
            "a number that is not E.164",
            broken(placed.clone(), &|e| {
                e.insert("phoneNumber".into(), "415 555 2671".into());
            }),
        ),
        (
            "a time not in UTC",
            broken(placed.clone(), &|e| {
                e.insert("receivedAt".into(), "2026-03-01T18:00:00+01:00".into());
            }),
        ),
        (
            "an unknown field",
            broken(placed.clone(), &|e| {
                e.insert("status".into(), "ok".into());
            }),
        ),
    ] {
        assert!(!schema.is_valid(&event), "the schema accepts {what}");
    }
}

#[test]
fn invalid_jobs_fail_both_the_schema_and_the_parser() {
    let schema = job_schema();
    let mut no_agent = minimal_job();
    no_agent.as_object_mut().unwrap().remove("agentUserId");
    let mut no_number = minimal_job();
    no_number.as_object_mut().unwrap().remove("phoneNumber");
    for (what, job) in [
        (
            "an unknown field",
            job_with(json!({"phone": "+14155552671"})),
        ),
        (
            "both agents",
            job_with(json!({"agentEmail": "ada@example.com"})),
        ),
        ("no agent", no_agent),
        (
            "no agent but nulls",
            job_with(json!({"agentUserId": null, "agentEmail": null})),
        ),
        ("no phone number", no_number),
        (
            "dialerJobId in attributes",
            job_with(json!({"attributes": {"dialerJobId": "x"}})),
        ),
        ("a job id with a space", job_with(json!({"jobId": "job 1"}))),
        (
            "a user id that is not a UUID",
            job_with(json!({"agentUserId": "ada"})),
        ),
        (
            "a queue id that is not a UUID",
            job_with(json!({"callFromQueueId": "sales"})),
        ),
        (
            "an email without @",
            job_with(json!({"agentUserId": null, "agentEmail": "ada.example.com"})),
        ),
        (
            "a number with letters",
            job_with(json!({"phoneNumber": "+1 415 FLOWERS"})),
        ),
        (
            "a region of three letters",
            job_with(json!({"defaultRegion": "GBR"})),
        ),
        ("a priority in words", job_with(json!({"priority": "high"}))),
        ("a fractional priority", job_with(json!({"priority": 1.5}))),
        (
            "a priority beyond i32",
            job_with(json!({"priority": 2_147_483_648u64})),
        ),
        ("an empty callerId", job_with(json!({"callerId": ""}))),
        (
            "a label of 257 characters",
            job_with(json!({"label": "x".repeat(257)})),
        ),
        (
            "uuiData of 1025 characters",
            job_with(json!({"uuiData": "x".repeat(1025)})),
        ),
        (
            "a number for an attribute",
            job_with(json!({"attributes": {"n": 1}})),
        ),
        (
            "an empty attribute name",
            job_with(json!({"attributes": {"": "x"}})),
        ),
        (
            "101 attributes",
            job_with(
                json!({"attributes": (0..101).map(|i| (i.to_string(), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            ),
        ),
        (
            "a time without offset",
            job_with(json!({"notBefore": "2026-03-01T09:00:00"})),
        ),
        (
            "a time with a space",
            job_with(json!({"expiresAt": "2026-03-01 09:00:00Z"})),
        ),
        ("an array", json!([minimal_job()])),
    ] {
        assert!(!schema.is_valid(&job), "the schema accepts {what}");
        assert!(
            parse_job(&job_body(&job), None).is_err(),
            "parse_job accepts {what}"
        );
    }
}

#[test]
fn valid_edge_cases_pass_both_the_schema_and_the_parser() {
    let schema = job_schema();
    let hundred: serde_json::Map<_, _> = (0..100).map(|i| (i.to_string(), json!("v"))).collect();
    for (what, job) in [
        (
            "nulls for absent fields",
            job_with(
                json!({"agentEmail": null, "callerId": null, "priority": null, "attributes": null}),
            ),
        ),
        (
            "a job id of 128 characters",
            job_with(json!({"jobId": "x".repeat(128)})),
        ),
        (
            "a label of 256 characters",
            job_with(json!({"label": "é".repeat(256)})),
        ),
        (
            "uuiData of 1024 characters",
            job_with(json!({"uuiData": "x".repeat(1024)})),
        ),
        ("100 attributes", job_with(json!({"attributes": hundred}))),
        (
            "an empty attribute value",
            job_with(json!({"attributes": {"note": ""}})),
        ),
        (
            "the largest priority",
            job_with(json!({"priority": 2_147_483_647})),
        ),
        (
            "a whole priority written as 5.0",
            job_with(json!({"priority": 5.0})),
        ),
        (
            "a lower-case region",
            job_with(json!({"phoneNumber": "(415) 555-2671", "defaultRegion": "us"})),
        ),
        (
            "an upper-case UUID",
            job_with(json!({"callFromQueueId": "0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"})),
        ),
        (
            "times with offsets and fractions",
            job_with(
                json!({"notBefore": "2026-03-01T09:00:00.5+01:00", "expiresAt": "2026-03-01T17:00:00Z"}),
            ),
        ),
    ] {
        assert_eq!(schema_errors(&schema, &job), Vec::<String>::new(), "{what}");
        if let Err(rejection) = parse_job(&job_body(&job), None) {
            panic!("parse_job rejects {what}: {rejection}");
        }
    }
}

/// What JSON Schema cannot say, the parser still checks (docs/jobs-and-events.md lists these).
#[test]
fn some_rules_only_the_parser_can_check() {
    let schema = job_schema();
    let mut no_id = minimal_job();
    no_id.as_object_mut().unwrap().remove("jobId");
    for (what, job) in [
        (
            "a number libphonenumber calls invalid",
            job_with(json!({"phoneNumber": "+1 415 555"})),
        ),
        (
            "a region libphonenumber does not know",
            job_with(json!({"phoneNumber": "020 7183 8750", "defaultRegion": "ZZ"})),
        ),
        (
            "an expiry before the start",
            job_with(
                json!({"notBefore": "2026-03-01T10:00:00Z", "expiresAt": "2026-03-01T09:00:00Z"}),
            ),
        ),
        ("no jobId and no AMQP message_id", no_id),
    ] {
        assert!(
            schema.is_valid(&job),
            "the schema now rejects {what}: update the docs"
        );
        assert!(
            parse_job(&job_body(&job), None).is_err(),
            "parse_job accepts {what}"
        );
    }
    let twice = br#"{"jobId":"j","agentUserId":"8f9a1c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b","phoneNumber":"+14155552671","phoneNumber":"+14155552672"}"#;
    assert!(
        parse_job(twice, None).is_err(),
        "parse_job accepts a field given twice"
    );
}
