//! The Genesys client against the simulator: tokens, calls, lookups and every error class.

use std::time::Duration;

use dialer::genesys::{CreateCallRequest, ErrorClass, GenesysClient, GenesysError};
use dialer::sim::Faults;

use crate::helpers::{
    agent, agent_id, client, genesys_settings, open_gate, spawn_sim, token_requests,
};

fn call(number: &str) -> CreateCallRequest {
    CreateCallRequest {
        phone_number: number.into(),
        attributes: [("dialerJobId".to_owned(), "job-1".to_owned())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn places_a_call_with_the_flat_payload_and_caches_the_token() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    for _ in 0..3 {
        let answer = client
            .place_call(agent_id(), &call("+14155552671"), None, None)
            .await;
        let created = answer.result.expect("placed");
        assert!(!created.id.is_empty());
        assert_eq!(answer.requests, 1);
    }
    assert_eq!(token_requests(&sim), 1, "one token for three calls");
    let placed = sim.placed_calls();
    assert_eq!(placed.len(), 3);
    assert_eq!(placed[0].user_id, agent().id);
    assert_eq!(placed[0].phone_number, "+14155552671");
    assert_eq!(
        placed[0].attributes.get("dialerJobId").map(String::as_str),
        Some("job-1")
    );
}

#[tokio::test]
async fn many_concurrent_callers_share_one_token_request() {
    let sim = spawn_sim(|_| {}).await;
    let client = std::sync::Arc::new(client(&sim));
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .place_call(agent_id(), &call("+14155552671"), None, None)
                    .await
            })
        })
        .collect();
    for handle in calls {
        handle.await.expect("task").result.expect("placed");
    }
    assert_eq!(token_requests(&sim), 1);
    assert_eq!(sim.placed_calls().len(), 50);
}

#[tokio::test]
async fn renews_the_token_before_it_expires() {
    // A 2-second token: the client renews it 0.4 s before expiry, so a call at 1.7 s uses a
    // new token without ever being refused.
    let sim = spawn_sim(|s| s.token_ttl = Duration::from_secs(2)).await;
    let client = client(&sim);
    client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect("placed");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let answer = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await;
    answer.result.expect("placed with a renewed token");
    assert_eq!(answer.requests, 1, "no 401 round trip");
    assert_eq!(token_requests(&sim), 2);
    assert!(sim.requests().iter().all(|r| r.status != 401));
}

#[tokio::test]
async fn renews_once_on_401_and_retries() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect("placed");
    sim.revoke_tokens();
    let answer = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await;
    answer.result.expect("placed after renewal");
    assert_eq!(answer.requests, 2, "the refused request and the retry");
    assert_eq!(token_requests(&sim), 2);
}

#[tokio::test]
async fn refused_credentials_are_systemic() {
    let sim = spawn_sim(|s| {
        s.faults = Faults {
            reject_credentials: true,
            ..Faults::default()
        }
    })
    .await;
    let client = client(&sim);
    let error = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect_err("refused");
    assert!(
        matches!(error, GenesysError::CredentialsRefused { status: 401, .. }),
        "{error:?}"
    );
    assert_eq!(error.class(), ErrorClass::Systemic);
    assert!(
        sim.attempts().is_empty(),
        "no call attempted without a token"
    );
}

#[tokio::test]
async fn a_token_refused_right_after_issue_is_systemic() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect("placed");
    // Existing tokens refused and new ones too: renewal fails, so the error is systemic.
    sim.set_faults(Faults {
        reject_credentials: true,
        ..Faults::default()
    });
    let answer = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await;
    let error = answer.result.expect_err("refused");
    assert_eq!(error.class(), ErrorClass::Systemic, "{error:?}");
}

#[tokio::test]
async fn each_error_status_is_classified() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    let cases = [
        (
            503,
            ErrorClass::Transient {
                retry_after: Some(Duration::from_secs(1)),
            },
        ),
        (500, ErrorClass::Ambiguous),
        (502, ErrorClass::Ambiguous),
        (504, ErrorClass::Ambiguous),
        (403, ErrorClass::Systemic),
    ];
    for (status, class) in cases {
        sim.set_faults(Faults {
            fail_next: vec![status],
            retry_after_secs: 1,
            ..Faults::default()
        });
        let error = client
            .place_call(agent_id(), &call("+14155552671"), None, None)
            .await
            .result
            .expect_err("injected failure");
        assert_eq!(error.http_status(), Some(status));
        assert_eq!(error.class(), class, "{status}: {error:?}");
        assert!(
            error.correlation_id().is_some(),
            "{status}: correlation id kept"
        );
    }
}

#[tokio::test]
async fn refusals_for_the_job_are_permanent() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    let unknown_user =
        dialer::genesys::UserId::parse("00000000-0000-4000-8000-000000000000").unwrap();
    let error = client
        .place_call(unknown_user, &call("+14155552671"), None, None)
        .await
        .result
        .expect_err("unknown user");
    assert_eq!(
        (error.http_status(), error.code()),
        (Some(404), Some("not.found"))
    );
    assert_eq!(error.class(), ErrorClass::Permanent);

    let error = client
        .place_call(agent_id(), &call("0123"), None, None)
        .await
        .result
        .expect_err("not E.164");
    assert_eq!(error.http_status(), Some(400));
    assert_eq!(error.class(), ErrorClass::Permanent);
    assert!(error.to_string().contains("phoneNumber"), "{error}");
}

#[tokio::test]
async fn a_429_is_parsed_and_pauses_the_whole_gate() {
    let sim = spawn_sim(|s| {
        s.rate_limit = 2;
        s.rate_window = Duration::from_secs(30);
    })
    .await;
    let client = client(&sim);
    for _ in 0..2 {
        client
            .place_call(agent_id(), &call("+14155552671"), None, None)
            .await
            .result
            .expect("within the limit");
    }
    let error = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect_err("over the limit");
    let GenesysError::Api {
        status: 429,
        retry_after: Some(retry_after),
        ref code,
        ..
    } = error
    else {
        panic!("expected a 429 with Retry-After, got {error:?}");
    };
    assert_eq!(code.as_deref(), Some("too.many.requests.retry.after"));
    assert!(
        retry_after >= Duration::from_secs(25) && retry_after <= Duration::from_secs(30),
        "{retry_after:?}"
    );
    assert!(matches!(
        error.class(),
        ErrorClass::Transient {
            retry_after: Some(_)
        }
    ));
    let paused_until = client.gate().pause_deadline().expect("the gate is paused");
    let remaining = paused_until - tokio::time::Instant::now();
    assert!(remaining > Duration::from_secs(20), "{remaining:?}");
}

#[tokio::test]
async fn a_connect_failure_is_transient_and_a_hang_is_ambiguous() {
    // Nothing listens on a port we just bound and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sim = spawn_sim(|_| {}).await;
    let mut settings = genesys_settings(&sim);
    settings.api_base = url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    let client = GenesysClient::new(&settings, open_gate()).unwrap();
    let error = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect_err("nothing listens");
    assert!(matches!(error, GenesysError::Connect(_)), "{error:?}");
    assert_eq!(error.class(), ErrorClass::Transient { retry_after: None });

    let mut settings = genesys_settings(&sim);
    settings.timeout = Duration::from_millis(300);
    let client = GenesysClient::new(&settings, open_gate()).unwrap();
    sim.set_faults(Faults {
        hang_next: 1,
        ..Faults::default()
    });
    let error = client
        .place_call(agent_id(), &call("+14155552671"), None, None)
        .await
        .result
        .expect_err("hangs");
    assert!(matches!(error, GenesysError::Timeout), "{error:?}");
    assert_eq!(error.class(), ErrorClass::Ambiguous);
    assert_eq!(
        sim.attempts().len(),
        1,
        "the request reached the simulator once"
    );
}

#[tokio::test]
async fn finds_users_by_email_and_caches_the_answer() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    let searches = || {
        sim.requests()
            .iter()
            .filter(|r| r.path == "/api/v2/users/search")
            .count()
    };
    let found = client.find_user_by_email(&agent().email, None).await;
    assert_eq!(found.result.expect("found"), Some(agent_id()));
    let again = client
        .find_user_by_email(&agent().email.to_uppercase(), None)
        .await;
    assert_eq!(again.result.expect("cached"), Some(agent_id()));
    assert_eq!(again.requests, 0);
    assert_eq!(searches(), 1);
    let missing = client.find_user_by_email("nobody@example.com", None).await;
    assert_eq!(missing.result.expect("answered"), None);
    assert_eq!(searches(), 2);
}

#[tokio::test]
async fn a_cancelled_request_waiting_for_its_turn_is_not_sent() {
    let sim = spawn_sim(|_| {}).await;
    let client = client(&sim);
    client.gate().pause_for(Duration::from_secs(30));
    let cancel = tokio_util::sync::CancellationToken::new();
    cancel.cancel();
    let answer = client
        .place_call(agent_id(), &call("+14155552671"), Some(&cancel), None)
        .await;
    assert!(matches!(answer.result, Err(GenesysError::Cancelled)));
    assert_eq!(answer.requests, 0);
    assert!(sim.attempts().is_empty());
}
