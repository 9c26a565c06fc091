//! Start-up, signals and shutdown.
//!
//! Start-up order: config, socket, stored login, then `READY=1`, so a client that sees the
//! socket accept also sees the login. Shutdown: `STOPPING=1`, stop accepting, let an
//! in-flight refresh finish and be saved (bounded), then remove the socket this process made.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::Config;
use crate::manager::Manager;
use crate::store::{FileStore, Selection};
use crate::{dbus, notify, sd, socket};

/// Where to listen.
#[derive(Debug)]
pub enum Listen {
    /// A socket passed by systemd; never unlinked by spotokd.
    Inherited(OwnedFd),
    /// A path to bind (and remove on exit).
    Path(PathBuf),
}

/// What `run` needs to know from the command line and the environment.
#[derive(Debug)]
pub struct Options {
    /// The config file.
    pub config: PathBuf,
    /// Where to listen.
    pub listen: Listen,
    /// The default state folder (`$XDG_STATE_HOME/spotok`).
    pub state_dir: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, where systemd puts `LoadCredential=` files.
    pub credentials: Option<PathBuf>,
}

/// A shutdown bounded by systemd's patience: an in-flight refresh gets this long to land.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// Runs the daemon until SIGTERM or SIGINT. `ready` is called once, when the socket is
/// bound and the stored login loaded; an error before that is returned, not passed to it.
pub async fn run(opts: Options, ready: impl FnOnce()) -> Result<(), String> {
    let uid = rustix::process::getuid().as_raw();
    let load = |path: &PathBuf| {
        Config::load(path, &opts.state_dir, opts.credentials.as_deref()).map_err(|e| e.to_string())
    };
    let config = load(&opts.config)?;

    let (listener, owned) = match opts.listen {
        Listen::Inherited(fd) => {
            let std = std::os::unix::net::UnixListener::from(fd);
            std.set_nonblocking(true).map_err(|e| e.to_string())?;
            let l = tokio::net::UnixListener::from_std(std).map_err(|e| e.to_string())?;
            tracing::info!("serving the socket passed by systemd");
            (l, None)
        }
        Listen::Path(path) => {
            let (l, owned) = socket::bind(&path, uid).map_err(|e| e.to_string())?;
            tracing::info!(socket = %path.display(), "listening");
            (l, Some(owned))
        }
    };

    let selection =
        Selection::choose(config.store, FileStore::new(config.state_dir.clone(), uid)).await;
    let loaded = selection.load().await.map_err(|e| e.0);
    if let Err(e) = &loaded {
        tracing::error!("{e}");
    }
    let http = reqwest::Client::builder()
        .user_agent(concat!("spotok/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        // One token request an hour: a kept-alive connection saves nothing and costs wake-ups
        // (hyper's idle-pool timer, the server closing it).
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| format!("cannot set up HTTPS: {e}"))?;
    let readable = loaded.is_ok();
    let (manager, handle, inboxes) = Manager::new(config, selection.store.clone(), http, loaded);
    let manager_task = tokio::spawn(manager.run(inboxes));
    selection.watch(&handle, readable);
    tokio::spawn(notify::run(handle.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let bus = tokio::spawn(dbus::serve(handle.clone(), stop_rx.clone()));
    let server = tokio::spawn(socket::serve(listener, handle.clone(), stop_rx));
    if let Some(every) = sd::watchdog() {
        tokio::spawn(async move {
            loop {
                sd::notify("WATCHDOG=1");
                tokio::time::sleep(every / 2).await;
            }
        });
    }

    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    sd::notify("READY=1");
    ready();

    loop {
        tokio::select! {
            _ = hup.recv() => {
                sd::notify_reloading();
                match load(&opts.config) {
                    Ok(config) => {
                        tracing::info!("config reloaded");
                        handle.reload(config).await;
                    }
                    Err(e) => tracing::error!("config not reloaded, keeping the old one: {e}"),
                }
                sd::notify("READY=1");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!("shutting down");
    sd::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, handle.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("a token request was still running at shutdown; it was abandoned");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), bus).await;
    manager_task.abort();
    drop(owned);
    Ok(())
}
