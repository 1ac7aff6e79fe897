//! `dialer run` as a child process, configured by environment variables as a deployment would
//! configure it: for the tests that SIGTERM or SIGKILL a worker, or run several side by side.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use crate::helpers::{TestApp, sim_settings};

/// `dialer run` as a child process; killed (SIGKILL) if the test ends without waiting for it.
pub struct ChildWorker {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl ChildWorker {
    /// Starts `dialer run` configured by environment variables from `app`'s settings, with
    /// its own worker name and file decisions in the app's state directory, logging to a file
    /// there (or to the test's stderr when `TEST_LOG` is set).
    pub fn spawn(app: &TestApp, label: &str) -> Self {
        Self::spawn_with(app, label, &[])
    }

    /// Like [`ChildWorker::spawn`], with `extra` environment variables set last (so they win):
    /// for example `DIALER_DECISIONS=postgres` and its database, or a fleet rate scope.
    pub fn spawn_with(app: &TestApp, label: &str, extra: &[(&str, String)]) -> Self {
        let settings = &app.settings;
        let sim = sim_settings();
        std::fs::create_dir_all(&settings.state_dir).expect("state dir");
        let log = settings.state_dir.join(format!("{label}.log"));
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dialer"));
        command.arg("run");
        // Only what the test sets: nothing from the environment the tests run in.
        for (name, _) in std::env::vars() {
            if name.starts_with("DIALER_") || name.starts_with("GENESYS_") || name == "RUST_LOG" {
                command.env_remove(name);
            }
        }
        command
            .env("DIALER_AMQP_URL", &settings.broker.amqp_url)
            .env("DIALER_PREFIX", &settings.broker.prefix)
            .env("GENESYS_CLIENT_ID", &sim.client_id)
            .env("GENESYS_CLIENT_SECRET", &sim.client_secret)
            .env("GENESYS_API_BASE_URL", app.sim.base_url())
            .env("GENESYS_LOGIN_BASE_URL", app.sim.base_url())
            .env("DIALER_METRICS_ADDR", "127.0.0.1:0")
            .env("DIALER_DECISIONS", "file")
            .env("DIALER_STATE_DIR", &settings.state_dir)
            .env("DIALER_CONCURRENCY", settings.concurrency.get().to_string())
            .env("DIALER_RATE_LIMIT", "1000/s")
            .env("DIALER_RATE_BURST", "50")
            .env("DIALER_SHUTDOWN_GRACE", "5s")
            .env(
                "DIALER_WORKER_NAME",
                format!("{}-{label}", settings.worker_name),
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (name, value) in extra {
            command.env(name, value);
        }
        if std::env::var_os("TEST_LOG").is_none() {
            let file = std::fs::File::create(&log).expect("child log");
            command
                .stdout(file.try_clone().expect("child log"))
                .stderr(file);
        }
        let child = command.spawn().expect("`dialer run` starts");
        let pid = child.id().expect("a running child has a pid");
        Self { child, pid, log }
    }

    /// Sends a signal (`TERM`, `KILL`) with `kill`, as an orchestrator would.
    pub async fn signal(&self, name: &str) {
        let status = tokio::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Waits for the child to exit, failing after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the child"),
            Err(_) => panic!(
                "`dialer run` did not exit within {timeout:?}\n{}",
                self.log_tail()
            ),
        }
    }

    /// The end of the child's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!("--- last lines of {} ---\n{tail}", self.log.display())
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        // A failing test must not leave a worker consuming behind it. After a successful
        // `wait` this does nothing.
        let _ = self.child.start_kill();
    }
}
