//! Tests of the simulator over real HTTP, with raw JSON (no client code shared).
#![allow(clippy::unwrap_used, reason = "a test should fail loudly")]

use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

use super::*;

const AGENT1: &str = "3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0001";
const INACTIVE: &str = "3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0004";
const DELETED: &str = "3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0005";

fn settings() -> SimSettings {
    SimSettings {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        ..SimSettings::default()
    }
}

async fn sim() -> SimHandle {
    start(settings()).await.unwrap()
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn token_response(sim: &SimHandle, id: &str, secret: &str) -> Response {
    client()
        .post(format!("{}/oauth/token", sim.base_url()))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
}

async fn token(sim: &SimHandle) -> String {
    let response = token_response(sim, "demo", "demo-secret").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn place(sim: &SimHandle, token: &str, user: &str, body: Value) -> Response {
    client()
        .post(format!(
            "{}/api/v2/conversations/calls/user/{user}",
            sim.base_url()
        ))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get(sim: &SimHandle, token: Option<&str>, path: &str) -> Response {
    let mut request = client().get(format!("{}{path}", sim.base_url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

fn header<'r>(response: &'r Response, name: &str) -> Option<&'r str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Checks an ErrorBody answer: status, code, and `contextId` equal to `ININ-Correlation-Id`.
async fn expect_error(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let correlation = header(&response, "inin-correlation-id").map(str::to_owned);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert_eq!(body["details"], json!([]));
    assert_eq!(body["errors"], json!([]));
    assert_eq!(
        correlation.as_deref(),
        body["contextId"].as_str(),
        "contextId must equal the header"
    );
    body
}

#[tokio::test]
async fn token_is_granted_to_the_right_credentials_with_the_configured_ttl() {
    let sim = start(SimSettings {
        token_ttl: Duration::from_secs(1234),
        ..settings()
    })
    .await
    .unwrap();
    let response = token_response(&sim, "demo", "demo-secret").await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert!(body["access_token"].as_str().is_some_and(|t| t.len() >= 32));
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 1234);

    sim.set_faults(Faults {
        token_ttl_secs: Some(300),
        ..Faults::default()
    });
    let body: Value = token_response(&sim, "demo", "demo-secret")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["expires_in"], 300);
    assert_eq!(sim.stats().tokens_granted, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn token_is_refused_to_wrong_credentials_and_bad_grants() {
    let sim = sim().await;
    let response = token_response(&sim, "demo", "wrong").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert!(body["error_description"].is_string() && body["description"].is_string());

    let no_auth = client()
        .post(format!("{}/oauth/token", sim.base_url()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);

    for form in [vec![], vec![("grant_type", "password")]] {
        let response = client()
            .post(format!("{}/oauth/token", sim.base_url()))
            .basic_auth("demo", Some("demo-secret"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unsupported_grant_type");
    }
    let stats = sim.stats();
    assert_eq!(
        (
            stats.token_requests,
            stats.tokens_granted,
            stats.tokens_refused
        ),
        (4, 0, 4)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn reject_credentials_refuses_new_and_existing_tokens() {
    let sim = sim().await;
    let token = token(&sim).await;
    assert_eq!(
        get(&sim, Some(&token), &format!("/api/v2/users/{AGENT1}"))
            .await
            .status(),
        StatusCode::OK
    );

    sim.set_faults(Faults {
        reject_credentials: true,
        ..Faults::default()
    });
    let response = token_response(&sim, "demo", "demo-secret").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );
    expect_error(
        get(&sim, Some(&token), &format!("/api/v2/users/{AGENT1}")).await,
        401,
        "bad.credentials",
    )
    .await;

    sim.set_faults(Faults::default());
    assert_eq!(
        get(&sim, Some(&token), &format!("/api/v2/users/{AGENT1}"))
            .await
            .status(),
        StatusCode::OK
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn api_requires_a_valid_unexpired_bearer_token() {
    let sim = sim().await;
    let path = format!("/api/v2/users/{AGENT1}");
    expect_error(get(&sim, None, &path).await, 401, "authentication.required").await;
    expect_error(
        get(&sim, Some("not-a-token-we-issued"), &path).await,
        401,
        "bad.credentials",
    )
    .await;

    let token = token(&sim).await;
    assert_eq!(
        get(&sim, Some(&token), &path).await.status(),
        StatusCode::OK
    );
    sim.revoke_tokens();
    expect_error(
        get(&sim, Some(&token), &path).await,
        401,
        "credentials.expired",
    )
    .await;

    // A 401 on a place-call request is still an attempt.
    let response = place(&sim, &token, AGENT1, json!({"phoneNumber": "+15551234567"})).await;
    expect_error(response, 401, "credentials.expired").await;
    let attempts = sim.attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        (attempts[0].status, attempts[0].phone_number.as_deref()),
        (401, Some("+15551234567"))
    );
    assert!(sim.placed_calls().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn place_call_creates_a_call_and_records_it() {
    let sim = sim().await;
    let token = token(&sim).await;
    let body = json!({
        "phoneNumber": "+15551234567",
        "callerId": "+15550000000",
        "callerIdName": "ACME",
        "attributes": {"dialerJobId": "job-1", "crm": "x"},
        "label": "outbound",
    });
    let response = place(&sim, &token, AGENT1, body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(&response, "inin-correlation-id").is_some());
    let answer: Value = response.json().await.unwrap();
    let id = answer["id"].as_str().unwrap().to_owned();
    assert!(answer["name"].is_string());
    assert_eq!(
        answer["selfUri"],
        format!("/api/v2/conversations/calls/{id}")
    );

    let placed = sim.placed_calls();
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].conversation_id, id);
    assert_eq!(placed[0].user_id, AGENT1);
    assert_eq!(placed[0].phone_number, "+15551234567");
    assert_eq!(placed[0].caller_id_name.as_deref(), Some("ACME"));
    assert_eq!(
        placed[0].attributes.get("dialerJobId").map(String::as_str),
        Some("job-1")
    );
    let attempts = sim.attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!((attempts[0].status, attempts[0].hung), (200, false));
    assert_eq!(attempts[0].conversation_id.as_deref(), Some(id.as_str()));

    let response = get(
        &sim,
        Some(&token),
        &format!("/api/v2/conversations/calls/{id}"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let call: Value = response.json().await.unwrap();
    assert_eq!(call["id"], id.as_str());
    let participants = call["participants"].as_array().unwrap();
    assert_eq!(participants[0]["purpose"], "agent");
    assert_eq!(participants[0]["user"]["id"], AGENT1);
    assert_eq!(participants[1]["purpose"], "customer");
    assert_eq!(participants[1]["address"], "+15551234567");
    assert_eq!(participants[1]["attributes"]["dialerJobId"], "job-1");
    let unknown = get(
        &sim,
        Some(&token),
        &format!("/api/v2/conversations/calls/{}", uuid::Uuid::new_v4()),
    )
    .await;
    expect_error(unknown, 404, "not.found").await;
    sim.shutdown().await;
}

#[tokio::test]
async fn place_call_refuses_bad_requests_like_genesys() {
    let sim = sim().await;
    let token = token(&sim).await;

    let wrong_shape =
        json!({"from": {"id": AGENT1, "type": "user"}, "to": {"phoneNumber": "+15551234567"}});
    let body = expect_error(
        place(&sim, &token, AGENT1, wrong_shape).await,
        400,
        "bad.request",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("`from`"),
        "{body}"
    );

    let body = expect_error(
        place(&sim, &token, AGENT1, json!({"wrapUpCode": "x"})).await,
        400,
        "bad.request",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("wrapUpCode"),
        "{body}"
    );

    let body = expect_error(
        place(&sim, &token, AGENT1, json!({"callerId": "+1555"})).await,
        400,
        "bad.request",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("phoneNumber"),
        "{body}"
    );

    let body = expect_error(
        place(&sim, &token, AGENT1, json!({"phoneNumber": "0123"})).await,
        400,
        "invalid.value",
    )
    .await;
    assert!(body["message"].as_str().unwrap().contains("0123"), "{body}");

    let not_json = client()
        .post(format!(
            "{}/api/v2/conversations/calls/user/{AGENT1}",
            sim.base_url()
        ))
        .bearer_auth(&token)
        .body("phoneNumber=+15551234567")
        .send()
        .await
        .unwrap();
    expect_error(not_json, 400, "bad.request").await;

    let ok_number = json!({"phoneNumber": "+15551234567"});
    let unknown = uuid::Uuid::new_v4().to_string();
    for user in [unknown.as_str(), "not-a-uuid", INACTIVE, DELETED] {
        let body = expect_error(
            place(&sim, &token, user, ok_number.clone()).await,
            404,
            "not.found",
        )
        .await;
        assert!(body["message"].as_str().unwrap().contains(user), "{body}");
    }

    let plain = client()
        .post(format!("{}/api/v2/conversations/calls", sim.base_url()))
        .bearer_auth(&token)
        .json(&ok_number)
        .send()
        .await
        .unwrap();
    let body = expect_error(plain, 400, "bad.request").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("client credentials"),
        "{body}"
    );

    assert!(sim.placed_calls().is_empty());
    let statuses: Vec<u16> = sim.attempts().iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [400, 400, 400, 400, 400, 404, 404, 404, 404],
        "the plain endpoint is not an attempt"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_answers_429_then_recovers_after_the_window() {
    // A 3-s window: four requests fit in it even on a machine busy with builds.
    let sim = start(SimSettings {
        rate_limit: 3,
        rate_window: Duration::from_secs(3),
        ..settings()
    })
    .await
    .unwrap();
    let token = token(&sim).await;
    let path = format!("/api/v2/users/{AGENT1}");
    for n in 1..=3 {
        let response = get(&sim, Some(&token), &path).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "inin-ratelimit-count"),
            Some(n.to_string().as_str())
        );
        assert_eq!(header(&response, "inin-ratelimit-allowed"), Some("3"));
        let reset: u64 = header(&response, "inin-ratelimit-reset")
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&reset), "reset {reset}");
    }
    let response = place(&sim, &token, AGENT1, json!({"phoneNumber": "+15551234567"})).await;
    let retry_after: u64 = header(&response, "retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body = expect_error(response, 429, "too.many.requests.retry.after").await;
    assert_eq!(
        body["message"],
        format!("Rate limit exceeded the maximum. Retry the request in [{retry_after}] seconds")
    );
    let attempts = sim.attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, 429);
    assert!(sim.placed_calls().is_empty());

    // Poll (bounded) until the window has rolled over.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let response = get(&sim, Some(&token), &path).await;
        if response.status() == StatusCode::OK {
            assert_eq!(header(&response, "inin-ratelimit-count"), Some("1"));
            break;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(Instant::now() < deadline, "the rate window never reset");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sim.stats().rate_limited >= 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn token_scope_gives_each_token_its_own_allowance() {
    let sim = start(SimSettings {
        rate_limit: 2,
        rate_window: Duration::from_secs(60),
        ..settings()
    })
    .await
    .unwrap();
    let (first, second) = (token(&sim).await, token(&sim).await);
    let path = format!("/api/v2/users/{AGENT1}");
    for token in [&first, &second] {
        for n in 1..=2 {
            let response = get(&sim, Some(token), &path).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                header(&response, "inin-ratelimit-count"),
                Some(n.to_string().as_str())
            );
        }
    }
    let response = get(&sim, Some(&first), &path).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    sim.shutdown().await;
}

#[tokio::test]
async fn client_scope_makes_every_token_share_one_allowance() {
    let sim = start(SimSettings {
        rate_limit: 3,
        rate_window: Duration::from_secs(60),
        rate_scope: RateScope::Client,
        ..settings()
    })
    .await
    .unwrap();
    let (first, second) = (token(&sim).await, token(&sim).await);
    let path = format!("/api/v2/users/{AGENT1}");
    // The count, the allowance and the seconds to the reset describe the shared window.
    for (n, token) in [(1, &first), (2, &second), (3, &first)] {
        let response = get(&sim, Some(token), &path).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "inin-ratelimit-count"),
            Some(n.to_string().as_str())
        );
        assert_eq!(header(&response, "inin-ratelimit-allowed"), Some("3"));
        let reset: u64 = header(&response, "inin-ratelimit-reset")
            .unwrap()
            .parse()
            .unwrap();
        assert!((59..=60).contains(&reset), "reset {reset}");
    }
    // The second token has used none of "its own" requests, yet the client's are used up; the
    // 429 keeps Genesys's exact format.
    let response = place(
        &sim,
        &second,
        AGENT1,
        json!({"phoneNumber": "+15551234567"}),
    )
    .await;
    let retry_after: u64 = header(&response, "retry-after").unwrap().parse().unwrap();
    assert!((59..=60).contains(&retry_after), "{retry_after}");
    assert!(header(&response, "inin-ratelimit-count").is_none());
    let correlation = header(&response, "inin-correlation-id").unwrap().to_owned();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "message": format!("Rate limit exceeded the maximum. Retry the request in [{retry_after}] seconds"),
            "code": "too.many.requests.retry.after",
            "status": 429,
            "contextId": correlation,
            "details": [],
            "errors": [],
        })
    );
    assert_eq!(sim.stats().rate_limited, 1);
    sim.shutdown().await;
}

#[test]
fn rate_scope_parses_token_and_client_only() {
    assert_eq!(RateScope::parse(" Client ").unwrap(), RateScope::Client);
    assert_eq!(RateScope::parse("token").unwrap(), RateScope::Token);
    assert_eq!(RateScope::default(), RateScope::Token);
    let error = RateScope::parse("org").unwrap_err();
    assert!(error.contains("token or client"), "{error}");
}

#[tokio::test]
async fn fail_next_injects_statuses_in_order() {
    let sim = sim().await;
    let token = token(&sim).await;
    sim.set_faults(Faults {
        fail_next: vec![503, 504],
        ..Faults::default()
    });
    let call = json!({"phoneNumber": "+15551234567", "attributes": {"dialerJobId": "j"}});

    let response = place(&sim, &token, AGENT1, call.clone()).await;
    assert_eq!(header(&response, "retry-after"), Some("1"));
    expect_error(response, 503, "service.unavailable").await;
    expect_error(
        place(&sim, &token, AGENT1, call.clone()).await,
        504,
        "request.timeout",
    )
    .await;
    assert_eq!(
        place(&sim, &token, AGENT1, call.clone()).await.status(),
        StatusCode::OK
    );

    sim.set_faults(Faults {
        fail_next: vec![429],
        retry_after_secs: 7,
        ..Faults::default()
    });
    let response = place(&sim, &token, AGENT1, call.clone()).await;
    assert_eq!(header(&response, "retry-after"), Some("7"));
    expect_error(response, 429, "too.many.requests.retry.after").await;

    let attempts = sim.attempts();
    let statuses: Vec<u16> = attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [503, 504, 200, 429]);
    assert!(attempts.iter().all(|a| {
        a.attributes
            .as_ref()
            .and_then(|m| m.get("dialerJobId"))
            .is_some()
    }));
    assert_eq!(sim.placed_calls().len(), 1);
    assert!(sim.faults().fail_next.is_empty(), "fail_next is used up");
    assert_eq!(sim.stats().faults_injected, 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn hang_next_leaves_the_request_unanswered() {
    let sim = sim().await;
    let token = token(&sim).await;
    sim.set_faults(Faults {
        hang_next: 1,
        ..Faults::default()
    });
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let error = impatient
        .post(format!(
            "{}/api/v2/conversations/calls/user/{AGENT1}",
            sim.base_url()
        ))
        .bearer_auth(&token)
        .json(&json!({"phoneNumber": "+15551234567"}))
        .send()
        .await
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    let attempts = sim.attempts();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].hung);
    assert_eq!(attempts[0].status, 0);
    assert!(sim.placed_calls().is_empty());

    assert_eq!(
        place(&sim, &token, AGENT1, json!({"phoneNumber": "+15551234567"}))
            .await
            .status(),
        StatusCode::OK
    );
    // Shutdown must not wait for the hung request.
    let started = Instant::now();
    sim.shutdown().await;
    assert!(started.elapsed() < SHUTDOWN_GRACE);
}

#[tokio::test]
async fn latency_delays_api_answers() {
    let sim = sim().await;
    let token = token(&sim).await;
    sim.set_faults(Faults {
        latency_ms: 200,
        ..Faults::default()
    });
    let started = Instant::now();
    assert_eq!(
        get(&sim, Some(&token), &format!("/api/v2/users/{AGENT1}"))
            .await
            .status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    sim.shutdown().await;
}

#[tokio::test]
async fn sim_endpoints_control_faults_and_show_records() {
    let sim = sim().await;
    let url = |p: &str| format!("{}/sim/{p}", sim.base_url());

    let bad = client()
        .put(url("faults"))
        .json(&json!({"failNext": [503], "explode": true}))
        .send()
        .await
        .unwrap();
    let body = expect_error(bad, 400, "bad.request").await;
    assert!(
        body["message"].as_str().unwrap().contains("explode"),
        "{body}"
    );
    let bad = client()
        .put(url("faults"))
        .json(&json!({"errorRate": 2.0}))
        .send()
        .await
        .unwrap();
    expect_error(bad, 400, "bad.request").await;

    let ok = client()
        .put(url("faults"))
        .json(&json!({"failNext": [502], "latencyMs": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(sim.faults().fail_next, [502]);
    let faults: Value = client()
        .get(url("faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults["failNext"], json!([502]));
    assert_eq!(faults["latencyMs"], 1);

    let token = token(&sim).await;
    expect_error(
        place(&sim, &token, AGENT1, json!({"phoneNumber": "+15551234567"})).await,
        502,
        "bad.gateway",
    )
    .await;
    assert_eq!(
        place(&sim, &token, AGENT1, json!({"phoneNumber": "+15551234567"}))
            .await
            .status(),
        StatusCode::OK
    );

    let calls: Value = client()
        .get(url("calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(calls["placed"].as_array().unwrap().len(), 1);
    let requests: Vec<RequestRecord> = client()
        .get(url("requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen: Vec<(&str, u16)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.status))
        .collect();
    assert_eq!(
        seen,
        [("POST", 200), ("POST", 502), ("POST", 200)],
        "the /sim calls are not recorded"
    );
    assert_eq!(requests[0].path, "/oauth/token");
    assert!(requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert!(requests[1].correlation_id.is_some());
    let stats: SimStats = client()
        .get(url("stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (stats.api_requests, stats.calls_placed, stats.call_attempts),
        (2, 1, 2)
    );
    assert_eq!(stats.by_status.get(&502), Some(&1));

    let reset = client().post(url("reset")).send().await.unwrap();
    assert!(reset.status().is_success());
    assert!(
        sim.attempts().is_empty() && sim.requests().is_empty() && sim.placed_calls().is_empty()
    );
    // Tokens survive a reset.
    assert_eq!(
        get(&sim, Some(&token), &format!("/api/v2/users/{AGENT1}"))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(sim.requests().len(), 1);

    expect_error(
        client().get(url("nothing")).send().await.unwrap(),
        404,
        "not.found",
    )
    .await;
    expect_error(get(&sim, None, "/elsewhere").await, 404, "not.found").await;
    expect_error(
        get(&sim, Some(&token), "/api/v2/nothing/here").await,
        404,
        "not.found",
    )
    .await;
    sim.shutdown().await;
}

async fn search(sim: &SimHandle, token: &str, body: Value) -> Response {
    client()
        .post(format!("{}/api/v2/users/search", sim.base_url()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn users_can_be_searched_by_exact_email_and_read_by_id() {
    let sim = sim().await;
    let token = token(&sim).await;
    let by_email = |email: &str| json!({"query": [{"type": "EXACT", "fields": ["email"], "value": email}], "pageSize": 1});

    let response = search(&sim, &token, by_email("Agent1@Example.com")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["total"], 1);
    assert_eq!(body["pageSize"], 1);
    assert_eq!(body["pageNumber"], 1);
    assert_eq!(body["results"][0]["id"], AGENT1);
    assert_eq!(body["results"][0]["email"], "agent1@example.com");
    assert_eq!(body["results"][0]["state"], "active");
    assert_eq!(
        body["results"][0]["selfUri"],
        format!("/api/v2/users/{AGENT1}")
    );

    let inactive: Value = search(&sim, &token, by_email("agent4@example.com"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(inactive["results"][0]["state"], "inactive");
    for missing in ["nobody@example.com", "agent5@example.com"] {
        let body: Value = search(&sim, &token, by_email(missing))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["total"], 0, "{missing}");
        assert_eq!(body["results"], json!([]));
    }

    let full = json!({"query": [{"type": "EXACT", "fields": ["email"], "value": "agent2@example.com", "operator": "AND"}],
        "pageSize": 25, "pageNumber": 1, "sortOrder": "ASC", "sortBy": "name", "expand": [], "enforcePermissions": false});
    assert_eq!(search(&sim, &token, full).await.status(), StatusCode::OK);

    let contains = json!({"query": [{"type": "CONTAINS", "fields": ["email"], "value": "agent"}]});
    let body = expect_error(search(&sim, &token, contains).await, 400, "bad.request").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("only EXACT on email"),
        "{body}"
    );
    let by_name = json!({"query": [{"type": "EXACT", "fields": ["name"], "value": "Agent One"}]});
    expect_error(search(&sim, &token, by_name).await, 400, "bad.request").await;
    let unknown = json!({"query": [{"type": "EXACT", "fields": ["email"], "value": "a@b.c"}], "email": "a@b.c"});
    let body = expect_error(search(&sim, &token, unknown).await, 400, "bad.request").await;
    assert!(
        body["message"].as_str().unwrap().contains("email"),
        "{body}"
    );

    let user: Value = get(&sim, Some(&token), &format!("/api/v2/users/{AGENT1}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(user["name"], "Agent One");
    expect_error(
        get(
            &sim,
            Some(&token),
            &format!("/api/v2/users/{}", uuid::Uuid::new_v4()),
        )
        .await,
        404,
        "not.found",
    )
    .await;
    expect_error(
        get(&sim, Some(&token), &format!("/api/v2/users/{DELETED}")).await,
        404,
        "not.found",
    )
    .await;
    sim.shutdown().await;
}

#[test]
fn agents_are_parsed_strictly() {
    let agents = parse_agents(
        r#"[{"id":"3F6D2B9E-8C1A-4E57-9B2D-5A7C0E1F0009","email":"a@x.io","name":"A","state":"inactive"},
            {"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0010","email":"b@x.io","name":"B"}]"#,
    )
    .unwrap();
    assert_eq!(
        agents[0].id, "3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0009",
        "ids are normalised"
    );
    assert_eq!(agents[0].state, AgentState::Inactive);
    assert_eq!(agents[1].state, AgentState::Active);

    let unknown = parse_agents(
        r#"[{"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0009","email":"a@x.io","name":"A","role":"x"}]"#,
    );
    assert!(unknown.unwrap_err().contains("role"));
    let bad_id = parse_agents(r#"[{"id":"42","email":"a@x.io","name":"A"}]"#);
    assert!(bad_id.unwrap_err().contains("not a UUID"));
    let duplicate = parse_agents(
        r#"[{"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0009","email":"a@x.io","name":"A"},
            {"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0010","email":"A@x.io","name":"B"}]"#,
    );
    assert!(duplicate.unwrap_err().contains("duplicate email"));
    let bad_state = parse_agents(
        r#"[{"id":"3f6d2b9e-8c1a-4e57-9b2d-5a7c0e1f0009","email":"a@x.io","name":"A","state":"gone"}]"#,
    );
    assert!(bad_state.is_err());

    let demo = SimAgent::demo_set();
    assert!(Directory::new(demo.clone()).is_ok());
    assert_eq!(
        demo.iter()
            .filter(|a| a.state == AgentState::Inactive)
            .count(),
        1
    );
}

#[test]
fn first_line_and_banner() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9900));
    assert_eq!(listening_line(addr), "listening on http://127.0.0.1:9900");
    let settings = SimSettings {
        client_secret: "s3cr3t-value".to_owned(),
        ..SimSettings::default()
    };
    let banner = banner(&settings, "http://127.0.0.1:9900").join("\n");
    assert!(banner.contains("SIMULATOR") && banner.contains("NOT the real Genesys Cloud"));
    assert!(banner.contains("demo") && banner.contains("agent1@example.com"));
    assert!(
        !banner.contains("s3cr3t-value"),
        "the secret must never be printed"
    );
    assert!(!format!("{settings:?}").contains("s3cr3t-value"));
}

#[tokio::test]
async fn start_refuses_bad_settings_and_base_url_is_connectable() {
    let bad_agents = vec![SimAgent {
        id: "x".into(),
        email: "a@b.c".into(),
        name: "A".into(),
        state: AgentState::Active,
    }];
    assert!(
        start(SimSettings {
            agents: bad_agents,
            ..settings()
        })
        .await
        .is_err()
    );
    assert!(
        start(SimSettings {
            rate_limit: 0,
            ..settings()
        })
        .await
        .is_err()
    );

    let sim = start(SimSettings {
        addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        ..settings()
    })
    .await
    .unwrap();
    assert_eq!(
        sim.base_url(),
        format!("http://127.0.0.1:{}", sim.addr().port())
    );
    assert_eq!(
        token_response(&sim, "demo", "demo-secret").await.status(),
        StatusCode::OK
    );
    sim.shutdown().await;
}
