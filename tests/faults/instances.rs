//! Postgres and Redis instances of the fault suite's own: started from the Debian packages'
//! binaries on free ports in temporary directories, so that they can be stopped, killed and
//! restarted without touching the shared servers (5432, 6379).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::unique;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_until_answers(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The newest `/usr/lib/postgresql/*/bin` (or `$PG_BIN`).
fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres server binaries under /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("pg_ctl").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("pg_ctl under /usr/lib/postgresql/*/bin")
}

/// Whether this process runs as root (`id -u`: no libc dependency for one check).
fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `initdb` and `pg_ctl` refuse to run as root: then they run as the `postgres` user.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let out = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Postgres cluster of its own (trust authentication, no fsync: a test instance).
pub(crate) struct OwnPostgres {
    dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
}

impl OwnPostgres {
    pub(crate) fn start() -> Self {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(unique("faults-pg"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres").arg(&dir);
            run(chown, "chown the data directory");
        }
        let mut initdb = as_pg_user(&bin.join("initdb"));
        initdb.arg("-D").arg(dir.join("data")).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let pg = Self {
            dir,
            port: free_port(),
            bin,
        };
        pg.resume();
        pg
    }

    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut c = as_pg_user(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.join("data")).args(args);
        c
    }

    /// `pg_ctl start` (again, on the same port).
    pub(crate) fn resume(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log");
        let log = log.to_str().expect("utf-8 temp path");
        run(
            self.pg_ctl(&["-w", "-l", log, "-o", &options, "start"]),
            "pg_ctl start",
        );
        wait_until_answers(self.port, "Postgres");
    }

    /// `pg_ctl stop -m fast`: sessions are disconnected, new connections refused.
    pub(crate) fn stop(&self) {
        run(self.pg_ctl(&["-w", "-m", "fast", "stop"]), "pg_ctl stop");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl(&["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of its own, with or without persistence (append-only file).
pub(crate) struct OwnRedis {
    dir: PathBuf,
    pub port: u16,
    persistent: bool,
    child: Option<Child>,
}

impl OwnRedis {
    /// Not started yet: see [`OwnRedis::resume`].
    pub(crate) fn new(persistent: bool) -> Self {
        let dir = std::env::temp_dir().join(unique("faults-redis"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self {
            dir,
            port: free_port(),
            persistent,
            child: None,
        }
    }

    pub(crate) fn start(persistent: bool) -> Self {
        let mut redis = Self::new(persistent);
        redis.resume();
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn resume(&mut self) {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", ""])
            .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(
            command
                .spawn()
                .expect("redis-server (apt-get install redis-server)"),
        );
        wait_until_answers(self.port, "Redis");
    }

    /// SIGKILL: what the append-only file holds survives, nothing else.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
