//! A small Secret Service client (`org.freedesktop.secrets`, as served by gnome-keyring,
//! `KeePassXC` and others) for the one item spotok keeps.
//!
//! It speaks the D-Bus API directly over its own session-bus connection, with the `plain`
//! session algorithm: the secret crosses only the local bus, which is as private as the
//! provider it talks to, so the DH/AES transport encryption (and its crypto crates) would add
//! code without adding protection.
//!
//! The item lives in the default collection (alias `default`, gnome-keyring's "login"):
//! label [`ITEM_LABEL`], attributes [`ATTRIBUTES`], secret the JSON of [`Login`] with content
//! type `application/json`.
//!
//! Rules:
//! - Never a prompt. spotokd runs without a terminal and often before anyone looks at the
//!   screen; an operation that answers with a prompt is treated as "locked" (or "needs a new
//!   collection") and the prompt is dismissed, never shown.
//! - Nothing here falls back to a file: a locked or missing keyring is an error the caller
//!   reports and waits out ([`SecretError::waitable`]).
//! - Secrets never reach an error message: a damaged item is described by position only.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::export::futures_core::Stream;
use zbus::names::BusName;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, MatchRule, MessageStream};

use crate::store::Login;

/// The well-known name of a Secret Service provider.
pub const BUS_NAME: &str = "org.freedesktop.secrets";
/// The service object.
const SERVICE_PATH: &str = "/org/freedesktop/secrets";
/// What people see in Passwords and Keys / seahorse / `KeePassXC`.
pub const ITEM_LABEL: &str = "spotok: Spotify login";
/// The attributes that find the item (`secret-tool search application spotok`).
pub const ATTRIBUTES: [(&str, &str); 2] = [("application", "spotok"), ("service", "spotify")];
/// The MIME type of the secret.
const CONTENT_TYPE: &str = "application/json";
/// A provider that does not answer within this long is treated as failing, so a hung keyring
/// cannot hold the token owner forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to the session bus may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A Secret Service secret: session, parameters, value, content type.
type Secret = (OwnedObjectPath, Vec<u8>, Vec<u8>, String);

/// Why the Secret Service could not be used. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No session bus to reach a provider through.
    #[error(
        "store = \"secret-service\" needs a D-Bus session bus, and there is none ({0}); \
         spotokd does not fall back to a plaintext file: start it inside a desktop session, \
         or set store = \"file\" in config.toml"
    )]
    NoBus(String),
    /// Nobody owns (or can be activated as) `org.freedesktop.secrets`.
    #[error(
        "no Secret Service provider (org.freedesktop.secrets) on the session bus; start one \
         (gnome-keyring, KeePassXC), or set store = \"file\" in config.toml"
    )]
    NoProvider,
    /// The provider has no default collection, and making one would need a prompt.
    #[error(
        "the keyring has no default collection, and creating one needs a password prompt, \
         which spotokd never shows: create a keyring (e.g. in Passwords and Keys) and make it \
         the default, or set store = \"file\" in config.toml"
    )]
    NoCollection,
    /// The default collection is locked.
    #[error(
        "keyring is locked: unlock it (log in to the desktop, or unlock the keyring in \
         Passwords and Keys); spotokd picks the login up as soon as it is unlocked and never \
         writes it to a plaintext file instead"
    )]
    Locked,
    /// The stored item is not a login record.
    #[error(
        "the keyring item \"{ITEM_LABEL}\" is damaged ({0}); it was left as it is: remove it \
         (secret-tool clear application spotok service spotify) and log in again"
    )]
    Damaged(String),
    /// Anything else the provider or the bus said.
    #[error("the Secret Service failed: {0}")]
    Failed(String),
}

impl SecretError {
    /// A change on the bus (a provider appearing, a keyring unlocked or created) can end it,
    /// so it is worth waiting for rather than only reporting.
    #[must_use]
    pub fn waitable(&self) -> bool {
        matches!(
            self,
            Self::NoProvider | Self::NoCollection | Self::Locked | Self::Failed(_)
        )
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.Secret.Service",
    default_service = "org.freedesktop.secrets",
    default_path = "/org/freedesktop/secrets",
    gen_blocking = false
)]
trait Service {
    fn open_session(
        &self,
        algorithm: &str,
        input: &Value<'_>,
    ) -> zbus::Result<(OwnedValue, OwnedObjectPath)>;

    fn read_alias(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    fn create_collection(
        &self,
        properties: HashMap<&str, Value<'_>>,
        alias: &str,
    ) -> zbus::Result<(OwnedObjectPath, OwnedObjectPath)>;

    fn get_secrets(
        &self,
        items: &[OwnedObjectPath],
        session: &ObjectPath<'_>,
    ) -> zbus::Result<HashMap<OwnedObjectPath, Secret>>;
}

#[zbus::proxy(
    interface = "org.freedesktop.Secret.Collection",
    default_service = "org.freedesktop.secrets",
    gen_blocking = false
)]
trait Collection {
    fn search_items(&self, attributes: HashMap<&str, &str>) -> zbus::Result<Vec<OwnedObjectPath>>;

    fn create_item(
        &self,
        properties: HashMap<&str, Value<'_>>,
        secret: &Secret,
        replace: bool,
    ) -> zbus::Result<(OwnedObjectPath, OwnedObjectPath)>;

    #[zbus(property)]
    fn locked(&self) -> zbus::Result<bool>;
}

#[zbus::proxy(
    interface = "org.freedesktop.Secret.Item",
    default_service = "org.freedesktop.secrets",
    gen_blocking = false
)]
trait Item {
    fn delete(&self) -> zbus::Result<OwnedObjectPath>;
}

#[zbus::proxy(
    interface = "org.freedesktop.Secret.Session",
    default_service = "org.freedesktop.secrets",
    gen_blocking = false
)]
trait Session {
    fn close(&self) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.Secret.Prompt",
    default_service = "org.freedesktop.secrets",
    gen_blocking = false
)]
trait Prompt {
    fn dismiss(&self) -> zbus::Result<()>;
}

/// Connects to the session bus, with a deadline and a per-call timeout.
pub async fn session_bus() -> Result<Connection, SecretError> {
    let build = async {
        zbus::connection::Builder::session()?
            .method_timeout(CALL_TIMEOUT)
            .build()
            .await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, build).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(SecretError::NoBus(e.to_string())),
        Err(_) => Err(SecretError::NoBus(format!(
            "no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// A session bus on which a provider owns `org.freedesktop.secrets` right now, if there is
/// one (what `store = "auto"` asks). A provider that is merely D-Bus-activatable does not
/// count: see `docs/storage.md`.
pub async fn running_provider() -> Option<Connection> {
    let conn = match session_bus().await {
        Ok(conn) => conn,
        Err(e) => {
            let why = match e {
                SecretError::NoBus(why) => why,
                other => other.to_string(),
            };
            tracing::debug!("no Secret Service provider to use ({why})");
            return None;
        }
    };
    let owned = async {
        let name = BusName::try_from(BUS_NAME).map_err(zbus::Error::from)?;
        zbus::fdo::DBusProxy::new(&conn)
            .await?
            .name_has_owner(name)
            .await
            .map_err(zbus::Error::from)
    };
    match owned.await {
        Ok(true) => Some(conn),
        Ok(false) => {
            tracing::debug!("nobody owns {BUS_NAME} on the session bus");
            None
        }
        Err(e) => {
            tracing::debug!("cannot ask the session bus about {BUS_NAME}: {e}");
            None
        }
    }
}

/// Maps a D-Bus failure to what it means for the store.
#[allow(clippy::needless_pass_by_value)] // used as `map_err(classify)`
fn classify(e: zbus::Error) -> SecretError {
    if let zbus::Error::MethodError(name, detail, _) = &e {
        return match name.as_str() {
            "org.freedesktop.Secret.Error.IsLocked" => SecretError::Locked,
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => SecretError::NoProvider,
            _ => SecretError::Failed(format!(
                "{name}{}",
                detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )),
        };
    }
    if let zbus::Error::FDO(fdo) = &e {
        if matches!(
            **fdo,
            zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
        ) {
            return SecretError::NoProvider;
        }
    }
    SecretError::Failed(e.to_string())
}

fn no_prompt(path: &ObjectPath<'_>) -> bool {
    path.as_str() == "/"
}

/// The Secret Service backend: a lazily made, shared session-bus connection.
#[derive(Debug, Clone, Default)]
pub struct SecretStore {
    /// The connection, made on first use and dropped after a failure, so a restarted bus
    /// or provider is reached again.
    conn: Arc<Mutex<Option<Connection>>>,
}

impl SecretStore {
    /// A store using `conn` (e.g. the one the provider was found on), or connecting on
    /// first use.
    #[must_use]
    pub fn new(conn: Option<Connection>) -> Self {
        Self {
            conn: Arc::new(Mutex::new(conn)),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Connection>> {
        // The slot is an Option that is only ever replaced whole: a panic elsewhere cannot
        // leave it half-written.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session-bus connection, made if needed.
    pub async fn connection(&self) -> Result<Connection, SecretError> {
        let existing = self.slot().clone();
        if let Some(conn) = existing {
            return Ok(conn);
        }
        let conn = session_bus().await?;
        *self.slot() = Some(conn.clone());
        Ok(conn)
    }

    /// Runs `op` on the connection; a failure that is not the provider's own answer drops
    /// the connection so the next call makes a fresh one.
    async fn with<T>(
        &self,
        op: impl AsyncFnOnce(&Connection) -> Result<T, SecretError>,
    ) -> Result<T, SecretError> {
        let conn = self.connection().await?;
        let result = op(&conn).await;
        if matches!(result, Err(SecretError::Failed(_))) {
            *self.slot() = None;
        }
        result
    }

    /// Reads the login from the default collection; `None` when there is none.
    pub async fn load(&self) -> Result<Option<Login>, SecretError> {
        self.with(async |conn| {
            let service = ServiceProxy::new(conn).await.map_err(classify)?;
            let collection = unlocked_default(conn, &service).await?;
            let items = collection
                .search_items(HashMap::from(ATTRIBUTES))
                .await
                .map_err(classify)?;
            if items.is_empty() {
                return Ok(None);
            }
            if items.len() > 1 {
                tracing::warn!(
                    "{} keyring items match {ATTRIBUTES:?}; using the first",
                    items.len()
                );
            }
            let secrets = in_session(conn, &service, async |session| {
                service
                    .get_secrets(&items[..1], session)
                    .await
                    .map_err(classify)
            })
            .await?;
            let Some((_, _, value, _)) = secrets.into_values().next() else {
                // Listed but not returned: gnome-keyring does this for a locked item.
                return Err(SecretError::Locked);
            };
            serde_json::from_slice(&value).map(Some).map_err(|e| {
                // Position only: serde's message may quote the value, i.e. the token.
                SecretError::Damaged(format!(
                    "not a login record: {:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            })
        })
        .await
    }

    /// Writes the login, replacing the item if there is one.
    pub async fn save(&self, login: &Login) -> Result<(), SecretError> {
        let json = serde_json::to_vec(login).map_err(|e| SecretError::Failed(e.to_string()))?;
        self.with(async |conn| {
            let service = ServiceProxy::new(conn).await.map_err(classify)?;
            let collection = match unlocked_default(conn, &service).await {
                Err(SecretError::NoCollection) => create_default(conn, &service).await?,
                other => other?,
            };
            let properties = HashMap::from([
                ("org.freedesktop.Secret.Item.Label", Value::from(ITEM_LABEL)),
                (
                    "org.freedesktop.Secret.Item.Attributes",
                    Value::from(HashMap::from(ATTRIBUTES)),
                ),
            ]);
            let (_, prompt) = in_session(conn, &service, async |session| {
                let secret: Secret = (
                    session.to_owned().into(),
                    Vec::new(),
                    json,
                    CONTENT_TYPE.to_string(),
                );
                collection
                    .create_item(properties, &secret, true)
                    .await
                    .map_err(classify)
            })
            .await?;
            if no_prompt(&prompt) {
                Ok(())
            } else {
                dismiss(conn, &prompt).await;
                Err(SecretError::Locked)
            }
        })
        .await
    }

    /// Removes every spotok item from the default collection; none is not an error.
    pub async fn delete(&self) -> Result<(), SecretError> {
        self.with(async |conn| {
            let service = ServiceProxy::new(conn).await.map_err(classify)?;
            let collection = match unlocked_default(conn, &service).await {
                // No collection holds nothing to delete.
                Err(SecretError::NoCollection) => return Ok(()),
                other => other?,
            };
            let items = collection
                .search_items(HashMap::from(ATTRIBUTES))
                .await
                .map_err(classify)?;
            for path in items {
                let item = ItemProxy::builder(conn)
                    .path(path)
                    .map_err(classify)?
                    .cache_properties(CacheProperties::No)
                    .build()
                    .await
                    .map_err(classify)?;
                let prompt = item.delete().await.map_err(classify)?;
                if !no_prompt(&prompt) {
                    dismiss(conn, &prompt).await;
                    return Err(SecretError::Locked);
                }
            }
            Ok(())
        })
        .await
    }

    /// `Ok` when the default collection exists and is unlocked.
    pub async fn probe(&self) -> Result<(), SecretError> {
        self.with(async |conn| {
            let service = ServiceProxy::new(conn).await.map_err(classify)?;
            unlocked_default(conn, &service).await.map(drop)
        })
        .await
    }

    /// Signals after which the store may have become usable (or unusable): the provider
    /// appearing or leaving, a collection created, changed, locked or unlocked.
    pub async fn changes(&self) -> Result<Changes, SecretError> {
        let conn = self.connection().await?;
        let rules = [
            MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender("org.freedesktop.DBus")
                .and_then(|b| b.interface("org.freedesktop.DBus"))
                .and_then(|b| b.member("NameOwnerChanged"))
                .and_then(|b| b.arg(0, BUS_NAME))
                .map(zbus::match_rule::Builder::build),
            MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .interface("org.freedesktop.DBus.Properties")
                .and_then(|b| b.member("PropertiesChanged"))
                .and_then(|b| b.path_namespace(SERVICE_PATH))
                .and_then(|b| b.arg(0, "org.freedesktop.Secret.Collection"))
                .map(zbus::match_rule::Builder::build),
            MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .interface("org.freedesktop.Secret.Service")
                .and_then(|b| b.path(SERVICE_PATH))
                .map(zbus::match_rule::Builder::build),
        ];
        let mut streams = Vec::new();
        for rule in rules {
            let rule = rule.map_err(classify)?;
            streams.push(
                MessageStream::for_match_rule(rule, &conn, Some(16))
                    .await
                    .map_err(classify)?,
            );
        }
        Ok(Changes { streams })
    }
}

/// A stream of "look again" events from the bus.
#[derive(Debug)]
pub struct Changes {
    /// One per match rule.
    streams: Vec<MessageStream>,
}

impl Changes {
    /// Waits for the next relevant signal; `false` once the connection is gone.
    pub async fn next(&mut self) -> bool {
        poll_fn(|cx| {
            let mut open = false;
            for s in &mut self.streams {
                match Pin::new(s).poll_next(cx) {
                    std::task::Poll::Ready(Some(_)) => return std::task::Poll::Ready(true),
                    std::task::Poll::Ready(None) => {}
                    std::task::Poll::Pending => open = true,
                }
            }
            if open {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(false)
            }
        })
        .await
    }
}

/// The default collection, if it exists and is unlocked.
async fn unlocked_default<'c>(
    conn: &'c Connection,
    service: &ServiceProxy<'_>,
) -> Result<CollectionProxy<'c>, SecretError> {
    let path = service.read_alias("default").await.map_err(classify)?;
    if no_prompt(&path) {
        return Err(SecretError::NoCollection);
    }
    let collection = collection(conn, path).await?;
    if collection.locked().await.map_err(classify)? {
        return Err(SecretError::Locked);
    }
    Ok(collection)
}

async fn collection(
    conn: &Connection,
    path: OwnedObjectPath,
) -> Result<CollectionProxy<'_>, SecretError> {
    CollectionProxy::builder(conn)
        .path(path)
        .map_err(classify)?
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(classify)
}

/// Creates the default collection if the provider can do it without a prompt.
async fn create_default<'c>(
    conn: &'c Connection,
    service: &ServiceProxy<'_>,
) -> Result<CollectionProxy<'c>, SecretError> {
    let properties = HashMap::from([(
        "org.freedesktop.Secret.Collection.Label",
        Value::from("Login"),
    )]);
    let (path, prompt) = service
        .create_collection(properties, "default")
        .await
        .map_err(classify)?;
    if !no_prompt(&prompt) || no_prompt(&path) {
        dismiss(conn, &prompt).await;
        return Err(SecretError::NoCollection);
    }
    tracing::info!("created the default keyring collection {}", path.as_str());
    collection(conn, path).await
}

/// Runs `op` inside a `plain` session, closing the session afterwards whatever happened.
async fn in_session<T>(
    conn: &Connection,
    service: &ServiceProxy<'_>,
    op: impl AsyncFnOnce(&ObjectPath<'_>) -> Result<T, SecretError>,
) -> Result<T, SecretError> {
    let (_, session) = service
        .open_session("plain", &Value::from(""))
        .await
        .map_err(classify)?;
    let result = op(&session).await;
    let closed = async {
        SessionProxy::builder(conn)
            .path(session.clone())?
            .cache_properties(CacheProperties::No)
            .build()
            .await?
            .close()
            .await
    };
    if let Err(e) = closed.await {
        tracing::debug!("closing the Secret Service session failed: {e}");
    }
    result
}

/// Throws a prompt away without showing it.
async fn dismiss(conn: &Connection, prompt: &ObjectPath<'_>) {
    if no_prompt(prompt) {
        return;
    }
    let dismissed = async {
        PromptProxy::builder(conn)
            .path(prompt.to_owned())?
            .cache_properties(CacheProperties::No)
            .build()
            .await?
            .dismiss()
            .await
    };
    if let Err(e) = dismissed.await {
        tracing::debug!("dismissing a Secret Service prompt failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do_and_locked_is_recognisable() {
        assert!(SecretError::Locked
            .to_string()
            .starts_with("keyring is locked"));
        assert!(SecretError::NoProvider
            .to_string()
            .contains("store = \"file\""));
        assert!(SecretError::Locked.waitable());
        assert!(!SecretError::NoBus("x".into()).waitable());
        assert!(!SecretError::Damaged("x".into()).waitable());
    }

    #[test]
    fn secret_service_errors_are_classified() {
        let msg = zbus::message::Message::method_call("/", "Ping")
            .unwrap()
            .build(&())
            .unwrap();
        let locked = zbus::Error::MethodError(
            zbus::names::OwnedErrorName::try_from("org.freedesktop.Secret.Error.IsLocked").unwrap(),
            Some("Cannot delete a locked item".into()),
            msg.clone(),
        );
        assert_eq!(classify(locked), SecretError::Locked);
        let unknown = zbus::Error::MethodError(
            zbus::names::OwnedErrorName::try_from("org.freedesktop.DBus.Error.ServiceUnknown")
                .unwrap(),
            None,
            msg,
        );
        assert_eq!(classify(unknown), SecretError::NoProvider);
    }
}
