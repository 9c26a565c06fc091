//! The two token POSTs Spotify knows (code exchange and refresh), and the classification of
//! every answer into a grant, a transient failure, or a final one.
//!
//! The requests are plain `reqwest` rather than `oauth2`'s client: `oauth2`'s error type drops
//! the response headers, and a 429's `Retry-After` is exactly what must not be lost.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use spotok_proto::{AccessToken, RefreshToken};
use url::Url;

use crate::config::ClientSecret;

/// A successful token response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The new access token.
    pub access_token: AccessToken,
    /// Its lifetime as Spotify states it.
    pub expires_in: Duration,
    /// A new refresh token, if Spotify rotated it; `None` keeps the old one.
    pub refresh_token: Option<RefreshToken>,
    /// The granted scopes, if the response says.
    pub scopes: Option<Vec<String>>,
}

/// Why a token request did not produce a grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Worth retrying later: network, timeout, 408, 429, 5xx, a body that is not the JSON
    /// Spotify sends.
    #[error("{reason}")]
    Transient {
        /// For people and `LastError`.
        reason: String,
        /// The server's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// `invalid_grant`: the refresh token (or code) is dead. Final.
    #[error("Spotify refused the login (invalid_grant: {0})")]
    InvalidGrant(String),
    /// `invalid_client` or another 4xx: the config is wrong; retrying will not help until
    /// it changes.
    #[error("{0}")]
    Config(String),
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone)]
#[allow(clippy::struct_field_names)] // `client_id` is Spotify's name for it.
pub struct Client {
    /// Shared connection pool.
    http: reqwest::Client,
    /// The token endpoint.
    token_url: Url,
    /// The app's client id.
    client_id: String,
    /// With a secret: HTTP Basic; without: PKCE public client (`client_id` in the body).
    secret: Option<ClientSecret>,
}

/// Spotify's token JSON.
#[derive(Deserialize)]
struct TokenJson {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    expires_in: u64,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

/// Spotify's error JSON on the accounts service.
#[derive(Deserialize)]
struct ErrorJson {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl Client {
    /// A client for `token_url` with the app's credentials.
    #[must_use]
    pub fn new(
        http: reqwest::Client,
        token_url: Url,
        client_id: String,
        secret: Option<ClientSecret>,
    ) -> Self {
        Self {
            http,
            token_url,
            client_id,
            secret,
        }
    }

    /// `grant_type=refresh_token`.
    pub async fn refresh(&self, token: &RefreshToken) -> Result<Grant, TokenError> {
        self.post(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", token.expose()),
        ])
        .await
    }

    /// `grant_type=authorization_code`; `verifier` is the PKCE code verifier (public client).
    pub async fn exchange(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Grant, TokenError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
        ];
        if self.secret.is_none() {
            form.push(("code_verifier", verifier));
        }
        self.post(&form).await
    }

    async fn post(&self, form: &[(&str, &str)]) -> Result<Grant, TokenError> {
        let mut request = self
            .http
            .post(self.token_url.clone())
            .header("content-type", "application/x-www-form-urlencoded");
        let body = {
            let mut body = url::form_urlencoded::Serializer::new(String::new());
            body.extend_pairs(form);
            match &self.secret {
                Some(secret) => {
                    request = request.basic_auth(&self.client_id, Some(secret.expose()));
                }
                None => {
                    body.append_pair("client_id", &self.client_id);
                }
            }
            body.finish()
        };
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| TokenError::Transient {
                reason: format!("cannot reach {}: {}", host(&self.token_url), describe(&e)),
                retry_after: None,
            })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|e| TokenError::Transient {
            reason: format!("reading the answer failed: {}", describe(&e)),
            retry_after: None,
        })?;
        classify(status, &headers, &body)
    }
}

fn host(url: &Url) -> String {
    url.host_str().unwrap_or("the token endpoint").to_string()
}

/// reqwest's error with its sources, which carry the useful part ("connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Turns a token endpoint's answer into a grant or a classified error.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8]) -> Result<Grant, TokenError> {
    let transient = |reason: String| TokenError::Transient {
        reason,
        retry_after: retry_after(headers),
    };
    match status {
        200 => {
            let json: TokenJson = serde_json::from_slice(body).map_err(|_| {
                transient("Spotify answered 200 without the expected token JSON".into())
            })?;
            if json
                .token_type
                .as_deref()
                .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
            {
                return Err(transient(format!(
                    "unexpected token_type {:?}",
                    json.token_type.unwrap_or_default()
                )));
            }
            Ok(Grant {
                access_token: AccessToken::new(json.access_token),
                // Spotify says 3600; the cap keeps a broken answer from overflowing the clock.
                expires_in: Duration::from_secs(json.expires_in.min(86_400)),
                refresh_token: json
                    .refresh_token
                    .filter(|t| !t.is_empty())
                    .map(RefreshToken::new),
                scopes: json
                    .scope
                    .map(|s| s.split_whitespace().map(str::to_string).collect()),
            })
        }
        408 | 429 | 500..=599 => Err(transient(format!("Spotify answered HTTP {status}"))),
        _ => match serde_json::from_slice::<ErrorJson>(body) {
            Ok(e) if e.error == "invalid_grant" => Err(TokenError::InvalidGrant(
                e.error_description
                    .unwrap_or_else(|| "no description".into()),
            )),
            Ok(e) if e.error == "invalid_client" => Err(TokenError::Config(format!(
                "Spotify says the client is invalid (invalid_client: {}): check client_id and \
                 the client secret in the config",
                e.error_description.unwrap_or_default()
            ))),
            Ok(e) => Err(TokenError::Config(format!(
                "Spotify refused the request (HTTP {status}, {}: {})",
                e.error,
                e.error_description.unwrap_or_default()
            ))),
            Err(_) if (400..500).contains(&status) => Err(TokenError::Config(format!(
                "Spotify refused the request (HTTP {status}) without an error body: check \
                 token_url in the config"
            ))),
            Err(_) => Err(transient(format!("unexpected HTTP {status} from Spotify"))),
        },
    }
}

/// `Retry-After` in seconds (what Spotify sends); an HTTP-date is not expected and ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(retry: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(r) = retry {
            h.insert(RETRY_AFTER, HeaderValue::from_str(r).unwrap());
        }
        h
    }

    #[test]
    fn success_without_rotation_keeps_no_refresh_token() {
        let body =
            br#"{"access_token":"BQa","token_type":"Bearer","expires_in":3600,"scope":"a b"}"#;
        let g = classify(200, &headers(None), body).unwrap();
        assert_eq!(g.access_token.expose(), "BQa");
        assert_eq!(g.expires_in, Duration::from_secs(3600));
        assert_eq!(g.refresh_token, None);
        assert_eq!(g.scopes, Some(vec!["a".into(), "b".into()]));
    }

    #[test]
    fn success_with_rotation() {
        let body = br#"{"access_token":"BQa","token_type":"Bearer","expires_in":3600,"refresh_token":"AQn"}"#;
        let g = classify(200, &headers(None), body).unwrap();
        assert_eq!(g.refresh_token.unwrap().expose(), "AQn");
        assert_eq!(g.scopes, None);
    }

    #[test]
    fn transient_statuses_and_retry_after() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    classify(status, &headers(None), b""),
                    Err(TokenError::Transient { .. })
                ),
                "{status}"
            );
        }
        let e = classify(429, &headers(Some("3")), b"").unwrap_err();
        assert_eq!(
            e,
            TokenError::Transient {
                reason: "Spotify answered HTTP 429".into(),
                retry_after: Some(Duration::from_secs(3))
            }
        );
        let e = classify(503, &headers(Some("Wed, 21 Oct 2015 07:28:00 GMT")), b"").unwrap_err();
        assert!(matches!(
            e,
            TokenError::Transient {
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn garbage_200_is_transient() {
        let e = classify(200, &headers(None), b"<html>oops</html>").unwrap_err();
        assert!(matches!(e, TokenError::Transient { .. }));
    }

    #[test]
    fn invalid_grant_is_final_and_invalid_client_is_config() {
        let body = br#"{"error":"invalid_grant","error_description":"Refresh token revoked"}"#;
        assert_eq!(
            classify(400, &headers(None), body),
            Err(TokenError::InvalidGrant("Refresh token revoked".into()))
        );
        let body = br#"{"error":"invalid_client","error_description":"Invalid client"}"#;
        let e = classify(400, &headers(None), body).unwrap_err();
        assert!(matches!(&e, TokenError::Config(m) if m.contains("invalid_client")));
        assert!(matches!(
            classify(404, &headers(None), b"not found"),
            Err(TokenError::Config(_))
        ));
    }
}
