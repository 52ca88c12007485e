//! Logging set-up and secret redaction.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The filter when `RUST_LOG` is unset. lapin's own error lines are off: they repeat, as a
/// raw protocol dump, what walletq reports in one line (a refused login, a lost connection).
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=off,sqlx=warn";

/// Installs the global subscriber: `RUST_LOG` filter (default [`DEFAULT_LOG_FILTER`]), to
/// stderr, coloured only when stderr is a terminal and `NO_COLOR` is unset.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let colour = use_colour(std::io::IsTerminal::is_terminal(&std::io::stderr()), std::env::var_os("NO_COLOR"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything but the empty
/// string (<https://no-color.org>).
fn use_colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Installs the process-wide Prometheus recorder once and returns its handle; every
/// `metrics::counter!`/`histogram!` call after this is exported by `handle.render()`.
pub fn prometheus() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        .map_err(|e| anyhow::anyhow!("configuring metric buckets: {e}"))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_batch_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0],
        )
        .map_err(|e| anyhow::anyhow!("configuring batch size buckets: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The URL with any password replaced by `***`, for logs and errors. A comma-separated list
/// of URLs (several broker addresses, a Sentinel URL's hosts) is redacted URL by URL; a part
/// that is no URL is kept only when it cannot hold credentials (no `@`).
pub fn redact_url(raw: &str) -> String {
    raw.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(raw: &str) -> String {
    match url::Url::parse(raw.trim()) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) if !raw.contains('@') && !raw.contains("://") && !raw.is_empty() => raw.to_owned(),
        Err(_) => "<unparseable url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None), "a file or a pipe gets no escapes");
    }

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(redact_url("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert!(!redact_url("postgres://u:p@h/db").contains(":p@"));
        assert_eq!(redact_url("not a url@x"), "<unparseable url>");
    }

    #[test]
    fn every_url_of_a_list_is_redacted() {
        let list = "amqp://u:one@h1:5672/%2f, amqp://u:two@h2:5672/%2f";
        assert_eq!(redact_url(list), "amqp://u:***@h1:5672/%2f,amqp://u:***@h2:5672/%2f");
        let sentinel = "redis+sentinel://:secret@s1:26379,s2:26379,s3:26379/mymaster";
        let shown = redact_url(sentinel);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.ends_with(",s2:26379,s3:26379/mymaster"), "{shown}");
    }
}
