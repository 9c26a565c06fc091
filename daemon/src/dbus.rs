//! The D-Bus service on the session bus: the [`Service`] interface (`org.spotok.Spotokd1` at
//! `/org/spotok/Spotokd`, name `org.spotok.Spotokd`), and the mirror that turns every new
//! [`Snapshot`] into `PropertiesChanged` and `TokenRefreshed` signals.
//!
//! [`serve`] keeps a connection for the daemon's life: no bus at start-up is one log line and
//! a quiet retry; a bus that goes away is reconnected with backoff and the name taken again.
//! The name is requested without `ReplaceExisting`, so a second spotokd never steals it: the
//! bus queues the second one and hands it the name when the first one leaves.
//!
//! Invariants:
//! - A token value leaves only in a method reply: never in a property, a signal or a log line.
//! - Property values are computed from the current snapshot on every read ([`Props`]), so a
//!   reader never sees a value the mirror has not announced, or will not announce.
//! - The interface is served before the name is requested, so no call to the name is lost.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use enumflags2::BitFlags;
use spotok_proto::dbus::{NAME, PATH};
use spotok_proto::ErrorKind;
use tokio::sync::watch;
use zbus::fdo::RequestNameReply;
use zbus::object_server::SignalEmitter;
use zbus::Connection;

use crate::clock;
use crate::manager::{Failure, Handle, Snapshot, Token};

/// `GetAccessToken` answers with a token good for at least this long (like `spotokctl get`).
const MIN_VALID: Duration = Duration::from_secs(60);
/// How long a method waits for a refresh: under the 25 s default D-Bus call timeout, so the
/// caller gets our error (`Unavailable`) rather than a `NoReply`.
const WAIT: Duration = Duration::from_secs(20);
/// First wait before reconnecting to the bus.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between reconnection attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Longest wait while there has never been a bus (a headless machine): an idle daemon should
/// not wake every minute for a bus that is not coming.
const RETRY_MAX_NO_BUS: Duration = Duration::from_secs(3600);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(60);

/// The D-Bus errors, one per [`ErrorKind`] a caller can meet; named
/// `org.spotok.Spotokd1.Error.<Variant>` ([`spotok_proto::dbus::ERROR_PREFIX`]).
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.spotok.Spotokd1.Error")]
pub enum Error {
    /// A failure of D-Bus itself.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No login, or Spotify refused the refresh token.
    NeedsLogin(String),
    /// The login lacks a requested scope.
    InsufficientScope(String),
    /// No valid token and the accounts service is failing: retry later.
    Unavailable(String),
    /// The request itself is wrong.
    InvalidArgs(String),
    /// Anything else.
    Failed(String),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f.kind {
            ErrorKind::NeedsLogin => Self::NeedsLogin(f.message),
            ErrorKind::InsufficientScope => Self::InsufficientScope(f.message),
            ErrorKind::Unavailable => Self::Unavailable(f.message),
            ErrorKind::InvalidArgs => Self::InvalidArgs(f.message),
            // The last two are client-side kinds; the daemon never produces them.
            ErrorKind::Failed | ErrorKind::Unreachable | ErrorKind::ProtocolMismatch => {
                Self::Failed(f.message)
            }
        }
    }
}

/// The property values of one snapshot. No token in here, by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Props {
    /// `State`.
    state: String,
    /// `ExpiresAt`: Unix seconds, 0 when there is no token.
    expires_at: u64,
    /// `LoginExpiresAt`: Unix seconds, 0 when there is no login.
    login_expires_at: u64,
    /// `Scopes`.
    scopes: Vec<String>,
    /// `LastError`: "" when none.
    last_error: String,
}

impl Props {
    fn of(snap: &Snapshot) -> Self {
        Self {
            state: snap.state.as_str().into(),
            expires_at: snap.token.as_ref().map_or(0, |t| clock::unix(t.expires_at)),
            login_expires_at: snap.login_expires_at().map_or(0, clock::unix),
            scopes: snap.scopes.clone(),
            last_error: snap.last_error.clone().unwrap_or_default(),
        }
    }
}

/// The `org.spotok.Spotokd1` interface object.
#[derive(Debug)]
pub struct Service {
    /// To the token owner.
    handle: Handle,
}

impl Service {
    /// The interface for `handle`.
    #[must_use]
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    fn props(&self) -> Props {
        Props::of(&self.handle.snapshot())
    }
}

/// Seconds from now until `t` expires, for `GetAccessToken`'s `expires_in`.
fn expires_in(t: &Token) -> i32 {
    let left = t
        .expires_at
        .duration_since(clock::now())
        .map_or(0, |d| d.as_secs());
    i32::try_from(left).unwrap_or(i32::MAX)
}

#[zbus::interface(name = "org.spotok.Spotokd1")]
impl Service {
    /// A token valid for at least 60 s, and the seconds it has left (the shape of GNOME
    /// Online Accounts' `OAuth2Based.GetAccessToken`).
    #[zbus(out_args("token", "expires_in"))]
    async fn get_access_token(&self) -> Result<(String, i32), Error> {
        let t = self.handle.token(MIN_VALID, &[], WAIT).await?;
        Ok((t.access.expose().to_owned(), expires_in(&t)))
    }

    /// A token with every scope in `scopes`, valid for at least `min_valid_secs`, and when it
    /// expires (Unix seconds).
    #[zbus(out_args("token", "expires_at"))]
    async fn get_access_token_for(
        &self,
        scopes: Vec<String>,
        min_valid_secs: u32,
    ) -> Result<(String, u64), Error> {
        let min_valid = Duration::from_secs(min_valid_secs.into());
        let t = self.handle.token(min_valid, &scopes, WAIT).await?;
        Ok((t.access.expose().to_owned(), clock::unix(t.expires_at)))
    }

    /// Refreshes now; answers when the new token expires (Unix seconds).
    #[zbus(out_args("expires_at"))]
    async fn refresh(&self) -> Result<u64, Error> {
        let t = self.handle.refresh().await?;
        Ok(clock::unix(t.expires_at))
    }

    /// Starts a login and answers with the URL to open; its completion shows in `State`.
    #[zbus(out_args("url"))]
    async fn login(&self) -> Result<String, Error> {
        let (url, _redirect_uri) = crate::login::begin(&self.handle, None, vec![]).await?;
        Ok(url)
    }

    /// Forgets the login everywhere it is stored.
    async fn logout(&self) -> Result<(), Error> {
        Ok(self.handle.logout().await?)
    }

    /// `unconfigured`, `logged_out`, `active`, `refreshing`, `backing_off` or `needs_login`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.props().state
    }

    /// When the current token expires (Unix seconds), 0 when there is none.
    #[zbus(property)]
    fn expires_at(&self) -> u64 {
        self.props().expires_at
    }

    /// When the login ends (Unix seconds), 0 when there is none.
    #[zbus(property)]
    fn login_expires_at(&self) -> u64 {
        self.props().login_expires_at
    }

    /// The scopes of the login.
    #[zbus(property)]
    fn scopes(&self) -> Vec<String> {
        self.props().scopes
    }

    /// The last error, for people; "" when none.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.props().last_error
    }

    /// A new token is available (fetch it with a method call); never carries the token.
    #[zbus(signal)]
    async fn token_refreshed(emitter: &SignalEmitter<'_>, expires_at: u64) -> zbus::Result<()>;
}

/// Keeps the service on the session bus until `shutdown` turns true: connects, serves,
/// takes the name, mirrors the snapshot, and reconnects with backoff when the bus goes away.
pub async fn serve(handle: Handle, mut shutdown: watch::Receiver<bool>) {
    let mut retry = RETRY_MIN;
    // Whether the latest failure was reported; later ones stay quiet until a success.
    let mut reported = false;
    let mut ever_connected = false;
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        // Made before connecting, so a change during the connection set-up is announced.
        let mirror = Mirror::new(&handle);
        match connect(&handle).await {
            Ok((conn, reply)) => {
                ever_connected = true;
                let since = Instant::now();
                if reply == RequestNameReply::InQueue {
                    tracing::warn!(
                        "another process (another spotokd?) owns {NAME} on the session bus, so \
                         D-Bus calls go to it; this one waits in the bus's queue and takes the \
                         name over when that one exits"
                    );
                } else if reported {
                    tracing::info!("connected to the session bus as {NAME}");
                } else {
                    tracing::debug!("connected to the session bus as {NAME}");
                }
                let why = tokio::select! {
                    () = conn.closed() => "lost the session bus".to_string(),
                    _ = shutdown.changed() => {
                        // Closing releases the name at once, for a queued successor.
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                        return;
                    }
                    Err(e) = mirror.run(&conn) => format!("cannot send D-Bus signals ({e})"),
                };
                tracing::warn!("{why}; reconnecting to the session bus in the background");
                reported = true;
                if since.elapsed() >= STABLE {
                    retry = RETRY_MIN;
                }
            }
            Err(e) if !reported => {
                tracing::info!(
                    "no D-Bus session bus ({e}); serving the socket only, and trying the bus \
                     again in the background"
                );
                reported = true;
            }
            Err(e) => tracing::trace!("still no D-Bus session bus: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = shutdown.changed() => return,
        }
        let max = if ever_connected {
            RETRY_MAX
        } else {
            RETRY_MAX_NO_BUS
        };
        retry = (retry * 2).min(max);
    }
}

/// Connects to the session bus, serves the interface, then asks for the name (queued
/// behind an owner, never replacing it).
async fn connect(handle: &Handle) -> zbus::Result<(Connection, RequestNameReply)> {
    let conn = zbus::connection::Builder::session()?
        .serve_at(PATH, Service::new(handle.clone()))?
        .build()
        .await?;
    // No flag at all: no ReplaceExisting (never steal the name), no AllowReplacement (never
    // give it away), no DoNotQueue (wait in the bus's queue for it). zbus's default, which
    // `Builder::name` uses, is all three: a second daemon would steal the name from the first.
    // `BitFlags::default()` would be zbus's default set, not the empty one.
    let reply = conn
        .request_name_with_flags(NAME, BitFlags::empty())
        .await?;
    Ok((conn, reply))
}

/// Turns snapshot changes into signals: `PropertiesChanged` for every property a new snapshot
/// changes, `TokenRefreshed` for every new token. Changes count from the moment it is made.
#[derive(Debug)]
pub struct Mirror {
    /// Every new snapshot.
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The property values last announced (or current when the mirror was made).
    last: Props,
    /// `Snapshot::refreshes` last seen.
    refreshes: u64,
}

impl Mirror {
    /// A mirror of `handle`'s snapshots from now on.
    #[must_use]
    pub fn new(handle: &Handle) -> Self {
        let mut snapshots = handle.subscribe();
        let first = snapshots.borrow_and_update().clone();
        Self {
            last: Props::of(&first),
            refreshes: first.refreshes,
            snapshots,
        }
    }

    /// Emits on `conn`, which serves the interface at [`PATH`]. Returns only on an error;
    /// pends once the manager is gone.
    pub async fn run(mut self, conn: &Connection) -> zbus::Result<Infallible> {
        let iface = conn.object_server().interface::<_, Service>(PATH).await?;
        let emitter = iface.signal_emitter();
        // Checked before waiting: a change made before `run` still counts.
        loop {
            let snap = self.snapshots.borrow_and_update().clone();
            let now = Props::of(&snap);
            {
                let service = iface.get().await;
                if now.state != self.last.state {
                    service.state_changed(emitter).await?;
                }
                if now.expires_at != self.last.expires_at {
                    service.expires_at_changed(emitter).await?;
                }
                if now.login_expires_at != self.last.login_expires_at {
                    service.login_expires_at_changed(emitter).await?;
                }
                if now.scopes != self.last.scopes {
                    service.scopes_changed(emitter).await?;
                }
                if now.last_error != self.last.last_error {
                    service.last_error_changed(emitter).await?;
                }
            }
            if snap.refreshes > self.refreshes {
                if let Some(t) = &snap.token {
                    Service::token_refreshed(emitter, clock::unix(t.expires_at)).await?;
                }
            }
            self.refreshes = snap.refreshes;
            self.last = now;
            if self.snapshots.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::SystemTime;

    use spotok_proto::dbus::{ERROR_PREFIX, INTERFACE};
    use spotok_proto::{AccessToken, RefreshToken};
    use zbus::zvariant::OwnedValue;
    use zbus::{DBusError as _, MessageStream};

    use super::*;
    use crate::config::Config;
    use crate::manager::Manager;
    use crate::oauth::Grant;
    use crate::store::{FileStore, Login, Store};

    const DEADLINE: Duration = Duration::from_secs(10);
    const TOKEN: &str = "BQp2p-test-access-token";

    /// A manager for `config_text` served over a p2p pair: no bus involved.
    struct Pair {
        /// Serves the interface.
        server: Connection,
        /// Calls it.
        client: Connection,
        /// To the manager.
        handle: Handle,
        /// Config and state.
        _dir: tempfile::TempDir,
    }

    async fn pair(config_text: &str) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(
            config_text,
            &dir.path().join("config.toml"),
            &dir.path().join("state"),
            None,
        )
        .unwrap();
        let uid = rustix::process::getuid().as_raw();
        let store = Store::File(FileStore::new(config.state_dir.clone(), uid));
        let (manager, handle, inboxes) =
            Manager::new(config, store, reqwest::Client::new(), Ok(None));
        tokio::spawn(manager.run(inboxes));
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let server = zbus::connection::Builder::unix_stream(a)
            .server(zbus::Guid::generate())
            .unwrap()
            .p2p()
            .serve_at(PATH, Service::new(handle.clone()))
            .unwrap()
            .build();
        let client = zbus::connection::Builder::unix_stream(b).p2p().build();
        let (server, client) =
            tokio::time::timeout(DEADLINE, async { tokio::try_join!(server, client) })
                .await
                .unwrap()
                .unwrap();
        Pair {
            server,
            client,
            handle,
            _dir: dir,
        }
    }

    impl Pair {
        async fn call<B>(&self, method: &str, body: &B) -> zbus::Result<zbus::Message>
        where
            B: serde::Serialize + zbus::zvariant::DynamicType,
        {
            let call = self
                .client
                .call_method(None::<&str>, PATH, Some(INTERFACE), method, body);
            tokio::time::timeout(DEADLINE, call).await.unwrap()
        }

        async fn property(&self, name: &str) -> OwnedValue {
            let body = (INTERFACE, name);
            let call = self.client.call_method(
                None::<&str>,
                PATH,
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &body,
            );
            let reply = tokio::time::timeout(DEADLINE, call).await.unwrap().unwrap();
            reply.body().deserialize::<OwnedValue>().unwrap()
        }
    }

    fn error_name(e: &zbus::Error) -> String {
        match e {
            zbus::Error::MethodError(name, _, _) => name.to_string(),
            other => panic!("not a D-Bus error reply: {other:?}"),
        }
    }

    #[tokio::test]
    async fn unconfigured_get_access_token_is_needs_login_and_state_reads_unconfigured() {
        let p = pair("").await;
        let e = p.call("GetAccessToken", &()).await.unwrap_err();
        assert_eq!(error_name(&e), "org.spotok.Spotokd1.Error.NeedsLogin");
        let e = p
            .call("GetAccessTokenFor", &(vec!["streaming"], 0u32))
            .await
            .unwrap_err();
        assert_eq!(error_name(&e), "org.spotok.Spotokd1.Error.NeedsLogin");
        assert_eq!(
            String::try_from(p.property("State").await).unwrap(),
            "unconfigured"
        );
        assert_eq!(u64::try_from(p.property("ExpiresAt").await).unwrap(), 0);
        assert_eq!(
            u64::try_from(p.property("LoginExpiresAt").await).unwrap(),
            0
        );
        assert_eq!(String::try_from(p.property("LastError").await).unwrap(), "");
        let e = p.call("Login", &()).await.unwrap_err();
        assert_eq!(error_name(&e), "org.spotok.Spotokd1.Error.InvalidArgs");
    }

    #[tokio::test]
    async fn a_new_login_is_announced_by_signals_that_never_carry_the_token() {
        let p = pair("client_id = \"p2p\"").await;
        assert_eq!(
            String::try_from(p.property("State").await).unwrap(),
            "logged_out"
        );
        let mut incoming = MessageStream::from(&p.client);
        let (server, mirror) = (p.server.clone(), Mirror::new(&p.handle));
        let mirroring = tokio::spawn(async move { mirror.run(&server).await });

        let config = p.handle.snapshot().config.clone();
        let login = Login {
            refresh_token: RefreshToken::new("AQp2p-test-refresh-token".into()),
            client_id: "p2p".into(),
            token_url: config.token_url.to_string(),
            login_at: clock::unix(SystemTime::now()),
            scopes: vec!["user-read-playback-state".into()],
        };
        let grant = Grant {
            access_token: AccessToken::new(TOKEN.into()),
            expires_in: Duration::from_secs(3600),
            refresh_token: None,
            scopes: None,
        };
        let token = p.handle.adopt(login, grant).await.unwrap();
        let expires_at = clock::unix(token.expires_at);

        let mut changed: HashMap<String, OwnedValue> = HashMap::new();
        let mut refreshed = None;
        let collect = async {
            while let Some(msg) = futures_next(&mut incoming).await {
                let msg = msg.unwrap();
                let bytes: &[u8] = msg.data();
                assert!(
                    !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
                    "a message carries the token: {msg:?}"
                );
                let header = msg.header();
                match header.member().map(zbus::names::MemberName::as_str) {
                    Some("PropertiesChanged") => {
                        let (iface, props, _): (String, HashMap<String, OwnedValue>, Vec<String>) =
                            msg.body().deserialize().unwrap();
                        assert_eq!(iface, INTERFACE);
                        changed.extend(props);
                    }
                    Some("TokenRefreshed") => {
                        refreshed = Some(msg.body().deserialize::<u64>().unwrap());
                    }
                    _ => {}
                }
                let done = refreshed.is_some()
                    && ["State", "ExpiresAt", "LoginExpiresAt", "Scopes"]
                        .iter()
                        .all(|k| changed.contains_key(*k));
                if done {
                    break;
                }
            }
        };
        tokio::time::timeout(DEADLINE, collect)
            .await
            .unwrap_or_else(|_| panic!("signals missing: {changed:?}, {refreshed:?}"));
        assert_eq!(refreshed, Some(expires_at));
        assert_eq!(
            String::try_from(changed["State"].try_clone().unwrap()).unwrap(),
            "active"
        );
        assert_eq!(
            u64::try_from(changed["ExpiresAt"].try_clone().unwrap()).unwrap(),
            expires_at
        );
        assert!(!mirroring.is_finished(), "the mirror keeps running");

        let reply = p.call("GetAccessToken", &()).await.unwrap();
        let (got, expires_in): (String, i32) = reply.body().deserialize().unwrap();
        assert_eq!(got, TOKEN);
        assert!((3590..=3600).contains(&expires_in), "{expires_in}");
        let e = p
            .call("GetAccessTokenFor", &(vec!["streaming"], 0u32))
            .await
            .unwrap_err();
        assert_eq!(
            error_name(&e),
            "org.spotok.Spotokd1.Error.InsufficientScope"
        );
        mirroring.abort();
    }

    /// The next item of a stream. `Stream` is taken from zbus's re-export (the very trait
    /// `MessageStream` implements) rather than adding a futures dependency for tests.
    async fn futures_next<S>(s: &mut S) -> Option<S::Item>
    where
        S: zbus::export::futures_core::Stream + Unpin,
    {
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut *s).poll_next(cx)).await
    }

    #[test]
    fn every_error_kind_maps_to_its_spec_name() {
        for kind in ErrorKind::ALL {
            let e = Error::from(Failure::new(kind, "why"));
            let expected = match kind {
                ErrorKind::Unreachable | ErrorKind::ProtocolMismatch => "Failed",
                other => other.dbus_name(),
            };
            assert_eq!(e.name().as_str(), format!("{ERROR_PREFIX}.{expected}"));
            assert_eq!(e.description(), Some("why"));
        }
    }
}
