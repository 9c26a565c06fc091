//! spotokd under systemd's default open-file limit (soft 1024, below `MAX_CONNECTIONS`).
//!
//! Alone in its own test binary because it lowers this process's own soft limit while it
//! starts spotokd (the child inherits it, as it would from systemd): any test running
//! beside it in the same process could fail to open a file meanwhile.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use spotok_tests::{Env, FakeSpotify};

/// Regression (found with `SPOTOK_LOAD_NOFILE=1024` in robustness.rs's load test):
/// connections could use up every file descriptor spotokd may open, and then the daemon could
/// neither reach Spotify (`connect`: EMFILE) nor save a rotated refresh token (`open`:
/// EMFILE): idle clients of the same user stopped the refreshes and put the login at risk.
/// Connections must leave the daemon the descriptors its own work needs; extra clients wait
/// in the listen backlog instead.
#[test]
fn idle_connections_cannot_starve_refreshes_of_file_descriptors() {
    const SOFT: u64 = 128;
    let fake = FakeSpotify::start();
    fake.set_rotation(true);
    fake.set_expires_in(2);
    let env = Env::new();
    env.configure(&fake, "refresh_margin = \"1s\"");
    let saved = getrlimit(Resource::Nofile);
    let low = Rlimit {
        current: Some(SOFT),
        maximum: saved.maximum,
    };
    setrlimit(Resource::Nofile, low).expect("lower the soft limit");
    let started = std::panic::catch_unwind(|| env.daemon(&[]));
    setrlimit(Resource::Nofile, saved).expect("restore the soft limit");
    let mut d = started.unwrap_or_else(|e| std::panic::resume_unwind(e));
    env.import(&fake);

    let idle: Vec<UnixStream> = (0..2 * SOFT)
        .map(|_| UnixStream::connect(&env.socket).expect("connect"))
        .collect();
    // Refreshes rotate about once a second; five seconds of them must all land on disk.
    let before = fake.issued_access_tokens().len();
    std::thread::sleep(Duration::from_secs(5));
    let refreshed = fake.issued_access_tokens().len() - before;
    let newest = fake.issued_refresh_tokens().last().cloned();
    let on_disk = std::fs::read_to_string(env.state.join("login.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["refresh_token"].as_str().map(str::to_string));
    drop(idle);
    let log = d.log();
    assert!(
        refreshed >= 3,
        "{refreshed} refreshes in 5 s with {} idle connections\n{}",
        2 * SOFT,
        log.lines()
            .filter(|l| !l.contains(" DEBUG "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(on_disk, newest, "the rotated token is on disk");
    assert!(!log.contains("Too many open files"), "{log}");
    // Once the crowd has gone, clients are served again.
    spotok_tests::wait_until(Duration::from_secs(10), || {
        env.ctl(&["get"]).code == Some(0)
    });
    env.ctl(&["get"]).ok();
    assert!(matches!(d.child.try_wait(), Ok(None)), "spotokd died");
}
