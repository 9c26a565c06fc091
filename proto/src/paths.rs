//! Where things live (SPEC: Paths). Every function takes the environment as a lookup so the
//! rules are testable without touching the process environment.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "SPOTOK_CONFIG";
/// Environment variable naming the socket.
pub const SOCKET_ENV: &str = "SPOTOK_SOCKET";
/// File name of the socket inside its folder.
pub const SOCKET_NAME: &str = "spotokd.sock";

/// A variable, ignoring empty and relative values as the XDG base directory spec asks.
fn absolute(env: &dyn Fn(&str) -> Option<OsString>, name: &str) -> Option<PathBuf> {
    env(name).map(PathBuf::from).filter(|p| p.is_absolute())
}

fn home_or(env: &dyn Fn(&str) -> Option<OsString>, xdg: &str, fallback: &str) -> PathBuf {
    absolute(env, xdg).unwrap_or_else(|| {
        absolute(env, "HOME")
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(fallback)
    })
}

/// `config.toml`: the override, else `$SPOTOK_CONFIG`, else `$XDG_CONFIG_HOME/spotok/config.toml`.
pub fn config_file(env: &dyn Fn(&str) -> Option<OsString>, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| env(CONFIG_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| home_or(env, "XDG_CONFIG_HOME", ".config").join("spotok/config.toml"))
}

/// The state folder: `$XDG_STATE_HOME/spotok`, else `~/.local/state/spotok`.
pub fn state_dir(env: &dyn Fn(&str) -> Option<OsString>) -> PathBuf {
    home_or(env, "XDG_STATE_HOME", ".local/state").join("spotok")
}

/// Where the socket is: the flag, else `$SPOTOK_SOCKET`, else `$XDG_RUNTIME_DIR/spotok/spotokd.sock`,
/// else `/tmp/spotok-$UID/spotokd.sock`.
pub fn socket(env: &dyn Fn(&str) -> Option<OsString>, flag: Option<&Path>, uid: u32) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| env(SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| match absolute(env, "XDG_RUNTIME_DIR") {
            Some(run) => run.join("spotok").join(SOCKET_NAME),
            None => PathBuf::from(format!("/tmp/spotok-{uid}")).join(SOCKET_NAME),
        })
}

/// Creates `dir` (and its parents) with mode 0700 if it is missing, then checks that it is a
/// folder owned by `uid` that nobody else can enter. A folder another user made in `/tmp`
/// is refused, never adopted.
pub fn private_dir(dir: &Path, uid: u32) -> Result<(), String> {
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder: remove it", dir.display()));
    }
    check_owner(dir, &meta, uid)?;
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private (chmod 700): {e}", dir.display()))?;
    }
    Ok(())
}

/// Checks, without creating anything, that an existing folder belongs to `uid`: a client
/// must not hand a refresh token to a socket someone else planted.
pub fn owned_by(dir: &Path, uid: u32) -> Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => check_owner(dir, &meta, uid),
        Err(_) => Ok(()), // Missing: connecting will fail with "not running".
    }
}

fn check_owner(dir: &Path, meta: &std::fs::Metadata, uid: u32) -> Result<(), String> {
    if meta.uid() == uid {
        Ok(())
    } else {
        Err(format!(
            "{} belongs to uid {}, not to you (uid {uid}): refusing to use it; \
             remove it or set SPOTOK_SOCKET",
            dir.display(),
            meta.uid()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn xdg_locations() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_CONFIG_HOME", "/c"),
            ("XDG_STATE_HOME", "/s"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]);
        assert_eq!(config_file(&e, None), Path::new("/c/spotok/config.toml"));
        assert_eq!(state_dir(&e), Path::new("/s/spotok"));
        assert_eq!(
            socket(&e, None, 1000),
            Path::new("/run/user/1000/spotok/spotokd.sock")
        );
    }

    #[test]
    fn home_fallbacks_and_relative_xdg_ignored() {
        let e = env(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "rel")]);
        assert_eq!(
            config_file(&e, None),
            Path::new("/home/u/.config/spotok/config.toml")
        );
        assert_eq!(state_dir(&e), Path::new("/home/u/.local/state/spotok"));
        assert_eq!(
            socket(&e, None, 42),
            Path::new("/tmp/spotok-42/spotokd.sock")
        );
    }

    #[test]
    fn overrides_win() {
        let e = env(&[
            ("SPOTOK_CONFIG", "/x.toml"),
            ("SPOTOK_SOCKET", "/y.sock"),
            ("XDG_RUNTIME_DIR", "/run"),
        ]);
        assert_eq!(config_file(&e, None), Path::new("/x.toml"));
        assert_eq!(config_file(&e, Some(Path::new("/f"))), Path::new("/f"));
        assert_eq!(socket(&e, None, 1), Path::new("/y.sock"));
        assert_eq!(socket(&e, Some(Path::new("/z")), 1), Path::new("/z"));
    }

    #[test]
    fn private_dir_creates_0700_and_tightens() {
        let tmp = std::env::temp_dir().join(format!("spotok-proto-test-{}", std::process::id()));
        let dir = tmp.join("a/b");
        let uid = std::fs::metadata(std::env::temp_dir())
            .map(|_| ())
            .map(|()| {
                std::fs::create_dir_all(&tmp).unwrap();
                std::fs::metadata(&tmp).unwrap().uid()
            });
        let uid = uid.unwrap();
        private_dir(&dir, uid).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir, uid).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let err = private_dir(&dir, uid + 1).unwrap_err();
        assert!(err.contains("refusing"), "{err}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
