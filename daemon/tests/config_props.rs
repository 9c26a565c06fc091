//! Property tests of the config parser, `spotokd::config::Config::parse`.
//!
//! Whatever a user (or an editor accident) puts in `config.toml`, the parser must not panic,
//! every error must name the file (SPEC: "errors that name the key and the file"), and every
//! config it accepts must hold the invariants the rest of the daemon relies on (a loopback
//! http redirect URI, an alphanumeric client id, scopes without spaces, an absolute state
//! folder).
//!
//! Inputs: arbitrary text; TOML documents built from the real keys with odd values; and the
//! checked-in corpus (`corpus/config/*.toml`) mutated byte by byte. Failures proptest finds
//! are kept in `config_props.proptest-regressions` beside this file and replayed first.
//!
//! 256 cases per property by default (CI); `SPOTOK_LONG=1` runs 20,000, `PROPTEST_CASES`
//! overrides both.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::FileFailurePersistence;
use spotokd::config::{Config, ConfigError};

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

/// The keys of SPEC's config table.
const KEYS: &[&str] = &[
    "client_id",
    "client_secret_file",
    "scopes",
    "redirect_uri",
    "refresh_margin",
    "store",
    "notify",
    "auth_url",
    "token_url",
    "api_url",
    "state_dir",
];

/// A folder for the config "file" (never written: only its folder matters, for relative
/// paths), holding a client secret and an empty one, so `client_secret_file` meets real files.
/// Its name has a space and non-ASCII, which errors must still show intact.
fn config_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("spotok config-props ü");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("client_secret"), " s3cret \n").expect("write secret");
        std::fs::write(dir.join("empty_secret"), "").expect("write secret");
        dir.join("config.toml")
    })
}

/// Parses `text` and checks the properties. Returns whether it was accepted.
fn check(text: &str) -> bool {
    let path = config_path();
    let shown = path.display().to_string();
    match Config::parse(text, path, Path::new("/default/state"), None) {
        Ok(c) => {
            assert_eq!(c.path, path);
            if let Some(id) = &c.client_id {
                assert!(
                    !id.is_empty() && id.chars().all(|ch| ch.is_ascii_alphanumeric()),
                    "accepted client_id {id:?}\n--- config:\n{text}"
                );
            }
            let r = &c.redirect_uri;
            assert_eq!(r.scheme(), "http", "{r}\n--- config:\n{text}");
            assert!(
                matches!(
                    r.host(),
                    Some(url::Host::Ipv4(ip)) if ip == std::net::Ipv4Addr::LOCALHOST
                ) || matches!(
                    r.host(),
                    Some(url::Host::Ipv6(ip)) if ip == std::net::Ipv6Addr::LOCALHOST
                ),
                "accepted a non-loopback redirect {r}\n--- config:\n{text}"
            );
            assert!(r.query().is_none() && r.fragment().is_none(), "{r}");
            for s in &c.scopes {
                assert!(
                    !s.is_empty() && !s.contains(char::is_whitespace),
                    "accepted scope {s:?}"
                );
            }
            assert!(c.state_dir.is_absolute(), "{}", c.state_dir.display());
            if let Some(secret) = &c.client_secret {
                assert!(!secret.expose().is_empty());
                assert_eq!(secret.expose(), secret.expose().trim());
                assert!(
                    !format!("{c:?}").contains(secret.expose()),
                    "Debug shows the secret"
                );
            }
            true
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(&shown),
                "error does not name the file: {message}\n--- config:\n{text}"
            );
            assert!(
                !message.contains("s3cret"),
                "error shows the secret: {message}"
            );
            match &e {
                ConfigError::Value { key, .. } => {
                    assert!(KEYS.contains(key), "unknown key {key} in {message}");
                    assert!(message.contains(&format!("`{key}`")), "{message}");
                }
                ConfigError::Parse { message: m, .. } => assert!(!m.is_empty()),
                ConfigError::Read { .. } => panic!("parse never reads the config: {message}"),
            }
            false
        }
    }
}

/// The checked-in corpus, as (name, text).
fn corpus() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/config");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("corpus folder")
        .map(|e| {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("read corpus file"))
        })
        .collect();
    files.sort();
    files
}

fn strings() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        3 => prop::sample::select(vec![
            // durations
            "5m", "90s", "0", "", " ", "1h30m", "250ms", "2d", "-1s", "5 m", "5m5m", "ms", "s5",
            "1.5h", "5µs", "18446744073709551615", "18446744073709551615d",
            "99999999999999999999999h", "1h1h1h1h1h1h1h1h1h1h",
            // URLs
            "http://127.0.0.1:8898/callback", "http://[::1]/cb", "http://localhost/cb",
            "http://LOCALHOST./cb", "https://127.0.0.1/cb", "http://127.0.0.1/cb?x=1",
            "http://127.0.0.1/cb#", "http://127.0.0.1:0/", "http://127.0.0.2/",
            "http://[::ffff:127.0.0.1]/", "http://2130706433/", "http://0x7f.1/",
            "http://127.1/", "http://user:pw@127.0.0.1/cb", "http://127.0.0.1:65536/",
            "file:///etc/passwd", "http:", "//127.0.0.1/cb", "http://[::1",
            // ids, stores, paths
            "abc123", "a b", "ÄÖÜ", "testclient", "auto", "file", "secret-service", "disk",
            "client_secret", "empty_secret", "missing_secret", "~/x", "~", ".", "..", "/",
            "relative/dir", "\u{0}", "line\nbreak",
        ]).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// A TOML value, written as TOML (JSON string escapes are close enough to TOML's; where
/// they are not, the parser gets one more syntax error to survive).
fn value() -> impl Strategy<Value = String> {
    let quoted = strings()
        .prop_map(|s| serde_json::to_string(&s).expect("string"))
        .boxed();
    prop_oneof![
        6 => quoted.clone(),
        1 => strings().prop_map(|s| format!("'{}'", s.replace(['\'', '\n'], ""))),
        1 => strings().prop_map(|s| format!("\"\"\"\n{}\"\"\"", s.replace('"', ""))),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|n| format!("{n:?}")),
        1 => any::<bool>().prop_map(|b| b.to_string()),
        1 => Just("1979-05-27T07:32:00Z".to_string()),
        2 => prop::collection::vec(quoted.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => (prop::sample::select(KEYS), quoted).prop_map(|(k, v)| format!("{{ {k} = {v} }}")),
        1 => Just("[1, \"a\", [true]]".to_string()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => prop::sample::select(vec![
            "refresh_margn", "Client_ID", "\"client_id\"", "client_id.sub", "scopes.x", "spotok",
            "'store'", "ü", "",
        ]).prop_map(str::to_string),
        1 => "[a-z_]{1,12}",
    ]
}

/// A TOML document from real keys: assignments, tables, comments and the odd bad line.
fn document() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        10 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => key().prop_map(|k| format!("[{k}]")),
        1 => key().prop_map(|k| format!("[[{k}]]")),
        1 => any::<String>().prop_map(|s| format!("# {}", s.replace(['\n', '\r'], " "))),
        1 => Just(String::new()),
        1 => any::<String>(),
    ];
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

/// One edit of the text's bytes (the result is made UTF-8 again, lossily).
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Insert(Index, u8),
    InsertText(Index, &'static str),
    Delete(Index, usize),
    Duplicate(Index, usize),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (
            any::<Index>(),
            prop::sample::select(b"\"'=[]{}\n#\\ .,0sm\xc3\xa4".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (
            any::<Index>(),
            prop::sample::select(vec![
                "\n[x]\n",
                "\nclient_id = \"a\"\n",
                "\"\"\"",
                "'''",
                "ä",
                "😀",
                "\\u00",
                "\r",
                "\nstore = \"file\"\n",
                "9999999999999999999999",
            ])
        )
            .prop_map(|(i, s)| Mutation::InsertText(i, s)),
        (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<Index>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

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
                bytes.drain(p..(p + n).min(bytes.len()));
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
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics_and_errors_name_the_file(text in any::<String>()) {
        check(&text);
    }

    #[test]
    fn documents_of_real_keys_never_panic_and_errors_name_the_file(text in document()) {
        check(&text);
    }

    #[test]
    fn mutated_corpus_never_panics_and_errors_name_the_file(
        seed in prop::sample::select(corpus()),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = seed.1.into_bytes();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn corpus_parses_as_expected() {
    let corpus = corpus();
    assert!(corpus.len() >= 8, "the corpus lost files");
    for (name, text) in &corpus {
        let accepted = check(text);
        let expected = matches!(
            name.as_str(),
            "full.toml" | "minimal.toml" | "test-harness.toml" | "edge-values.toml"
        );
        assert_eq!(accepted, expected, "{name}");
    }
}
