//! Where the login (the refresh token and what is known about it) is kept.
//!
//! [`Store`] puts the backends behind one face. The file backend is crash-safe: a temp file
//! written and fsynced, renamed over the old one, then the folder fsynced, so after a crash
//! the file holds either the old login or the new one, never a torn mix, and a failed write
//! leaves the old one in place. The Secret Service backend is [`crate::secret`].
//!
//! [`Selection`] picks the backend at start-up (the `store` key), moves a login left in the
//! other backend over once, and for the keyring watches for it to become usable: a locked
//! keyring is reported and waited for, never replaced by a plaintext file.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::{Deserialize, Serialize};
use spotok_proto::wire::StoreKind;
use spotok_proto::RefreshToken;

use crate::config::StoreChoice;
use crate::manager::Handle;
use crate::secret::{self, SecretError, SecretStore};

/// A stored login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// The key to the account.
    pub refresh_token: RefreshToken,
    /// The app it belongs to: a refresh token is useless with another client id.
    pub client_id: String,
    /// The token endpoint it was issued by, for the same reason.
    pub token_url: String,
    /// When the user logged in (Unix seconds); the login dies six months later.
    pub login_at: u64,
    /// Scopes granted at login, updated by refreshes that report them.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// A store operation that failed. The message names the place and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// The login file in the state folder.
#[derive(Debug, Clone)]
pub struct FileStore {
    /// The folder (0700).
    dir: PathBuf,
    /// The uid that must own the folder.
    uid: u32,
}

/// File name of the login record inside the state folder.
pub const LOGIN_FILE: &str = "login.json";

impl FileStore {
    /// A store in `dir`, created 0700 on first write.
    #[must_use]
    pub fn new(dir: PathBuf, uid: u32) -> Self {
        Self { dir, uid }
    }

    /// The login file's path.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        self.dir.join(LOGIN_FILE)
    }

    /// Reads the login; `None` when there is none.
    pub fn load(&self) -> Result<Option<Login>, StoreError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError(format!("cannot read {}: {e}", path.display()))),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StoreError(format!(
                "{} is damaged ({e}); it was left as it is: move it away and log in again",
                path.display()
            ))
        })
    }

    /// Replaces the login durably: temp file, fsync, rename, fsync of the folder.
    pub fn save(&self, login: &Login) -> Result<(), StoreError> {
        let fail = |what: &str, e: std::io::Error| {
            StoreError(format!(
                "cannot save the login in {}: {what}: {e}",
                self.dir.display()
            ))
        };
        spotok_proto::paths::private_dir(&self.dir, self.uid).map_err(StoreError)?;
        let json = serde_json::to_vec(login).map_err(|e| StoreError(e.to_string()))?;
        let tmp = self
            .dir
            .join(format!(".{LOGIN_FILE}.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail("write", e));
        }
        if let Err(e) = std::fs::rename(&tmp, self.path()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail("rename", e));
        }
        sweep_temps(&self.dir);
        sync_dir(&self.dir).map_err(|e| fail("fsync", e))
    }

    /// Removes the login; no login is not an error.
    pub fn delete(&self) -> Result<(), StoreError> {
        sweep_temps(&self.dir);
        match std::fs::remove_file(self.path()) {
            Ok(()) => sync_dir(&self.dir)
                .map_err(|e| StoreError(format!("cannot sync {}: {e}", self.dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError(format!(
                "cannot remove {}: {e}",
                self.path().display()
            ))),
        }
    }
}

/// Removes the temp files of saves that a crash cut short: each may hold a refresh token, and
/// a later daemon (another pid) would never reuse its name.
fn sweep_temps(dir: &Path) {
    let prefix = format!(".{LOGIN_FILE}.");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The store in use.
#[derive(Debug, Clone)]
pub enum Store {
    /// The 0600 file.
    File(FileStore),
    /// The desktop keyring (`org.freedesktop.secrets`).
    SecretService(SecretStore),
}

impl Store {
    /// Which kind, for `status`.
    #[must_use]
    pub fn kind(&self) -> StoreKind {
        match self {
            Self::File(_) => StoreKind::File,
            Self::SecretService(_) => StoreKind::SecretService,
        }
    }

    /// Where the login is, for log lines.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::File(f) => f.path().display().to_string(),
            Self::SecretService(_) => "the keyring (Secret Service)".into(),
        }
    }

    /// Reads the login.
    pub async fn load(&self) -> Result<Option<Login>, StoreError> {
        match self {
            Self::File(f) => blocking(f.clone(), FileStore::load).await,
            Self::SecretService(s) => s.load().await.map_err(keyring_error),
        }
    }

    /// Replaces the login durably.
    pub async fn save(&self, login: &Login) -> Result<(), StoreError> {
        match self {
            Self::File(f) => {
                let login = login.clone();
                blocking(f.clone(), move |f| f.save(&login)).await
            }
            Self::SecretService(s) => s.save(login).await.map_err(keyring_error),
        }
    }

    /// Forgets the login.
    pub async fn delete(&self) -> Result<(), StoreError> {
        match self {
            Self::File(f) => blocking(f.clone(), FileStore::delete).await,
            Self::SecretService(s) => s.delete().await.map_err(|e| match e {
                SecretError::Locked => StoreError(
                    "keyring is locked: the login is removed from it as soon as it is unlocked"
                        .into(),
                ),
                other => keyring_error(other),
            }),
        }
    }
}

#[allow(clippy::needless_pass_by_value)] // used as `map_err(keyring_error)`
fn keyring_error(e: SecretError) -> StoreError {
    StoreError(e.to_string())
}

/// The store chosen at start-up (SPEC: the `store` key), and the other backend, when it can
/// be reached, so a login left there is moved over once.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The store in use, for the whole life of the daemon.
    pub store: Store,
    /// The backend not in use, looked at once for a login to move.
    pub other: Option<Store>,
}

impl Selection {
    /// Chooses the store: `auto` takes the Secret Service when a provider owns
    /// `org.freedesktop.secrets` on the session bus now, else the file; `secret-service` takes
    /// only it, reachable or not (never a plaintext fallback); `file` takes the file.
    pub async fn choose(choice: StoreChoice, file: FileStore) -> Self {
        match choice {
            StoreChoice::SecretService => Self {
                store: Store::SecretService(SecretStore::new(None)),
                other: Some(Store::File(file)),
            },
            StoreChoice::Auto => {
                if let Some(conn) = secret::running_provider().await {
                    tracing::info!("a Secret Service provider is running: using the keyring");
                    Self {
                        store: Store::SecretService(SecretStore::new(Some(conn))),
                        other: Some(Store::File(file)),
                    }
                } else {
                    tracing::info!(
                        "no Secret Service provider on the session bus: the login is kept in {}",
                        file.path().display()
                    );
                    Self {
                        store: Store::File(file),
                        other: None,
                    }
                }
            }
            StoreChoice::File => Self {
                store: Store::File(file),
                // Only a provider that is running: `store = "file"` must not start a keyring.
                other: secret::running_provider()
                    .await
                    .map(|conn| Store::SecretService(SecretStore::new(Some(conn)))),
            },
        }
    }

    /// Loads the login, moving it over from the other backend when only that one has it
    /// (written to the new store first, then removed from the old, so a crash in between
    /// leaves two copies, never none). When both have one, the store in use wins and the copy
    /// in the other is removed: one login, one place.
    pub async fn load(&self) -> Result<Option<Login>, StoreError> {
        let found = self.store.load().await?;
        let Some(other) = &self.other else {
            return Ok(found);
        };
        let old = match other.load().await {
            Ok(old) => old,
            Err(e) => {
                tracing::info!("{} was not searched for a login to move: {e}", other.name());
                return Ok(found);
            }
        };
        match (found, old) {
            (found, None) => Ok(found),
            (None, Some(old)) => {
                self.store.save(&old).await.map_err(|e| {
                    StoreError(format!(
                        "cannot move the login from {} to {}: {e}",
                        other.name(),
                        self.store.name()
                    ))
                })?;
                tracing::info!(
                    "moved the login from {} to {}",
                    other.name(),
                    self.store.name()
                );
                if let Err(e) = other.delete().await {
                    tracing::warn!(
                        "the login was copied to {} but not removed from {}: {e}",
                        self.store.name(),
                        other.name()
                    );
                }
                Ok(Some(old))
            }
            (Some(found), Some(_)) => {
                tracing::warn!(
                    "{} also holds a login, which is not used (the store in use is {}); removing it",
                    other.name(),
                    self.store.name()
                );
                if let Err(e) = other.delete().await {
                    tracing::warn!("cannot remove the unused login from {}: {e}", other.name());
                }
                Ok(Some(found))
            }
        }
    }

    /// For the Secret Service: spawns the task that hands the manager the stored login each
    /// time the keyring becomes usable (unlocked, created, its provider started). `readable`
    /// says whether the first [`Selection::load`] succeeded.
    pub fn watch(self, handle: &Handle, readable: bool) {
        if let Store::SecretService(keyring) = &self.store {
            tokio::spawn(watch_keyring(
                keyring.clone(),
                self,
                handle.clone(),
                readable,
            ));
        }
    }
}

/// The first wait between looks at a keyring that cannot be used yet (signals usually end
/// the wait sooner); doubled up to [`WATCH_BACKOFF_MAX`]. Only while it cannot be used.
const WATCH_BACKOFF_MIN: Duration = Duration::from_secs(5);
/// The longest wait between looks at an unusable keyring whose provider sends no signals.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What the keyring watcher last saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Unlocked, its login handed to the manager: wait for signals only.
    Usable,
    /// Locked, missing or its provider gone: signals, plus a slow poll in case none come.
    Waiting,
    /// Broken in a way no signal announces the end of (a damaged item, no bus): signals only.
    Stuck,
}

/// Waits for the keyring to become usable and hands the manager what it holds, again after
/// every lock/unlock. Wakes only on Secret Service signals, plus a slow poll (with backoff)
/// while the keyring is locked or missing.
async fn watch_keyring(keyring: SecretStore, selection: Selection, handle: Handle, readable: bool) {
    let mut backoff = WATCH_BACKOFF_MIN;
    let mut changes = None;
    let mut seen = if readable {
        Seen::Usable
    } else {
        Seen::Waiting
    };
    loop {
        if changes.is_none() {
            match keyring.changes().await {
                Ok(c) => changes = Some(c),
                Err(e) => tracing::debug!("cannot watch the keyring: {e}"),
            }
        }
        if seen != Seen::Usable {
            seen = match keyring.probe().await {
                Err(e) => {
                    tracing::debug!("waiting for the keyring: {e}");
                    if e.waitable() {
                        Seen::Waiting
                    } else {
                        Seen::Stuck
                    }
                }
                Ok(()) => match selection.load().await {
                    Ok(login) => {
                        tracing::info!("the keyring can be used now");
                        backoff = WATCH_BACKOFF_MIN;
                        handle.store_opened(login).await;
                        Seen::Usable
                    }
                    Err(e) => {
                        tracing::debug!("the keyring is open, its login is not usable: {e}");
                        Seen::Stuck
                    }
                },
            };
        }
        let signalled = match (&mut changes, seen) {
            (Some(c), Seen::Waiting) => tokio::select! {
                s = c.next() => s,
                () = tokio::time::sleep(backoff) => true,
            },
            (Some(c), _) => c.next().await,
            (None, Seen::Waiting) => {
                tokio::time::sleep(backoff).await;
                true
            }
            // Usable but unwatchable: a failed save is retried by the manager on its own.
            (None, Seen::Usable) => std::future::pending().await,
            (None, Seen::Stuck) => {
                tracing::debug!("cannot watch the keyring; its error stands until a restart");
                return;
            }
        };
        if !signalled {
            tracing::debug!("lost the keyring's signals; looking again");
            changes = None;
            seen = Seen::Waiting;
            // A connection that dies again at once must not become a busy loop.
            tokio::time::sleep(backoff).await;
        } else if seen == Seen::Usable {
            if let Err(e) = keyring.probe().await {
                tracing::debug!("the keyring cannot be used now: {e}");
                seen = Seen::Waiting;
            }
        }
        if seen == Seen::Waiting {
            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
        }
    }
}

/// Runs file I/O (fsync can take a while) off the async workers.
async fn blocking<T: Send + 'static>(
    store: FileStore,
    op: impl FnOnce(&FileStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(|e| StoreError(format!("store task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn login(token: &str) -> Login {
        Login {
            refresh_token: RefreshToken::new(token.into()),
            client_id: "cid".into(),
            token_url: "http://127.0.0.1/api/token".into(),
            login_at: 1_800_000_000,
            scopes: vec!["streaming".into()],
        }
    }

    fn uid(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().uid()
    }

    #[test]
    fn save_load_delete_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().join("state/spotok"), uid(tmp.path()));
        assert_eq!(store.load().unwrap(), None);
        store.save(&login("AQ1")).unwrap();
        assert_eq!(store.load().unwrap(), Some(login("AQ1")));
        let dir_mode = std::fs::metadata(tmp.path().join("state/spotok"))
            .unwrap()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(store.path()).unwrap().mode() & 0o777,
            0o600
        );
        store.save(&login("AQ2")).unwrap();
        assert_eq!(store.load().unwrap(), Some(login("AQ2")));
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("state/spotok"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [LOGIN_FILE]);
        store.delete().unwrap();
        store.delete().unwrap();
        assert_eq!(store.load().unwrap(), None);
    }

    #[test]
    fn a_failed_write_keeps_the_old_login() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let store = FileStore::new(dir.clone(), uid(tmp.path()));
        store.save(&login("AQ1")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).unwrap();
        // root ignores permissions; only check the outcome where the write really failed.
        if store.save(&login("AQ2")).is_err() {
            assert_eq!(store.load().unwrap(), Some(login("AQ1")));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_damaged_file_is_reported_not_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::new(tmp.path().to_path_buf(), uid(tmp.path()));
        std::fs::write(store.path(), "{not json").unwrap();
        let e = store.load().unwrap_err();
        assert!(e.0.contains("damaged"), "{e}");
        assert!(store.path().exists());
    }
}
