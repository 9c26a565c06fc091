//! Property tests of the socket protocol decoder.
//!
//! The daemon decodes every line a local program sends with `serde_json::from_slice::<Request>`
//! and the client decodes every answer with `Reply`; neither may ever panic, whatever the
//! bytes, and every message one side can write must read back as itself on the other.
//!
//! Inputs: arbitrary bytes and text, JSON values shaped like our messages (known keys, odd
//! values), and valid messages mutated byte by byte. `corpus/wire.txt` is the checked-in list
//! of interesting lines (regressions, edge cases); it seeds the mutations and is decoded on its
//! own by [`corpus_lines_decode_without_panicking`]. Failures proptest finds are kept in
//! `wire_props.proptest-regressions` beside this file and replayed first on every run.
//!
//! 256 cases per property by default (CI); `SPOTOK_LONG=1` runs 20,000, `PROPTEST_CASES`
//! overrides both.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;
use spotok_proto::wire::{StoreKind, MAX_LINE};
use spotok_proto::{AccessToken, ErrorKind, RefreshToken, Reply, Request, State, Status};

const CORPUS: &str = include_str!("corpus/wire.txt");

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("SPOTOK_LONG").is_some() {
            20_000
        } else {
            256
        });
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// The corpus lines, comments and blank lines skipped.
fn corpus() -> Vec<&'static str> {
    CORPUS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect()
}

/// Decodes `bytes` both ways the programs do; whatever is accepted must be canonical:
/// written out again it is one line, and reads back as the same value.
fn decode_all(bytes: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<Request>(bytes) {
        assert_round_trips(&request);
    }
    if let Ok(reply) = serde_json::from_slice::<Reply>(bytes) {
        assert_round_trips(&reply);
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        let a = serde_json::from_str::<Request>(text).ok();
        let b = serde_json::from_slice::<Request>(bytes).ok();
        assert_eq!(a, b, "from_str and from_slice disagree on {text:?}");
        let _ = serde_json::from_str::<Reply>(text);
    }
}

fn assert_round_trips<T>(value: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let line = serde_json::to_string(value).expect("every message serializes");
    assert!(
        !line.contains('\n'),
        "a message must stay on one line: {line}"
    );
    let back: T = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("{value:?} wrote {line}, which does not read back: {e}"));
    assert_eq!(&back, value, "{line}");
    let back: T = serde_json::from_slice(line.as_bytes()).expect("from_slice");
    assert_eq!(&back, value, "{line}");
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "[a-z-]{0,12}",
        1 => Just(String::new()),
        1 => Just("\u{0}\n\r\t\"\\\u{2028}\u{feff}😀".to_string()),
    ]
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => any::<u64>(),
        2 => 0u64..100_000,
        1 => prop::sample::select(vec![
            0,
            1,
            30,
            60,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            i64::MAX as u64,
            u64::MAX,
        ]),
    ]
}

fn scopes() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..4)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(protocol, client)| Request::Hello { protocol, client }),
        (number(), scopes(), number()).prop_map(|(min_valid_secs, scopes, wait_secs)| {
            Request::Get {
                min_valid_secs,
                scopes,
                wait_secs,
            }
        }),
        Just(Request::Status),
        Just(Request::Refresh),
        text().prop_map(|t| Request::Import {
            refresh_token: RefreshToken::new(t)
        }),
        Just(Request::Logout),
        (prop::option::of(text()), scopes())
            .prop_map(|(client_id, scopes)| Request::Login { client_id, scopes }),
        Just(Request::LoginWait),
        text().prop_map(|url| Request::LoginRedirect { url }),
        Just(Request::Watch),
        Just(Request::Whoami),
    ]
}

fn status() -> impl Strategy<Value = Status> {
    let state = prop::sample::select(vec![
        State::Unconfigured,
        State::LoggedOut,
        State::Active,
        State::Refreshing,
        State::BackingOff,
        State::NeedsLogin,
    ]);
    let store = prop::sample::select(vec![StoreKind::File, StoreKind::SecretService]);
    (
        (state, store, prop::option::of(number())),
        (prop::option::of(number()), prop::option::of(number())),
        (scopes(), prop::option::of(text()), text(), any::<u32>()),
    )
        .prop_map(
            |(
                (state, store, expires_at),
                (refresh_at, login_expires_at),
                (scopes, last_error, version, protocol),
            )| Status {
                state,
                expires_at,
                refresh_at,
                login_expires_at,
                scopes,
                store,
                last_error,
                version,
                protocol,
            },
        )
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(protocol, version)| Reply::Hello { protocol, version }),
        (text(), number(), scopes()).prop_map(|(t, expires_at, scopes)| Reply::Token {
            access_token: AccessToken::new(t),
            expires_at,
            scopes,
        }),
        status().prop_map(Reply::Status),
        number().prop_map(|expires_at| Reply::Refreshed { expires_at }),
        Just(Reply::Ok),
        (text(), text()).prop_map(|(url, redirect_uri)| Reply::LoginStarted { url, redirect_uri }),
        (text(), text()).prop_map(|(display_name, id)| Reply::Me { display_name, id }),
        (prop::sample::select(ErrorKind::ALL.to_vec()), text())
            .prop_map(|(kind, message)| Reply::Error { kind, message }),
    ]
}

/// Every key and tag the protocol knows, plus near misses.
const KEYS: &[&str] = &[
    "op",
    "reply",
    "protocol",
    "client",
    "min_valid_secs",
    "scopes",
    "wait_secs",
    "refresh_token",
    "client_id",
    "url",
    "version",
    "access_token",
    "expires_at",
    "state",
    "refresh_at",
    "login_expires_at",
    "store",
    "last_error",
    "kind",
    "message",
    "display_name",
    "id",
    "redirect_uri",
    "Op",
    "",
];

const TAGS: &[&str] = &[
    "hello",
    "get",
    "status",
    "refresh",
    "import",
    "logout",
    "login",
    "login_wait",
    "login_redirect",
    "watch",
    "whoami",
    "token",
    "refreshed",
    "ok",
    "login_started",
    "me",
    "error",
    "needs_login",
    "active",
    "file",
    "secret-service",
    "Hello",
];

/// JSON values shaped like protocol messages: objects whose keys are mostly known ones, with
/// values of every type, nested a little.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(TAGS).prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A message-shaped object: a known tag plus up to four known keys.
fn message_value() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["op", "reply"]),
        prop::sample::select(TAGS),
        prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..4),
    )
        .prop_map(|(tag_key, tag, fields)| {
            let mut map = serde_json::Map::new();
            map.insert(tag_key.to_string(), Value::from(tag));
            for (k, v) in fields {
                map.insert(k.to_string(), v);
            }
            Value::Object(map)
        })
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Insert(Index, u8),
    InsertText(Index, &'static str),
    Delete(Index, usize),
    Duplicate(Index, usize),
    Truncate(Index),
    ReplaceNumber(Index, &'static str),
}

/// Bytes that matter to a JSON parser.
const INTERESTING: &[u8] = b"{}[]\":,\\ 0189-+.eEntfu\n\r\t\x00\xff\xc3";

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), prop::sample::select(INTERESTING))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (
            any::<Index>(),
            prop::sample::select(vec![
                "\"op\":\"get\",",
                ",\"wait_secs\":18446744073709551615",
                ",\"min_valid_secs\":18446744073709551615",
                ",\"scopes\":[\"\"]",
                "\\u0000",
                "\\ud800",
                "null",
                "{",
                "}",
                "[[[[",
            ])
        )
            .prop_map(|(i, s)| Mutation::InsertText(i, s)),
        (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        (
            any::<Index>(),
            prop::sample::select(vec![
                "18446744073709551615",
                "18446744073709551616",
                "9223372036854775807",
                "4294967296",
                "-1",
                "1e400",
                "0.5",
                "-0",
            ])
        )
            .prop_map(|(i, n)| Mutation::ReplaceNumber(i, n)),
    ]
}

/// Applies `m` to `bytes`.
fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len) };
    match m {
        Mutation::FlipBit(i, bit) => {
            if !bytes.is_empty() {
                let p = at(i, bytes.len());
                bytes[p] ^= 1 << bit;
            }
        }
        Mutation::Insert(i, b) => {
            let p = at(i, bytes.len() + 1);
            bytes.insert(p, *b);
        }
        Mutation::InsertText(i, s) => {
            let p = at(i, bytes.len() + 1);
            bytes.splice(p..p, s.bytes());
        }
        Mutation::Delete(i, n) => {
            if !bytes.is_empty() {
                let p = at(i, bytes.len());
                let end = (p + n).min(bytes.len());
                bytes.drain(p..end);
            }
        }
        Mutation::Duplicate(i, n) => {
            if !bytes.is_empty() {
                let p = at(i, bytes.len());
                let end = (p + n).min(bytes.len());
                let copy = bytes[p..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
        Mutation::Truncate(i) => {
            let p = at(i, bytes.len() + 1);
            bytes.truncate(p);
        }
        Mutation::ReplaceNumber(which, number) => {
            // One run of digits becomes `number`.
            let mut runs: Vec<(usize, usize)> = Vec::new();
            let mut start = None;
            for (pos, byte) in bytes.iter().enumerate() {
                match (byte.is_ascii_digit(), start) {
                    (true, None) => start = Some(pos),
                    (false, Some(from)) => {
                        runs.push((from, pos));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = start {
                runs.push((from, bytes.len()));
            }
            if !runs.is_empty() {
                let (from, to) = runs[which.index(runs.len())];
                bytes.splice(from..to, number.bytes());
            }
        }
    }
}

/// A valid line to mutate: the corpus, or a freshly generated valid message.
fn seed_line() -> impl Strategy<Value = Vec<u8>> {
    let corpus: Vec<Vec<u8>> = corpus()
        .into_iter()
        .map(|l| l.as_bytes().to_vec())
        .collect();
    prop_oneof![
        prop::sample::select(corpus),
        request().prop_map(|r| serde_json::to_vec(&r).expect("serializes")),
        reply().prop_map(|r| serde_json::to_vec(&r).expect("serializes")),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_request_round_trips(request in request()) {
        assert_round_trips(&request);
    }

    #[test]
    fn every_reply_round_trips(reply in reply()) {
        assert_round_trips(&reply);
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        decode_all(text.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn message_shaped_json_never_panics(value in prop_oneof![message_value(), json_value()]) {
        decode_all(value.to_string().as_bytes());
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        seed in seed_line(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = seed;
        for m in &mutations {
            apply(&mut bytes, m);
        }
        decode_all(&bytes);
    }
}

#[test]
fn corpus_lines_decode_without_panicking() {
    let lines = corpus();
    assert!(lines.len() > 50, "the corpus lost lines");
    for line in lines {
        decode_all(line.as_bytes());
    }
    // Deep nesting hits serde_json's recursion limit, not the stack.
    let deep = "[".repeat(MAX_LINE);
    decode_all(deep.as_bytes());
    let deep = "{\"op\":".repeat(MAX_LINE / 6);
    decode_all(deep.as_bytes());
}

#[test]
fn corpus_decodes_as_pinned() {
    // A few corpus lines whose fate is part of the contract.
    let ok = |l: &str| serde_json::from_str::<Request>(l).is_ok();
    assert!(ok(
        r#"{"op":"get","min_valid_secs":0,"wait_secs":18446744073709551615}"#
    ));
    assert!(ok(r#"{"op":"hello","protocol":1}"#));
    assert!(!ok(
        r#"{"op":"hello","protocol":4294967296,"client":"overflow"}"#
    ));
    assert!(!ok(r#"{"op":"get","min_valid_secs":1e3}"#));
    assert!(!ok(r#"{"op":"get","min_valid_secs":-1}"#));
    assert!(!ok(r#"{"op":"fly"}"#));
    assert!(!ok(r#"{"op":"hello","protocol":1,"protocol":2}"#));
    assert!(!ok(r#"{"op":"get","min_valid_secs":60,"x":1}"#));
}
