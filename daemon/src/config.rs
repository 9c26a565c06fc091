//! `config.toml`: every key of SPEC's config table, checked at load. An error names the file
//! and the key; a missing file is an empty config (the daemon runs `unconfigured`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spotok_proto::wire::StoreKind;
use url::{Host, Url};

/// Spotify's own words on redirect URIs, quoted when one is refused.
const SPOTIFY_RULE: &str = "Spotify: \"localhost is not allowed as redirect URI\"; use a loopback \
     literal such as http://127.0.0.1:8898/callback or http://[::1]:8898/callback, and register \
     that exact URI in your app's settings on the Spotify developer dashboard";

/// Which store keeps the refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreChoice {
    /// The Secret Service when a provider owns `org.freedesktop.secrets`, else the file.
    Auto,
    /// Only the Secret Service.
    SecretService,
    /// Only the 0600 file.
    File,
}

impl StoreChoice {
    /// The store that must be used, if the choice is not `auto`.
    #[must_use]
    pub fn forced(self) -> Option<StoreKind> {
        match self {
            Self::Auto => None,
            Self::SecretService => Some(StoreKind::SecretService),
            Self::File => Some(StoreKind::File),
        }
    }
}

/// The loaded configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from; named in errors and used by `login --client-id`.
    pub path: PathBuf,
    /// The Spotify app's client id; without it only `status` works.
    pub client_id: Option<String>,
    /// The app's client secret, when configured: the code flow then uses HTTP Basic.
    pub client_secret: Option<ClientSecret>,
    /// Scopes asked for at login.
    pub scopes: Vec<String>,
    /// Where the browser is sent back to; always a loopback literal.
    pub redirect_uri: Url,
    /// Refresh this long before expiry (clamped to half the lifetime by the policy).
    pub refresh_margin: Duration,
    /// Which store keeps the refresh token.
    pub store: StoreChoice,
    /// Whether to send desktop notifications.
    pub notify: bool,
    /// Spotify's authorize endpoint.
    pub auth_url: Url,
    /// Spotify's token endpoint.
    pub token_url: Url,
    /// The Web API base, for `whoami`.
    pub api_url: Url,
    /// The state folder (login record, log file).
    pub state_dir: PathBuf,
}

/// A client secret, read from a file, never from the config's own text.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(String);

impl ClientSecret {
    /// The value, for the Basic authorization header.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

/// The file as written, before checks that need more than one key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    #[serde(default)]
    scopes: Vec<String>,
    redirect_uri: Option<String>,
    refresh_margin: Option<String>,
    store: Option<StoreChoice>,
    notify: Option<bool>,
    auth_url: Option<String>,
    token_url: Option<String>,
    api_url: Option<String>,
    state_dir: Option<PathBuf>,
}

/// A config that cannot be used, with the file and the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's message, which names the key and the line.
        message: String,
    },
    /// A value of the right type that is still not acceptable.
    #[error("{path}: bad value for `{key}`: {message}")]
    Value {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong and what to write instead.
        message: String,
    },
}

impl Config {
    /// Loads `path`; a missing file gives the defaults. `default_state` is the XDG state
    /// folder, `credentials` is `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`).
    pub fn load(
        path: &Path,
        default_state: &Path,
        credentials: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        Self::parse(&text, path, default_state, credentials)
    }

    /// Parses config text; `path` is only used in messages and to resolve relative paths.
    pub fn parse(
        text: &str,
        path: &Path,
        default_state: &Path,
        credentials: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: match e.span().map(|s| where_in(text, s.start)) {
                Some((line, Some(key))) => format!("line {line}, `{key}`: {}", e.message().trim()),
                Some((line, None)) => format!("line {line}: {}", e.message().trim()),
                None => e.message().trim().to_string(),
            },
        })?;
        let bad = |key: &'static str, message: String| ConfigError::Value {
            path: path.into(),
            key,
            message,
        };
        let url = |key: &'static str, value: Option<String>, default: &str| {
            let text = value.as_deref().unwrap_or(default);
            Url::parse(text).map_err(|e| bad(key, format!("{text:?} is not a URL ({e})")))
        };

        let client_id =
            match raw.client_id.map(|s| s.trim().to_string()) {
                Some(id) if id.is_empty() => None,
                Some(id) if !id.chars().all(|c| c.is_ascii_alphanumeric()) => return Err(bad(
                    "client_id",
                    "a Spotify client id is made of letters and digits; copy it from your app's \
                     page on the developer dashboard"
                        .into(),
                )),
                other => other,
            };
        let secret_file = raw
            .client_secret_file
            .map(|p| resolve(path, &p))
            .or_else(|| {
                credentials
                    .map(|dir| dir.join("client_secret"))
                    .filter(|p| p.exists())
            });
        let client_secret = secret_file
            .map(|file| read_secret(&file).map_err(|m| bad("client_secret_file", m)))
            .transpose()?;
        let redirect_text = raw
            .redirect_uri
            .unwrap_or_else(|| "http://127.0.0.1:8898/callback".into());
        let redirect_uri = check_redirect(&redirect_text).map_err(|m| bad("redirect_uri", m))?;
        let refresh_margin = match raw.refresh_margin {
            None => Duration::from_secs(300),
            Some(text) => {
                spotok_proto::duration::parse(&text).map_err(|m| bad("refresh_margin", m))?
            }
        };
        let state_dir = match raw.state_dir {
            None => default_state.to_path_buf(),
            Some(dir) => resolve(path, &dir),
        };
        for scope in &raw.scopes {
            if scope.is_empty() || scope.contains(char::is_whitespace) {
                return Err(bad(
                    "scopes",
                    format!("{scope:?} is not a scope: write one scope per string"),
                ));
            }
        }
        Ok(Self {
            path: path.into(),
            client_id,
            client_secret,
            scopes: raw.scopes,
            redirect_uri,
            refresh_margin,
            store: raw.store.unwrap_or(StoreChoice::Auto),
            notify: raw.notify.unwrap_or(true),
            auth_url: url(
                "auth_url",
                raw.auth_url,
                "https://accounts.spotify.com/authorize",
            )?,
            token_url: url(
                "token_url",
                raw.token_url,
                "https://accounts.spotify.com/api/token",
            )?,
            api_url: url("api_url", raw.api_url, "https://api.spotify.com/v1")?,
            state_dir,
        })
    }
}

/// The secret in `file`, without surrounding whitespace.
fn read_secret(file: &Path) -> Result<ClientSecret, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    match text.trim() {
        "" => Err(format!("{} is empty", file.display())),
        secret => Ok(ClientSecret(secret.to_string())),
    }
}

/// `~/x` is the home folder; a relative path is relative to the config file's folder.
fn resolve(config: &Path, p: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    match config.parent() {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// The line number of `offset`, and the key assigned on that line, if any.
fn where_in(text: &str, offset: usize) -> (usize, Option<&str>) {
    let before = &text[..offset.min(text.len())];
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    (before.matches('\n').count() + 1, key)
}

/// SPEC: `http://127.0.0.1[:port]/path` or `http://[::1][:port]/path`, never `localhost`.
fn check_redirect(text: &str) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    match url.host() {
        Some(Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => {
            return Err(format!("{text:?} uses localhost. {SPOTIFY_RULE}"))
        }
        Some(Host::Ipv4(ip)) if ip == std::net::Ipv4Addr::LOCALHOST => {}
        Some(Host::Ipv6(ip)) if ip == std::net::Ipv6Addr::LOCALHOST => {}
        _ => {
            return Err(format!(
                "{text:?} is not a loopback address: spotokd receives the redirect itself. \
                 {SPOTIFY_RULE}"
            ))
        }
    }
    if url.scheme() != "http" {
        return Err(format!(
            "{text:?}: the loopback redirect is plain http (Spotify allows http only for \
             127.0.0.1 and [::1])"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?}: a redirect URI has no query or fragment"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/c/config.toml"), Path::new("/s"), None)
    }

    #[test]
    fn empty_config_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.client_id, None);
        assert_eq!(c.refresh_margin, Duration::from_secs(300));
        assert_eq!(c.redirect_uri.as_str(), "http://127.0.0.1:8898/callback");
        assert_eq!(c.store, StoreChoice::Auto);
        assert!(c.notify);
        assert_eq!(
            c.token_url.as_str(),
            "https://accounts.spotify.com/api/token"
        );
        assert_eq!(c.state_dir, Path::new("/s"));
    }

    #[test]
    fn every_key() {
        let c = parse(
            r#"
            client_id = "abc123"
            scopes = ["user-read-private", "streaming"]
            redirect_uri = "http://[::1]/cb"
            refresh_margin = "90s"
            store = "file"
            notify = false
            auth_url = "http://127.0.0.1:1/authorize"
            token_url = "http://127.0.0.1:1/api/token"
            api_url = "http://127.0.0.1:1/v1"
            state_dir = "state"
            "#,
        )
        .unwrap();
        assert_eq!(c.client_id.as_deref(), Some("abc123"));
        assert_eq!(c.scopes, ["user-read-private", "streaming"]);
        assert_eq!(c.redirect_uri.port(), None);
        assert_eq!(c.refresh_margin, Duration::from_secs(90));
        assert_eq!(c.store, StoreChoice::File);
        assert!(!c.notify);
        assert_eq!(c.state_dir, Path::new("/c/state"));
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let e = parse("client_id = \"a\"\nrefresh_margn = \"5m\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/c/config.toml"), "{e}");
        assert!(e.contains("refresh_margn"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("refresh_margin = \"soon\"", "refresh_margin"),
            ("store = \"disk\"", "store"),
            ("notify = \"yes\"", "notify"),
            ("token_url = \"not a url\"", "token_url"),
            ("client_id = \"a b\"", "client_id"),
            ("scopes = [\"a b\"]", "scopes"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("/c/config.toml"),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn localhost_is_refused_with_spotifys_rule() {
        let e = parse("redirect_uri = \"http://localhost:8898/callback\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("redirect_uri"), "{e}");
        assert!(
            e.contains("localhost is not allowed as redirect URI"),
            "{e}"
        );
        for bad in [
            "http://192.168.1.2:8898/cb",
            "https://127.0.0.1/cb",
            "http://127.0.0.1/cb?x=1",
        ] {
            assert!(
                parse(&format!("redirect_uri = \"{bad}\"")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn secret_from_file_or_credentials_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client_secret"), "  s3cret \n").unwrap();
        let c = Config::parse(
            "",
            Path::new("/c/x.toml"),
            Path::new("/s"),
            Some(dir.path()),
        )
        .unwrap();
        assert_eq!(
            c.client_secret.as_ref().map(ClientSecret::expose),
            Some("s3cret")
        );
        assert_eq!(
            format!("{:?}", c.client_secret),
            "Some(ClientSecret(<redacted>))"
        );
        let text = format!(
            "client_secret_file = \"{}\"",
            dir.path().join("missing").display()
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("client_secret_file"), "{e}");
    }
}
