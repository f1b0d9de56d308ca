//! Throwaway PostgreSQL servers for tests (DESIGN §6: a real server, never a mock).
//!
//! * [`TestPostgres::database`]: a fresh database on the server this test binary shares
//!   (started on first use). Cheap, tens of milliseconds: use it unless the test stops
//!   the server.
//! * [`TestPostgres::start`]: a private server with a fresh database, which the test may
//!   [`stop`](TestPostgres::stop) and [`restart`](TestPostgres::restart) (same port, same
//!   data directory). It is stopped and deleted when its last handle is dropped, also
//!   when the test panics.
//!
//! How a server runs:
//! * The binaries come from `$PG_BIN`, else the highest `/usr/lib/postgresql/<version>/bin`,
//!   else the `PATH` (`initdb`, `postgres`, `psql`).
//! * PostgreSQL refuses to run as root, so when the tests run as root the server runs as
//!   the `postgres` user (the process switches user itself before `exec`; no `su`). With
//!   no such user, starting fails and says so.
//! * `initdb` (trust authentication, UTF8, C locale) runs once per test binary into a
//!   template directory; each server gets a copy (tens of milliseconds instead of a
//!   second), in its own directory that also holds the Unix socket and the log
//!   (`postgres.log`, named in every error). The directories go to
//!   `$PLANE_TEST_POSTGRES_DIR`, else `/dev/shm` if it has 2 GiB free (a tmpfs is ten
//!   times faster at creating databases), else the temporary directory.
//! * It listens on 127.0.0.1 only, on a port that was free when it started, with fsync
//!   off and minimal WAL (nothing needs to survive an OS crash).
//! * Readiness is read from `postmaster.pid`, as `pg_ctl -w` does: the server is ready
//!   when it says so, and only the one this harness started counts.
//! * Cleanup: a dropped private server is stopped (fast shutdown) and deleted; the shared
//!   server and the template are removed when the test binary exits (an `atexit` hook).
//!   Every server is started with a parent-death signal, so it also dies if the test
//!   binary is killed; directories left behind by a killed binary are removed by the
//!   next run.

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The prefix of every directory this harness creates (see [`base_dir`]), followed by
/// the pid of the test binary that owns it.
const DIR_PREFIX: &str = "plane-test-postgres-";
/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the harness looks at a starting or stopping server.
const POLL: Duration = Duration::from_millis(10);
/// Attempts at a first start, each on a new port (another process may take the free
/// port between the check and the server's bind).
const PORT_ATTEMPTS: usize = 5;

/// A database on a throwaway PostgreSQL server. See the crate docs.
pub struct TestPostgres {
    server: Arc<Server>,
    database: String,
    shared: bool,
}

impl std::fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPostgres")
            .field("url", &self.url())
            .field("shared", &self.shared)
            .finish()
    }
}

impl TestPostgres {
    /// Starts a private server (its own port and data directory) and creates a fresh
    /// database on it. Blocks until the server accepts connections.
    pub fn start() -> anyhow::Result<TestPostgres> {
        let server = Arc::new(Server::start()?);
        let database = server.create_database()?;
        Ok(TestPostgres {
            server,
            database,
            shared: false,
        })
    }

    /// Creates a fresh database on the server shared by this test binary, starting that
    /// server on first use. The shared server cannot be stopped or restarted.
    pub fn database() -> anyhow::Result<TestPostgres> {
        let server = SHARED
            .get_or_init(|| Ok(Arc::new(Server::start().map_err(|e| format!("{e:#}"))?)))
            .as_ref()
            .map_err(|e| anyhow!("the shared test PostgreSQL server did not start: {e}"))?
            .clone();
        let database = server.create_database()?;
        Ok(TestPostgres {
            server,
            database,
            shared: true,
        })
    }

    /// Creates another fresh database on the same server.
    pub fn another_database(&self) -> anyhow::Result<TestPostgres> {
        Ok(TestPostgres {
            server: self.server.clone(),
            database: self.server.create_database()?,
            shared: self.shared,
        })
    }

    /// The connection URL: `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.server.port, self.database)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The database's name.
    pub fn database_name(&self) -> &str {
        &self.database
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.server.log_path()
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    /// Stops the server (fast shutdown: open sessions are ended). Its data stays, and
    /// [`restart`](Self::restart) brings it back. Refused on the shared server.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.private("stop")?;
        self.server.stop()
    }

    /// Stops the server if it runs, and starts it again on the same port and data
    /// directory; returns once it accepts connections. Refused on the shared server.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.private("restart")?;
        self.server.stop()?;
        self.server.launch()
    }

    fn private(&self, what: &str) -> anyhow::Result<()> {
        if self.shared {
            bail!("cannot {what} the shared test PostgreSQL server (other tests use it); use TestPostgres::start()");
        }
        Ok(())
    }
}

/// The server shared by the tests of this binary (or why it did not start).
static SHARED: OnceLock<Result<Arc<Server>, String>> = OnceLock::new();

/// Where the binaries are and whom the server runs as.
struct Install {
    bin: PathBuf,
    /// The user the server runs as; `None` to run as the current user (not root).
    owner: Option<(Uid, Gid)>,
}

impl Install {
    fn get() -> anyhow::Result<&'static Install> {
        static INSTALL: OnceLock<Result<Install, String>> = OnceLock::new();
        INSTALL
            .get_or_init(|| Install::find().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn find() -> anyhow::Result<Install> {
        let bin = find_bin_dir()?;
        for tool in ["initdb", "postgres", "psql"] {
            if !bin.join(tool).is_file() {
                bail!(
                    "{} has no `{tool}`; PG_BIN must name a PostgreSQL bin directory",
                    bin.display()
                );
            }
        }
        let owner = if Uid::effective().is_root() {
            let user = User::from_name("postgres")
                .context("looking up the `postgres` user")?
                .ok_or_else(|| {
                    anyhow!(
                        "the tests run as root, PostgreSQL refuses to run as root, and there is no `postgres` user \
                         to run it as: create one (`useradd --system --user-group postgres`) or install Debian's \
                         `postgresql` package, which does"
                    )
                })?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        Ok(Install { bin, owner })
    }

    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("PG") {
                cmd.env_remove(var);
            }
        }
        cmd.env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    /// A command run as the server's user.
    fn as_owner(&self, name: &str) -> Command {
        let mut cmd = self.tool(name);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    /// Gives a directory to the server's user.
    fn give(&self, dir: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.owner {
            chown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
                .with_context(|| format!("giving {} to the postgres user", dir.display()))?;
        }
        Ok(())
    }
}

fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(bin) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").is_file())
    {
        return Ok(bin);
    }
    bail!(
        "no PostgreSQL binaries found (looked at $PG_BIN, /usr/lib/postgresql/*/bin and the PATH for `initdb`): \
         install Debian's `postgresql` package, or set PG_BIN to the directory holding initdb, postgres and psql"
    )
}

static TEMPLATE: OnceLock<Result<Template, String>> = OnceLock::new();

/// A data directory made by `initdb` once per test binary, copied for each server.
struct Template {
    dir: PathBuf,
}

impl Template {
    fn get() -> anyhow::Result<&'static Template> {
        TEMPLATE
            .get_or_init(|| {
                remove_stale_dirs();
                // SAFETY: registering a plain `extern "C"` function; it runs once, at exit.
                unsafe { libc::atexit(clean_up_at_exit) };
                Template::create().map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn create() -> anyhow::Result<Template> {
        let install = Install::get()?;
        let dir = new_dir("template-")?;
        install.give(&dir)?;
        let data = dir.join("data");
        let out = install
            .as_owner("initdb")
            .current_dir(&dir)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            let _ = fs::remove_dir_all(&dir);
            bail!("initdb failed ({}): {}", out.status, output_text(&out));
        }
        Ok(Template { dir })
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

/// A server process and its directory.
struct Server {
    install: &'static Install,
    dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
    next_database: AtomicU32,
}

impl Server {
    fn start() -> anyhow::Result<Server> {
        let install = Install::get()?;
        let template = Template::get()?;
        let dir = new_dir("")?;
        install.give(&dir)?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(template.data())
            .arg(dir.join("data"))
            .output()
            .context("running cp");
        match copied {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let _ = fs::remove_dir_all(&dir);
                bail!("copying the template data directory failed: {}", output_text(&out));
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
        // From here on, dropping `server` deletes the directory.
        let mut server = Server {
            install,
            dir,
            port: 0,
            child: Mutex::new(None),
            next_database: AtomicU32::new(1),
        };
        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) if attempt >= PORT_ATTEMPTS => return Err(e),
                Err(_) => attempt += 1,
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// Starts the server process and waits until it accepts connections.
    fn launch(&self) -> anyhow::Result<()> {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            bail!("the server is already running");
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        let mut cmd = self.install.as_owner("postgres");
        cmd.current_dir(&self.dir)
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .args(["-c", "wal_level=minimal", "-c", "max_wal_senders=0"])
            .args(["-c", "min_wal_size=32MB", "-c", "max_wal_size=128MB"])
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = spawn_tied_to_process(cmd, libc::SIGQUIT).context("starting postgres")?;
        match self.wait_ready(&mut child) {
            Ok(()) => {
                *slot = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = halt(&mut child);
                Err(e.context(format!("PostgreSQL did not start on port {}", self.port)))
            }
        }
    }

    fn wait_ready(&self, child: &mut Child) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_file = self.data().join("postmaster.pid");
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("postgres exited ({status}); its log:\n{}", self.log_tail());
            }
            // `postmaster.pid`: pid on line 1, status on line 8 ("ready" once it
            // accepts connections).
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let lines: Vec<&str> = text.lines().collect();
                let ours = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(child.id());
                if ours && lines.get(7).is_some_and(|l| l.trim() == "ready") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("not ready within {START_TIMEOUT:?}; its log:\n{}", self.log_tail());
            }
            std::thread::sleep(POLL);
        }
    }

    fn stop(&self) -> anyhow::Result<()> {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        match child {
            Some(mut child) => halt(&mut child),
            None => Ok(()),
        }
    }

    fn create_database(&self) -> anyhow::Result<String> {
        let name = format!("test_{}", self.next_database.fetch_add(1, Ordering::Relaxed));
        let out = self
            .install
            .tool("psql")
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "-X",
                "-q",
                "-w",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("CREATE DATABASE {name} TEMPLATE template0"))
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "creating database {name} on port {} failed: {}\nserver log ({}):\n{}",
                self.port,
                output_text(&out),
                self.log_path().display(),
                self.log_tail()
            );
        }
        Ok(name)
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn remove(&self) {
        let _ = self.stop();
        // A killed server's children may still be closing files for a moment.
        for _ in 0..50 {
            match fs::remove_dir_all(&self.dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => std::thread::sleep(POLL),
                _ => return,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Stops a server: fast shutdown (SIGINT), then SIGKILL if it takes too long.
fn halt(child: &mut Child) -> anyhow::Result<()> {
    let pid = Pid::from_raw(child.id() as i32);
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let _ = kill(pid, Signal::SIGINT);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
    child.kill()?;
    child.wait()?;
    bail!("postgres did not shut down within {STOP_TIMEOUT:?} and was killed")
}

/// Spawns a test server that dies with the test binary, even one killed before it can
/// clean up: the child gets `signal` as its parent-death signal. That signal fires when
/// the *thread* that forked the child ends, so the spawn is made from one thread that
/// lives as long as the process, not from a test's thread or a runtime's worker.
/// `plane-test-pebble` starts pebble with it too.
pub fn spawn_tied_to_process(mut cmd: Command, signal: libc::c_int) -> io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("test-server-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the test-server spawner thread");
        tx
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// At exit: stops the shared server and deletes its directory and the template.
extern "C" fn clean_up_at_exit() {
    if let Some(Ok(server)) = SHARED.get() {
        server.remove();
    }
    if let Some(Ok(template)) = TEMPLATE.get() {
        let _ = fs::remove_dir_all(&template.dir);
    }
}

/// Where servers live: `$PLANE_TEST_POSTGRES_DIR` if set, else `/dev/shm` when it has
/// room (a tmpfs: creating a database there takes milliseconds, on a disk hundreds),
/// else the temporary directory.
fn base_dir() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PLANE_TEST_POSTGRES_DIR") {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        let room = nix::sys::statvfs::statvfs(shm)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(0);
        if room >= TMPFS_ROOM && nix::unistd::access(shm, nix::unistd::AccessFlags::W_OK).is_ok() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

/// The free space `/dev/shm` needs to be used (a few servers with their WAL).
const TMPFS_ROOM: u64 = 2 << 30;

/// A new directory `<base>/plane-test-postgres-<pid>-<what><random>`.
fn new_dir(what: &str) -> anyhow::Result<PathBuf> {
    let base = base_dir();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-{what}", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("creating a directory in {}", base.display()))?;
    Ok(dir.keep())
}

/// Removes directories left by test binaries that are gone (killed before their exit
/// hook ran), unless a server still runs in them.
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(base_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let postmaster = fs::read_to_string(entry.path().join("data/postmaster.pid")).ok();
        let server_alive = postmaster
            .and_then(|text| text.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !server_alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free port")?
        .local_addr()?
        .port())
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_are_fresh_and_the_shared_server_cannot_be_stopped() {
        let a = TestPostgres::database().unwrap();
        let b = TestPostgres::database().unwrap();
        assert_eq!(a.port(), b.port());
        assert_ne!(a.database_name(), b.database_name());
        assert!(a.url().starts_with("postgres://postgres@127.0.0.1:"));
        assert!(a.stop().is_err());
        assert!(a.restart().is_err());
        assert!(a.is_running());
    }

    #[test]
    fn a_private_server_restarts_on_its_port_and_is_removed_on_drop() {
        let pg = TestPostgres::start().unwrap();
        let port = pg.port();
        let dir = pg.server.dir.clone();
        pg.stop().unwrap();
        assert!(!pg.is_running());
        // The port is free again while it is stopped.
        TcpListener::bind(("127.0.0.1", port)).unwrap();
        pg.restart().unwrap();
        assert_eq!(pg.port(), port);
        assert!(pg.is_running());
        let other = pg.another_database().unwrap();
        assert_ne!(other.database_name(), pg.database_name());
        drop(pg);
        assert!(dir.exists(), "a handle is still alive");
        drop(other);
        assert!(!dir.exists());
        TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
