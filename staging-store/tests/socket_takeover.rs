//! One store per Unix socket path, with real `staging-store` processes: a store started on a
//! live store's socket is refused (naming the path and the other store's pid) and the first
//! stays reachable; a socket left by a store killed with SIGKILL is replaced; two stores racing
//! for one path end with exactly one serving; a store stopping removes only its own socket.

mod common;
#[path = "common/processes.rs"]
mod processes;

use common::temp_dir;
use processes::{Outcome, Server};
use std::path::Path;
use std::process::{Command, ExitStatus};

fn serve_args(sock: &Path) -> [&str; 4] {
    ["--unix", sock.to_str().unwrap(), "--region-size", "64MiB"]
}

/// `staging-store stat --store unix:SOCK`, as an operator runs it: its exit status and output.
fn cli_stat(sock: &Path) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_staging-store"))
        .args(["stat", "--store", &format!("unix:{}", sock.display())])
        .env_remove("STAGING_STORE_ADDR")
        .output()
        .expect("running staging-store stat");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

fn assert_reachable(sock: &Path, what: &str) {
    let (status, text) = cli_stat(sock);
    assert!(
        status.success() && text.contains("region"),
        "{what}: staging-store stat on {} failed ({status}): {text}",
        sock.display()
    );
}

/// The exit status and stderr of a store that must have refused to start.
fn refused(outcome: Outcome, what: &str) -> (ExitStatus, String) {
    match outcome {
        Outcome::Exited { status, stderr } => (status, stderr),
        Outcome::Serving(mut server) => {
            let _ = server.proc.term();
            panic!("{what} came to serve on a path another store serves");
        }
    }
}

/// The pid a refusal names, if it names one.
fn named_pid(stderr: &str) -> Option<i32> {
    let after = &stderr[stderr.find(", pid ")? + ", pid ".len()..];
    let digits = after
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after.len());
    after[..digits].parse().ok()
}

fn assert_refusal(status: ExitStatus, stderr: &str, sock: &Path) {
    assert!(
        !status.success(),
        "a refused store exits non-zero: {status}"
    );
    assert!(
        stderr.contains(&sock.display().to_string()) && stderr.contains("not taking it over"),
        "the refusal names the path: {stderr:?}"
    );
}

fn stop(server: &mut Server, what: &str) {
    let status = server.proc.term();
    assert_eq!(status.code(), Some(0), "{what} exit status: {status}");
}

#[test]
fn a_second_store_on_a_live_stores_socket_is_refused_and_the_first_stays_reachable() {
    let dir = temp_dir("takeover-live");
    let sock = dir.join("a.sock");
    let lock = dir.join("a.sock.lock");
    let mut a = Server::start(&serve_args(&sock));
    assert_reachable(&sock, "store A");

    let (status, stderr) = refused(Server::launch(&serve_args(&sock)).outcome(), "store B");
    assert_refusal(status, &stderr, &sock);
    assert_eq!(named_pid(&stderr), Some(a.proc.pid()), "{stderr:?}");

    assert_reachable(&sock, "store A after B was refused");
    assert_reachable(&sock, "store A, a second client");
    stop(&mut a, "store A");
    assert!(
        !sock.exists() && !lock.exists(),
        "a store stopping removes its socket and its lock file"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn after_kill_9_the_next_store_replaces_the_stale_socket_and_owns_the_path() {
    let dir = temp_dir("takeover-stale");
    let sock = dir.join("a.sock");
    let mut a = Server::start(&serve_args(&sock));
    a.proc.kill9();
    assert!(sock.exists(), "a killed store leaves its socket behind");
    let (status, _) = cli_stat(&sock);
    assert!(!status.success(), "nobody serves the stale socket");

    let mut b = Server::start(&serve_args(&sock));
    assert_reachable(&sock, "store B on the stale path");

    // The path is B's now: a third store is refused, naming B (not the dead A).
    let (status, stderr) = refused(Server::launch(&serve_args(&sock)).outcome(), "store C");
    assert_refusal(status, &stderr, &sock);
    assert_eq!(named_pid(&stderr), Some(b.proc.pid()), "{stderr:?}");
    assert_reachable(&sock, "store B after C was refused");
    stop(&mut b, "store B");
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn two_stores_racing_for_one_path_end_with_exactly_one_serving() {
    let dir = temp_dir("takeover-race");
    let sock = dir.join("a.sock");
    for round in 0..6 {
        let first = Server::launch(&serve_args(&sock));
        let second = Server::launch(&serve_args(&sock));
        let (mut winner, loser) = match (first.outcome(), second.outcome()) {
            (Outcome::Serving(w), l @ Outcome::Exited { .. })
            | (l @ Outcome::Exited { .. }, Outcome::Serving(w)) => (w, l),
            (Outcome::Serving(mut x), Outcome::Serving(mut y)) => {
                let _ = x.proc.term();
                let _ = y.proc.term();
                panic!("round {round}: both stores came to serve on one path");
            }
            (Outcome::Exited { stderr: x, .. }, Outcome::Exited { stderr: y, .. }) => {
                panic!("round {round}: neither store serves: {x:?} / {y:?}")
            }
        };
        let (status, stderr) = refused(loser, "the loser");
        // The loser may find the lock before the winner has written its pid into it: the pid
        // is named where it is known, and then it is the winner's.
        assert_refusal(status, &stderr, &sock);
        if let Some(pid) = named_pid(&stderr) {
            assert_eq!(pid, winner.proc.pid(), "round {round}: {stderr:?}");
        }
        assert_reachable(&sock, &format!("round {round}: the winner"));
        stop(&mut winner, &format!("round {round}: the winner"));
        assert!(
            !sock.exists(),
            "round {round}: the winner removed its socket"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_store_stopping_leaves_a_socket_another_process_bound_after_it() {
    let dir = temp_dir("takeover-own");
    let sock = dir.join("a.sock");
    let mut a = Server::start(&serve_args(&sock));
    // Another process replaces the socket while A runs (the test process stands in for it).
    std::fs::remove_file(&sock).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    stop(&mut a, "store A");
    assert!(
        sock.exists(),
        "store A removed a socket that was not its own"
    );
    std::os::unix::net::UnixStream::connect(&sock)
        .expect("the other process's socket still takes connections");
    drop(other);
    let _ = std::fs::remove_dir_all(dir);
}
