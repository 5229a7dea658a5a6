//! Test harness: temporary config and state folders, the real `usher` binary as a child
//! process (with a NOTIFY_SOCKET the test owns, so READY=1 is observed as systemd would),
//! signals, and polling helpers. The fakes run in the test process (usher_sandbox).
//!
//! Both state backends: with `USHER_TEST_POSTGRES=postgres://…` (scripts/pg-test-cluster.sh
//! starts a throwaway server and prints one) every [`Env`] keeps its state in a schema of
//! its own on that server, its configs say so, and the query helpers below read it there;
//! a test about the SQLite file itself returns early ([`sqlite_only`]).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_usher")
}

/// A config folder (with `usher.toml`, `usher.d/`, secrets) and a state folder.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// The PostgreSQL state of this environment (a schema of its own), when the suite runs
    /// on PostgreSQL.
    pub pg: Option<String>,
}

/// The PostgreSQL server the suite runs on, if any.
pub fn postgres() -> Option<String> {
    std::env::var("USHER_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// True (and says so) when the suite runs on PostgreSQL: for tests of the SQLite file
/// itself (its mode, its moves, its damage, its backup), which then return early.
pub fn sqlite_only(what: &str) -> bool {
    if postgres().is_some() {
        eprintln!("SKIPPED on PostgreSQL: {what} is about the SQLite state file");
        return true;
    }
    false
}

/// State database paths (`Env::db_path`) of environments whose state is on PostgreSQL.
fn pg_states() -> &'static std::sync::Mutex<std::collections::HashMap<PathBuf, String>> {
    static M: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<PathBuf, String>>> =
        std::sync::OnceLock::new();
    M.get_or_init(Default::default)
}

/// Runs SQL on PostgreSQL with psql: every value as text (NULL as None).
pub fn psql(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-F", "\u{1f}", "-R", "\u{1e}", "-P", "null=\u{1}"])
        .arg("-c")
        .arg(sql)
        .arg(url)
        .output()
        .expect("psql (apt-get install postgresql-client)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim_end_matches('\n')
        .split('\u{1e}')
        .filter(|r| !r.is_empty())
        .map(|r| {
            r.split('\u{1f}')
                .map(|v| (v != "\u{1}").then(|| v.to_string()))
                .collect()
        })
        .collect()
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("etc/usher.d")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let pg = postgres().map(|base| {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let schema = format!(
                "t{}_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst),
                rand_suffix()
            );
            psql(&base, &format!("CREATE SCHEMA {schema}"));
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-csearch_path%3D{schema}")
        });
        let env = Env { dir, pg };
        if let Some(url) = &env.pg {
            pg_states()
                .lock()
                .unwrap()
                .insert(env.db_path(), url.clone());
        }
        env
    }

    /// The `[daemon]` lines that put the state where this environment keeps it.
    pub fn state_lines(&self) -> String {
        match &self.pg {
            Some(url) => format!(
                "state_dir = {:?}\nstate = {url:?}\n",
                self.state_dir().display().to_string()
            ),
            None => format!("state_dir = {:?}\n", self.state_dir().display().to_string()),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("etc/usher.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir().join("usher.db")
    }

    /// Writes the main config; `[daemon] state_dir` is added when the text has no
    /// `[daemon]` table.
    pub fn write_config(&self, toml: &str) {
        let mut text = toml.to_string();
        if !text.contains("[daemon]") {
            text = format!(
                "[daemon]\nstate_dir = {:?}\ncontrol_poll = \"500ms\"\nshutdown_timeout = \"20s\"\n\n{text}",
                self.state_dir().display().to_string()
            );
        }
        // On PostgreSQL: the [daemon] table names this environment's schema.
        if let Some(url) = &self.pg
            && !text.contains("\nstate = ")
        {
            text = text.replacen("[daemon]\n", &format!("[daemon]\nstate = {url:?}\n"), 1);
        }
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn write_dropin(&self, name: &str, toml: &str) {
        std::fs::write(self.dir.path().join("etc/usher.d").join(name), toml).unwrap();
    }

    /// Writes a secret file beside the config and returns its path.
    pub fn write_secret(&self, name: &str, value: &str) -> PathBuf {
        let p = self.dir.path().join("etc").join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        // As a sysadmin should (a looser file is warned about).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Runs a CLI command to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run usher")
    }

    /// [`Env::cli`] with the process's clock starting at `now` (RFC 3339; a debug build
    /// reads `USHER_TEST_NOW`).
    pub fn cli_at(&self, now: &str, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("USHER_TEST_NOW", now)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run usher")
    }

    pub fn spawn_daemon(&self) -> Daemon {
        self.spawn_daemon_with(&[], &[])
    }

    pub fn spawn_daemon_with(&self, extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        self.spawn_daemon_opts(extra_args, env, &Spawn::default())
    }

    /// Like [`Env::spawn_daemon_with`], with the log format and a descriptor limit chosen.
    pub fn spawn_daemon_opts(
        &self,
        extra_args: &[&str],
        env: &[(&str, &str)],
        opts: &Spawn,
    ) -> Daemon {
        let sock_path = self
            .dir
            .path()
            .join(format!("notify-{}.sock", rand_suffix()));
        let notify = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log_path = self
            .dir
            .path()
            .join(format!("daemon-{}.log", rand_suffix()));
        let log = std::fs::File::create(&log_path).unwrap();
        // A descriptor limit is set by a shell that then becomes usher (`exec`), so the
        // daemon starts with it, as under systemd's LimitNOFILE=.
        let mut cmd = match opts.nofile {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("--log-format")
            .arg(opts.log_format)
            .args(extra_args)
            .arg("run")
            .env("NOTIFY_SOCKET", &sock_path)
            .env("RUST_LOG", "usher=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            // An empty value removes the variable (e.g. RUST_LOG, to see the default level).
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().expect("spawn usher run");
        Daemon {
            child,
            notify,
            log_path,
            started: Instant::now(),
        }
    }
}

/// How [`Env::spawn_daemon_opts`] starts the daemon.
pub struct Spawn {
    /// `--log-format` (the harness reads JSON lines unless a test says otherwise).
    pub log_format: &'static str,
    /// The soft and hard limit of open descriptors (`ulimit -n`), else inherited.
    pub nofile: Option<u64>,
}

impl Default for Spawn {
    fn default() -> Self {
        Spawn {
            log_format: "json",
            nofile: None,
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst) * 1000 + std::process::id() as u64 % 1000
}

pub struct Daemon {
    pub child: Child,
    notify: UnixDatagram,
    pub log_path: PathBuf,
    pub started: Instant,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a notify message containing `what` (e.g. "READY=1").
    pub fn wait_notify(&self, what: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).contains(what)
            {
                return true;
            }
        }
        false
    }

    /// Waits for READY=1 and returns the time from spawn to it.
    pub fn wait_ready(&self) -> Duration {
        assert!(
            self.wait_notify("READY=1", Duration::from_secs(30)),
            "the daemon did not become ready; log:\n{}",
            self.log()
        );
        self.started.elapsed()
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, sig);
    }

    pub fn kill9(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; returns its exit code (None = killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens the SQLite state database read-only for assertions (tests of the file itself;
/// for anything else, [`rows`] and friends read either backend).
pub fn db(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// The rows of a query on the state of the environment whose `db_path` this is, on
/// either backend, every value as text (NULL as None). Write SQL both accept.
pub fn rows(path: &Path, sql: &str) -> Vec<Vec<Option<String>>> {
    let pg = pg_states().lock().unwrap().get(path).cloned();
    match pg {
        Some(url) => psql(&url, sql),
        None => {
            let c = db(path);
            let mut st = c.prepare(sql).unwrap();
            let n = st.column_count();
            st.query_map([], |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => None,
                            rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                            rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                            rusqlite::types::ValueRef::Text(t)
                            | rusqlite::types::ValueRef::Blob(t) => {
                                Some(String::from_utf8_lossy(t).into_owned())
                            }
                        })
                    })
                    .collect()
            })
            .unwrap()
            .map(Result::unwrap)
            .collect()
        }
    }
}

/// The first column of the first row, if any.
pub fn query_text(path: &Path, sql: &str) -> Option<String> {
    rows(path, sql)
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

/// The first column of every row.
pub fn column(path: &Path, sql: &str) -> Vec<Option<String>> {
    rows(path, sql)
        .into_iter()
        .map(|r| r.into_iter().next().flatten())
        .collect()
}

/// A single number (`SELECT COUNT(*) …`).
pub fn query_i64(path: &Path, sql: &str) -> i64 {
    let v = query_text(path, sql).unwrap_or_default();
    v.parse::<f64>()
        .map(|f| f as i64)
        .unwrap_or_else(|_| panic!("{sql}: not a number: {v:?}"))
}

/// A byte column (a payload body): SQLite's blob, PostgreSQL's bytea (`\x…` in text).
pub fn query_bytes(path: &Path, sql: &str) -> Option<Vec<u8>> {
    if !pg_states().lock().unwrap().contains_key(path) {
        return db(path).query_row(sql, [], |r| r.get(0)).ok();
    }
    let v = query_text(path, sql)?;
    Some(match v.strip_prefix("\\x") {
        Some(hex) => hex::decode(hex).expect("bytea in hex"),
        None => v.into_bytes(),
    })
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The common config of the CRM feed → webhook stream against a sandbox at `base`.
pub fn crm_stream_config(
    base: &str,
    every: &str,
    max_per_run: u32,
    max_per_payload: u32,
) -> String {
    format!(
        r#"
[connections.crm]
kind = "crm"
base_url = "{base}/crm"
max_retries = 3

[connections.hub]
kind = "crm"
base_url = "{base}/crm"
# A restart after a kill waits until a POST in flight can no longer land (timeout + 1 s +
# the settle margin): kept short here so that kill tests do not wait 36 s.
timeout = "3s"

[streams.contacts]
source = "crm"
entity = "contact"
target = "hub"
every = "{every}"
jitter = "0s"
page_size = 50
max_per_run = {max_per_run}
max_per_payload = {max_per_payload}

[streams.contacts.webhook]
url = "/hooks/contacts"
"#
    )
}

/// A small tmpfs mounted over a folder, so that a test can fill the state's disk for real.
/// Needs root (CI runs as root). Unmounted (lazily, so that a daemon still inside does not
/// stop it) when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "4m") at `dir`; `None` (with a line saying the test is
    /// skipped) where mounting is not allowed, unless `USHER_TEST_MOUNTS=required` (CI).
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs {
                dir: dir.to_path_buf(),
            }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                if std::env::var("USHER_TEST_MOUNTS").as_deref() == Ok("required") {
                    panic!("cannot mount a tmpfs at {} ({why})", dir.display());
                }
                eprintln!(
                    "SKIPPED: this test needs a tmpfs it can fill and cannot mount one at {} ({why}); run it as root",
                    dir.display()
                );
                None
            }
        }
    }

    fn filler(&self) -> PathBuf {
        self.dir.join("filler")
    }

    /// Takes every free byte of the tmpfs with a file.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }

    /// Gives the space back.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A free TCP port on loopback (for `[metrics] listen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `http://127.0.0.1:{port}{path}`: status and body.
pub async fn get(port: u16, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}
