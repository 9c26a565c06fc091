//! spotokd: one Spotify login per user, and a current access token for any local program.
//!
//! # Layout
//! - [`config`]: `config.toml`, checked key by key.
//! - [`oauth`]: the two token POSTs and the classification of Spotify's answers.
//! - [`policy`]: when to refresh and how long to back off, as pure functions.
//! - [`clock`]: wall-clock time and a suspend-safe alarm.
//! - [`store`]: where the refresh token is kept (crash-safe file, Secret Service), which
//!   one is used, moving a login between them, waiting for a locked keyring.
//! - [`secret`]: the small Secret Service (keyring) client behind the `store`.
//! - [`manager`]: the single owner of the token state, and the [`manager::Handle`] to it.
//! - [`login`]: the Authorization Code login with PKCE and the loopback redirect.
//! - [`api`]: Web API calls (`whoami`).
//! - [`socket`]: the Unix socket: binding, peer checks, the NDJSON protocol.
//! - [`dbus`]: the D-Bus interface on the session bus, and the mirror of the state into signals.
//! - [`notify`]: desktop notifications when a login is needed or ends soon.
//! - [`sd`]: systemd readiness notification and socket activation.
//! - [`daemon`]: start-up, signals and shutdown, tying the rest together.

pub mod api;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod login;
pub mod manager;
pub mod notify;
pub mod oauth;
pub mod policy;
pub mod sd;
pub mod secret;
pub mod socket;
pub mod store;
