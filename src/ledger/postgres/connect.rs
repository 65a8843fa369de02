//! Connecting to a PostgreSQL ledger: the URL, its `sslmode`, TLS with rustls, the password,
//! and the connection pool.
//!
//! Owns: turning `[ledger] url`, `password_file` and `ca_file` into a pool of connections, and
//! the session settings a daemon's connections carry (its role, for the fence; the idle-in-
//! transaction timeout that ends a paused writer's transaction).
//! Must never: show the URL's password, or the password from a file, in an error or a log (the
//! password is a [`Secret`], registered with the scrubber, and errors name the host, port and
//! database only); send the password over a TLS connection whose certificate was not checked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use super::PgError;
use crate::domain::scrub_secrets;
use crate::settings::Secret;

/// The `sslmode` of a `postgresql://` URL, as libpq names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`: never TLS.
    Disable,
    /// `allow` or `prefer` (libpq's default): TLS when the server offers it. Unlike libpq,
    /// paywatch then checks the certificate as `verify-full` does.
    Prefer,
    /// `require`, `verify-ca`, `verify-full`: TLS or no connection, the certificate checked
    /// against the built-in roots plus `ca_file`, and its name against the host.
    Require,
}

/// Who a connection is for: it decides the session settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// A daemon: every write must carry the lease epoch (`paywatch.role = 'daemon'`), and a
    /// transaction left idle longer than `idle_limit` is ended by the server (a paused daemon
    /// cannot hold the election lock past it).
    Daemon {
        /// `idle_in_transaction_session_timeout`.
        idle_limit: Duration,
    },
    /// An operator's command (`track`, `link create`, `hooks replay`, `ledger copy`): no
    /// lease needed.
    Operator,
}

/// Where and how to connect, checked but not yet connected.
#[derive(Clone)]
pub struct Target {
    /// The parsed URL (password set from the URL or the password file).
    config: tokio_postgres::Config,
    /// The URL's `sslmode`.
    tls: TlsMode,
    /// Extra CA certificates (PEM) for the server's certificate.
    ca_file: Option<PathBuf>,
    /// `host:port/database`, for messages.
    display: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("at", &self.display)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// Whether `url` names a PostgreSQL ledger (`postgresql://` or `postgres://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgresql://") || url.starts_with("postgres://")
}

impl Target {
    /// Parses `url` (libpq's URL form) with `sslmode` taken out of it, registering its password
    /// with the scrubber; `password`, if given, is used instead of the URL's.
    ///
    /// # Errors
    ///
    /// A URL that is not `postgresql://...`, does not parse, has an unknown `sslmode`, or has a
    /// password while `password` is also given. The message never quotes the URL.
    pub fn parse(
        url: &str,
        password: Option<&Secret>,
        ca_file: Option<&Path>,
    ) -> Result<Target, String> {
        if !is_postgres_url(url) {
            return Err("must start with postgresql:// (or postgres://)".to_owned());
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut tls = TlsMode::Prefer;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == "sslmode" {
                tls = match value {
                    "disable" => TlsMode::Disable,
                    "allow" | "prefer" => TlsMode::Prefer,
                    "require" | "verify-ca" | "verify-full" => TlsMode::Require,
                    other => {
                        return Err(format!(
                            "sslmode '{}' is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full",
                            crate::domain::printable(other)
                        ));
                    }
                };
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|error: tokio_postgres::Error| {
                format!(
                    "is not a PostgreSQL URL ({}); the form is \
                 postgresql://user@host:port/database",
                    scrub_secrets(&error.to_string())
                )
            })?;
        if let Some(url_password) = config.get_password() {
            let url_password = String::from_utf8_lossy(url_password).into_owned();
            // Registered even when refused below: it must not show up anywhere.
            let _ = Secret::new(url_password);
            if password.is_some() {
                return Err(
                    "has a password, and a password file (or the systemd credential) gives \
                     one too; keep one of them (the file is better: the URL shows in `ps` and \
                     in config dumps)"
                        .to_owned(),
                );
            }
        }
        if let Some(password) = password {
            config.password(password.expose());
        }
        if config.get_hosts().is_empty() {
            return Err("names no host; the form is postgresql://user@host:port/database".into());
        }
        if config.get_user().is_none() {
            return Err("names no user; the form is postgresql://user@host:port/database".into());
        }
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require => SslMode::Require,
        });
        config.connect_timeout(Duration::from_secs(10));
        config.keepalives_idle(Duration::from_secs(30));
        let display = describe(&config);
        Ok(Target {
            config,
            tls,
            ca_file: ca_file.map(Path::to_path_buf),
            display,
        })
    }

    /// `host:port/database`, for messages (never the password).
    pub fn describe(&self) -> &str {
        &self.display
    }

    /// The TLS mode from the URL.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls
    }

    /// The parsed configuration with `session`'s settings.
    fn session_config(&self, session: Session) -> tokio_postgres::Config {
        let mut config = self.config.clone();
        config.application_name("paywatch");
        // The server's notices ("relation already exists, skipping" from the migrations' IF
        // NOT EXISTS) are not the operator's business; its warnings are.
        let quiet = "-c client_min_messages=warning";
        match session {
            Session::Daemon { idle_limit } => config.options(format!(
                "{quiet} -c paywatch.role=daemon -c idle_in_transaction_session_timeout={}",
                idle_limit.as_millis().max(1)
            )),
            Session::Operator => config.options(quiet),
        };
        config
    }

    /// The rustls connector: the built-in roots plus `ca_file`.
    ///
    /// # Errors
    ///
    /// `ca_file` cannot be read or holds no certificate.
    pub fn tls_connector(&self) -> Result<MakeRustlsConnect, PgError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &self.ca_file {
            let pem = crate::settings::read_ca_file(path)
                .map_err(|problem| PgError::Settings(format!("'ledger.ca_file': {problem}")))?;
            let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| {
                    PgError::Settings(format!(
                        "'ledger.ca_file': cannot read '{}': {error}",
                        path.display()
                    ))
                })?;
            for certificate in certificates {
                roots.add(certificate).map_err(|error| {
                    PgError::Settings(format!(
                        "'ledger.ca_file': a certificate in '{}' is not usable: {error}",
                        path.display()
                    ))
                })?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| PgError::Settings(format!("TLS set-up failed: {error}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// A pool of at most `size` connections for `session`; nothing is connected yet.
    ///
    /// # Errors
    ///
    /// `ca_file` problems (see [`Target::tls_connector`]).
    pub fn pool(&self, session: Session, size: usize) -> Result<Pool, PgError> {
        let manager = Manager::from_config(
            self.session_config(session),
            self.tls_connector()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|error| {
                PgError::Settings(format!("cannot build the connection pool: {error}"))
            })
    }

    /// One connection outside the pool, with its connection task, for LISTEN: the returned
    /// receiver yields the payload of every `paywatch_lease` notification and closes when the
    /// connection does.
    ///
    /// # Errors
    ///
    /// The connection fails (see [`PgError::from_connect`]).
    pub async fn listener(
        &self,
        session: Session,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio::sync::mpsc::UnboundedReceiver<String>,
        ),
        PgError,
    > {
        use futures::StreamExt;
        let (client, mut connection) = self
            .session_config(session)
            .connect(self.tls_connector()?)
            .await
            .map_err(|error| PgError::from_connect(self, &error))?;
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(notification) = message
                    && sender.send(notification.payload().to_owned()).is_err()
                {
                    break;
                }
            }
        });
        client
            .batch_execute("LISTEN paywatch_lease")
            .await
            .map_err(|error| PgError::from_db(self, &error))?;
        Ok((client, receiver))
    }
}

/// `host:port/database` of `config`.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "?".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().or(config.get_user()).unwrap_or("?");
    format!("{host}:{port}/{database}")
}
