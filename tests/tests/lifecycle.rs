//! Lifecycle: readiness and reload notifications, socket activation, daemonize, signals.

#![allow(clippy::unwrap_used)] // Helpers of tests: a panic is a test failure with its line.

use std::process::{Command, Stdio};
use std::time::Duration;

use rustix::process::Signal;
use spotok_tests::{bin, wait_child, wait_until, Env, FakeSpotify};

fn status(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ctl(&["status", "--json"]).ok().stdout).unwrap()
}

#[test]
fn ready_reloading_and_stopping_are_notified() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "refresh_margin = \"5m\"");
    let mut d = env.daemon(&[]);
    // READY=1 came after the socket accepts and the login is loaded.
    assert!(std::os::unix::net::UnixStream::connect(&env.socket).is_ok());
    env.import(&fake);
    let before = status(&env)["refresh_at"].as_u64().unwrap();

    env.configure(&fake, "refresh_margin = \"20m\"");
    d.signal(Signal::HUP);
    assert!(
        d.wait_for("RELOADING=1", Duration::from_secs(10)),
        "{:?}",
        d.messages()
    );
    assert!(
        d.wait_for("READY=1", Duration::from_secs(10)),
        "{:?}",
        d.messages()
    );
    let after = status(&env)["refresh_at"].as_u64().unwrap();
    let moved = before.saturating_sub(after);
    // 15 min, give or take the jitter: up to a tenth of each margin earlier (30 s, 120 s),
    // and a second of rounding to Unix seconds.
    assert!(
        (869..=1021).contains(&moved),
        "refresh moved by {moved}s, not ~15m"
    );

    // A broken config on reload is refused and the old one kept.
    env.configure(&fake, "refresh_margin = \"soon\"");
    d.signal(Signal::HUP);
    assert!(d.wait_for("READY=1", Duration::from_secs(10)));
    assert!(d.log().contains("config not reloaded"), "{}", d.log());
    env.ctl(&["get"]).ok();

    assert!(d.stop().success());
    assert!(
        d.wait_for("STOPPING=1", Duration::from_secs(5)),
        "{:?}",
        d.messages()
    );
}

#[test]
fn socket_activation_serves_the_inherited_socket_and_leaves_it() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let socket = env.dir.path().join("activated.sock");
    let mut cmd = env.command("spotokd");
    // systemd-socket-activate is the program; spotokd's environment comes through it.
    cmd.env_remove("NOTIFY_SOCKET");
    let mut activator = Command::new("systemd-socket-activate");
    activator
        .arg("-l")
        .arg(&socket)
        .args(cmd.get_envs().filter_map(|(k, v)| {
            v.map(|v| format!("--setenv={}={}", k.to_string_lossy(), v.to_string_lossy()))
        }))
        .arg(bin("spotokd"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = activator
        .spawn()
        .expect("systemd-socket-activate is missing: run scripts/test.sh (package systemd)");
    assert!(wait_until(Duration::from_secs(10), || socket.exists()));
    let s = socket.to_str().unwrap();
    let token = fake.issue_refresh_token();
    env.ctl_stdin(&["--socket", s, "import"], &token).ok();
    env.ctl(&["--socket", s, "get"]).ok();
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
    rustix::process::kill_process(pid, Signal::TERM).unwrap();
    let exit = wait_child(&mut child, Duration::from_secs(10)).expect("stops");
    assert!(exit.success(), "{exit:?}");
    assert!(
        socket.exists(),
        "an inherited socket is never unlinked by spotokd"
    );
}

/// Kills the daemonized spotokd named in a pidfile when dropped.
struct PidGuard(std::path::PathBuf);

impl PidGuard {
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

#[test]
fn daemonize_returns_once_serving_and_a_second_instance_is_refused() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let pidfile = env.dir.path().join("spotokd.pid");
    let guard = PidGuard(pidfile.clone());
    let mut cmd = env.command("spotokd");
    cmd.args(["--daemonize", "--pidfile", pidfile.to_str().unwrap()]);
    let out = spotok_tests::run(cmd, None, Duration::from_secs(30));
    out.ok();
    // Answering the moment the parent returned: no retry, no sleep.
    assert_eq!(status(&env)["state"], "logged_out");
    let pid = guard.pid().expect("pidfile holds the daemon's pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    let mut again = env.command("spotokd");
    again.args(["--daemonize", "--pidfile", pidfile.to_str().unwrap()]);
    let out = spotok_tests::run(again, None, Duration::from_secs(30));
    assert_ne!(out.code, Some(0));
    assert!(!out.stderr.trim().is_empty(), "says why");
    let mut third = env.command("spotokd");
    third.arg("--daemonize");
    let out = spotok_tests::run(third, None, Duration::from_secs(30));
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("already serving"), "{}", out.stderr);
    env.ctl(&["status"]).ok();
    assert_eq!(guard.pid(), Some(pid));
    assert!(
        env.state.join("spotokd.log").exists(),
        "the daemon logs to the state folder"
    );
}

#[test]
fn sigterm_during_a_refresh_keeps_the_rotated_token() {
    let fake = FakeSpotify::start();
    fake.set_rotation(true);
    let env = Env::new();
    env.configure(&fake, "");
    let mut d = env.daemon(&[]);
    env.import(&fake);
    fake.set_delay(Duration::from_secs(2));
    let mut refresh = env.command("spotokctl");
    refresh
        .arg("refresh")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut refresh = refresh.spawn().unwrap();
    assert!(wait_until(Duration::from_secs(10), || fake
        .token_request_count()
        == 2));
    let start = std::time::Instant::now();
    assert!(d.stop().success());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let _ = wait_child(&mut refresh, Duration::from_secs(10));
    fake.set_delay(Duration::ZERO);
    // The token rotated during shutdown was saved: the old one is dead now.
    let _d = env.daemon(&[]);
    env.ctl(&["get"]).ok();
    assert_eq!(status(&env)["state"], "active");
}

#[test]
fn version_and_help() {
    let env = Env::new();
    let mut cmd = env.command("spotokd");
    cmd.arg("--version");
    let out = spotok_tests::run(cmd, None, Duration::from_secs(10));
    assert!(out.ok().stdout.starts_with("spotokd "), "{}", out.stdout);
    let out = env.ctl(&["--version"]);
    assert!(out.ok().stdout.starts_with("spotokctl "), "{}", out.stdout);
    env.ctl(&["frobnicate"]).expect_code(2);
    env.ctl(&["get", "--min-valid", "soon"]).expect_code(2);
}
