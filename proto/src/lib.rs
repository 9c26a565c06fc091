//! The contract between `spotokd` and its clients.
//!
//! # Layout
//! - [`wire`]: the newline-delimited JSON messages of the socket protocol, pinned by golden tests.
//! - [`error`]: [`ErrorKind`], which maps one-to-one to `spotokctl`'s exit codes and to the
//!   D-Bus error names.
//! - [`paths`]: where the config, the state and the socket live, and how to override them.
//! - [`duration`]: the `"90s"` / `"5m"` durations of the config and the CLI.
//! - [`secret`]: token newtypes whose `Debug` never shows the value.
//!
//! This crate has no async runtime and no D-Bus dependency, so the client stays small.

pub mod duration;
pub mod error;
pub mod paths;
pub mod secret;
pub mod wire;

pub use error::ErrorKind;
pub use secret::{AccessToken, RefreshToken};
pub use wire::{Reply, Request, State, Status, PROTOCOL_VERSION};

/// The crate version, reported by `status` on both sides.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// D-Bus names fixed by the spec.
pub mod dbus {
    /// The well-known bus name.
    pub const NAME: &str = "org.spotok.Spotokd";
    /// The object path.
    pub const PATH: &str = "/org/spotok/Spotokd";
    /// The interface name.
    pub const INTERFACE: &str = "org.spotok.Spotokd1";
    /// Prefix of every error name.
    pub const ERROR_PREFIX: &str = "org.spotok.Spotokd1.Error";
}
