//! The Secret Service store and desktop notifications, against real parts: a private
//! `dbus-daemon`, a real `gnome-keyring-daemon` on it, `secret-tool`, and a notification server
//! played by the test on that bus.

#![allow(clippy::unwrap_used)]
// Helpers of tests: a panic is a test failure with its line.
// The stand-in servers implement fixed D-Bus signatures whose unused parts zbus's generated
// code still binds; attributes on the impl blocks do not reach that code.
#![allow(clippy::used_underscore_binding, clippy::unused_self)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spotok_tests::{wait_until, Bus, Env, FakeSpotify, Keyring};
use zbus::zvariant::OwnedValue;

/// The attributes spotokd puts on its keyring item (documented in docs/storage.md).
const ATTRIBUTES: [(&str, &str); 2] = [("application", "spotok"), ("service", "spotify")];

/// A config for `fake` with the given store and notifications; the redirect listener takes
/// any free port, so parallel tests never collide.
fn configure(env: &Env, fake: &FakeSpotify, store: &str, notify: bool) {
    env.write_config(&format!(
        "client_id = \"testclient\"\nstore = \"{store}\"\nnotify = {notify}\n\
         redirect_uri = \"http://127.0.0.1/callback\"\n\
         auth_url = \"{}\"\ntoken_url = \"{}\"\napi_url = \"{}\"\n",
        fake.auth_url(),
        fake.token_url(),
        fake.api_url()
    ));
}

fn status(env: &Env) -> serde_json::Value {
    let out = env.ctl(&["status", "--json"]);
    out.ok();
    serde_json::from_str(&out.stdout).unwrap()
}

fn get(env: &Env) -> String {
    let out = env.ctl(&["get"]);
    out.ok();
    out.stdout.trim().to_string()
}

/// The refresh token each token request used, in order.
fn used_refresh_tokens(fake: &FakeSpotify) -> Vec<String> {
    fake.token_requests()
        .iter()
        .filter_map(|r| r.form.get("refresh_token").cloned())
        .collect()
}

#[test]
fn import_keeps_the_login_in_the_keyring_only_and_logout_removes_it() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();
    let keyring = Keyring::start(&bus, env.dir.path());
    configure(&env, &fake, "auto", false);

    let mut d = env.daemon(&[]);
    assert_eq!(status(&env)["store"], "secret-service");
    let token = env.import(&fake);
    let found = keyring.secret_tool(&["search", "--all", "application", "spotok"]);
    found.ok();
    let shown = format!("{}{}", found.stdout, found.stderr);
    assert!(shown.contains("label = spotok: Spotify login"), "{shown}");
    assert!(shown.contains("attribute.service = spotify"), "{shown}");
    assert!(
        shown.contains(&token),
        "the secret holds the refresh token: {shown}"
    );
    assert!(
        !env.state.join("login.json").exists(),
        "no plaintext copy next to the keyring"
    );
    assert_eq!(keyring.items(&ATTRIBUTES).len(), 1);

    d.stop();
    let mut d = env.daemon(&[]);
    get(&env);
    assert_eq!(
        used_refresh_tokens(&fake),
        [token.clone(), token],
        "the restarted daemon read the login from the keyring"
    );

    env.ctl(&["logout"]).ok();
    assert!(
        keyring.items(&ATTRIBUTES).is_empty(),
        "logout removes the item"
    );
    env.ctl(&["get"]).expect_code(4);
    assert!(d.stop().success());
    assert!(!env.state.join("login.json").exists());
}

#[test]
fn auto_takes_the_keyring_when_a_provider_runs_and_the_file_when_none() {
    let fake = FakeSpotify::start();

    // A provider on the bus: the keyring.
    let (env, bus) = Env::with_bus();
    let _keyring = Keyring::start(&bus, env.dir.path());
    configure(&env, &fake, "auto", false);
    let mut d = env.daemon(&[]);
    assert_eq!(status(&env)["store"], "secret-service");
    assert!(d.stop().success());

    // A bus with nobody owning org.freedesktop.secrets: the file.
    let (env, _bus) = Env::with_bus();
    configure(&env, &fake, "auto", false);
    let mut d = env.daemon(&[]);
    let s = status(&env);
    assert_eq!(s["store"], "file");
    assert_eq!(s["last_error"], serde_json::Value::Null);
    env.import(&fake);
    assert!(env.state.join("login.json").exists());
    assert!(d.stop().success());

    // No session bus at all: the file too.
    let env = Env::new();
    configure(&env, &fake, "auto", false);
    let _d = env.daemon(&[]);
    assert_eq!(status(&env)["store"], "file");
}

#[test]
fn secret_service_without_a_provider_is_an_error_never_a_file() {
    let fake = FakeSpotify::start();
    let (env, _bus) = Env::with_bus();
    configure(&env, &fake, "secret-service", false);
    let _d = env.daemon(&[]);
    let s = status(&env);
    assert_eq!(s["store"], "secret-service");
    let error = s["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("no Secret Service provider"), "{s}");
    let out = env.ctl_stdin(&["import"], &fake.issue_refresh_token());
    out.expect_code(1);
    assert!(out.stderr.contains("Secret Service"), "{}", out.stderr);
    assert!(
        !env.state.join("login.json").exists(),
        "no plaintext fallback"
    );
}

#[test]
fn a_keyring_without_a_default_collection_is_reported_without_a_prompt() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();
    let keyring = Keyring::start_without_login_keyring(&bus, env.dir.path());
    configure(&env, &fake, "auto", false);
    let mut d = env.daemon(&[]);
    let s = status(&env);
    assert_eq!(s["store"], "secret-service", "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("no default collection"),
        "{s}"
    );
    // Saving would need a new collection, which needs a prompt: refused, promptly.
    let out = env.ctl_stdin(&["import"], &fake.issue_refresh_token());
    out.expect_code(1);
    assert!(
        out.stderr.contains("no default collection"),
        "{}",
        out.stderr
    );
    assert_eq!(keyring.default_collection(), "/", "nothing was created");
    assert!(
        !env.state.join("login.json").exists(),
        "no plaintext fallback"
    );
    get(&env);
    assert!(d.stop().success());
}

#[test]
fn a_locked_keyring_is_reported_and_waited_for_never_replaced_by_a_file() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();
    let keyring = Keyring::start(&bus, env.dir.path());
    configure(&env, &fake, "auto", false);
    let mut d = env.daemon(&[]);
    let token = env.import(&fake);
    d.stop();

    // Started while the keyring is locked: reported, no file, no login.
    keyring.lock();
    let mut d = env.daemon(&[]);
    let s = status(&env);
    assert_eq!(s["store"], "secret-service", "{s}");
    assert_eq!(s["state"], "logged_out", "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("keyring is locked"),
        "{s}"
    );
    let out = env.ctl(&["get"]);
    out.expect_code(4);
    assert!(out.stderr.contains("locked"), "{}", out.stderr);
    assert!(!env.state.join("login.json").exists());
    assert_eq!(fake.token_request_count(), 1, "nothing to refresh yet");

    // Unlocked: the daemon picks the stored login up by itself.
    keyring.unlock();
    assert!(
        wait_until(Duration::from_secs(15), || status(&env)["state"]
            == "active"),
        "the login was not picked up after the unlock: {}\n{}",
        status(&env),
        d.log()
    );
    assert_eq!(status(&env)["last_error"], serde_json::Value::Null);
    get(&env);
    assert_eq!(used_refresh_tokens(&fake), [token.clone(), token]);

    // Locked while running: a new login is served from memory, reported, not written to a
    // file, and saved once the keyring opens.
    keyring.lock();
    let newer = fake.issue_refresh_token();
    let out = env.ctl_stdin(&["import"], &newer);
    out.expect_code(1);
    assert!(out.stderr.contains("keyring is locked"), "{}", out.stderr);
    let served = get(&env);
    assert_eq!(fake.issued_access_tokens().last(), Some(&served));
    assert!(status(&env)["last_error"]
        .as_str()
        .unwrap_or_default()
        .contains("keyring is locked"));
    assert!(!env.state.join("login.json").exists());
    keyring.unlock();
    assert!(
        wait_until(Duration::from_secs(15), || {
            status(&env)["last_error"].is_null()
        }),
        "the login was not saved after the unlock: {}\n{}",
        status(&env),
        d.log()
    );
    let stored = keyring.secret_tool(&["lookup", "application", "spotok", "service", "spotify"]);
    assert!(
        stored.ok().stdout.contains(&newer),
        "the keyring holds the new login"
    );
    assert!(!env.state.join("login.json").exists());

    // A logout while locked takes effect at once, and reaches the keyring once it opens.
    keyring.lock();
    let out = env.ctl(&["logout"]);
    out.expect_code(1);
    assert!(
        out.stderr
            .contains("removed from it as soon as it is unlocked"),
        "{}",
        out.stderr
    );
    env.ctl(&["get"]).expect_code(4);
    assert_eq!(keyring.items(&ATTRIBUTES).len(), 1);
    keyring.unlock();
    assert!(
        wait_until(Duration::from_secs(15), || keyring
            .items(&ATTRIBUTES)
            .is_empty()),
        "the item outlived the logout: {}",
        d.log()
    );
    let s = status(&env);
    assert_eq!(s["state"], "logged_out", "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    assert!(d.stop().success());
}

#[test]
fn switching_store_moves_the_login_once_each_way() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();
    let keyring = Keyring::start(&bus, env.dir.path());
    let login_file = env.state.join("login.json");

    configure(&env, &fake, "file", false);
    let mut d = env.daemon(&[]);
    assert_eq!(status(&env)["store"], "file");
    let token = env.import(&fake);
    assert!(login_file.exists());
    assert!(keyring.items(&ATTRIBUTES).is_empty());
    d.stop();

    // file -> keyring
    configure(&env, &fake, "secret-service", false);
    let mut d = env.daemon(&[]);
    assert!(!login_file.exists(), "the plaintext copy is gone");
    assert_eq!(keyring.items(&ATTRIBUTES).len(), 1, "exactly one item");
    assert_eq!(status(&env)["store"], "secret-service");
    get(&env);
    assert!(d.log().contains("moved the login"), "{}", d.log());
    d.stop();

    // keyring -> file
    configure(&env, &fake, "file", false);
    let mut d = env.daemon(&[]);
    assert!(login_file.exists());
    assert!(
        keyring.items(&ATTRIBUTES).is_empty(),
        "the keyring copy is gone"
    );
    get(&env);
    assert!(d.stop().success());

    // Every refresh used the one imported login: nothing was lost on the way.
    assert_eq!(
        used_refresh_tokens(&fake),
        [token.clone(), token.clone(), token]
    );
}

/// One `Notify` call as the server saw it.
#[derive(Debug, Clone)]
struct Notification {
    app_name: String,
    summary: String,
    body: String,
    actions: Vec<String>,
}

/// A notification server on the test bus: records `Notify` calls, supports actions.
#[derive(Debug, Default)]
struct Server {
    calls: Arc<Mutex<Vec<Notification>>>,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Server {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        actions: Vec<String>,
        _hints: HashMap<String, OwnedValue>,
        _expire_timeout: i32,
    ) -> u32 {
        let mut calls = self.calls.lock().unwrap();
        calls.push(Notification {
            app_name,
            summary,
            body,
            actions,
        });
        u32::try_from(calls.len()).unwrap() + 100
    }

    fn close_notification(&self, _id: u32) {}

    fn get_capabilities(&self) -> Vec<String> {
        vec!["body".into(), "actions".into()]
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        ("test".into(), "spotok".into(), "1".into(), "1.2".into())
    }
}

fn notification_server(bus: &Bus) -> (zbus::blocking::Connection, Arc<Mutex<Vec<Notification>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let conn = zbus::blocking::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .serve_at(
            "/org/freedesktop/Notifications",
            Server {
                calls: calls.clone(),
            },
        )
        .unwrap()
        .name("org.freedesktop.Notifications")
        .unwrap()
        .build()
        .unwrap();
    (conn, calls)
}

#[test]
#[allow(clippy::too_many_lines)] // One story: refusal, one notification, its button, a login.
fn invalid_grant_sends_one_notification_whose_button_starts_a_login() {
    let fake = FakeSpotify::start();
    let (mut env, bus) = Env::with_bus();
    let (server, calls) = notification_server(&bus);
    // A stand-in for xdg-open that records the URL it was asked to open.
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let opened = env.dir.path().join("opened-url");
    let script = bin.join("xdg-open");
    std::fs::write(
        &script,
        // Written aside and renamed, so the file exists only once the URL is in it.
        format!(
            "#!/bin/sh\nprintf '%s' \"$1\" > '{0}.tmp' && mv '{0}.tmp' '{0}'\n",
            opened.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    env.vars.push(("PATH".into(), path));
    configure(&env, &fake, "file", true);

    let mut d = env.daemon(&[]);
    env.import(&fake);
    get(&env);
    assert!(
        calls.lock().unwrap().is_empty(),
        "nothing to say while active"
    );

    fake.revoke_all();
    env.ctl(&["refresh"]).expect_code(4);
    assert!(
        wait_until(Duration::from_secs(10), || !calls
            .lock()
            .unwrap()
            .is_empty()),
        "no notification; log:\n{}",
        d.log()
    );
    // More state changes (a get, a status) bring no second one.
    env.ctl(&["get"]).expect_code(4);
    std::thread::sleep(Duration::from_millis(1500));
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let note = &seen[0];
    assert_eq!(note.app_name, "spotok");
    assert!(note.body.contains("spotokctl login"), "{note:?}");
    assert!(note.actions.contains(&"login".to_string()), "{note:?}");
    for t in fake
        .issued_access_tokens()
        .iter()
        .chain(&fake.issued_refresh_tokens())
    {
        assert!(
            !note.summary.contains(t.as_str()) && !note.body.contains(t.as_str()),
            "token in {note:?}"
        );
    }

    // "Log in" starts the login and opens its URL.
    server
        .emit_signal(
            None::<zbus::names::BusName<'_>>,
            "/org/freedesktop/Notifications",
            "org.freedesktop.Notifications",
            "ActionInvoked",
            &(101_u32, "login"),
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || opened.exists()),
        "xdg-open was not run; log:\n{}",
        d.log()
    );
    let url = std::fs::read_to_string(&opened).unwrap();
    assert!(url.starts_with(&fake.auth_url()), "{url}");
    assert!(url.contains("client_id=testclient"), "{url}");

    // With a desktop portal on the bus, the browser is opened through it instead.
    std::fs::remove_file(&opened).unwrap();
    let uris = Arc::new(Mutex::new(Vec::new()));
    let _portal = zbus::blocking::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .serve_at(
            "/org/freedesktop/portal/desktop",
            Portal { uris: uris.clone() },
        )
        .unwrap()
        .name("org.freedesktop.portal.Desktop")
        .unwrap()
        .build()
        .unwrap();
    server
        .emit_signal(
            None::<zbus::names::BusName<'_>>,
            "/org/freedesktop/Notifications",
            "org.freedesktop.Notifications",
            "ActionInvoked",
            &(101_u32, "login"),
        )
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !uris.lock().unwrap().is_empty()),
        "the portal was not asked; log:\n{}",
        d.log()
    );
    let url = uris.lock().unwrap()[0].clone();
    assert!(url.starts_with(&fake.auth_url()), "{url}");
    assert!(!opened.exists(), "xdg-open is only the fallback");
    assert!(d.stop().success());
}

/// The desktop portal's `OpenURI`, recording what it is asked to open.
#[derive(Debug)]
struct Portal {
    uris: Arc<Mutex<Vec<String>>>,
}

#[zbus::interface(name = "org.freedesktop.portal.OpenURI")]
impl Portal {
    #[zbus(name = "OpenURI")]
    fn open_uri(
        &self,
        _parent_window: String,
        uri: String,
        _options: HashMap<String, OwnedValue>,
    ) -> zbus::zvariant::OwnedObjectPath {
        self.uris.lock().unwrap().push(uri);
        zbus::zvariant::OwnedObjectPath::try_from("/org/freedesktop/portal/desktop/request/1/t")
            .unwrap()
    }
}

#[test]
fn notify_false_or_no_server_means_no_notification_and_no_trouble() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();

    // No notification server on the bus: the daemon carries on.
    configure(&env, &fake, "file", true);
    let mut d = env.daemon(&[]);
    env.import(&fake);
    fake.revoke_all();
    env.ctl(&["refresh"]).expect_code(4);
    assert_eq!(status(&env)["state"], "needs_login");
    assert!(d.stop().success());

    // A server, but notify = false: it hears nothing.
    let (_server, calls) = notification_server(&bus);
    configure(&env, &fake, "file", false);
    let mut d = env.daemon(&[]);
    env.import(&fake);
    fake.revoke_all();
    env.ctl(&["refresh"]).expect_code(4);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(calls.lock().unwrap().is_empty());
    assert!(d.stop().success());
}

#[test]
fn the_client_secret_comes_from_the_systemd_credentials_folder() {
    let fake = FakeSpotify::start();
    fake.set_client_secret("testclient", "cr3d-s3cret");
    let mut env = Env::new();
    // What LoadCredential= / LoadCredentialEncrypted=client_secret:… leave for the service.
    let credentials = env.dir.path().join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("client_secret"), "cr3d-s3cret\n").unwrap();
    env.vars.push((
        "CREDENTIALS_DIRECTORY".into(),
        credentials.display().to_string(),
    ));
    configure(&env, &fake, "file", false);
    let mut d = env.daemon(&[]);
    env.import(&fake);
    let request = &fake.token_requests()[0];
    // base64("testclient:cr3d-s3cret")
    assert_eq!(
        request.authorization.as_deref(),
        Some("Basic dGVzdGNsaWVudDpjcjNkLXMzY3JldA==")
    );
    assert_eq!(
        request.field("client_id"),
        None,
        "Basic auth, not a form field"
    );
    assert!(d.stop().success());
    assert!(!d.log().contains("cr3d-s3cret"), "the secret is not logged");
}
