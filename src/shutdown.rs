//! Process signals: SIGTERM (containers) and SIGINT (a terminal) both mean "stop cleanly".

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// Resolves on the first SIGINT or, on Unix, SIGTERM.
pub async fn signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("listening for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("listening for Ctrl-C")?;
    Ok(())
}

/// Cancels `shutdown` on the first signal (or at once if signals cannot be listened to, so
/// the process never ignores a stop request it cannot see).
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    if let Err(error) = signal().await {
        tracing::error!(error = %error, "cannot listen for signals; stopping");
    }
    tracing::info!("shutdown requested: finishing jobs in flight");
    shutdown.cancel();
}
