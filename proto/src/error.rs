//! The small, stable set of error kinds. Each maps to exactly one exit code of `spotokctl` and
//! one D-Bus error name; the socket carries the `snake_case` name.

use serde::{Deserialize, Serialize};

/// Why a request failed, as far as a caller needs to know to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Anything else: a bad config, a failed write, an unexpected answer from Spotify.
    Failed,
    /// The request itself is wrong (bad argument, unknown verb, malformed line).
    InvalidArgs,
    /// spotokd is not reachable. Only the client produces it; never on the wire.
    Unreachable,
    /// There is no login, or Spotify refused the refresh token (`invalid_grant`).
    NeedsLogin,
    /// The login lacks a scope the caller asked for.
    InsufficientScope,
    /// No valid token, and the accounts service is failing: retry later.
    Unavailable,
    /// Client and daemon speak different protocol versions.
    ProtocolMismatch,
}

impl ErrorKind {
    /// Every kind, in exit-code order.
    pub const ALL: [ErrorKind; 7] = [
        Self::Failed,
        Self::InvalidArgs,
        Self::Unreachable,
        Self::NeedsLogin,
        Self::InsufficientScope,
        Self::Unavailable,
        Self::ProtocolMismatch,
    ];

    /// `spotokctl`'s exit code for this kind (SPEC: exit codes).
    #[must_use]
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Failed => 1,
            Self::InvalidArgs => 2,
            Self::Unreachable => 3,
            Self::NeedsLogin => 4,
            Self::InsufficientScope => 5,
            Self::Unavailable => 6,
            Self::ProtocolMismatch => 7,
        }
    }

    /// The last component of the D-Bus error name, under
    /// [`crate::dbus::ERROR_PREFIX`].
    #[must_use]
    pub fn dbus_name(self) -> &'static str {
        match self {
            Self::Failed => "Failed",
            Self::InvalidArgs => "InvalidArgs",
            Self::Unreachable => "Unreachable",
            Self::NeedsLogin => "NeedsLogin",
            Self::InsufficientScope => "InsufficientScope",
            Self::Unavailable => "Unavailable",
            Self::ProtocolMismatch => "ProtocolMismatch",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn exit_codes_are_the_spec_ones_and_distinct() {
        let codes: Vec<u8> = ErrorKind::ALL.iter().map(|k| k.exit_code()).collect();
        assert_eq!(codes, [1, 2, 3, 4, 5, 6, 7]);
        let names: HashSet<_> = ErrorKind::ALL.iter().map(|k| k.dbus_name()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }

    #[test]
    fn wire_names() {
        let json = serde_json::to_string(&ErrorKind::InsufficientScope).unwrap();
        assert_eq!(json, r#""insufficient_scope""#);
    }
}
