//! (7) The simulator's own capacity: many concurrent HTTP clients placing calls as fast as
//! they are answered, to show the simulator is not what limits the worker's throughput.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::task::JoinSet;

use super::Plan;
use super::dialer::{CLIENT_ID, CLIENT_SECRET, unlimited_sim};

/// What (7) measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SimCapacity {
    /// Concurrent clients (each its own connection).
    pub(crate) clients: usize,
    /// How long they ran.
    pub(crate) seconds: f64,
    /// Calls placed (200).
    pub(crate) placed: u64,
    /// Answers other than 200 (each one a problem).
    pub(crate) errors: u64,
    /// Calls placed per second.
    pub(crate) requests_per_sec: f64,
}

/// Runs (7).
pub(crate) async fn run(plan: &Plan) -> anyhow::Result<SimCapacity> {
    let sim = unlimited_sim(0).await?;
    let base = sim.base_url();
    let result = hammer(&base, plan).await;
    sim.shutdown().await;
    result
}

async fn hammer(base: &str, plan: &Plan) -> anyhow::Result<SimCapacity> {
    // One pool, one connection per client: the worker's client works the same way.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(plan.sim_clients)
        .build()
        .context("an HTTP client")?;
    let token = token(&http, base).await?;
    let url = format!(
        "{base}/api/v2/conversations/calls/user/{}",
        super::agent_id()
    );
    // The body the worker sends for a bench job.
    let body = serde_json::json!({
        "phoneNumber": super::PHONE,
        "attributes": {"crmRecord": super::crm_record(0), "dialerJobId": super::job_id("00000000", 0)},
    });
    let body = Arc::new(serde_json::to_vec(&body).context("the request body")?);
    let placed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + plan.sim_duration;
    let mut clients = JoinSet::new();
    for _ in 0..plan.sim_clients {
        let (http, url, token, body) = (http.clone(), url.clone(), token.clone(), body.clone());
        let (placed, errors) = (placed.clone(), errors.clone());
        clients.spawn(async move {
            // Bounded by time; each request also has the client's timeout.
            while Instant::now() < until {
                let sent = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await;
                let ok = match sent {
                    Ok(response) => {
                        let ok = response.status().as_u16() == 200;
                        let _ = response.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                let counter = if ok { &placed } else { &errors };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while clients.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let placed = placed.load(Ordering::Relaxed);
    Ok(SimCapacity {
        clients: plan.sim_clients,
        seconds: elapsed.as_secs_f64(),
        placed,
        errors: errors.load(Ordering::Relaxed),
        requests_per_sec: placed as f64 / elapsed.as_secs_f64(),
    })
}

/// A bearer token from the simulator's login endpoint.
async fn token(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
    }
    let response = http
        .post(format!("{base}/oauth/token"))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .context("asking the simulator for a token")?;
    if !response.status().is_success() {
        bail!("the simulator refused a token: {}", response.status());
    }
    Ok(response
        .json::<Answer>()
        .await
        .context("reading the token")?
        .access_token)
}
