//! A throwaway PostgreSQL cluster for tests: one per test binary, one database per test.
//!
//! Owns: finding PostgreSQL's programs, `initdb` into a temporary directory (as the `postgres`
//! user when the tests run as root: PostgreSQL refuses to run as root), starting it with
//! `pg_ctl` on a free loopback port with its unix socket inside that directory, creating one
//! database per test, and stopping it and removing the directory when the test process exits
//! (a watchdog process that outlives nothing but the test binary; statics are never dropped).
//! Must never: listen on anything but 127.0.0.1, touch a cluster it did not create, or skip
//! silently under `CI=true` (CI must run the PostgreSQL tests, so a missing PostgreSQL fails).
//!
//! Used by the ledger's unit tests and, through `tests/common/postgres.rs`, by the end-to-end
//! tests; it uses only the standard library so both can include it as it is.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The running cluster of this test process.
#[derive(Debug)]
pub struct Cluster {
    /// PostgreSQL's program directory (`initdb`, `pg_ctl`, `createdb`, ...).
    bin: PathBuf,
    /// The data directory, which also holds the unix socket and the server log.
    dir: PathBuf,
    /// The TCP port on 127.0.0.1.
    port: u16,
    /// Whether commands run as the `postgres` user (the tests run as root).
    as_postgres: bool,
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty database on this process's cluster, as a `postgresql://` URL (trust auth, no
/// password, no TLS), or `None` after printing why the test is skipped.
///
/// # Panics
///
/// When PostgreSQL is missing or will not start under `CI=true`, or when a database cannot be
/// created.
pub fn database() -> Option<String> {
    let cluster = cluster()?;
    let name = format!(
        "paywatch_test_{}",
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    cluster.createdb(&name);
    Some(cluster.url(&name))
}

/// This process's cluster, started on first use, or `None` (skip message printed).
///
/// # Panics
///
/// Under `CI=true` when PostgreSQL is not installed or does not start.
pub fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| match Cluster::start() {
            Ok(cluster) => Some(cluster),
            Err(why) => {
                if std::env::var("CI").is_ok_and(|value| value == "true") {
                    panic!("PostgreSQL tests cannot run under CI=true: {why}");
                }
                // Straight to the process's stderr, past the test harness's capture: the
                // skip must show in a plain `cargo test` run. Printed once per test binary.
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped: the PostgreSQL tests of this binary need a local PostgreSQL ({why})"
                );
                None
            }
        })
        .as_ref()
}

impl Cluster {
    /// The URL of database `name` as the superuser `postgres`, without TLS (a test may turn
    /// TLS on for the cluster: see [`Cluster::enable_tls`]).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    /// Turns TLS on with this server certificate and key (PEM), for connections made from
    /// now on; the URLs of [`Cluster::url`] keep `sslmode=disable`.
    ///
    /// # Panics
    ///
    /// When the files cannot be written or the configuration not reloaded.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) {
        let cert = self.dir.join("server.crt");
        let key = self.dir.join("server.key");
        std::fs::write(&cert, cert_pem).expect("write server.crt");
        std::fs::write(&key, key_pem).expect("write server.key");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod server.key");
        }
        if self.as_postgres {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .expect("the postgres user");
            for file in [&cert, &key] {
                std::os::unix::fs::chown(file, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .expect("chown");
            }
        }
        for setting in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", path_text(&cert)),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", path_text(&key)),
            "ALTER SYSTEM SET ssl = on".to_owned(),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            self.psql("postgres", &setting);
        }
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs `psql -c sql` against database `name` as the superuser, returning its output.
    ///
    /// # Panics
    ///
    /// When psql fails.
    pub fn psql(&self, name: &str, sql: &str) -> String {
        let output = self
            .command("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &path_text(&self.dir), "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", name, "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Makes role `user` log in over TCP with a password (scram-sha-256) while every other
    /// role keeps trust authentication; takes effect at once (the configuration is reloaded).
    ///
    /// # Panics
    ///
    /// When pg_hba.conf cannot be rewritten or the reload fails.
    pub fn require_password_for(&self, user: &str) {
        let hba = self.dir.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        let rules = format!("host all {user} 127.0.0.1/32 scram-sha-256\n{rules}");
        std::fs::write(&hba, rules).expect("write pg_hba.conf");
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    fn createdb(&self, name: &str) {
        let output = self
            .command("createdb")
            .args(["-h", &path_text(&self.dir), "-p", &self.port.to_string()])
            .args(["-U", "postgres", name])
            .output()
            .expect("run createdb");
        assert!(
            output.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A command for PostgreSQL program `program`, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        command_as(&self.bin, program, self.as_postgres)
    }

    fn start() -> Result<Cluster, String> {
        let bin = find_bin().ok_or_else(|| {
            "no initdb found in /usr/lib/postgresql/*/bin or on PATH; install Debian's \
             'postgresql' package, or set PAYWATCH_TEST_PG_BIN"
                .to_owned()
        })?;
        let as_postgres = nix::unistd::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("paywatch-pg-")
            .tempdir()
            .map_err(|error| format!("cannot create a temporary directory: {error}"))?
            .keep();
        if as_postgres {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or("running as root, but there is no 'postgres' user to run PostgreSQL as")?;
            std::os::unix::fs::chown(&dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(|error| format!("cannot give {} to postgres: {error}", dir.display()))?;
        }
        let initdb = command_as(&bin, "initdb", as_postgres)
            .args(["-D", &path_text(&dir), "-U", "postgres", "--auth=trust"])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .map_err(|error| format!("cannot run initdb: {error}"))?;
        if !initdb.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&initdb.stderr).trim()
            ));
        }
        watch_parent(&bin, &dir, as_postgres);
        // A free port can be taken between our probe and the server's bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let options = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
                 -c fsync=off -c full_page_writes=off",
                path_text(&dir)
            );
            let start = command_as(&bin, "pg_ctl", as_postgres)
                .args(["-D", &path_text(&dir), "-l", &path_text(&dir.join("log"))])
                .args(["-w", "-t", "60", "-o", &options, "start"])
                .stdout(Stdio::null())
                .output()
                .map_err(|error| format!("cannot run pg_ctl: {error}"))?;
            if start.status.success() {
                return Ok(Cluster {
                    bin,
                    dir,
                    port,
                    as_postgres,
                });
            }
            last = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        }
        Err(format!("pg_ctl start failed; server log:\n{last}"))
    }
}

/// Stops the cluster and removes its directory once this process has gone, whichever way it
/// ends (statics are never dropped, and a panicking or killed test binary runs no destructor).
fn watch_parent(bin: &Path, dir: &Path, as_postgres: bool) {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if as_postgres {
        format!(
            "runuser -u postgres -- '{}' -D \"$1\" stop -m immediate",
            path_text(&pg_ctl)
        )
    } else {
        format!("'{}' -D \"$1\" stop -m immediate", path_text(&pg_ctl))
    };
    let script =
        format!("while [ -d /proc/$2 ]; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf \"$1\"");
    let spawned = Command::new("sh")
        .args(["-c", &script, "paywatch-pg-watchdog"])
        .arg(dir)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(error) = spawned {
        eprintln!(
            "cannot start the watchdog that stops the test cluster in {}: {error}",
            dir.display()
        );
    }
}

fn command_as(bin: &Path, program: &str, as_postgres: bool) -> Command {
    let program = bin.join(program);
    if as_postgres {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        // The postgres user cannot enter root's working directory.
        command.current_dir("/");
        command
    } else {
        Command::new(program)
    }
}

/// PostgreSQL's program directory: `PAYWATCH_TEST_PG_BIN`, Debian's newest
/// `/usr/lib/postgresql/N/bin`, or the directory of `initdb` on PATH.
fn find_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("PAYWATCH_TEST_PG_BIN") {
        return Some(PathBuf::from(bin));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
    })
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|error| format!("cannot find a free loopback port: {error}"))
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A loopback TCP proxy in front of the cluster that a test can cut (every connection dropped,
/// new ones closed at once: the database "lost"), freeze (connections held open, nothing
/// forwarded: a partition) and restore.
pub struct Proxy {
    /// The loopback port to connect to instead of the cluster's.
    pub port: u16,
    down: tokio::sync::watch::Sender<bool>,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:`port` (a free one) to `upstream`.
    ///
    /// # Panics
    ///
    /// When no loopback port can be bound.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (down, _) = tokio::sync::watch::channel(false);
        let (frozen, _) = tokio::sync::watch::channel(false);
        let state = down.clone();
        let freeze = frozen.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *state.borrow() {
                    continue;
                }
                let mut cut = state.subscribe();
                let mut frozen = freeze.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let cut_off = async {
                        let _ = cut.wait_for(|down| *down).await;
                    };
                    // Frozen: stop forwarding, keep both sockets open.
                    let freeze = async {
                        let _ = frozen.wait_for(|frozen| *frozen).await;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = cut_off => return,
                        () = freeze => {}
                    }
                    let _ = cut.wait_for(|down| *down).await.map(|_| ());
                });
            }
        });
        Proxy { port, down, frozen }
    }

    /// Stops forwarding; connections stay open (a partition).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Drops every connection and closes new ones at once (the database lost).
    pub fn cut(&self) {
        self.down.send_replace(true);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.down.send_replace(false);
    }
}
