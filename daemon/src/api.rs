//! Calls to the Spotify Web API made for `whoami`: the token is used where it lives, and a
//! `401 The access token expired` costs one forced refresh and one retry, never a loop.

use std::time::Duration;

use serde::Deserialize;
use spotok_proto::{ErrorKind, Reply};

use crate::manager::{Failure, Handle, Token};

/// The part of `GET /me` that `whoami` shows.
#[derive(Deserialize)]
struct Me {
    #[serde(default)]
    display_name: Option<String>,
    id: String,
}

/// `GET {api_url}/me`.
pub async fn whoami(handle: &Handle) -> Reply {
    match me(handle).await {
        Ok(me) => Reply::Me {
            display_name: me.display_name.unwrap_or_default(),
            id: me.id,
        },
        Err(f) => Reply::error(f.kind, f.message),
    }
}

async fn me(handle: &Handle) -> Result<Me, Failure> {
    let token = handle
        .token(Duration::from_secs(10), &[], Duration::from_secs(30))
        .await?;
    if let Some(me) = get_me(handle, &token).await? {
        return Ok(me);
    }
    let token = handle.refresh().await?;
    get_me(handle, &token).await?.ok_or_else(|| {
        Failure::new(
            ErrorKind::NeedsLogin,
            "Spotify refused a freshly refreshed token (401): run `spotokctl login`",
        )
    })
}

/// `Ok(None)` on a 401, for the caller to refresh once.
async fn get_me(handle: &Handle, token: &Token) -> Result<Option<Me>, Failure> {
    let api = handle.snapshot().config.api_url.clone();
    let url = format!("{}/me", api.as_str().trim_end_matches('/'));
    let fail = |kind, m: String| Failure::new(kind, m);
    let response = handle
        .http
        .get(&url)
        .bearer_auth(token.access.expose())
        .send()
        .await
        .map_err(|e| {
            fail(
                ErrorKind::Unavailable,
                format!("cannot reach the Web API: {e}"),
            )
        })?;
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    match status {
        200 => serde_json::from_slice(&body).map(Some).map_err(|e| {
            fail(
                ErrorKind::Failed,
                format!("unexpected answer from {url}: {e}"),
            )
        }),
        401 => Ok(None),
        403 => Err(fail(
            ErrorKind::InsufficientScope,
            "Spotify says the token may not read the profile (403): log in again with the \
             scopes you need (`spotokctl login --scope …`)"
                .into(),
        )),
        429 | 500..=599 => Err(fail(
            ErrorKind::Unavailable,
            format!("the Web API answered HTTP {status}: try again later"),
        )),
        _ => Err(fail(
            ErrorKind::Failed,
            format!("the Web API answered HTTP {status} for {url}"),
        )),
    }
}
