//! The D-Bus service, through the real `spotokd` on a private `dbus-daemon`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use spotok_proto::dbus::{INTERFACE, NAME, PATH};
use spotok_tests::{wait_until, Bus, Env, FakeSpotify};
use zbus::blocking::{fdo::DBusProxy, Connection, MessageIterator};
use zbus::message::Type;
use zbus::{MatchRule, Message};

/// How long a D-Bus call may take before the test fails.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long spotokd may take to own the name after it is ready (or after the bus is back).
const NAME_DEADLINE: Duration = Duration::from_secs(15);

/// A fresh env with a private bus (in the env's folder) that its commands use.
fn connect(address: &str) -> Connection {
    zbus::blocking::connection::Builder::address(address)
        .expect("bus address")
        .method_timeout(CALL_DEADLINE)
        .build()
        .expect("connect to the test bus")
}

/// The unique name owning `org.spotok.Spotokd`, if any.
fn owner(conn: &Connection) -> Option<String> {
    let dbus = DBusProxy::new(conn).expect("DBus proxy");
    dbus.get_name_owner(NAME.try_into().expect("bus name"))
        .ok()
        .map(|o| o.to_string())
}

/// Waits until somebody owns the name and returns its unique name.
#[track_caller]
fn wait_owner(conn: &Connection) -> String {
    let mut found = None;
    assert!(
        wait_until(NAME_DEADLINE, || {
            found = owner(conn);
            found.is_some()
        }),
        "nobody took {NAME} within {NAME_DEADLINE:?}"
    );
    found.expect("checked above")
}

fn call<B>(conn: &Connection, method: &str, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
{
    conn.call_method(Some(NAME), PATH, Some(INTERFACE), method, body)
}

fn get_access_token(conn: &Connection) -> zbus::Result<(String, i32)> {
    call(conn, "GetAccessToken", &())?.body().deserialize()
}

#[track_caller]
fn error_name(r: zbus::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        other => panic!("expected a D-Bus error reply, got {other:?}"),
    }
}

fn ctl_get(env: &Env) -> String {
    env.ctl(&["get"]).ok().stdout.trim().to_string()
}

/// Every message a bus sends this connection that matches `rule`, through a channel, so the
/// test can wait with a deadline (the iterator itself blocks without one).
fn collect(conn: &Connection, rule: MatchRule<'static>) -> mpsc::Receiver<Message> {
    let messages = MessageIterator::for_match_rule(rule, conn, None).expect("add match");
    let (tx, rx) = mpsc::channel();
    // The thread ends when the bus closes the connection (at the latest, when the test's Bus
    // is dropped).
    std::thread::spawn(move || {
        for msg in messages.flatten() {
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
    rx
}

/// The message as text, strings in clear: D-Bus strings travel as raw UTF-8.
fn text(msg: &Message) -> String {
    String::from_utf8_lossy(msg.data()).into_owned()
}

#[test]
fn get_access_token_is_the_token_spotokctl_prints_and_errors_have_spec_names() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();
    env.configure(&fake, "");
    let _d = env.daemon(&[]);
    env.import(&fake);
    let conn = connect(&bus.address);
    wait_owner(&conn);

    let printed = ctl_get(&env);
    let (token, expires_in) = get_access_token(&conn).unwrap();
    assert_eq!(token, printed);
    assert!(
        0 < expires_in && expires_in <= 3600,
        "expires_in {expires_in}"
    );

    let (for_token, expires_at): (String, u64) =
        call(&conn, "GetAccessTokenFor", &(Vec::<&str>::new(), 0u32))
            .unwrap()
            .body()
            .deserialize()
            .unwrap();
    assert_eq!(for_token, printed);
    let json: serde_json::Value =
        serde_json::from_str(&env.ctl(&["get", "--json"]).ok().stdout).unwrap();
    assert_eq!(json["expires_at"].as_u64(), Some(expires_at));

    let r = call(
        &conn,
        "GetAccessTokenFor",
        &(vec!["some-scope-not-granted"], 0u32),
    );
    assert_eq!(error_name(r), "org.spotok.Spotokd1.Error.InsufficientScope");

    fake.revoke_all();
    env.ctl(&["refresh"]).expect_code(4);
    assert_eq!(
        error_name(get_access_token(&conn)),
        "org.spotok.Spotokd1.Error.NeedsLogin"
    );
    assert_eq!(
        error_name(call(&conn, "Refresh", &())),
        "org.spotok.Spotokd1.Error.NeedsLogin"
    );
}

#[test]
fn a_proactive_refresh_shows_in_properties_and_signals_that_never_carry_a_token() {
    let fake = FakeSpotify::start();
    fake.set_expires_in(4);
    let (env, bus) = Env::with_bus();
    env.configure(&fake, "refresh_margin = \"2s\"");
    let d = env.daemon(&[]);
    let conn = connect(&bus.address);
    let daemon = wait_owner(&conn);
    let from_daemon = MatchRule::builder()
        .sender(daemon.clone())
        .unwrap()
        .build()
        .to_owned();
    let messages = collect(&conn, from_daemon);
    env.import(&fake);
    // Each token request now takes a while, so `refreshing` lasts long enough to be seen.
    fake.set_delay(Duration::from_millis(1500));

    let proxy = zbus::blocking::Proxy::new(&conn, NAME, PATH, INTERFACE).unwrap();
    let mut seen = Vec::new();
    let mut states = Vec::new();
    let mut refreshed = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    let done = |states: &[String], refreshed: &[u64]| {
        states.ends_with(&["refreshing".to_string(), "active".to_string()]) && !refreshed.is_empty()
    };
    while !done(&states, &refreshed) {
        let left = end.saturating_duration_since(Instant::now());
        let msg = messages.recv_timeout(left).unwrap_or_else(|_| {
            panic!("no refresh seen in 20 s: states {states:?}, TokenRefreshed {refreshed:?}")
        });
        let header = msg.header();
        if header.message_type() == Type::Signal {
            match header.member().map(zbus::names::MemberName::as_str) {
                Some("PropertiesChanged") => {
                    let (iface, changed, _): (
                        String,
                        std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
                        Vec<String>,
                    ) = msg.body().deserialize().unwrap();
                    if iface == INTERFACE {
                        if let Some(state) = changed.get("State") {
                            states.push(String::try_from(state.try_clone().unwrap()).unwrap());
                        }
                    }
                }
                Some("TokenRefreshed") => refreshed.push(msg.body().deserialize::<u64>().unwrap()),
                _ => {}
            }
        }
        seen.push(text(&msg));
    }
    assert!(
        refreshed.iter().all(|&t| t > 1_700_000_000),
        "{refreshed:?}"
    );
    let state: String = proxy.get_property("State").unwrap();
    assert!(
        ["active", "refreshing"].contains(&state.as_str()),
        "{state}"
    );

    // Properties, read all at once, and every message the daemon sent: no token anywhere.
    let all = conn
        .call_method(
            Some(NAME),
            PATH,
            Some("org.freedesktop.DBus.Properties"),
            "GetAll",
            &INTERFACE,
        )
        .unwrap();
    seen.push(text(&all));
    while let Ok(msg) = messages.try_recv() {
        seen.push(text(&msg));
    }
    let tokens: Vec<String> = fake
        .issued_access_tokens()
        .into_iter()
        .chain(fake.issued_refresh_tokens())
        .collect();
    assert!(tokens.len() >= 3, "{} tokens issued", tokens.len());
    let log = d.log();
    for token in &tokens {
        for s in &seen {
            assert!(
                !s.contains(token.as_str()),
                "a token went out on D-Bus: {s:?}"
            );
        }
        assert!(!log.contains(token.as_str()), "a token is in the log");
    }
    // The check can see a token: a method reply does carry one.
    let reply = call(&conn, "GetAccessTokenFor", &(Vec::<&str>::new(), 0u32)).unwrap();
    assert!(tokens.iter().any(|t| text(&reply).contains(t.as_str())));
}

#[test]
fn introspection_lists_exactly_the_spec_members() {
    let (env, bus) = Env::with_bus();
    let _d = env.daemon(&[]);
    let conn = connect(&bus.address);
    wait_owner(&conn);
    let xml: String = conn
        .call_method(
            Some(NAME),
            PATH,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        )
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    let start = xml
        .find(&format!("<interface name=\"{INTERFACE}\">"))
        .unwrap_or_else(|| panic!("no {INTERFACE} in\n{xml}"));
    let iface = &xml[start..start + xml[start..].find("</interface>").expect("closed")];

    let expected = [
        "method GetAccessToken out:s out:i",
        "method GetAccessTokenFor in:as in:u out:s out:t",
        "method Login out:s",
        "method Logout",
        "method Refresh out:t",
        "property ExpiresAt t read",
        "property LastError s read",
        "property LoginExpiresAt t read",
        "property Scopes as read",
        "property State s read",
        "signal TokenRefreshed t",
    ];
    assert_eq!(members(iface), expected, "\n{iface}");
}

/// The members of an `<interface>` element, one line each: `method Name in:… out:…`,
/// `property Name type access`, `signal Name types…`; sorted.
fn members(iface: &str) -> Vec<String> {
    use std::fmt::Write;
    let mut out: Vec<String> = Vec::new();
    for tag in iface.split('<').skip(1) {
        let head = &tag[..tag.find('>').unwrap_or(tag.len())];
        let kind: String = head.chars().take_while(char::is_ascii_alphabetic).collect();
        let attr = |name: &str| {
            let key = format!("{name}=\"");
            head.find(&key).map(|j| {
                let value = &head[j + key.len()..];
                value[..value.find('"').expect("quoted")].to_string()
            })
        };
        let name = || attr("name").expect("a member has a name");
        match kind.as_str() {
            "method" | "signal" => out.push(format!("{kind} {}", name())),
            "property" => out.push(format!(
                "property {} {} {}",
                name(),
                attr("type").expect("type"),
                attr("access").expect("access")
            )),
            "arg" => {
                let last = out.last_mut().expect("an arg belongs to a member");
                let ty = attr("type").expect("type");
                if last.starts_with("signal") {
                    write!(last, " {ty}").expect("write to a String");
                } else {
                    let dir = attr("direction").unwrap_or_else(|| "in".into());
                    write!(last, " {dir}:{ty}").expect("write to a String");
                }
            }
            _ => {}
        }
    }
    out.sort();
    out
}

#[test]
fn a_second_spotokd_on_the_bus_never_takes_the_name_from_the_first() {
    let fake = FakeSpotify::start();
    let (env, bus) = Env::with_bus();
    env.configure(&fake, "");
    let mut first = env.daemon(&[]);
    env.import(&fake);
    let conn = connect(&bus.address);
    let owner_before = wait_owner(&conn);

    // Another user env on the same bus: its own state and, to be explicit, its own socket.
    let mut other = Env::new();
    other.bus = bus.address.clone();
    other.configure(&fake, "");
    let other_socket = other.dir.path().join("other.sock");
    let second = other.daemon(&["--socket", other_socket.to_str().unwrap()]);
    assert!(
        wait_until(Duration::from_secs(10), || second.log().contains("queue")),
        "the second spotokd did not say the name is taken; its log:\n{}",
        second.log()
    );
    assert_eq!(owner(&conn).as_deref(), Some(owner_before.as_str()));
    let (token, _) = get_access_token(&conn).unwrap();
    assert_eq!(token, ctl_get(&env), "the first one answers");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(owner(&conn).as_deref(), Some(owner_before.as_str()));

    // When the first one exits, the second one (queued, not polling) takes over.
    first.stop();
    let mut after = None;
    assert!(wait_until(Duration::from_secs(10), || {
        after = owner(&conn);
        after.as_ref().is_some_and(|o| o != &owner_before)
    }));
    assert_eq!(
        error_name(get_access_token(&conn)),
        "org.spotok.Spotokd1.Error.NeedsLogin",
        "the second one, with no login, answers now"
    );
}

#[test]
fn spotokd_takes_the_name_again_after_the_bus_restarts_and_the_socket_serves_throughout() {
    let fake = FakeSpotify::start();
    let (env, mut bus) = Env::with_bus();
    env.configure(&fake, "");
    let d = env.daemon(&[]);
    env.import(&fake);
    let conn = connect(&bus.address);
    wait_owner(&conn);
    let token = get_access_token(&conn).unwrap().0;
    drop(conn);

    bus.stop();
    assert_eq!(
        ctl_get(&env),
        token,
        "the socket serves while the bus is down"
    );
    bus = Bus::start_at(env.dir.path(), &bus.address.clone());
    let conn = connect(&bus.address);
    // Unique names restart at :1.0 on a new bus, so only "owned again" can be checked.
    wait_owner(&conn);
    assert_eq!(get_access_token(&conn).unwrap().0, token);
    assert_eq!(ctl_get(&env), token);
    assert!(d.log().contains("lost the session bus"), "{}", d.log());
}

#[test]
fn without_a_session_bus_spotokd_says_so_once_and_serves_the_socket() {
    let fake = FakeSpotify::start();
    let env = Env::new(); // Its bus address points at nothing.
    env.configure(&fake, "");
    let d = env.daemon(&[]);
    env.import(&fake);
    ctl_get(&env);
    // Long enough for two retries (after 1 s and 3 s).
    std::thread::sleep(Duration::from_millis(3500));
    ctl_get(&env);
    let log = d.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("D-Bus") || l.contains("session bus"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("serving the socket only"), "{log}");
}
