//! Why a service could not be reached, in terms a user can act on: one line naming the
//! service, its address (never a password) and the likely fix. The adapters map their
//! clients' errors to a [`ServiceError`] by variant; the command line prints it alone.

use std::fmt;
use std::time::Duration;

/// One of the three services walletq talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The message broker.
    RabbitMq,
    /// The ledger database.
    PostgreSql,
    /// The lock and membership store.
    Redis,
}

impl Service {
    /// The environment variable (and, in lower case, the flag) that holds its URL.
    pub fn variable(self) -> &'static str {
        match self {
            Service::RabbitMq => "AMQP_URL",
            Service::PostgreSql => "DATABASE_URL",
            Service::Redis => "REDIS_URL",
        }
    }

    /// The URL schemes it accepts.
    pub fn schemes(self) -> &'static [&'static str] {
        match self {
            Service::RabbitMq => &["amqp", "amqps"],
            Service::PostgreSql => &["postgres", "postgresql"],
            Service::Redis => &["redis", "rediss"],
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::RabbitMq => "RabbitMQ",
            Service::PostgreSql => "PostgreSQL",
            Service::Redis => "Redis",
        })
    }
}

/// A service could not be reached or refused us. Every message is one line and shows no
/// password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The URL names another kind of service (`mysql://` for PostgreSQL).
    #[error("{service}: {url} is not a {service} URL (scheme {scheme:?}); set {var} to a {expected}:// URL", var = service.variable(), expected = service.schemes()[0])]
    WrongScheme {
        /// The service.
        service: Service,
        /// The URL, password hidden.
        url: String,
        /// The scheme found.
        scheme: String,
    },
    /// The URL cannot be parsed.
    #[error("{service}: the URL {url} is not valid ({reason}); check {var}", var = service.variable())]
    InvalidUrl {
        /// The service.
        service: Service,
        /// The URL, password hidden.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host name does not resolve.
    #[error("{service}: cannot resolve the host of {address}; check the host name in {var}", var = service.variable())]
    UnknownHost {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
    },
    /// Nothing listens there.
    #[error("{service}: connection refused at {address}; is {service} running, and on that port? (check {var})", var = service.variable())]
    Refused {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
    },
    /// Nothing answered in time.
    #[error("{service}: no answer from {address} within {after:?}; check the address in {var} and any firewall between", var = service.variable())]
    TimedOut {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
        /// How long it waited.
        after: Duration,
    },
    /// The server refused the user or its password.
    #[error("{service}: login refused for user {user:?} at {address}; check the user and password in {var}", var = service.variable())]
    LoginRefused {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
        /// The user name tried.
        user: String,
    },
    /// The user may not use that RabbitMQ virtual host.
    #[error("{service}: user {user:?} may not use virtual host {vhost:?} at {address}; check the vhost in {var} and the user's permissions", var = service.variable())]
    VhostRefused {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
        /// The user name tried.
        user: String,
        /// The virtual host asked for.
        vhost: String,
    },
    /// The database does not exist.
    #[error("{service}: database {database:?} does not exist at {address}; run `walletq migrate` to create it (or check {var})", var = service.variable())]
    NoDatabase {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
        /// The database asked for.
        database: String,
    },
    /// Anything else, with the client's own words (never the URL's password).
    #[error("{service}: cannot connect to {address}: {detail}")]
    Other {
        /// The service.
        service: Service,
        /// `host:port`.
        address: String,
        /// What the client said.
        detail: String,
    },
}

impl ServiceError {
    /// The service concerned.
    pub fn service(&self) -> Service {
        match self {
            ServiceError::WrongScheme { service, .. }
            | ServiceError::InvalidUrl { service, .. }
            | ServiceError::UnknownHost { service, .. }
            | ServiceError::Refused { service, .. }
            | ServiceError::TimedOut { service, .. }
            | ServiceError::LoginRefused { service, .. }
            | ServiceError::VhostRefused { service, .. }
            | ServiceError::NoDatabase { service, .. }
            | ServiceError::Other { service, .. } => *service,
        }
    }

    /// The first [`ServiceError`] in an error's chain, if any.
    pub fn find(error: &anyhow::Error) -> Option<&ServiceError> {
        error.chain().find_map(|cause| cause.downcast_ref::<ServiceError>())
    }
}

/// A parsed service URL: what the errors show.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) service: Service,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: String,
}

impl Target {
    /// Checks the URL's scheme and reads its host, port and user (`default_port` when it
    /// has none).
    pub(crate) fn parse(service: Service, raw: &str, default_port: u16) -> Result<Target, ServiceError> {
        let shown = crate::telemetry::redact_url(raw);
        let url = url::Url::parse(raw).map_err(|error| ServiceError::InvalidUrl {
            service,
            url: shown.clone(),
            reason: error.to_string(),
        })?;
        if !service.schemes().contains(&url.scheme()) {
            return Err(ServiceError::WrongScheme { service, url: shown, scheme: url.scheme().to_owned() });
        }
        let host = url.host_str().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = url.port().unwrap_or(default_port);
        Ok(Target { service, host, port, user: url.username().to_owned() })
    }

    /// `host:port`.
    pub(crate) fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Resolves the host (a Unix socket directory needs none): an unknown name is reported
    /// as such instead of as whatever the client makes of it.
    pub(crate) async fn resolve(&self) -> Result<(), ServiceError> {
        if self.host.starts_with('/') {
            return Ok(());
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port)).await.map(|mut a| a.next().is_some());
        if found.unwrap_or(false) {
            Ok(())
        } else {
            Err(ServiceError::UnknownHost { service: self.service, address: self.address() })
        }
    }

    /// The error for an I/O failure while connecting.
    pub(crate) fn io_error(&self, error: &std::io::Error) -> ServiceError {
        match error.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                ServiceError::Refused { service: self.service, address: self.address() }
            }
            std::io::ErrorKind::TimedOut => {
                ServiceError::TimedOut { service: self.service, address: self.address(), after: Duration::ZERO }
            }
            _ => self.other(error),
        }
    }

    /// Nothing answered within `after`.
    pub(crate) fn timed_out(&self, after: Duration) -> ServiceError {
        ServiceError::TimedOut { service: self.service, address: self.address(), after }
    }

    /// The user or password was refused.
    pub(crate) fn login_refused(&self) -> ServiceError {
        ServiceError::LoginRefused { service: self.service, address: self.address(), user: self.user.clone() }
    }

    /// Anything else, in the client's words.
    pub(crate) fn other(&self, detail: &dyn fmt::Display) -> ServiceError {
        ServiceError::Other { service: self.service, address: self.address(), detail: detail.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_another_service_are_named_as_such() {
        let wrong = Target::parse(Service::PostgreSql, "mysql://root:secret@db:3306/walletq", 5432).unwrap_err();
        assert!(matches!(&wrong, ServiceError::WrongScheme { scheme, .. } if scheme == "mysql"), "{wrong:?}");
        let line = wrong.to_string();
        assert!(line.contains("DATABASE_URL") && line.contains("postgres://") && !line.contains("secret"), "{line}");
        let target = Target::parse(Service::RabbitMq, "amqp://guest:guest@127.0.0.1/%2f", 5672).unwrap();
        assert_eq!((target.address(), target.user.as_str()), ("127.0.0.1:5672".to_owned(), "guest"));
        assert!(matches!(Target::parse(Service::Redis, "not a url", 6379), Err(ServiceError::InvalidUrl { .. })));
    }

    #[test]
    fn each_message_is_one_line_with_the_service_the_address_and_the_variable() {
        let target = Target::parse(Service::PostgreSql, "postgres://nobody:pw@127.0.0.1:5433/walletq", 5432).unwrap();
        for error in [
            target.io_error(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            target.timed_out(Duration::from_secs(10)),
            target.login_refused(),
        ] {
            let line = error.to_string();
            assert!(!line.contains('\n') && !line.contains(":pw@"), "{line}");
            assert!(line.starts_with("PostgreSQL: ") && line.contains("127.0.0.1:5433"), "{line}");
            assert!(line.contains("DATABASE_URL"), "{line}");
            assert_eq!(error.service(), Service::PostgreSql);
        }
        assert!(target.login_refused().to_string().contains("\"nobody\""));
    }
}
