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
        Err(error) => report(
            false,
            "broker",
            format!("{error}; fix DIALER_AMQP_URL (--amqp-url)"),
        ),
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
            Err(error) => format!("{error}{}", token_advice(&error)),
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
    // The simulator (a loopback base URL) has no roles: the note would only mislead there.
    if !is_loopback(&settings.genesys.api_base) {
        println!(
            "note placing calls needs conversation:call:add or conversation:agentlessCall:add on the OAuth client's role; it is only exercised by a real call, so check does not test it"
        );
    }
    if failures > 0 {
        anyhow::bail!(
            "{} failed",
            crate::output::count(failures as u64, "check", "checks")
        );
    }
    Ok(())
}

/// Which settings to look at when no token could be had.
fn token_advice(error: &GenesysError) -> &'static str {
    match error {
        GenesysError::CredentialsRefused { .. } => {
            "; fix GENESYS_CLIENT_ID and GENESYS_CLIENT_SECRET (or GENESYS_CLIENT_SECRET_FILE): they must be an OAuth client of this org with the Client Credentials grant"
        }
        GenesysError::Connect(_) | GenesysError::Timeout | GenesysError::Transport(_) => {
            "; check GENESYS_ENVIRONMENT (or GENESYS_LOGIN_BASE_URL) and the network path to it"
        }
        _ => "",
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulator_is_recognised_by_its_loopback_address() {
        for local in [
            "http://127.0.0.1:9900",
            "http://localhost:1",
            "http://[::1]:2",
        ] {
            assert!(is_loopback(&url::Url::parse(local).unwrap()), "{local}");
        }
        assert!(!is_loopback(
            &url::Url::parse("https://api.mypurecloud.ie").unwrap()
        ));
    }
}
