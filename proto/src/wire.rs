//! The socket protocol: newline-delimited JSON, one object per line, at most
//! [`MAX_LINE`] bytes a line.
//!
//! A connection starts with [`Request::Hello`]; the daemon answers [`Reply::Hello`], or
//! [`Reply::Error`] with [`ErrorKind::ProtocolMismatch`] and closes. Then any number of
//! requests follow, each answered by exactly one reply, in order, except
//! [`Request::Watch`], which answers with a [`Reply::Status`] now and after every change
//! until the client hangs up. The hello's shape never changes between versions, so any two
//! versions can at least tell each other apart. Golden tests below pin every message.

use serde::{Deserialize, Serialize};

use crate::{AccessToken, ErrorKind, RefreshToken};

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest line either side accepts, newline included. A longer one closes the connection.
pub const MAX_LINE: usize = 64 * 1024;

/// A connection that sends no request for this long is closed.
pub const IDLE_TIMEOUT_SECS: u64 = 60;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// First line of every connection.
    Hello {
        /// The client's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// Free text for logs, e.g. `spotokctl 0.1.0`.
        #[serde(default)]
        client: String,
    },
    /// A token valid for at least `min_valid_secs`, carrying every scope in `scopes`.
    Get {
        /// Answer from memory when the token has this long left; otherwise wait for a refresh.
        min_valid_secs: u64,
        /// Scopes the caller needs; a login lacking one fails with `insufficient_scope`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scopes: Vec<String>,
        /// How long the caller will wait for a refresh; past it the daemon answers
        /// `unavailable` at once instead of holding the caller.
        #[serde(default = "default_wait", skip_serializing_if = "is_default_wait")]
        wait_secs: u64,
    },
    /// The daemon's state.
    Status,
    /// Refresh now, whatever the expiry.
    Refresh,
    /// Store this refresh token after one successful refresh with it.
    Import {
        /// The token, read by the client from stdin.
        refresh_token: RefreshToken,
    },
    /// Forget the stored login.
    Logout,
    /// Start an Authorization Code login; answered with [`Reply::LoginStarted`].
    Login {
        /// Write this client id to a config that has none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// Scopes to ask for on top of the config's.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        scopes: Vec<String>,
    },
    /// Wait until the pending login ends; answered with [`Reply::Status`] or an error.
    LoginWait,
    /// The redirected URL of a login finished in a browser elsewhere, pasted by the user.
    LoginRedirect {
        /// The full `http://127.0.0.1:…/callback?code=…&state=…` URL.
        url: String,
    },
    /// Stream a [`Reply::Status`] now and on every change.
    Watch,
    /// The Spotify user the login belongs to (`GET /me`).
    Whoami,
}

fn default_wait() -> u64 {
    30
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference.
fn is_default_wait(v: &u64) -> bool {
    *v == default_wait()
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The daemon's [`PROTOCOL_VERSION`].
        protocol: u32,
        /// The daemon's crate version.
        version: String,
    },
    /// A current access token.
    Token {
        /// The token.
        access_token: AccessToken,
        /// Unix seconds.
        expires_at: u64,
        /// Scopes the login was granted.
        scopes: Vec<String>,
    },
    /// The daemon's state.
    Status(Status),
    /// A refresh (or import) succeeded.
    Refreshed {
        /// Unix seconds when the new token expires.
        expires_at: u64,
    },
    /// Done, nothing to report.
    Ok,
    /// A login is waiting for the browser.
    LoginStarted {
        /// The authorize URL to open.
        url: String,
        /// The redirect URI the Spotify app must have registered.
        redirect_uri: String,
    },
    /// Answer to [`Request::Whoami`].
    Me {
        /// The user's display name (may be empty).
        display_name: String,
        /// The Spotify user id.
        id: String,
    },
    /// The request failed.
    Error {
        /// What kind of failure, for exit codes and D-Bus error names.
        kind: ErrorKind,
        /// One line for people that says what to do next. Never contains a token.
        message: String,
    },
}

impl Reply {
    /// An error reply.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Error {
            kind,
            message: message.into(),
        }
    }
}

/// What the daemon is doing; the D-Bus `State` property carries the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// No `client_id` configured.
    Unconfigured,
    /// Configured, no stored login.
    LoggedOut,
    /// A login and (usually) a valid token.
    Active,
    /// A token request is in flight.
    Refreshing,
    /// The last token request failed transiently; waiting before the next.
    BackingOff,
    /// Spotify refused the refresh token; a new login is needed.
    NeedsLogin,
}

impl State {
    /// The `snake_case` name used on the wire and on D-Bus.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unconfigured => "unconfigured",
            Self::LoggedOut => "logged_out",
            Self::Active => "active",
            Self::Refreshing => "refreshing",
            Self::BackingOff => "backing_off",
            Self::NeedsLogin => "needs_login",
        }
    }
}

/// Where the refresh token is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// A 0600 file in the state folder.
    File,
    /// The desktop keyring (org.freedesktop.secrets).
    SecretService,
}

impl StoreKind {
    /// The name used in the config and in `status`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::SecretService => "secret-service",
        }
    }
}

/// The daemon's state as `status --json` prints it (SPEC: spotokctl status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// What the daemon is doing.
    pub state: State,
    /// When the current access token expires (Unix seconds).
    pub expires_at: Option<u64>,
    /// When the next refresh is planned (Unix seconds).
    pub refresh_at: Option<u64>,
    /// When the login itself ends (Spotify: six months after it happened).
    pub login_expires_at: Option<u64>,
    /// Scopes the login was granted.
    pub scopes: Vec<String>,
    /// Where the refresh token is kept.
    pub store: StoreKind,
    /// The last error, for people; cleared by the next success.
    pub last_error: Option<String>,
    /// The daemon's crate version.
    pub version: String,
    /// The daemon's protocol version.
    pub protocol: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(value: &T, golden: &str)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(value).unwrap(), golden);
        assert_eq!(&serde_json::from_str::<T>(golden).unwrap(), value);
    }

    #[test]
    fn hello_is_frozen() {
        // These two lines must parse in every version, forever: they are how mismatches are told.
        round_trip(
            &Request::Hello {
                protocol: 1,
                client: "spotokctl 0.1.0".into(),
            },
            r#"{"op":"hello","protocol":1,"client":"spotokctl 0.1.0"}"#,
        );
        round_trip(
            &Reply::Hello {
                protocol: 1,
                version: "0.1.0".into(),
            },
            r#"{"reply":"hello","protocol":1,"version":"0.1.0"}"#,
        );
        assert_eq!(PROTOCOL_VERSION, 1, "bump the goldens with the version");
    }

    #[test]
    fn requests() {
        round_trip(
            &Request::Get {
                min_valid_secs: 60,
                scopes: vec![],
                wait_secs: 30,
            },
            r#"{"op":"get","min_valid_secs":60}"#,
        );
        round_trip(
            &Request::Get {
                min_valid_secs: 0,
                scopes: vec!["user-read-private".into()],
                wait_secs: 5,
            },
            r#"{"op":"get","min_valid_secs":0,"scopes":["user-read-private"],"wait_secs":5}"#,
        );
        round_trip(&Request::Status, r#"{"op":"status"}"#);
        round_trip(&Request::Refresh, r#"{"op":"refresh"}"#);
        round_trip(
            &Request::Import {
                refresh_token: RefreshToken::new("AQx".into()),
            },
            r#"{"op":"import","refresh_token":"AQx"}"#,
        );
        round_trip(&Request::Logout, r#"{"op":"logout"}"#);
        round_trip(
            &Request::Login {
                client_id: Some("abc".into()),
                scopes: vec!["streaming".into()],
            },
            r#"{"op":"login","client_id":"abc","scopes":["streaming"]}"#,
        );
        round_trip(
            &Request::Login {
                client_id: None,
                scopes: vec![],
            },
            r#"{"op":"login"}"#,
        );
        round_trip(&Request::LoginWait, r#"{"op":"login_wait"}"#);
        round_trip(
            &Request::LoginRedirect {
                url: "http://127.0.0.1:8898/callback?code=c&state=s".into(),
            },
            r#"{"op":"login_redirect","url":"http://127.0.0.1:8898/callback?code=c&state=s"}"#,
        );
        round_trip(&Request::Watch, r#"{"op":"watch"}"#);
        round_trip(&Request::Whoami, r#"{"op":"whoami"}"#);
    }

    #[test]
    fn replies() {
        round_trip(
            &Reply::Token {
                access_token: AccessToken::new("BQx".into()),
                expires_at: 1_800_000_000,
                scopes: vec!["streaming".into()],
            },
            r#"{"reply":"token","access_token":"BQx","expires_at":1800000000,"scopes":["streaming"]}"#,
        );
        round_trip(
            &Reply::Refreshed {
                expires_at: 1_800_000_000,
            },
            r#"{"reply":"refreshed","expires_at":1800000000}"#,
        );
        round_trip(&Reply::Ok, r#"{"reply":"ok"}"#);
        round_trip(
            &Reply::LoginStarted {
                url: "https://a/authorize?x".into(),
                redirect_uri: "http://127.0.0.1:8898/callback".into(),
            },
            r#"{"reply":"login_started","url":"https://a/authorize?x","redirect_uri":"http://127.0.0.1:8898/callback"}"#,
        );
        round_trip(
            &Reply::Me {
                display_name: "Ann".into(),
                id: "ann".into(),
            },
            r#"{"reply":"me","display_name":"Ann","id":"ann"}"#,
        );
        round_trip(
            &Reply::error(ErrorKind::NeedsLogin, "run spotokctl login"),
            r#"{"reply":"error","kind":"needs_login","message":"run spotokctl login"}"#,
        );
    }

    #[test]
    fn status() {
        round_trip(
            &Reply::Status(Status {
                state: State::BackingOff,
                expires_at: Some(10),
                refresh_at: None,
                login_expires_at: Some(20),
                scopes: vec![],
                store: StoreKind::SecretService,
                last_error: Some("HTTP 503".into()),
                version: "0.1.0".into(),
                protocol: 1,
            }),
            r#"{"reply":"status","state":"backing_off","expires_at":10,"refresh_at":null,"login_expires_at":20,"scopes":[],"store":"secret-service","last_error":"HTTP 503","version":"0.1.0","protocol":1}"#,
        );
    }

    #[test]
    fn unknown_ops_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"fly"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"get","min_valid_secs":1,"x":1}"#).is_err()
        );
    }
}
