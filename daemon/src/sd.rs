//! The two systemd protocols spotokd speaks, without libsystemd: readiness notification
//! (`sd_notify`, a datagram to `$NOTIFY_SOCKET`) and socket activation (`$LISTEN_FDS`).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to the service manager, if there is one. Failures are
/// logged, never fatal: readiness is a courtesy to the supervisor.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("sd_notify {state:?} failed: {e}");
    }
}

/// `RELOADING=1` with the timestamp newer systemd wants alongside it.
pub fn notify_reloading() {
    let usec = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = usec.tv_sec as u64 * 1_000_000 + usec.tv_nsec as u64 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// The watchdog interval systemd asked for, if any.
#[must_use]
pub fn watchdog() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let pid_ok = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
    (pid_ok && usec > 0).then(|| std::time::Duration::from_micros(usec))
}

/// Takes the first socket systemd passed (`LISTEN_FDS`), if it was meant for this process.
/// Must run before any thread starts: it clears the variables so children do not inherit
/// them.
#[must_use]
pub fn take_listen_fd() -> Option<OwnedFd> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: by the sd_listen_fds protocol, fd 3 is an open socket handed to this process
    // (LISTEN_PID is ours), and nothing else in the process owns it: the variables are
    // removed above, so this runs at most once.
    #[allow(unsafe_code)]
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).ok()?;
    Some(fd)
}
