//! The Authorization Code login, run by the daemon so the refresh token never passes through
//! a client: PKCE (S256) and a random `state` per login, a loopback listener for the
//! redirect, and the same checks for a redirected URL pasted by the user.
//!
//! At most one login is pending. A redirect with a wrong `state`, a stray request or a
//! replay is answered with an error page and leaves the pending login waiting; only a
//! redirect with the right `state` ends it, with the code exchanged, or with Spotify's
//! `error=`. The stored login is replaced only once the new one has succeeded.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::{
    AuthUrl, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
};
use spotok_proto::{ErrorKind, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use url::Url;

use crate::clock;
use crate::config::Config;
use crate::manager::{oauth_client, Failure, Handle};
use crate::store::Login;

/// A login not finished within this time ends with an error.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);
/// The head of a request to the redirect listener may be this large.
const MAX_HEAD: usize = 16 * 1024;

/// The pending login, shared by the socket, D-Bus and the redirect listener.
#[derive(Debug, Clone, Default)]
pub struct Logins {
    /// The login waiting for its redirect, if any.
    pending: Arc<Mutex<Option<Pending>>>,
    /// The outcome of the latest login.
    outcome: Arc<Mutex<Option<Outcome>>>,
}

/// Where a login's result is published: `None` while it runs.
type Outcome = watch::Sender<Option<Result<(), Failure>>>;

/// What a pending login must remember to finish.
#[derive(Debug)]
struct Pending {
    /// The expected `state`.
    state: String,
    /// The PKCE verifier for the exchange.
    verifier: PkceCodeVerifier,
    /// The redirect URI sent in the authorize request, with the real port.
    redirect_uri: Url,
    /// Scopes asked for, in case the exchange answer does not say.
    scopes: Vec<String>,
    /// Where the outcome goes.
    outcome: Outcome,
    /// The redirect listener; aborted when the login ends or is replaced.
    listener: tokio::task::JoinHandle<()>,
}

impl Logins {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pending>> {
        // A panic while holding this lock is a bug; the data (an Option) stays consistent.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts a login: writes `client_id` to a config that has none, binds the redirect
/// listener, and answers with the authorize URL.
pub async fn start(handle: &Handle, client_id: Option<String>, extra: Vec<String>) -> Reply {
    match begin(handle, client_id, extra).await {
        Ok((url, redirect_uri)) => Reply::LoginStarted { url, redirect_uri },
        Err(f) => Reply::error(f.kind, f.message),
    }
}

/// [`start`] for D-Bus: the URL, or why not.
pub async fn begin(
    handle: &Handle,
    client_id: Option<String>,
    extra: Vec<String>,
) -> Result<(String, String), Failure> {
    let mut config = handle.snapshot().config.clone();
    if let Some(id) = client_id {
        config = Arc::new(set_client_id(&config, &id)?);
        handle.reload((*config).clone()).await;
    }
    let Some(client_id) = config.client_id.clone() else {
        return Err(Failure::new(
            ErrorKind::InvalidArgs,
            format!(
                "no client_id yet: create an app at https://developer.spotify.com/dashboard, \
                 add the redirect URI {} to it, then run `spotokctl login --client-id ID`",
                config.redirect_uri
            ),
        ));
    };
    let scopes: Vec<String> = config
        .scopes
        .iter()
        .chain(&extra)
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    // A newer login replaces a pending one (say, of a `spotokctl login` that was interrupted).
    // Its listener must be gone before binding, or a fixed redirect port would be "in use".
    let old = handle.logins.lock().take();
    if let Some(old) = old {
        old.listener.abort();
        let _ = old.listener.await;
        old.outcome.send_replace(Some(Err(Failure::new(
            ErrorKind::Failed,
            "replaced by a newer login",
        ))));
    }
    let (listener, redirect_uri) = bind_redirect(&config).await?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let client = oauth2::basic::BasicClient::new(ClientId::new(client_id))
        .set_auth_uri(AuthUrl::from_url(config.auth_url.clone()))
        .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()));
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes.iter().cloned().map(Scope::new));
    if config.client_secret.is_none() {
        request = request.set_pkce_challenge(challenge);
    }
    let (url, state) = request.url();

    let (outcome, _) = watch::channel(None);
    let serve = tokio::spawn(listen(listener, handle.clone()));
    let pending = Pending {
        state: state.secret().clone(),
        verifier,
        redirect_uri: redirect_uri.clone(),
        scopes,
        outcome: outcome.clone(),
        listener: serve,
    };
    if let Some(racing) = handle.logins.lock().replace(pending) {
        // Two logins started at once: the later one wins.
        racing.listener.abort();
        racing.outcome.send_replace(Some(Err(Failure::new(
            ErrorKind::Failed,
            "replaced by a newer login",
        ))));
    }
    *handle
        .logins
        .outcome
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
    tracing::info!(redirect_uri = %redirect_uri, "login started");
    Ok((url.to_string(), redirect_uri.to_string()))
}

/// Binds the loopback listener for the configured redirect URI (any free port when it has
/// none) and returns the URI with the real port.
async fn bind_redirect(config: &Config) -> Result<(TcpListener, Url), Failure> {
    let uri = &config.redirect_uri;
    let host = match uri.host() {
        Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip),
        _ => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    };
    let port = uri.port().unwrap_or(0);
    let listener = TcpListener::bind((host, port)).await.map_err(|e| {
        Failure::new(
            ErrorKind::Failed,
            format!(
                "cannot listen on {uri} for the login redirect ({e}): free port {port}, or set \
                 another redirect_uri in {} and register it in your Spotify app",
                config.path.display()
            ),
        )
    })?;
    let mut real = uri.clone();
    if port == 0 {
        let bound = listener
            .local_addr()
            .map_err(|e| Failure::new(ErrorKind::Failed, e.to_string()))?
            .port();
        // Setting a port on an http URL with a host cannot fail.
        let _ = real.set_port(Some(bound));
    }
    Ok((listener, real))
}

/// Writes `client_id` into the config file, which must not have one. Creates the file 0600.
fn set_client_id(config: &Config, id: &str) -> Result<Config, Failure> {
    let id = id.trim();
    match config.client_id.as_deref() {
        Some(old) if old == id => return Ok(config.clone()),
        Some(old) => {
            return Err(Failure::new(
                ErrorKind::InvalidArgs,
                format!(
                    "{} already has client_id {old}: edit it there to change it",
                    config.path.display()
                ),
            ))
        }
        None => {}
    }
    let fail = |e: String| Failure::new(ErrorKind::Failed, e);
    let path = &config.path;
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fail(format!("cannot read {}: {e}", path.display()))),
    };
    let text = format!("client_id = {}\n{old}", toml_string(id));
    // Check the result before writing anything: a bad id must not damage the config.
    let new = Config::parse(&text, path, &config.state_dir, None)
        .map_err(|e| Failure::new(ErrorKind::InvalidArgs, e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "client_id written to the config");
    Ok(Config {
        client_secret: config.client_secret.clone(),
        ..new
    })
}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Waits until the pending login ends.
pub async fn wait(handle: &Handle) -> Reply {
    let rx = handle
        .logins
        .outcome
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map(watch::Sender::subscribe);
    let Some(mut rx) = rx else {
        return Reply::error(
            ErrorKind::InvalidArgs,
            "no login is running: run `spotokctl login`",
        );
    };
    let outcome = rx.wait_for(Option::is_some).await.map(|o| o.clone());
    match outcome {
        Ok(Some(Ok(()))) => Reply::Status(handle.snapshot().status()),
        Ok(Some(Err(f))) => Reply::error(f.kind, f.message),
        _ => Reply::error(ErrorKind::Failed, "the login was abandoned"),
    }
}

/// Completes the pending login from a redirected URL pasted by the user.
pub async fn redirect(handle: &Handle, url: &str) -> Reply {
    match finish(handle, url.trim()).await {
        Ok(()) => Reply::Status(handle.snapshot().status()),
        Err(f) => Reply::error(f.kind, f.message),
    }
}

/// Checks a redirect against the pending login and, if it is the one, ends the login.
/// Errors that leave the login pending (stray, wrong state) are returned without ending it.
async fn finish(handle: &Handle, url: &str) -> Result<(), Failure> {
    let bad = |m: String| Failure::new(ErrorKind::InvalidArgs, m);
    let url = Url::parse(url).map_err(|e| {
        bad(format!(
            "that is not the redirected URL ({e}): paste the whole address from the browser's \
             address bar"
        ))
    })?;
    let params: std::collections::HashMap<String, String> =
        url.query_pairs().into_owned().collect();
    let pending = {
        let mut slot = handle.logins.lock();
        let Some(p) = slot.as_ref() else {
            return Err(bad("no login is waiting: run `spotokctl login`".into()));
        };
        if url.path() != p.redirect_uri.path() {
            return Err(bad(format!(
                "that URL's path is {}, not the redirect path {}",
                url.path(),
                p.redirect_uri.path()
            )));
        }
        if params.get("state").map(String::as_str) != Some(p.state.as_str()) {
            tracing::warn!("refused a login redirect with a wrong state");
            return Err(bad(
                "the redirect's state does not match this login (an old or forged link): \
                 the login is still waiting for the right one"
                    .into(),
            ));
        }
        // The right state: this redirect ends the login, and a replay finds nothing pending.
        slot.take()
            .ok_or_else(|| bad("no login is waiting".into()))?
    };
    pending.listener.abort();
    let result = exchange(handle, &pending, &params).await;
    match &result {
        Ok(()) => tracing::info!("login succeeded"),
        Err(f) => tracing::warn!("login failed: {}", f.message),
    }
    pending.outcome.send_replace(Some(result.clone()));
    result
}

async fn exchange(
    handle: &Handle,
    pending: &Pending,
    params: &std::collections::HashMap<String, String>,
) -> Result<(), Failure> {
    if let Some(error) = params.get("error") {
        let hint = if error == "access_denied" {
            "you declined access in the browser; run `spotokctl login` to try again".to_string()
        } else {
            format!("Spotify ended the login with error={error}; check the app's settings")
        };
        return Err(Failure::new(
            ErrorKind::Failed,
            format!("login failed: {hint}"),
        ));
    }
    let code = params
        .get("code")
        .ok_or_else(|| Failure::new(ErrorKind::Failed, "the redirect carries no code"))?;
    let config = handle.snapshot().config.clone();
    let client = oauth_client(&config, &handle.http)?;
    let grant = client
        .exchange(
            code,
            pending.redirect_uri.as_str(),
            pending.verifier.secret(),
        )
        .await
        .map_err(|e| {
            Failure::new(
                ErrorKind::Failed,
                format!("Spotify refused the login code: {e}; run `spotokctl login` again"),
            )
        })?;
    let Some(refresh_token) = grant.refresh_token.clone() else {
        return Err(Failure::new(
            ErrorKind::Failed,
            "Spotify's answer to the login carries no refresh token",
        ));
    };
    let login = Login {
        refresh_token,
        client_id: config.client_id.clone().unwrap_or_default(),
        token_url: config.token_url.to_string(),
        login_at: clock::unix(clock::now()),
        scopes: grant
            .scopes
            .clone()
            .unwrap_or_else(|| pending.scopes.clone()),
    };
    handle.adopt(login, grant).await.map(|_| ())
}

/// Serves the redirect listener until the login ends (the task is aborted) or times out.
async fn listen(listener: TcpListener, handle: Handle) {
    let deadline = tokio::time::sleep(LOGIN_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(answer(stream, handle.clone()));
                }
            }
            () = &mut deadline => {
                if let Some(p) = handle.logins.lock().take() {
                    p.outcome.send_replace(Some(Err(Failure::new(
                        ErrorKind::Failed,
                        "the login timed out after 10 minutes: run `spotokctl login` again",
                    ))));
                }
                return;
            }
        }
    }
}

/// Answers one browser request on the redirect listener.
async fn answer(mut stream: TcpStream, handle: Handle) {
    let Ok(Some(target)) = tokio::time::timeout(Duration::from_secs(10), read_target(&mut stream))
        .await
        .map(Result::ok)
        .map(Option::flatten)
    else {
        return;
    };
    let local = stream.local_addr().ok();
    let host = match local {
        Some(std::net::SocketAddr::V6(a)) => format!("[{}]:{}", a.ip(), a.port()),
        Some(a) => a.to_string(),
        None => "127.0.0.1".into(),
    };
    let (status, title, body) = if target.starts_with("/favicon") {
        ("404 Not Found", "spotok", "Nothing here.".to_string())
    } else {
        match finish(&handle, &format!("http://{host}{target}")).await {
            Ok(()) => (
                "200 OK",
                "spotok: logged in",
                "You are logged in to Spotify. You can close this tab.".to_string(),
            ),
            Err(f) => ("400 Bad Request", "spotok: login problem", f.message),
        }
    };
    let html = format!(
        "<!doctype html><meta charset=utf-8><title>{title}</title>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{}</p>",
        escape(&body)
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{html}",
        html.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads a request head and returns the target of a GET.
async fn read_target(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.lines().next().unwrap_or("").split(' ');
    Ok(match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) if target.starts_with('/') => Some(target.to_string()),
        _ => None,
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
