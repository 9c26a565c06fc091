//! One connection to spotokd: connect, hello, then request/reply lines. Synchronous on
//! purpose: `spotokctl get` is a process start, a connect, two short writes and two reads.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use spotok_proto::{ErrorKind, Reply, Request, PROTOCOL_VERSION};

use crate::Fail;

/// An open, greeted connection.
pub struct Conn {
    /// Buffered for reading lines; writes go to the same stream.
    stream: BufReader<UnixStream>,
    /// For messages.
    path: PathBuf,
    /// Reused for every line read.
    line: String,
}

impl Conn {
    /// Connects to `path` and exchanges hellos. `timeout` bounds every read.
    pub fn open(path: &Path, timeout: Option<Duration>) -> Result<Self, Fail> {
        Self::open_with(path, timeout, None).map(|(conn, _)| conn)
    }

    /// Like [`Conn::open`], and sends `first` in the same write as the hello, so a one-shot
    /// verb costs one round trip to spotokd instead of two. The daemon answers lines in
    /// order, so the hello's answer (or a refusal) still comes first.
    pub fn open_with(
        path: &Path,
        timeout: Option<Duration>,
        first: Option<&Request>,
    ) -> Result<(Self, Option<Reply>), Fail> {
        if let Some(dir) = path.parent().filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("spotok"))
        }) {
            let uid = rustix::process::getuid().as_raw();
            spotok_proto::paths::owned_by(dir, uid).map_err(|m| Fail::new(ErrorKind::Failed, m))?;
        }
        let stream = UnixStream::connect(path).map_err(|e| {
            Fail::new(
                ErrorKind::Unreachable,
                format!(
                    "spotokd is not running ({}: {e}): start it with `systemctl --user start \
                     spotokd` or `spotokd --daemonize`",
                    path.display()
                ),
            )
        })?;
        stream
            .set_read_timeout(timeout)
            .map_err(|e| Fail::new(ErrorKind::Failed, e.to_string()))?;
        let mut conn = Self {
            stream: BufReader::new(stream),
            path: path.into(),
            line: String::with_capacity(512),
        };
        let hello = Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: concat!("spotokctl ", env!("CARGO_PKG_VERSION")).into(),
        };
        let mut bytes = line(&hello)?;
        if let Some(first) = first {
            bytes.extend_from_slice(&line(first)?);
        }
        match conn.exchange(&bytes)? {
            Reply::Hello { protocol, .. } if protocol == PROTOCOL_VERSION => {
                let reply = first.map(|_| conn.read()).transpose()?;
                Ok((conn, reply))
            }
            Reply::Hello { protocol, version } => Err(Fail::new(
                ErrorKind::ProtocolMismatch,
                format!(
                    "spotokd {version} speaks protocol {protocol}, this spotokctl \
                     {PROTOCOL_VERSION}: install matching versions and restart spotokd"
                ),
            )),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request and reads its reply; an error reply becomes a [`Fail`].
    pub fn ask(&mut self, request: &Request) -> Result<Reply, Fail> {
        self.exchange(&line(request)?)
    }

    /// Writes request lines and reads the first reply.
    fn exchange(&mut self, bytes: &[u8]) -> Result<Reply, Fail> {
        let sent = self.stream.get_mut().write_all(bytes);
        match sent.map_err(|e| self.lost(&e)) {
            Ok(()) => self.read(),
            // spotokd may have refused the connection and said why before closing.
            Err(lost) => match self.read() {
                Err(said) if said.kind != ErrorKind::Unreachable => Err(said),
                _ => Err(lost),
            },
        }
    }

    /// Sends a request without reading.
    pub fn send(&mut self, request: &Request) -> Result<(), Fail> {
        let bytes = line(request)?;
        self.stream
            .get_mut()
            .write_all(&bytes)
            .map_err(|e| self.lost(&e))
    }

    /// Reads one reply; an error reply becomes a [`Fail`].
    pub fn read(&mut self) -> Result<Reply, Fail> {
        self.line.clear();
        match self.stream.read_line(&mut self.line) {
            Ok(0) => Err(Fail::new(
                ErrorKind::Unreachable,
                "spotokd closed the connection: is it stopping? check `systemctl --user status spotokd`",
            )),
            Ok(_) => match serde_json::from_str::<Reply>(&self.line) {
                Ok(Reply::Error { kind, message }) => Err(Fail::new(kind, message)),
                Ok(reply) => Ok(reply),
                Err(e) => Err(Fail::new(
                    ErrorKind::ProtocolMismatch,
                    format!("spotokd sent a reply this spotokctl does not understand ({e}): install matching versions"),
                )),
            },
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Err(Fail::new(
                    ErrorKind::Unavailable,
                    "timed out waiting for spotokd: try again later, or raise --timeout",
                ))
            }
            Err(e) => Err(self.lost(&e)),
        }
    }

    fn lost(&self, e: &std::io::Error) -> Fail {
        Fail::new(
            ErrorKind::Unreachable,
            format!(
                "lost the connection to spotokd at {}: {e}",
                self.path.display()
            ),
        )
    }
}

/// One request line, newline included.
fn line(request: &Request) -> Result<Vec<u8>, Fail> {
    let mut bytes =
        serde_json::to_vec(request).map_err(|e| Fail::new(ErrorKind::Failed, e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// A reply that does not fit the request.
pub fn unexpected(reply: &Reply) -> Fail {
    let name = serde_json::to_value(reply)
        .ok()
        .and_then(|v| v.get("reply").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_default();
    Fail::new(
        ErrorKind::ProtocolMismatch,
        format!("unexpected reply {name:?} from spotokd: install matching versions"),
    )
}
