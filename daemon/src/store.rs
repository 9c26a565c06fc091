//! Where the login (the refresh token and what is known about it) is kept.
//!
//! [`Store`] puts the backends behind one face. The file backend is crash-safe: a temp file
//! written and fsynced, renamed over the old one, then the folder fsynced, so after a crash
//! the file holds either the old login or the new one, never a torn mix, and a failed write
//! leaves the old one in place.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use spotok_proto::wire::StoreKind;
use spotok_proto::RefreshToken;

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
        sync_dir(&self.dir).map_err(|e| fail("fsync", e))
    }

    /// Removes the login; no login is not an error.
    pub fn delete(&self) -> Result<(), StoreError> {
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

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The store in use.
#[derive(Debug, Clone)]
pub enum Store {
    /// The 0600 file.
    File(FileStore),
}

impl Store {
    /// Which kind, for `status`.
    #[must_use]
    pub fn kind(&self) -> StoreKind {
        match self {
            Self::File(_) => StoreKind::File,
        }
    }

    /// Reads the login.
    pub async fn load(&self) -> Result<Option<Login>, StoreError> {
        match self {
            Self::File(f) => blocking(f.clone(), FileStore::load).await,
        }
    }

    /// Replaces the login durably.
    pub async fn save(&self, login: &Login) -> Result<(), StoreError> {
        match self {
            Self::File(f) => {
                let login = login.clone();
                blocking(f.clone(), move |f| f.save(&login)).await
            }
        }
    }

    /// Forgets the login.
    pub async fn delete(&self) -> Result<(), StoreError> {
        match self {
            Self::File(f) => blocking(f.clone(), FileStore::delete).await,
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
