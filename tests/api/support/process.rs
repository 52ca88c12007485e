//! Process control: the real `walletq worker` binary as a child process ([`WorkerProcess`],
//! killed when dropped), a free port for it to bind, and [`http_get`] to probe its endpoints.

use std::process::{Child, Command, Stdio};

use super::fixture::TestApp;

/// A `walletq worker` child process, killed when dropped so a failing test leaves none behind.
pub(crate) struct WorkerProcess(Child);

impl WorkerProcess {
    /// SIGKILL, then reap.
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGSTOP: the process freezes wherever it is; its connections stay open.
    pub(crate) fn pause(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.0.id() as i32, libc::SIGSTOP) };
        assert_eq!(rc, 0, "SIGSTOP the worker");
    }

    /// SIGCONT after [`WorkerProcess::pause`].
    pub(crate) fn resume(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.0.id() as i32, libc::SIGCONT) };
        assert_eq!(rc, 0, "SIGCONT the worker");
    }

    /// Waits for the worker to exit by itself; its exit status and what it wrote to piped
    /// streams.
    pub(crate) async fn output(mut self) -> std::process::Output {
        let child = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("placeholder"));
        tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("join").expect("wait")
    }

    /// SIGTERM, then wait for the exit status.
    pub(crate) async fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM the worker");
        let mut child = std::mem::replace(&mut self.0, Command::new("true").spawn().expect("placeholder"));
        tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the real `walletq worker` binary on this app's namespace and database.
pub(crate) fn spawn_worker_process(app: &TestApp) -> WorkerProcess {
    spawn_worker_process_with(app, &[])
}

/// Same, with extra environment (for instance `WALLETQ_METRICS_ADDR`, or a service URL
/// through a fault relay); stderr goes to the test's.
pub(crate) fn spawn_worker_process_with(app: &TestApp, extra_env: &[(&str, &str)]) -> WorkerProcess {
    spawn_worker_process_logging(app, extra_env, Stdio::inherit())
}

/// Same, with the worker's stderr (its log) sent to `stderr`, for instance a file the test
/// reads to observe what the worker did.
pub(crate) fn spawn_worker_process_logging(app: &TestApp, extra_env: &[(&str, &str)], stderr: Stdio) -> WorkerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_walletq"));
    command
        .arg("worker")
        .env("DATABASE_URL", &app.services.database_url)
        .env("AMQP_URL", &app.services.amqp_url)
        .env("REDIS_URL", &app.services.redis_url)
        .env("WALLETQ_NAMESPACE", &app.services.namespace)
        .env("WALLETQ_PARTITIONS", app.topology.partitions.to_string())
        .env("WALLETQ_QUEUE_TYPE", app.topology.queue_type.as_str())
        .env("WALLETQ_LOCK_TTL_MS", "2000")
        .env("WALLETQ_BACKOFF_MAX_MS", "200")
        .env("WALLETQ_BATCH_MAX", "64")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    WorkerProcess(command.spawn().expect("start the walletq binary"))
}

/// A GET over loopback (no proxy): (status code, body), or `None` when nothing answers.
pub(crate) async fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder().no_proxy().build().expect("HTTP client");
    let response = client.get(format!("http://{address}{path}")).send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.text().await.ok()?;
    Some((status, body))
}

/// A free loopback port for a child process to bind.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}
