//! `dialer check`: proves the configuration before a deployment — the broker is reachable, a
//! Genesys token can be obtained, and the permissions the worker can test without side effects
//! are present. Nothing is dialled.

use std::sync::Arc;

use crate::broker;
use crate::config::{RunSettings, redact_url};
use crate::genesys::{GenesysClient, GenesysError};
use crate::ratelimit::RateGate;

/// Runs every check, prints one line each, and fails if any failed.
pub async fn run(settings: &RunSettings) -> anyhow::Result<()> {
    let mut failures = 0;
    let mut report = |ok: bool, what: &str, detail: String| {
        println!("{} {what}: {detail}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failures += 1;
        }
    };

    let url = redact_url(&settings.broker.amqp_url);
    match broker::connect(&settings.broker.amqp_url, "dialer check").await {
        Ok(connection) => {
            let channel = connection.create_channel().await;
            report(channel.is_ok(), "broker", format!("connected to {url}"));
            let _ = connection.close(200, "check done".into()).await;
        }
        Err(error) => report(false, "broker", error.to_string()),
    }

    let gate = Arc::new(RateGate::new(settings.rate_limit, settings.rate_burst));
    let client = GenesysClient::new(&settings.genesys, gate)?;
    let token = client.tokens().token().await;
    let token_ok = token.is_ok();
    report(
        token_ok,
        "token",
        match token {
            Ok(_) => format!(
                "client credentials accepted by {}",
                settings.genesys.login_base
            ),
            Err(error) => error.to_string(),
        },
    );
    if token_ok {
        // A search for an address nobody has: needs directory:user:view, changes nothing.
        let probe = format!(
            "dialer-check-{}@invalid.example",
            uuid::Uuid::new_v4().simple()
        );
        let answer = client.find_user_by_email(&probe, None).await;
        match answer.result {
            Ok(_) => report(
                true,
                "user search",
                "directory:user:view present (agentEmail jobs will work)".into(),
            ),
            Err(error @ GenesysError::Api { status: 403, .. }) => report(
                false,
                "user search",
                format!(
                    "{error}; give the OAuth client's role directory:user:view, or send agentUserId only"
                ),
            ),
            Err(error) => report(false, "user search", error.to_string()),
        }
    }
    println!(
        "note placing calls needs conversation:call:add or conversation:agentlessCall:add on the OAuth client's role; it is only exercised by a real call, so check does not test it"
    );
    if failures > 0 {
        anyhow::bail!("{failures} check(s) failed");
    }
    Ok(())
}
