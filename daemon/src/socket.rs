//! The Unix socket: binding it safely, and serving the NDJSON protocol on it.
//!
//! [`bind`] makes the socket (folder 0700, socket 0600) under a lock file, so two daemons
//! can never both own one path, and refuses to evict a daemon that answers. [`serve`]
//! accepts connections under a bound ([`MAX_CONNECTIONS`]); each is handled by its own task
//! ([`Connection`]), which checks the peer's uid, reads lines of at most
//! [`MAX_LINE`] bytes, and closes after [`IDLE_TIMEOUT_SECS`] without a request.

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spotok_proto::wire::{IDLE_TIMEOUT_SECS, MAX_LINE};
use spotok_proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::manager::{Failure, Handle};
use crate::{clock, login};

/// At most this many connections are served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// File descriptors never given to connections: the daemon's own work (the login file, HTTPS
/// to Spotify, D-Bus, the login listener) must not fail with EMFILE because clients piled up.
const RESERVED_FDS: u64 = 64;

/// A socket this process created: removed again on drop, with the lock released.
#[derive(Debug)]
pub struct Owned {
    /// The socket's path.
    path: PathBuf,
    /// Held (flock) for the daemon's life; a second daemon fails to take it.
    _lock: File,
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another daemon serves this path.
    #[error("another spotokd is already serving {0}: stop it first (`systemctl --user stop spotokd`), or pick another --socket")]
    Taken(PathBuf),
    /// Anything else, with the step that failed.
    #[error("cannot set up the socket {path}: {message}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// Binds `path`, creating its folder 0700 when it is spotok's own (or missing).
pub fn bind(path: &Path, uid: u32) -> Result<(UnixListener, Owned), BindError> {
    let io = |message: String| BindError::Io {
        path: path.into(),
        message,
    };
    if let Some(dir) = path.parent() {
        let ours = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("spotok"));
        if ours || !dir.exists() {
            spotok_proto::paths::private_dir(dir, uid).map_err(io)?;
        }
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| io(format!("lock file: {e}")))?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(BindError::Taken(path.into()));
    }
    // Holding the lock, a leftover socket file can only be a dead daemon's, unless something
    // without our lock (systemd's spotokd.socket) is listening on it: ask before removing.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(BindError::Taken(path.into()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!("removed a stale socket left by a dead spotokd"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("cannot remove the stale socket: {e}"))),
    }
    let listener = UnixListener::bind(path).map_err(|e| io(format!("bind: {e}")))?;
    let owned = Owned {
        path: path.into(),
        _lock: lock,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io(format!("chmod 600: {e}")))?;
    Ok((listener, owned))
}

/// Accepts and serves connections until `shutdown` turns true, then waits (briefly) for
/// the connections to finish their current request.
pub async fn serve(listener: UnixListener, handle: Handle, mut shutdown: watch::Receiver<bool>) {
    let uid = rustix::process::getuid().as_raw();
    // systemd's default soft limit (1024) is below MAX_CONNECTIONS; extra clients wait in
    // the listen backlog rather than take the descriptors a refresh or a save needs.
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    let max = soft.map_or(MAX_CONNECTIONS, |n| {
        usize::try_from(n.saturating_sub(RESERVED_FDS))
            .map_or(MAX_CONNECTIONS, |n| n.clamp(1, MAX_CONNECTIONS))
    });
    let limit = Arc::new(Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let conn = Connection {
            handle: handle.clone(),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.run(stream, uid).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(1), limit.acquire_many(all)).await;
}

/// One client connection.
#[derive(Debug)]
struct Connection {
    /// To the token owner.
    handle: Handle,
    /// Turns true when the daemon stops.
    shutdown: watch::Receiver<bool>,
}

/// How reading a line ended.
enum Line {
    /// A complete line is in the buffer.
    Ready,
    /// The peer closed the connection.
    Eof,
    /// The line is longer than [`MAX_LINE`].
    TooLong,
}

impl Connection {
    async fn run(mut self, stream: UnixStream, uid: u32) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let peer = write.as_ref().peer_cred()?.uid();
        if peer != uid {
            tracing::warn!(peer, "refused a connection from another user");
            let reply = Reply::error(
                ErrorKind::Failed,
                format!("spotokd serves only uid {uid}; you are uid {peer}"),
            );
            return send(&mut write, &reply).await;
        }
        let mut read = BufReader::with_capacity(512, read);
        let mut line = Vec::with_capacity(256);
        let mut greeted = false;
        loop {
            line.clear();
            let idle = Duration::from_secs(IDLE_TIMEOUT_SECS);
            let got = tokio::select! {
                r = tokio::time::timeout(idle, read_line(&mut read, &mut line)) => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(()), // Idle too long.
                },
                _ = self.shutdown.changed() => return Ok(()),
            };
            let request = match got {
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    let reply = Reply::error(
                        ErrorKind::InvalidArgs,
                        format!("request longer than {MAX_LINE} bytes; closing"),
                    );
                    return send(&mut write, &reply).await;
                }
                Line::Ready => serde_json::from_slice::<Request>(&line),
            };
            let reply = match request {
                Err(e) => Reply::error(ErrorKind::InvalidArgs, format!("malformed request: {e}")),
                Ok(Request::Hello { protocol, client }) => {
                    if protocol != PROTOCOL_VERSION {
                        let reply = Reply::error(
                            ErrorKind::ProtocolMismatch,
                            format!(
                                "spotokd {} speaks protocol {PROTOCOL_VERSION}, {client} speaks \
                                 {protocol}: install matching versions and restart spotokd",
                                spotok_proto::VERSION
                            ),
                        );
                        return send(&mut write, &reply).await;
                    }
                    greeted = true;
                    Reply::Hello {
                        protocol: PROTOCOL_VERSION,
                        version: spotok_proto::VERSION.into(),
                    }
                }
                Ok(_) if !greeted => Reply::error(
                    ErrorKind::InvalidArgs,
                    "the first request must be a hello with the protocol version",
                ),
                Ok(Request::Watch) => return self.watch(read, write).await,
                Ok(request) => dispatch(&self.handle, request).await,
            };
            send(&mut write, &reply).await?;
        }
    }

    /// Streams a status line now and on every change, until the peer hangs up.
    async fn watch(
        mut self,
        mut read: BufReader<OwnedReadHalf>,
        mut write: OwnedWriteHalf,
    ) -> std::io::Result<()> {
        let mut snapshots = self.handle.subscribe();
        let mut last = None;
        loop {
            let status = snapshots.borrow_and_update().status();
            if last.as_ref() != Some(&status) {
                send(&mut write, &Reply::Status(status.clone())).await?;
                last = Some(status);
            }
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { return Ok(()) },
                // Anything the client sends, or its hang-up, ends the watch.
                _ = read.fill_buf() => return Ok(()),
                _ = self.shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// Answers one request after the hello.
async fn dispatch(handle: &Handle, request: Request) -> Reply {
    let token_reply = |r: Result<crate::manager::Token, Failure>, scopes: Vec<String>| match r {
        Ok(t) => Reply::Token {
            access_token: t.access,
            expires_at: clock::unix(t.expires_at),
            scopes,
        },
        Err(f) => Reply::error(f.kind, f.message),
    };
    let refreshed = |r: Result<crate::manager::Token, Failure>| match r {
        Ok(t) => Reply::Refreshed {
            expires_at: clock::unix(t.expires_at),
        },
        Err(f) => Reply::error(f.kind, f.message),
    };
    match request {
        Request::Get {
            min_valid_secs,
            scopes,
            wait_secs,
        } => {
            let r = handle
                .token(
                    Duration::from_secs(min_valid_secs),
                    &scopes,
                    Duration::from_secs(wait_secs),
                )
                .await;
            token_reply(r, handle.snapshot().scopes.clone())
        }
        Request::Status => Reply::Status(handle.snapshot().status()),
        Request::Refresh => refreshed(handle.refresh().await),
        Request::Import { refresh_token } => refreshed(handle.import(refresh_token).await),
        Request::Logout => match handle.logout().await {
            Ok(()) => Reply::Ok,
            Err(f) => Reply::error(f.kind, f.message),
        },
        Request::Login { client_id, scopes } => login::start(handle, client_id, scopes).await,
        Request::LoginWait => login::wait(handle).await,
        Request::LoginRedirect { url } => login::redirect(handle, &url).await,
        Request::Whoami => crate::api::whoami(handle).await,
        Request::Hello { .. } | Request::Watch => {
            Reply::error(ErrorKind::InvalidArgs, "unexpected request")
        }
    }
}

/// Reads up to a newline into `buf` (without it), refusing lines over [`MAX_LINE`].
async fn read_line(
    read: &mut BufReader<OwnedReadHalf>,
    buf: &mut Vec<u8>,
) -> std::io::Result<Line> {
    loop {
        let available = read.fill_buf().await?;
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        if let Some(i) = available.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&available[..i]);
            read.consume(i + 1);
            return Ok(if buf.len() >= MAX_LINE {
                Line::TooLong
            } else {
                Line::Ready
            });
        }
        let n = available.len();
        buf.extend_from_slice(available);
        read.consume(n);
        if buf.len() >= MAX_LINE {
            return Ok(Line::TooLong);
        }
    }
}

/// Writes one reply line.
async fn send(write: &mut OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}
