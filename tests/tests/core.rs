//! The token engine, the socket and the file store, through the real binaries.

#![allow(clippy::unwrap_used)] // Helpers of tests: a panic is a test failure with its line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use spotok_tests::{wait_until, Env, FakeSpotify, Scripted};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o777
}

fn get(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    let out = env.ctl(&all);
    out.ok();
    out.stdout.trim().to_string()
}

#[test]
fn import_then_get_and_a_second_get_costs_nothing() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    assert_eq!(
        fake.token_request_count(),
        1,
        "import checks with one refresh"
    );
    let first = get(&env, &[]);
    assert!(fake.issued_access_tokens().contains(&first), "{first}");
    let second = get(&env, &[]);
    assert_eq!(first, second);
    assert_eq!(
        fake.token_request_count(),
        1,
        "gets are answered from memory"
    );

    let header = env.ctl(&["get", "--header"]);
    assert_eq!(
        header.ok().stdout,
        format!("Authorization: Bearer {first}\n")
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ctl(&["--json", "get"]).stdout).unwrap();
    assert_eq!(json["access_token"], first.as_str());
    assert!(json["expires_at"].as_u64().unwrap() > 1_700_000_000);
    assert!(json["scopes"].is_array());
    // Global options go before or after the verb.
    let after: serde_json::Value =
        serde_json::from_str(&env.ctl(&["get", "--json"]).stdout).unwrap();
    assert_eq!(after["access_token"], first.as_str());
}

#[test]
fn the_token_is_refreshed_before_it_expires_with_no_client_asking() {
    let fake = FakeSpotify::start();
    fake.set_expires_in(4);
    let env = Env::new();
    env.configure(&fake, "refresh_margin = \"2s\"");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let first = get(&env, &["--min-valid", "0s"]);
    let issued = fake.token_requests()[0].at;
    assert!(
        wait_until(Duration::from_secs(6), || fake.token_request_count() >= 2),
        "no proactive refresh"
    );
    let refreshed_at = fake.token_requests()[1].at;
    assert!(
        refreshed_at.duration_since(issued) < Duration::from_secs(4),
        "the refresh came after the old token expired: {:?}",
        refreshed_at.duration_since(issued)
    );
    let second = get(&env, &["--min-valid", "0s"]);
    assert_ne!(first, second);
}

#[test]
fn fifty_concurrent_gets_share_one_token_request() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    fake.set_delay(Duration::from_secs(2));
    let before = fake.token_request_count();
    let tokens: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| s.spawn(|| get(&env, &["--min-valid", "1h"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(fake.token_request_count() - before, 1, "single flight");
    assert!(
        tokens.iter().all(|t| t == &tokens[0]),
        "all 50 got the same token"
    );
    assert_eq!(fake.issued_access_tokens().last(), Some(&tokens[0]));
}

#[test]
fn rotation_survives_kill_9_right_after_a_refresh() {
    let fake = FakeSpotify::start();
    fake.set_rotation(true);
    let env = Env::new();
    env.configure(&fake, "");
    let mut d = env.daemon(&[]);
    env.import(&fake);
    env.ctl(&["refresh"]).ok();
    d.kill9();
    let _d = env.daemon(&[]);
    let token = get(&env, &[]);
    assert!(fake.issued_access_tokens().contains(&token));
    assert!(fake
        .token_requests()
        .iter()
        .all(|r| r.form.get("grant_type").map(String::as_str) == Some("refresh_token")),);
    // Every refresh used the newest refresh token: none was refused.
    let refused = env.ctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&refused.stdout).unwrap();
    assert_eq!(status["state"], "active", "{status}");
}

#[test]
fn without_rotation_the_old_refresh_token_keeps_working_across_restarts() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let mut d = env.daemon(&[]);
    let token = env.import(&fake);
    for _ in 0..2 {
        d.stop();
        d = env.daemon(&[]);
        get(&env, &[]);
    }
    let used: Vec<_> = fake
        .token_requests()
        .iter()
        .map(|r| r.form["refresh_token"].clone())
        .collect();
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|t| t == &token));
}

#[test]
fn transient_failures_are_retried_until_success() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let mut d = env.daemon(&[]);
    env.import(&fake);
    d.stop();
    // Restarted with no access token, the daemon's first three requests fail.
    for _ in 0..3 {
        fake.push(Scripted::status(503));
    }
    let _d = env.daemon(&[]);
    let token = get(&env, &[]);
    assert_eq!(fake.issued_access_tokens().last(), Some(&token));
    assert_eq!(fake.token_request_count(), 1 + 4);
}

#[test]
fn retry_after_is_honoured() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    fake.push(Scripted::too_many(3));
    let out = env.ctl(&["refresh"]);
    out.expect_code(6);
    assert!(out.stderr.contains("429"), "{}", out.stderr);
    // The current token is still served while the daemon backs off.
    get(&env, &[]);
    assert!(wait_until(Duration::from_secs(10), || fake
        .token_request_count()
        >= 3));
    let r = fake.token_requests();
    let gap = r[2].at.duration_since(r[1].at);
    assert!(gap >= Duration::from_secs(3), "retried after {gap:?}");
}

#[test]
fn invalid_grant_drops_the_login_and_stops_asking() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    assert!(env.state.join("login.json").exists());
    fake.revoke_all();
    let out = env.ctl(&["refresh"]);
    out.expect_code(4);
    assert!(out.stderr.contains("spotokctl login"), "{}", out.stderr);
    let status: serde_json::Value =
        serde_json::from_str(&env.ctl(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(status["state"], "needs_login");
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("Invalid refresh token"));
    assert!(
        !env.state.join("login.json").exists(),
        "the dead token is dropped"
    );
    let count = fake.token_request_count();
    env.ctl(&["get"]).expect_code(4);
    env.ctl(&["refresh"]).expect_code(4);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fake.token_request_count(),
        count,
        "no request after invalid_grant"
    );
}

#[test]
fn a_lifetime_shorter_than_the_margin_causes_no_storm() {
    let fake = FakeSpotify::start();
    fake.set_expires_in(1);
    let env = Env::new();
    env.configure(&fake, "refresh_margin = \"10m\"");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let start = fake.token_request_count();
    std::thread::sleep(Duration::from_secs(10));
    let made = fake.token_request_count() - start;
    // Refreshing once per lifetime (1 s) is the most it may do; a busy loop makes thousands.
    assert!((5..=12).contains(&made), "{made} token requests in 10 s");
}

#[test]
fn every_verb_without_a_daemon_exits_3_and_says_how_to_start_it() {
    let env = Env::new();
    for args in [
        &["get"][..],
        &["status"],
        &["login", "--no-browser"],
        &["logout"],
        &["refresh"],
        &["whoami"],
        &["watch"],
        &["exec", "--", "true"],
    ] {
        let out = env.ctl(args);
        out.expect_code(3);
        assert!(
            out.stderr.contains("systemctl --user start spotokd"),
            "{args:?}: {}",
            out.stderr
        );
        assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    }
    env.ctl_stdin(&["import"], "AQsomething").expect_code(3);
}

#[test]
fn modes_of_socket_folders_and_token_file() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    assert_eq!(mode(&env.socket), 0o600);
    assert_eq!(mode(env.socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&env.state), 0o700);
    assert_eq!(mode(&env.state.join("login.json")), 0o600);
}

#[test]
fn a_client_of_another_uid_is_refused() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    if rustix::process::getuid().as_raw() != 0 {
        eprintln!("skipped: needs root to run a client as nobody");
        return;
    }
    // Open the way to the socket for everyone, so only spotokd's own check stands; reach it
    // through a link in a folder not named spotok*, so only the daemon's check is tested.
    for dir in [env.dir.path(), &env.runtime, env.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&env.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let public = env.dir.path().join("public");
    std::fs::create_dir(&public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&env.socket, public.join("s.sock")).unwrap();
    let ctl = public.join("spotokctl");
    std::fs::copy(spotok_tests::bin("spotokctl"), &ctl).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&ctl)
        .args(["--socket", public.join("s.sock").to_str().unwrap(), "get"])
        .env_clear()
        .env("HOME", "/nonexistent");
    let out = spotok_tests::run(cmd, None, Duration::from_secs(30));
    out.expect_code(1);
    assert!(out.stderr.contains("serves only uid 0"), "{}", out.stderr);
    assert!(!out.stdout.contains("BQ"), "no token for another user");
}

fn hello(stream: &mut UnixStream) -> BufReader<UnixStream> {
    stream
        .write_all(b"{\"op\":\"hello\",\"protocol\":1,\"client\":\"test\"}\n")
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"reply\":\"hello\""), "{line}");
    reader
}

#[test]
fn bad_clients_do_not_disturb_others() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);

    // One that connects and never writes.
    let _idle = UnixStream::connect(&env.socket).unwrap();
    // One that sends garbage, then carries on properly.
    let mut garbage = UnixStream::connect(&env.socket).unwrap();
    let mut reader = hello(&mut garbage);
    garbage.write_all(b"{this is not json\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"kind\":\"invalid_args\""), "{line}");
    garbage.write_all(b"{\"op\":\"status\"}\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"reply\":\"status\""), "{line}");

    // One that sends a 1 MiB line: told so, then cut off.
    let mut huge = UnixStream::connect(&env.socket).unwrap();
    let mut huge_reader = hello(&mut huge);
    huge.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = huge.write_all(&vec![b'x'; 1 << 20]);
    let mut rest = String::new();
    huge.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = huge_reader.read_to_string(&mut rest);
    assert!(rest.contains("longer than"), "{rest}");

    // Everyone else is served, and quickly.
    let start = Instant::now();
    for _ in 0..5 {
        get(&env, &[]);
    }
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn many_requests_per_connection_and_hello_first() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let mut s = UnixStream::connect(&env.socket).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.contains("hello"),
        "status before hello is refused: {line}"
    );
    let mut s = UnixStream::connect(&env.socket).unwrap();
    let mut r = hello(&mut s);
    for _ in 0..100 {
        s.write_all(b"{\"op\":\"get\",\"min_valid_secs\":60}\n")
            .unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"reply\":\"token\""), "{line}");
    }
    let mut old = UnixStream::connect(&env.socket).unwrap();
    old.write_all(b"{\"op\":\"hello\",\"protocol\":99,\"client\":\"future\"}\n")
        .unwrap();
    let mut r = BufReader::new(old);
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("protocol_mismatch"), "{line}");
}

#[test]
fn the_log_never_contains_a_token() {
    let fake = FakeSpotify::start();
    fake.set_rotation(true);
    fake.set_expires_in(3);
    let env = Env::new();
    env.configure(&fake, "refresh_margin = \"1s\"");
    let mut d = env.daemon(&[]);
    env.import(&fake);
    get(&env, &[]);
    env.ctl(&["refresh"]).ok();
    fake.push(Scripted::status(503));
    wait_until(Duration::from_secs(8), || fake.token_request_count() >= 6);
    env.ctl(&["status"]).ok();
    fake.revoke_all();
    let _ = env.ctl(&["refresh"]);
    d.stop();
    let log = d.log();
    assert!(
        log.contains("token refreshed"),
        "debug log expected:\n{log}"
    );
    for t in fake
        .issued_access_tokens()
        .iter()
        .chain(&fake.issued_refresh_tokens())
    {
        assert!(!log.contains(t.as_str()), "token {t} in the log:\n{log}");
    }
}

#[test]
fn sigterm_removes_the_socket_and_a_second_daemon_is_refused() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let mut first = env.daemon(&[]);
    let mut second = env.spawn_daemon(&[]);
    let status = spotok_tests::wait_child(&mut second.child, Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    assert!(second.log().contains("already serving"), "{}", second.log());
    env.ctl(&["status"]).ok();
    assert!(first.stop().success());
    assert!(!env.socket.exists(), "socket removed on SIGTERM");
}

#[test]
fn a_stale_socket_from_a_killed_daemon_is_taken_over() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let mut d = env.daemon(&[]);
    env.import(&fake);
    d.kill9();
    assert!(env.socket.exists(), "kill -9 leaves the socket file");
    env.ctl(&["status"]).expect_code(3);
    let _d = env.daemon(&[]);
    get(&env, &[]);
}

#[test]
fn unconfigured_daemon_starts_and_says_how_to_set_up() {
    let env = Env::new();
    let _d = env.daemon(&[]);
    let status: serde_json::Value =
        serde_json::from_str(&env.ctl(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(status["state"], "unconfigured");
    assert_eq!(status["store"], "file");
    assert_eq!(status["protocol"], 1);
    let out = env.ctl(&["status"]);
    assert!(out.ok().stderr.contains("--client-id"), "{}", out.stderr);
    let out = env.ctl(&["get"]);
    out.expect_code(4);
    assert!(out.stderr.contains("client_id"), "{}", out.stderr);
}

#[test]
fn a_bad_config_names_the_key_and_file_and_keeps_the_login() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let mut d = env.daemon(&[]);
    env.import(&fake);
    d.stop();
    env.configure(&fake, "refresh_margn = \"5m\"");
    let mut bad = env.spawn_daemon(&[]);
    let status = spotok_tests::wait_child(&mut bad.child, Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let log = bad.log();
    assert!(
        log.contains("refresh_margn") && log.contains("config.toml"),
        "{log}"
    );
    assert!(env.state.join("login.json").exists(), "the login is kept");
}

#[test]
fn import_refuses_empty_input_and_dead_tokens_without_touching_the_login() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    let good = env.import(&fake);
    env.ctl_stdin(&["import"], "").expect_code(2);
    let out = env.ctl_stdin(&["import"], "AQdead\n");
    out.expect_code(4);
    assert!(out.stderr.contains("nothing was stored"), "{}", out.stderr);
    let stored = std::fs::read_to_string(env.state.join("login.json")).unwrap();
    assert!(stored.contains(&good));
}

#[test]
fn logout_forgets_the_login() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let out = env.ctl(&["logout"]);
    assert!(
        out.ok().stderr.contains("spotify.com/account/apps"),
        "{}",
        out.stderr
    );
    assert!(!env.state.join("login.json").exists());
    env.ctl(&["get"]).expect_code(4);
    let status: serde_json::Value =
        serde_json::from_str(&env.ctl(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["state"], "logged_out");
}

#[test]
fn exec_passes_the_token_in_the_environment() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let token = get(&env, &[]);
    let out = env.ctl(&["exec", "--", "sh", "-c", "echo \"$SPOTIFY_ACCESS_TOKEN\""]);
    assert_eq!(out.ok().stdout.trim(), token);
    let out = env.ctl(&["exec", "--env", "TOK", "--", "sh", "-c", "echo \"$TOK\""]);
    assert_eq!(out.ok().stdout.trim(), token);
    env.ctl(&["exec", "--", "/nonexistent/cmd"]).expect_code(1);
}

#[test]
fn watch_prints_a_line_per_change() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let mut cmd = env.command("spotokctl");
    cmd.args(["watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["state"], "active");
    env.ctl(&["logout"]).ok();
    let next: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(next["state"], "logged_out");
    let _ = child.kill();
    let _ = child.wait();
}
