//! Real processes for tests: the `staging-store` binary, and this test binary re-executed as a
//! child with a role (the pattern of `capnp-rdma/tests/multi_process.rs`).
//!
//! Included with `#[path = "common/processes.rs"] mod processes;` by the tests that need it.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a test waits for a process to say something or to exit.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A child process whose stdout lines are read by a thread, so waiting for one has a deadline.
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    what: String,
    /// With [`Proc::start_capturing`]: the thread reading stderr, which returns all of it.
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    fn start(command: Command, what: &str) -> Self {
        Self::spawn(command, what, false)
    }

    /// [`Proc::start`], keeping what the process writes to stderr for [`Proc::stderr`] (and
    /// still passing it on to this process's stderr).
    fn start_capturing(command: Command, what: &str) -> Self {
        Self::spawn(command, what, true)
    }

    fn spawn(mut command: Command, what: &str, capture: bool) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(if capture {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                eprint!("{text}");
                text
            })
        });
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            what: what.to_owned(),
            stderr,
        }
    }

    /// Everything a process started with [`Proc::start_capturing`] wrote to stderr; waits
    /// for it to close its stderr (to exit, as a rule).
    pub fn stderr(&mut self) -> String {
        let reader = self
            .stderr
            .take()
            .expect("stderr captured, and asked for once");
        reader.join().expect("the stderr reader")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The text after `marker` on the next line that contains it (libtest may print
    /// "test child_entry ... " before it on the same line).
    pub fn expect(&mut self, marker: &str) -> String {
        self.expect_or_exit(marker).unwrap_or_else(|| {
            let status = self.child.wait().ok();
            panic!(
                "{} exited ({status:?}) before printing {marker:?}",
                self.what
            )
        })
    }

    /// [`Proc::expect`], or `None` when the process closes its stdout (exits) first.
    pub fn expect_or_exit(&mut self, marker: &str) -> Option<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(marker) {
                        return Some(line[at + marker.len()..].trim().to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{} did not print {marker:?} within {PATIENCE:?}", self.what)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// `expect`, as whitespace-separated numbers.
    pub fn expect_numbers(&mut self, marker: &str) -> Vec<u64> {
        self.expect(marker)
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect()
    }

    /// Waits (with a deadline) for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {PATIENCE:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", self.what);
    }

    /// SIGTERM, and the exit status.
    pub fn term(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid; it touches no memory of this process.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
        self.wait()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed test must not leave processes behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `staging-store` binary serving.
pub struct Server {
    pub proc: Proc,
    /// `unix:PATH` when serving a Unix socket.
    pub unix: Option<String>,
    /// `tcp:HOST:PORT` when serving TCP.
    pub tcp: Option<String>,
}

/// `staging-store serve ARGS`, with no configuration from the environment of whoever runs
/// the tests.
fn serve_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_staging-store"));
    command
        .arg("serve")
        .args(args)
        .args(["--log", "warn"])
        .env_remove("STAGING_STORE_CONFIG")
        .env_remove("STAGING_STORE_PERSIST");
    command
}

impl Server {
    /// Runs `staging-store serve ARGS` and waits for its "staging-store ready" line.
    pub fn start(args: &[&str]) -> Self {
        let mut proc = Proc::start(serve_command(args), "staging-store serve");
        let ready = proc.expect("staging-store ready");
        Self::from_ready(proc, &ready)
    }

    /// Starts `staging-store serve ARGS` without waiting for it (its stderr captured):
    /// [`Launch::outcome`] tells whether it came to serve or exited.
    pub fn launch(args: &[&str]) -> Launch {
        Launch(Proc::start_capturing(
            serve_command(args),
            "staging-store serve",
        ))
    }

    fn from_ready(proc: Proc, ready: &str) -> Self {
        let field = |key: &str| {
            ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .filter(|v| *v != "-")
                .map(str::to_owned)
        };
        Self {
            unix: field("unix=").map(|p| format!("unix:{p}")),
            tcp: field("tcp=").map(|a| format!("tcp:{a}")),
            proc,
        }
    }

    pub fn unix(&self) -> &str {
        self.unix.as_deref().expect("serving a Unix socket")
    }

    pub fn tcp(&self) -> &str {
        self.tcp.as_deref().expect("serving TCP")
    }
}

/// A `staging-store serve` started by [`Server::launch`].
pub struct Launch(Proc);

/// How a launched `staging-store serve` turned out.
pub enum Outcome {
    /// It printed its ready line.
    Serving(Server),
    /// It exited first.
    Exited {
        status: ExitStatus,
        /// What it wrote to stderr.
        stderr: String,
    },
}

impl Launch {
    /// Waits (with a deadline) for the ready line or the exit.
    pub fn outcome(self) -> Outcome {
        let mut proc = self.0;
        match proc.expect_or_exit("staging-store ready") {
            Some(ready) => Outcome::Serving(Server::from_ready(proc, &ready)),
            None => {
                let status = proc.wait();
                let stderr = proc.stderr();
                Outcome::Exited { status, stderr }
            }
        }
    }
}

/// Re-executes this test binary as a child running only `entry` (an ignored test) with
/// `env` set.
pub fn spawn_child(entry: &str, env: &[(&str, &str)]) -> Proc {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        "--ignored",
        "--exact",
        entry,
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in env {
        command.env(k, v);
    }
    let what = env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    Proc::start(command, &format!("child [{what}]"))
}
