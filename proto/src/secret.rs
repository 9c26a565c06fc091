//! Token newtypes. Their `Debug` is redacted, and they have no `Display`, so a token can only
//! reach output through an explicit [`AccessToken::expose`] / [`RefreshToken::expose`].

use serde::{Deserialize, Serialize};

macro_rules! secret {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a token value.
            #[must_use]
            pub fn new(value: String) -> Self {
                Self(value)
            }

            /// The value itself, for the few places that must send it somewhere.
            #[must_use]
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "(<{} bytes>)"), self.0.len())
            }
        }
    };
}

secret!(
    /// A Spotify access token (`BQ…`), valid for about an hour.
    AccessToken
);
secret!(
    /// A Spotify refresh token (`AQ…`): the key to the user's account.
    RefreshToken
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let t = AccessToken::new("BQsecretvalue".into());
        assert_eq!(format!("{t:?}"), "AccessToken(<13 bytes>)");
        let r = RefreshToken::new("AQsecret".into());
        assert!(!format!("{r:?}").contains("secret"));
    }

    #[test]
    fn serializes_as_a_plain_string() {
        let t = AccessToken::new("BQx".into());
        assert_eq!(serde_json::to_string(&t).unwrap(), r#""BQx""#);
    }
}
