//! The Authorization Code login through the daemon, scopes, and whoami.

#![allow(clippy::unwrap_used)] // Helpers of tests: a panic is a test failure with its line.

use std::os::unix::fs::PermissionsExt;

use spotok_tests::{http_get, Env, FakeSpotify, LoginRun};

fn location(url: &str) -> String {
    let (status, headers, _) = http_get(url);
    assert_eq!(status, 303, "authorize answers with a redirect");
    headers
        .into_iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v)
        .expect("location")
}

fn status(env: &Env) -> serde_json::Value {
    serde_json::from_str(&env.ctl(&["status", "--json"]).ok().stdout).unwrap()
}

fn setup(extra: &str) -> (FakeSpotify, Env) {
    let fake = FakeSpotify::start();
    fake.set_scope("user-read-private");
    let env = Env::new();
    env.configure(
        &fake,
        &format!("redirect_uri = \"http://127.0.0.1/callback\"\nscopes = [\"user-read-private\"]\n{extra}"),
    );
    (fake, env)
}

#[test]
fn a_full_login_in_the_browser() {
    let (fake, env) = setup("");
    let _d = env.daemon(&[]);
    let mut login = LoginRun::start(&env, &["--no-browser", "--scope", "streaming"]);
    let url = login.url();
    let redirect = location(&url);
    let (code, _, page) = http_get(&redirect);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("logged in"), "{page}");
    let (exit, stderr) = login.finish();
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(stderr.contains("Logged in"), "{stderr}");

    let authorize = &fake.authorize_requests()[0];
    assert_eq!(authorize["code_challenge_method"], "S256");
    assert_eq!(authorize["response_type"], "code");
    assert_eq!(authorize["client_id"], "testclient");
    assert_eq!(authorize["scope"], "streaming user-read-private");
    assert!(
        redirect.starts_with(&authorize["redirect_uri"]),
        "{redirect}"
    );
    assert!(authorize["redirect_uri"].starts_with("http://127.0.0.1:"));
    assert!(authorize["redirect_uri"].ends_with("/callback"));
    let exchange = &fake.token_requests()[0];
    assert_eq!(exchange.form["grant_type"], "authorization_code");
    assert_eq!(exchange.form["redirect_uri"], authorize["redirect_uri"]);
    assert!(exchange.form.contains_key("code_verifier"));
    assert_eq!(exchange.form["client_id"], "testclient");
    assert!(exchange.authorization.is_none());

    let token = env.ctl(&["get"]).ok().stdout.trim().to_string();
    assert!(fake.issued_access_tokens().contains(&token));
    let s = status(&env);
    assert_eq!(s["state"], "active");
    assert_eq!(
        s["scopes"],
        serde_json::json!(["streaming", "user-read-private"])
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ends = s["login_expires_at"].as_u64().unwrap();
    assert!(
        ends > now + 180 * 86_400 && ends < now + 184 * 86_400,
        "{s}"
    );
    // A replay of the same redirect changes nothing.
    let (code, _, _) = http_get(&redirect);
    assert_ne!(code, 200);
    assert_eq!(fake.token_requests().len(), 1);
}

#[test]
fn paste_mode_and_a_wrong_state_that_is_refused_while_the_login_waits() {
    let (fake, env) = setup("");
    let _d = env.daemon(&[]);
    let mut login = LoginRun::start(&env, &["--no-browser"]);
    let url = login.url();
    let redirect = location(&url);
    let forged = redirect.replace("state=", "state=forged");
    login.paste(&forged);
    login
        .line(|l| l.contains("state does not match"))
        .expect("the wrong state is refused");
    assert_eq!(
        fake.token_request_count(),
        0,
        "no exchange for a forged redirect"
    );
    login.paste(&redirect);
    let (exit, stderr) = login.finish();
    assert_eq!(exit, Some(0), "{stderr}");
    env.ctl(&["get"]).ok();
}

#[test]
fn access_denied_fails_clearly_and_keeps_the_previous_login() {
    let (fake, env) = setup("");
    let _d = env.daemon(&[]);
    let old = env.import(&fake);
    fake.set_authorize_error(Some("access_denied"));
    let mut login = LoginRun::start(&env, &["--no-browser"]);
    let url = login.url();
    let (code, _, page) = http_get(&location(&url));
    assert_eq!(code, 400, "{page}");
    let (exit, stderr) = login.finish();
    assert_eq!(exit, Some(1), "{stderr}");
    assert!(stderr.contains("declined"), "{stderr}");
    let stored = std::fs::read_to_string(env.state.join("login.json")).unwrap();
    assert!(stored.contains(&old), "the previous login is still stored");
    env.ctl(&["get"]).ok();
}

#[test]
fn with_a_client_secret_the_token_requests_use_basic_auth() {
    let fake = FakeSpotify::start();
    fake.set_client_secret("testclient", "s3cret");
    let env = Env::new();
    let secret = env.dir.path().join("client_secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.configure(
        &fake,
        &format!(
            "redirect_uri = \"http://127.0.0.1/callback\"\nclient_secret_file = \"{}\"",
            secret.display()
        ),
    );
    let _d = env.daemon(&[]);
    let mut login = LoginRun::start(&env, &["--no-browser"]);
    let url = login.url();
    assert!(
        !url.contains("code_challenge"),
        "no PKCE with a secret: {url}"
    );
    let _ = http_get(&location(&url));
    let (exit, stderr) = login.finish();
    assert_eq!(exit, Some(0), "{stderr}");
    env.ctl(&["refresh"]).ok();
    let basic = "Basic dGVzdGNsaWVudDpzM2NyZXQ="; // base64("testclient:s3cret")
    for r in fake.token_requests() {
        assert_eq!(r.authorization.as_deref(), Some(basic));
        assert!(!r.form.contains_key("client_id"));
        assert!(!r.form.contains_key("code_verifier"));
    }
}

#[test]
fn localhost_redirect_uris_are_refused_with_spotifys_rule() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(&fake, "redirect_uri = \"http://localhost:8898/callback\"");
    let mut d = env.spawn_daemon(&[]);
    let exit = spotok_tests::wait_child(&mut d.child, std::time::Duration::from_secs(20)).unwrap();
    assert!(!exit.success());
    let log = d.log();
    assert!(
        log.contains("localhost is not allowed as redirect URI"),
        "{log}"
    );
    assert!(
        log.contains("redirect_uri") && log.contains("config.toml"),
        "{log}"
    );
}

#[test]
fn a_missing_scope_exits_5_and_says_how_to_get_it() {
    let (fake, env) = setup("");
    let _d = env.daemon(&[]);
    env.import(&fake);
    env.ctl(&["get", "--scope", "user-read-private"]).ok();
    let out = env.ctl(&["get", "--scope", "playlist-modify-private"]);
    out.expect_code(5);
    assert!(
        out.stderr
            .contains("spotokctl login --scope playlist-modify-private"),
        "{}",
        out.stderr
    );
}

#[test]
fn whoami_prints_the_user_and_survives_one_401() {
    let (fake, env) = setup("");
    fake.set_me("Ann Example", "ann");
    let _d = env.daemon(&[]);
    env.import(&fake);
    assert_eq!(env.ctl(&["whoami"]).ok().stdout, "Ann Example (ann)\n");
    let json: serde_json::Value =
        serde_json::from_str(&env.ctl(&["whoami", "--json"]).ok().stdout).unwrap();
    assert_eq!(json["id"], "ann");
    let before = fake.token_request_count();
    fake.push_api(
        401,
        r#"{"error":{"status":401,"message":"The access token expired"}}"#,
    );
    assert_eq!(env.ctl(&["whoami"]).ok().stdout, "Ann Example (ann)\n");
    assert_eq!(fake.token_request_count(), before + 1, "one forced refresh");
    // Two 401s in a row: give up, no loop.
    fake.push_api(
        401,
        r#"{"error":{"status":401,"message":"The access token expired"}}"#,
    );
    fake.push_api(
        401,
        r#"{"error":{"status":401,"message":"The access token expired"}}"#,
    );
    env.ctl(&["whoami"]).expect_code(4);
}

#[test]
fn first_run_login_says_what_to_do_and_client_id_is_written() {
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.write_config(&format!(
        "# my settings\nauth_url = \"{}\"\ntoken_url = \"{}\"\nredirect_uri = \"http://127.0.0.1/callback\"\n",
        fake.auth_url(),
        fake.token_url()
    ));
    let _d = env.daemon(&[]);
    let out = env.ctl(&["login", "--no-browser"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("developer.spotify.com/dashboard"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--client-id"), "{}", out.stderr);

    let mut login = LoginRun::start(&env, &["--no-browser", "--client-id", "abc123"]);
    let url = login.url();
    assert!(url.contains("client_id=abc123"), "{url}");
    let config = std::fs::read_to_string(&env.config).unwrap();
    assert!(
        config.starts_with("client_id = \"abc123\"\n# my settings"),
        "{config}"
    );
    drop(login);
    let out = env.ctl(&["login", "--no-browser", "--client-id", "other"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("already has client_id abc123"),
        "{}",
        out.stderr
    );
    let out = env.ctl(&["login", "--no-browser", "--client-id", "bad id!"]);
    out.expect_code(2);
}

#[test]
fn an_interrupted_login_on_a_fixed_port_does_not_block_the_next() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fake = FakeSpotify::start();
    let env = Env::new();
    env.configure(
        &fake,
        &format!("redirect_uri = \"http://127.0.0.1:{port}/callback\""),
    );
    let _d = env.daemon(&[]);
    let mut first = LoginRun::start(&env, &["--no-browser"]);
    let _ = first.url();
    drop(first); // Ctrl-C: the daemon still holds the first login's listener.
    let mut second = LoginRun::start(&env, &["--no-browser"]);
    let url = second.url();
    let redirect = location(&url);
    assert!(redirect.starts_with(&format!("http://127.0.0.1:{port}/callback?")));
    let (code, _, page) = http_get(&redirect);
    assert_eq!(code, 200, "{page}");
    let (exit, stderr) = second.finish();
    assert_eq!(exit, Some(0), "{stderr}");
}
