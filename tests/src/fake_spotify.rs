//! A fake Spotify Accounts service plus a sliver of the Web API, for black-box tests.
//!
//! [`FakeSpotify::start`] binds `127.0.0.1:0` (loopback only) and serves plain
//! HTTP/1.1 from a background thread, one thread per connection, closing every
//! connection after its response (`Connection: close`). It speaks Spotify's wire
//! format:
//!
//! * `POST /api/token` — the Accounts token endpoint. Form-encoded
//!   (`application/x-www-form-urlencoded`) `grant_type=refresh_token` and
//!   `grant_type=authorization_code` (PKCE or HTTP Basic client
//!   authentication). Errors are `{"error":…,"error_description":…}`.
//! * `GET /authorize` — the consent page, reduced to an immediate
//!   `303 See Other` back to `redirect_uri` with `code` (or `error`) and `state`.
//! * `GET /v1/me` — the current user's profile, guarded by a bearer access
//!   token. Errors are `{"error":{"status":…,"message":…}}`.
//!
//! Tests steer it with scripted responses ([`FakeSpotify::push`],
//! [`FakeSpotify::push_api`]) and knobs (rotation, lifetimes, delays, a
//! confidential client), and inspect everything it saw and issued afterwards.
//!
//! Tokens look like Spotify's: access tokens are `BQ` and refresh tokens and
//! authorization codes `AQ`, each followed by 40 lowercase hex digits that are
//! unique per process, so tests can grep logs for them.
//!
//! Dropping the [`FakeSpotify`] stops accepting connections; requests already
//! being answered (for example sleeping in [`FakeSpotify::set_delay`]) finish on
//! their own threads.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use url::{form_urlencoded, Url};

/// Longest request line plus headers accepted, in bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted, in bytes.
const MAX_BODY: usize = 1024 * 1024;
/// How long a connection may sit idle before the server gives up on it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A running fake Spotify. See the [module documentation](self).
///
/// Every method takes `&self`, so the fake can be shared with other threads by
/// reference (for example from [`std::thread::scope`]).
#[derive(Debug)]
pub struct FakeSpotify {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

/// One `POST /api/token` request as received, before any script or delay applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// When the request had been read completely.
    pub at: Instant,
    /// The decoded form fields (a repeated field keeps its last value). Parsed
    /// from the body whatever the `Content-Type` said.
    pub form: BTreeMap<String, String>,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The raw `Content-Type` header, if any.
    pub content_type: Option<String>,
}

impl TokenRequest {
    /// The value of form field `name`, if present.
    #[must_use]
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.get(name).map(String::as_str)
    }
}

/// One request under `/v1` as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    /// The HTTP method, e.g. `GET`.
    pub method: String,
    /// The request target: the path plus `?query` when there was one, e.g. `/v1/me`.
    pub path: String,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// A canned answer for the next `POST /api/token`, queued with [`FakeSpotify::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scripted {
    /// An arbitrary status and body, optionally with a `Retry-After: N` header.
    /// The `Content-Type` is `application/json` when the body parses as JSON,
    /// `text/plain` otherwise, and absent when the body is empty.
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body, sent verbatim.
        body: String,
        /// Seconds for a `Retry-After` header, if any.
        retry_after: Option<u64>,
    },
    /// `400 {"error":"invalid_grant","error_description":"<desc>"}`. Revokes nothing.
    InvalidGrant(&'static str),
    /// `400 {"error":"invalid_client","error_description":"Invalid client"}`.
    InvalidClient,
    /// `429` with `Retry-After: N` and an empty body, as Spotify sends it.
    TooMany {
        /// Seconds for the `Retry-After` header.
        retry_after: u64,
    },
    /// Read the request, then close the connection without answering.
    Drop,
    /// `200` with an HTML body that is not JSON.
    Garbage,
}

impl Scripted {
    /// `status` with an empty body and no `Retry-After`, e.g. `Scripted::status(503)`.
    #[must_use]
    pub fn status(status: u16) -> Self {
        Self::status_body(status, "")
    }

    /// `status` with `body` and no `Retry-After`.
    #[must_use]
    pub fn status_body(status: u16, body: impl Into<String>) -> Self {
        Self::Status {
            status,
            body: body.into(),
            retry_after: None,
        }
    }

    /// `429` with `Retry-After: retry_after` and an empty body.
    #[must_use]
    pub fn too_many(retry_after: u64) -> Self {
        Self::TooMany { retry_after }
    }

    fn into_reply(self) -> Reply {
        let response = match self {
            Self::Status {
                status,
                body,
                retry_after,
            } => {
                let response = Response::sniffed(status, body);
                match retry_after {
                    Some(secs) => response.with_header("Retry-After", secs.to_string()),
                    None => response,
                }
            }
            Self::InvalidGrant(description) => invalid_grant(description),
            Self::InvalidClient => invalid_client(),
            Self::TooMany { retry_after } => {
                Response::empty(429).with_header("Retry-After", retry_after.to_string())
            }
            Self::Drop => return Reply::Hang,
            Self::Garbage => Response {
                status: 200,
                content_type: Some("text/html; charset=utf-8"),
                headers: Vec::new(),
                body: "<html><body><h1>Something went wrong</h1></body></html>".to_owned(),
            },
        };
        Reply::Respond(response)
    }
}

impl FakeSpotify {
    /// Binds `127.0.0.1:0` and starts serving on a background thread.
    ///
    /// Panics if the loopback socket or the thread cannot be created: a test
    /// fixture has nothing sensible to fall back to.
    #[must_use]
    pub fn start() -> Self {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("fake spotify: bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("fake spotify: address of a bound listener");
        let state = Arc::new(Mutex::new(State::new(addr.port())));
        let stop = Arc::new(AtomicBool::new(false));
        let server = thread::Builder::new()
            .name("fake-spotify".to_owned())
            .spawn({
                let state = Arc::clone(&state);
                let stop = Arc::clone(&stop);
                move || accept_loop(&listener, &state, &stop)
            })
            .expect("fake spotify: spawn server thread");
        Self {
            addr,
            state,
            stop,
            server: Some(server),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint: [`base_url`](Self::base_url) + `/api/token`.
    #[must_use]
    pub fn token_url(&self) -> String {
        format!("{}/api/token", self.base_url())
    }

    /// The authorization endpoint: [`base_url`](Self::base_url) + `/authorize`.
    #[must_use]
    pub fn auth_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }

    /// The Web API root: [`base_url`](Self::base_url) + `/v1`.
    #[must_use]
    pub fn api_url(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// Registers a valid refresh token (as if a user had logged in); returns it.
    #[must_use]
    pub fn issue_refresh_token(&self) -> String {
        self.lock().issue_refresh_token()
    }

    /// Queues a scripted response for `POST /api/token`. Each request pops the
    /// front of the queue (after being recorded); when the queue is empty the
    /// endpoint behaves normally. A scripted response touches no token state.
    pub fn push(&self, response: Scripted) {
        self.lock().token_script.push_back(response);
    }

    /// Turns refresh-token rotation on or off (default off, as Spotify mostly
    /// does today). When on, every successful refresh returns a new
    /// `refresh_token` and revokes the one presented, which then gets
    /// `invalid_grant` "Refresh token revoked".
    pub fn set_rotation(&self, on: bool) {
        self.lock().rotation = on;
    }

    /// Lifetime, in seconds, of access tokens issued from now on (default 3600).
    /// `0` issues tokens that `/v1/me` already considers expired.
    pub fn set_expires_in(&self, secs: u64) {
        self.lock().expires_in = secs;
    }

    /// Delay before answering every token request, scripted or not (default none).
    /// The request is recorded before the delay; other connections are not held up.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// The space-separated `scope` returned on refresh (default `""`). A code
    /// exchange instead returns the scope asked for at `/authorize`.
    pub fn set_scope(&self, scope: &str) {
        scope.clone_into(&mut self.lock().scope);
    }

    /// Makes the client confidential: from now on token requests must carry
    /// `Authorization: Basic base64(id:secret)` and no `client_id` form field,
    /// otherwise they get `400 invalid_client` "Invalid client".
    pub fn set_client_secret(&self, id: &str, secret: &str) {
        self.lock().client = Some((id.to_owned(), secret.to_owned()));
    }

    /// Every `POST /api/token` received, in arrival order.
    #[must_use]
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.lock().token_requests.clone()
    }

    /// How many `POST /api/token` requests have been received.
    #[must_use]
    pub fn token_request_count(&self) -> usize {
        self.lock().token_requests.len()
    }

    /// Every access token ever issued, oldest first.
    #[must_use]
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.lock().issued_access.clone()
    }

    /// Every refresh token ever issued (by [`issue_refresh_token`](Self::issue_refresh_token),
    /// code exchange or rotation), oldest first.
    #[must_use]
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.lock().issued_refresh.clone()
    }

    /// Invalidates every refresh token issued so far (as when the user removes
    /// the app's access); presenting one gets `invalid_grant` "Invalid refresh
    /// token". Access tokens stay valid until they expire.
    pub fn revoke_all(&self) {
        for status in self.lock().refresh_tokens.values_mut() {
            if *status == RefreshStatus::Valid {
                *status = RefreshStatus::Revoked;
            }
        }
    }

    /// The query parameters of every `GET /authorize`, in arrival order.
    #[must_use]
    pub fn authorize_requests(&self) -> Vec<BTreeMap<String, String>> {
        self.lock().authorize_requests.clone()
    }

    /// When `Some(error)`, `/authorize` redirects with `?error=<error>&state=…`
    /// (e.g. `access_denied`) instead of issuing a code; `None` restores codes.
    pub fn set_authorize_error(&self, error: Option<&str>) {
        self.lock().authorize_error = error.map(str::to_owned);
    }

    /// The profile `/v1/me` returns (default "Test User" / "testuser").
    pub fn set_me(&self, display_name: &str, id: &str) {
        self.lock().me = (display_name.to_owned(), id.to_owned());
    }

    /// Queues a scripted response for the next request under `/v1`, which is
    /// still recorded. The `Content-Type` is `application/json` when `body`
    /// parses as JSON, `text/plain` otherwise, and absent when it is empty.
    pub fn push_api(&self, status: u16, body: &str) {
        self.lock().api_script.push_back((status, body.to_owned()));
    }

    /// Every request under `/v1`, in arrival order.
    #[must_use]
    pub fn api_requests(&self) -> Vec<ApiRequest> {
        self.lock().api_requests.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for FakeSpotify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag. Should the connection fail,
        // the loop may never wake up, so leave the thread be rather than hang.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(5)).is_ok() {
            if let Some(server) = self.server.take() {
                // A panic in the server thread has already been reported on stderr.
                let _ = server.join();
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().expect("fake spotify lock")
}

/// Accepts connections until `stop` is set, each served on its own thread.
fn accept_loop(listener: &TcpListener, state: &Arc<Mutex<State>>, stop: &AtomicBool) {
    for connection in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = connection else {
            // Transient (e.g. out of file descriptors): back off, keep serving.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let state = Arc::clone(state);
        // Without a thread the connection is dropped, as an overloaded server would.
        let _ = thread::Builder::new()
            .name("fake-spotify-conn".to_owned())
            .spawn(move || serve(&stream, &state));
    }
}

/// Reads one request from `stream`, answers it, and lets the caller close it.
fn serve(stream: &TcpStream, state: &Mutex<State>) {
    // Best effort: without timeouts a stuck client only costs this one thread.
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let reply = match read_request(stream) {
        Ok(request) => route(state, &request),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            Reply::Respond(Response::text(400, "Bad Request"))
        }
        Err(_) => return,
    };
    if let Reply::Respond(response) = reply {
        // The client may already have gone away; there is nobody to tell.
        let _ = response.write_to(&mut &*stream);
    }
}

fn route(state: &Mutex<State>, request: &Request) -> Reply {
    let response = match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/api/token") => return token_endpoint(state, request),
        (_, "/api/token") => Response::text(405, "Method Not Allowed").with_header("Allow", "POST"),
        ("GET", "/authorize") => lock(state).authorize(&parse_form(request.query.as_bytes())),
        (_, path) if path == "/v1" || path.starts_with("/v1/") => lock(state).api(request),
        _ => Response::text(404, "Not Found"),
    };
    Reply::Respond(response)
}

/// `POST /api/token`: record, pop the script, wait out the delay, then answer.
fn token_endpoint(state: &Mutex<State>, request: &Request) -> Reply {
    let record = TokenRequest {
        at: Instant::now(),
        form: parse_form(&request.body),
        authorization: request.header("authorization").map(str::to_owned),
        content_type: request.header("content-type").map(str::to_owned),
    };
    let (scripted, delay) = {
        let mut state = lock(state);
        state.token_requests.push(record.clone());
        (state.token_script.pop_front(), state.delay)
    };
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    match scripted {
        Some(scripted) => scripted.into_reply(),
        None => Reply::Respond(lock(state).grant(&record)),
    }
}

/// What became of a refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshStatus {
    Valid,
    /// Replaced by a newer token while rotation was on.
    Rotated,
    /// Invalidated by [`FakeSpotify::revoke_all`].
    Revoked,
}

/// An access token's validity window.
#[derive(Debug, Clone, Copy)]
struct AccessGrant {
    issued: Instant,
    lifetime: Duration,
}

/// What `/authorize` remembered about a code it issued.
#[derive(Debug, Clone)]
struct PendingCode {
    client_id: String,
    redirect_uri: String,
    /// The S256 `code_challenge`, when the client used PKCE.
    challenge: Option<String>,
    scope: String,
}

/// Everything the fake knows, behind one mutex.
#[derive(Debug)]
struct State {
    port: u16,
    // Knobs.
    rotation: bool,
    expires_in: u64,
    delay: Duration,
    scope: String,
    /// `(client_id, client_secret)` of a confidential client.
    client: Option<(String, String)>,
    /// `(display_name, id)` for `/v1/me`.
    me: (String, String),
    authorize_error: Option<String>,
    // Scripts.
    token_script: VecDeque<Scripted>,
    api_script: VecDeque<(u16, String)>,
    // Grants.
    refresh_tokens: HashMap<String, RefreshStatus>,
    access_tokens: HashMap<String, AccessGrant>,
    codes: HashMap<String, PendingCode>,
    // Logs.
    token_requests: Vec<TokenRequest>,
    authorize_requests: Vec<BTreeMap<String, String>>,
    api_requests: Vec<ApiRequest>,
    issued_access: Vec<String>,
    issued_refresh: Vec<String>,
}

impl State {
    fn new(port: u16) -> Self {
        Self {
            port,
            rotation: false,
            expires_in: 3600,
            delay: Duration::ZERO,
            scope: String::new(),
            client: None,
            me: ("Test User".to_owned(), "testuser".to_owned()),
            authorize_error: None,
            token_script: VecDeque::new(),
            api_script: VecDeque::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            codes: HashMap::new(),
            token_requests: Vec::new(),
            authorize_requests: Vec::new(),
            api_requests: Vec::new(),
            issued_access: Vec::new(),
            issued_refresh: Vec::new(),
        }
    }

    fn issue_access_token(&mut self) -> String {
        let token = mint("BQ", self.port);
        let grant = AccessGrant {
            issued: Instant::now(),
            lifetime: Duration::from_secs(self.expires_in),
        };
        self.access_tokens.insert(token.clone(), grant);
        self.issued_access.push(token.clone());
        token
    }

    fn issue_refresh_token(&mut self) -> String {
        let token = mint("AQ", self.port);
        self.refresh_tokens
            .insert(token.clone(), RefreshStatus::Valid);
        self.issued_refresh.push(token.clone());
        token
    }

    /// The normal (unscripted) answer to a token request.
    fn grant(&mut self, request: &TokenRequest) -> Response {
        // Spotify parses only form bodies; anything else looks like no grant_type.
        let is_form = request.content_type.as_deref().is_some_and(|value| {
            let mime = value.split_once(';').map_or(value, |(mime, _)| mime);
            mime.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
        let grant_type = if is_form {
            request.field("grant_type")
        } else {
            None
        };
        if !matches!(grant_type, Some("refresh_token" | "authorization_code")) {
            return oauth_error(
                400,
                "unsupported_grant_type",
                "grant_type parameter is missing",
            );
        }
        let client_id = match self.authenticate(request) {
            Ok(Some(client_id)) => client_id,
            Ok(None) => return invalid_client(),
            Err(response) => return response,
        };
        if grant_type == Some("refresh_token") {
            self.refresh_grant(request)
        } else {
            self.code_grant(request, &client_id)
        }
    }

    /// The client's id: Basic credentials when a secret is configured, else the
    /// `client_id` field or, failing that, the Basic user name.
    fn authenticate(&self, request: &TokenRequest) -> Result<Option<String>, Response> {
        let basic = request.authorization.as_deref().and_then(parse_basic);
        let body_id = request.field("client_id");
        match &self.client {
            Some((id, secret)) => {
                let authenticated = body_id.is_none()
                    && basic
                        .as_ref()
                        .is_some_and(|(got_id, got_secret)| got_id == id && got_secret == secret);
                if authenticated {
                    Ok(Some(id.clone()))
                } else {
                    Err(invalid_client())
                }
            }
            None => Ok(body_id.map(str::to_owned).or(basic.map(|(id, _)| id))),
        }
    }

    fn refresh_grant(&mut self, request: &TokenRequest) -> Response {
        let Some(presented) = request.field("refresh_token") else {
            return oauth_error(400, "invalid_request", "refresh_token must be supplied");
        };
        match self.refresh_tokens.get(presented) {
            Some(RefreshStatus::Valid) => {}
            Some(RefreshStatus::Rotated) => return invalid_grant("Refresh token revoked"),
            Some(RefreshStatus::Revoked) | None => return invalid_grant("Invalid refresh token"),
        }
        let access_token = self.issue_access_token();
        let mut body = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        });
        if self.rotation {
            let refresh_token = self.issue_refresh_token();
            self.refresh_tokens
                .insert(presented.to_owned(), RefreshStatus::Rotated);
            body["refresh_token"] = Value::String(refresh_token);
        }
        Response::json(200, &body)
    }

    /// `grant_type=authorization_code`. A code is used up by any attempt to
    /// redeem it, successful or not.
    fn code_grant(&mut self, request: &TokenRequest, client_id: &str) -> Response {
        let Some(code) = request.field("code") else {
            return oauth_error(400, "invalid_request", "code must be supplied");
        };
        let Some(pending) = self.codes.remove(code) else {
            return invalid_grant("Invalid authorization code");
        };
        if request.field("redirect_uri") != Some(pending.redirect_uri.as_str()) {
            return invalid_grant("Invalid redirect URI");
        }
        if client_id != pending.client_id {
            return invalid_client();
        }
        let basic_auth = request
            .authorization
            .as_deref()
            .and_then(parse_basic)
            .is_some();
        match (&pending.challenge, request.field("code_verifier")) {
            (Some(challenge), Some(verifier)) if pkce_challenge(verifier) == *challenge => {}
            // A public client must prove possession with PKCE.
            (None, None) if basic_auth => {}
            (None, None) => return invalid_client(),
            _ => return invalid_grant("code_verifier was incorrect"),
        }
        let access_token = self.issue_access_token();
        let refresh_token = self.issue_refresh_token();
        Response::json(
            200,
            &json!({
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "refresh_token": refresh_token,
                "scope": pending.scope,
            }),
        )
    }

    /// `GET /authorize`: validate, then redirect straight back with a code.
    fn authorize(&mut self, params: &BTreeMap<String, String>) -> Response {
        self.authorize_requests.push(params.clone());
        let Some(client_id) = params.get("client_id") else {
            return Response::text(400, "Missing required parameter: client_id");
        };
        if params.get("response_type").map(String::as_str) != Some("code") {
            return Response::text(400, "Unsupported response_type");
        }
        let Some(redirect_uri) = params.get("redirect_uri") else {
            return Response::text(400, "Missing required parameter: redirect_uri");
        };
        let Ok(mut location) = Url::parse(redirect_uri) else {
            return Response::text(400, "INVALID_CLIENT: Invalid redirect URI");
        };
        let challenge = params.get("code_challenge");
        match (
            challenge,
            params.get("code_challenge_method").map(String::as_str),
        ) {
            (Some(_), Some("S256")) | (None, None) => {}
            _ => return Response::text(400, "code_challenge_method must be S256"),
        }
        {
            let mut query = location.query_pairs_mut();
            if let Some(error) = &self.authorize_error {
                query.append_pair("error", error);
            } else {
                let code = mint("AQ", self.port);
                let pending = PendingCode {
                    client_id: client_id.clone(),
                    redirect_uri: redirect_uri.clone(),
                    challenge: challenge.cloned(),
                    scope: params.get("scope").cloned().unwrap_or_default(),
                };
                self.codes.insert(code.clone(), pending);
                query.append_pair("code", &code);
            }
            if let Some(state) = params.get("state") {
                query.append_pair("state", state);
            }
        }
        Response::empty(303).with_header("Location", location)
    }

    /// Anything under `/v1`: only `GET /v1/me` exists.
    fn api(&mut self, request: &Request) -> Response {
        let path = if request.query.is_empty() {
            request.path.clone()
        } else {
            format!("{}?{}", request.path, request.query)
        };
        let authorization = request.header("authorization").map(str::to_owned);
        self.api_requests.push(ApiRequest {
            method: request.method.clone(),
            path,
            authorization: authorization.clone(),
        });
        if let Some((status, body)) = self.api_script.pop_front() {
            return Response::sniffed(status, body);
        }
        if request.method != "GET" || request.path != "/v1/me" {
            return api_error(404, "Service not found");
        }
        let Some(authorization) = authorization else {
            return api_error(401, "No token provided");
        };
        let Some(token) = bearer(&authorization) else {
            return api_error(400, "Only valid bearer authentication supported");
        };
        match self.access_tokens.get(token) {
            None => api_error(401, "Invalid access token"),
            Some(grant) if grant.issued.elapsed() >= grant.lifetime => {
                api_error(401, "The access token expired")
            }
            Some(_) => {
                let (display_name, id) = &self.me;
                Response::json(
                    200,
                    &json!({
                        "display_name": display_name,
                        "id": id,
                        "type": "user",
                        "uri": format!("spotify:user:{id}"),
                    }),
                )
            }
        }
    }
}

/// A distinctive, process-unique token: `prefix` + 40 hex digits.
fn mint(prefix: &str, port: u16) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let serial = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let seed = format!("{prefix}:{serial}:{port}:{nanos}:{}", std::process::id());
    format!("{prefix}{}", hex(&sha256(seed.as_bytes())[..20]))
}

// ---------------------------------------------------------------------------
// Responses

/// What to do with a connection once the request is read.
#[derive(Debug)]
enum Reply {
    Respond(Response),
    /// Close without answering.
    Hang,
}

#[derive(Debug)]
struct Response {
    status: u16,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Response {
    fn empty(status: u16) -> Self {
        Self {
            status,
            content_type: None,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    fn text(status: u16, body: &str) -> Self {
        Self {
            content_type: Some("text/plain; charset=utf-8"),
            body: body.to_owned(),
            ..Self::empty(status)
        }
    }

    fn json(status: u16, body: &Value) -> Self {
        Self {
            content_type: Some("application/json"),
            body: body.to_string(),
            ..Self::empty(status)
        }
    }

    /// `body` labelled JSON if it parses as JSON, plain text otherwise.
    fn sniffed(status: u16, body: String) -> Self {
        let content_type = if body.is_empty() {
            None
        } else if serde_json::from_str::<Value>(&body).is_ok() {
            Some("application/json")
        } else {
            Some("text/plain; charset=utf-8")
        };
        Self {
            content_type,
            body,
            ..Self::empty(status)
        }
    }

    fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        // Assemble the whole response first so it leaves in as few segments as possible.
        let mut message = Vec::with_capacity(256 + self.body.len());
        write!(
            message,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason(self.status)
        )?;
        if let Some(content_type) = self.content_type {
            write!(message, "Content-Type: {content_type}\r\n")?;
        }
        for (name, value) in &self.headers {
            write!(message, "{name}: {value}\r\n")?;
        }
        write!(
            message,
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        )?;
        message.extend_from_slice(self.body.as_bytes());
        out.write_all(&message)?;
        out.flush()
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    Response::json(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(400, "invalid_grant", description)
}

fn invalid_client() -> Response {
    oauth_error(400, "invalid_client", "Invalid client")
}

/// A Web API error: `{"error":{"status":…,"message":…}}`.
fn api_error(status: u16, message: &str) -> Response {
    Response::json(
        status,
        &json!({ "error": { "status": status, "message": message } }),
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

// ---------------------------------------------------------------------------
// Requests

#[derive(Debug)]
struct Request {
    method: String,
    /// The path without the query, still percent-encoded.
    path: String,
    /// The raw query, without `?`; empty when absent.
    query: String,
    /// Header names lower-cased, in arrival order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    /// The first header called `name` (lower case).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Reads one HTTP/1.1 request. Malformed input is `ErrorKind::InvalidData`.
fn read_request(stream: &TcpStream) -> io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut budget = MAX_HEAD;
    let request_line = read_line(&mut reader, &mut budget)?;
    let mut parts = request_line.split_ascii_whitespace();
    let (Some(method), Some(target), Some(_version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_data("malformed request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    loop {
        let line = read_line(&mut reader, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid_data("malformed header"))?;
        request
            .headers
            .push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    if request
        .header("expect")
        .is_some_and(|expect| expect.eq_ignore_ascii_case("100-continue"))
    {
        let mut out = stream;
        out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked = request
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
    request.body = if chunked {
        read_chunked(&mut reader)?
    } else {
        let length = match request.header("content-length") {
            Some(length) => length
                .parse::<usize>()
                .map_err(|_| invalid_data("bad Content-Length"))?,
            None => 0,
        };
        if length > MAX_BODY {
            return Err(invalid_data("body too large"));
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    };
    Ok(request)
}

/// Reads a CRLF- (or LF-) terminated line of at most `budget` bytes, charging
/// it to `budget`, and returns it without the terminator.
fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> io::Result<String> {
    let mut line = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX);
    let read = reader.take(limit).read_until(b'\n', &mut line)?;
    if read == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\n") {
        return Err(if read == *budget {
            invalid_data("request head too large")
        } else {
            io::ErrorKind::UnexpectedEof.into()
        });
    }
    *budget -= read;
    line.pop();
    if line.ends_with(b"\r") {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid_data("request head is not UTF-8"))
}

/// Reads a `Transfer-Encoding: chunked` body, discarding trailers.
fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(reader, &mut budget)?;
        let size = line.split_once(';').map_or(line.as_str(), |(size, _)| size);
        let size =
            usize::from_str_radix(size.trim(), 16).map_err(|_| invalid_data("bad chunk size"))?;
        if size == 0 {
            while !read_line(reader, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(invalid_data("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        if !read_line(reader, &mut budget)?.is_empty() {
            return Err(invalid_data("chunk not followed by CRLF"));
        }
    }
}

fn invalid_data(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Decodes an `application/x-www-form-urlencoded` string; the last of repeated keys wins.
fn parse_form(bytes: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

/// `(id, secret)` from `Basic base64(id:secret)`.
fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, credentials) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(credentials.trim())?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// The token from `Bearer <token>`.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

// ---------------------------------------------------------------------------
// Encodings and hashing, small enough not to need crates.

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 of `data` in `alphabet`, `=`-padded when `pad`.
fn base64_encode(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (group >> (18 - 6 * i)) & 0x3f;
                out.push(char::from(alphabet[sextet as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64, padded or not; `None` on a character outside the alphabet.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let sextet = BASE64_STANDARD.iter().position(|&a| a == c)?;
        acc = (acc << 6) | sextet as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The PKCE S256 challenge for `verifier`: base64url-no-pad(SHA-256(verifier)).
fn pkce_challenge(verifier: &str) -> String {
    base64_encode(&sha256(verifier.as_bytes()), BASE64_URL, false)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// SHA-256 initial hash value (FIPS 180-4, 5.3.3).
#[rustfmt::skip]
const SHA256_INIT: [u32; 8] = [
    0x6a09_e667, 0xbb67_ae85, 0x3c6e_f372, 0xa54f_f53a,
    0x510e_527f, 0x9b05_688c, 0x1f83_d9ab, 0x5be0_cd19,
];

/// SHA-256 round constants (FIPS 180-4, 4.2.2).
#[rustfmt::skip]
const SHA256_K: [u32; 64] = [
    0x428a_2f98, 0x7137_4491, 0xb5c0_fbcf, 0xe9b5_dba5,
    0x3956_c25b, 0x59f1_11f1, 0x923f_82a4, 0xab1c_5ed5,
    0xd807_aa98, 0x1283_5b01, 0x2431_85be, 0x550c_7dc3,
    0x72be_5d74, 0x80de_b1fe, 0x9bdc_06a7, 0xc19b_f174,
    0xe49b_69c1, 0xefbe_4786, 0x0fc1_9dc6, 0x240c_a1cc,
    0x2de9_2c6f, 0x4a74_84aa, 0x5cb0_a9dc, 0x76f9_88da,
    0x983e_5152, 0xa831_c66d, 0xb003_27c8, 0xbf59_7fc7,
    0xc6e0_0bf3, 0xd5a7_9147, 0x06ca_6351, 0x1429_2967,
    0x27b7_0a85, 0x2e1b_2138, 0x4d2c_6dfc, 0x5338_0d13,
    0x650a_7354, 0x766a_0abb, 0x81c2_c92e, 0x9272_2c85,
    0xa2bf_e8a1, 0xa81a_664b, 0xc24b_8b70, 0xc76c_51a3,
    0xd192_e819, 0xd699_0624, 0xf40e_3585, 0x106a_a070,
    0x19a4_c116, 0x1e37_6c08, 0x2748_774c, 0x34b0_bcb5,
    0x391c_0cb3, 0x4ed8_aa4a, 0x5b9c_ca4f, 0x682e_6ff3,
    0x748f_82ee, 0x78a5_636f, 0x84c8_7814, 0x8cc7_0208,
    0x90be_fffa, 0xa450_6ceb, 0xbef9_a3f7, 0xc671_78f2,
];

/// SHA-256 (FIPS 180-4).
fn sha256(data: &[u8]) -> [u8; 32] {
    let mut hash = SHA256_INIT;

    // Pad: 0x80, zeros up to 56 mod 64, then the bit length as a big-endian u64.
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());

    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        // v = [a, b, c, d, e, f, g, h]
        let mut v = hash;
        for (k, word) in SHA256_K.iter().zip(w) {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let choice = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7]
                .wrapping_add(s1)
                .wrapping_add(choice)
                .wrapping_add(*k)
                .wrapping_add(word);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let majority = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(majority);
            // Shift every variable down one place: b = a, c = b, …, h = g.
            v.rotate_right(1);
            v[0] = t1.wrapping_add(t2);
            v[4] = v[4].wrapping_add(t1);
        }
        for (h, x) in hash.iter_mut().zip(v) {
            *h = h.wrapping_add(x);
        }
    }

    let mut digest = [0u8; 32];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(hash) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed HTTP response, as seen by a client.
    #[derive(Debug)]
    struct HttpReply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl HttpReply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body).expect("response body is JSON")
        }
    }

    /// Sends `raw` and reads until the server closes; `None` if it closed without a word.
    fn exchange(fake: &FakeSpotify, raw: &str) -> Option<HttpReply> {
        let mut stream = TcpStream::connect(fake.addr).expect("connect to fake spotify");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set read timeout");
        stream.write_all(raw.as_bytes()).expect("send request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("read response");
        if text.is_empty() {
            return None;
        }
        let (head, body) = text.split_once("\r\n\r\n").expect("response has a head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status code");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
            .collect();
        let reply = HttpReply {
            status,
            headers,
            body: body.to_owned(),
        };
        let length: usize = reply
            .header("content-length")
            .and_then(|length| length.parse().ok())
            .expect("Content-Length");
        assert_eq!(length, reply.body.len(), "Content-Length matches the body");
        Some(reply)
    }

    fn post_token(
        fake: &FakeSpotify,
        fields: &[(&str, &str)],
        authorization: Option<&str>,
    ) -> Option<HttpReply> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let authorization = authorization
            .map(|value| format!("Authorization: {value}\r\n"))
            .unwrap_or_default();
        exchange(
            fake,
            &format!(
                "POST /api/token HTTP/1.1\r\nHost: {}\r\n{authorization}\
                 Content-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                fake.addr,
                body.len()
            ),
        )
    }

    fn token(fake: &FakeSpotify, fields: &[(&str, &str)]) -> HttpReply {
        post_token(fake, fields, None).expect("token endpoint answers")
    }

    fn get(fake: &FakeSpotify, target: &str, authorization: Option<&str>) -> HttpReply {
        let authorization = authorization
            .map(|value| format!("Authorization: {value}\r\n"))
            .unwrap_or_default();
        exchange(
            fake,
            &format!(
                "GET {target} HTTP/1.1\r\nHost: {}\r\n{authorization}\r\n",
                fake.addr
            ),
        )
        .expect("GET answered")
    }

    fn refresh(fake: &FakeSpotify, refresh_token: &str) -> HttpReply {
        token(
            fake,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", "client123"),
            ],
        )
    }

    fn assert_oauth_error(reply: &HttpReply, error: &str, description: &str) {
        assert_eq!(reply.status, 400, "{reply:?}");
        assert_eq!(
            reply.json(),
            json!({ "error": error, "error_description": description })
        );
    }

    /// Runs `/authorize` and returns the `code` from the redirect.
    fn authorize(fake: &FakeSpotify, challenge: &str, redirect_uri: &str) -> String {
        let query = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("client_id", "client123"),
                ("response_type", "code"),
                ("redirect_uri", redirect_uri),
                ("state", "st@te 1"),
                ("scope", "user-read-private user-read-email"),
                ("code_challenge", challenge),
                ("code_challenge_method", "S256"),
            ])
            .finish();
        let reply = get(fake, &format!("/authorize?{query}"), None);
        assert_eq!(reply.status, 303, "{reply:?}");
        let location = Url::parse(reply.header("location").expect("Location")).expect("URL");
        assert!(location.as_str().starts_with(redirect_uri), "{location}");
        let params: BTreeMap<String, String> = location.query_pairs().into_owned().collect();
        assert_eq!(params.get("state").map(String::as_str), Some("st@te 1"));
        params.get("code").expect("code in redirect").clone()
    }

    #[test]
    fn sha256_known_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex(&sha256(&vec![b'a'; 1_000_000])),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn pkce_challenge_matches_rfc7636_example() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn base64_round_trips() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("id:secret", "aWQ6c2VjcmV0"),
        ] {
            assert_eq!(
                base64_encode(plain.as_bytes(), BASE64_STANDARD, true),
                encoded
            );
            assert_eq!(base64_decode(encoded).as_deref(), Some(plain.as_bytes()));
        }
        assert_eq!(base64_decode("not base64!"), None);
    }

    #[test]
    fn tokens_are_unique_and_distinctive() {
        let fake = FakeSpotify::start();
        let a = fake.issue_refresh_token();
        let b = fake.issue_refresh_token();
        assert_ne!(a, b);
        assert!(a.starts_with("AQ") && a.len() == 42, "{a}");
        assert_eq!(fake.issued_refresh_tokens(), [a, b]);
    }

    #[test]
    fn refresh_succeeds_and_the_access_token_works() {
        let fake = FakeSpotify::start();
        fake.set_scope("user-read-private");
        let refresh_token = fake.issue_refresh_token();

        let reply = refresh(&fake, &refresh_token);
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let body = reply.json();
        let access_token = body["access_token"].as_str().expect("access_token");
        assert!(access_token.starts_with("BQ"), "{access_token}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["scope"], "user-read-private");
        assert!(
            body.get("refresh_token").is_none(),
            "no rotation by default"
        );
        assert_eq!(fake.issued_access_tokens(), [access_token]);

        let requests = fake.token_requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].field("grant_type"), Some("refresh_token"));
        assert_eq!(
            requests[0].field("refresh_token"),
            Some(refresh_token.as_str())
        );
        assert_eq!(
            requests[0].content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );

        let me = get(&fake, "/v1/me", Some(&format!("Bearer {access_token}")));
        assert_eq!(me.status, 200, "{me:?}");
        assert_eq!(
            me.json(),
            json!({
                "display_name": "Test User",
                "id": "testuser",
                "type": "user",
                "uri": "spotify:user:testuser",
            })
        );
        let api = fake.api_requests();
        assert_eq!(api.len(), 1);
        assert_eq!(api[0].path, "/v1/me");
        assert_eq!(
            api[0].authorization.as_deref(),
            Some(format!("Bearer {access_token}").as_str())
        );
    }

    #[test]
    fn bad_refresh_requests_are_refused() {
        let fake = FakeSpotify::start();
        let refresh_token = fake.issue_refresh_token();
        assert_oauth_error(
            &refresh(&fake, "AQnonsense"),
            "invalid_grant",
            "Invalid refresh token",
        );
        assert_oauth_error(
            &token(&fake, &[("grant_type", "password")]),
            "unsupported_grant_type",
            "grant_type parameter is missing",
        );
        assert_oauth_error(
            &token(
                &fake,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &refresh_token),
                ],
            ),
            "invalid_client",
            "Invalid client",
        );
        fake.revoke_all();
        assert_oauth_error(
            &refresh(&fake, &refresh_token),
            "invalid_grant",
            "Invalid refresh token",
        );
        assert_eq!(fake.token_request_count(), 4);
    }

    #[test]
    fn rotation_revokes_the_old_refresh_token() {
        let fake = FakeSpotify::start();
        fake.set_rotation(true);
        let first = fake.issue_refresh_token();

        let reply = refresh(&fake, &first);
        assert_eq!(reply.status, 200, "{reply:?}");
        let second = reply.json()["refresh_token"]
            .as_str()
            .expect("rotated refresh_token")
            .to_owned();
        assert_ne!(first, second);
        assert_eq!(
            fake.issued_refresh_tokens(),
            [first.clone(), second.clone()]
        );

        assert_oauth_error(
            &refresh(&fake, &first),
            "invalid_grant",
            "Refresh token revoked",
        );
        assert_eq!(refresh(&fake, &second).status, 200);
    }

    #[test]
    fn scripted_responses_come_first_then_normal_behaviour() {
        let fake = FakeSpotify::start();
        let refresh_token = fake.issue_refresh_token();
        fake.push(Scripted::too_many(7));
        fake.push(Scripted::Status {
            status: 503,
            body: "upstream sad".to_owned(),
            retry_after: Some(2),
        });
        fake.push(Scripted::InvalidGrant("Refresh token revoked"));
        fake.push(Scripted::Garbage);
        fake.push(Scripted::Drop);

        let reply = refresh(&fake, &refresh_token);
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("7"));
        assert_eq!(reply.body, "");

        let reply = refresh(&fake, &refresh_token);
        assert_eq!(reply.status, 503);
        assert_eq!(reply.header("retry-after"), Some("2"));
        assert_eq!(reply.body, "upstream sad");

        assert_oauth_error(
            &refresh(&fake, &refresh_token),
            "invalid_grant",
            "Refresh token revoked",
        );

        let reply = refresh(&fake, &refresh_token);
        assert_eq!(reply.status, 200);
        assert!(serde_json::from_str::<Value>(&reply.body).is_err());

        assert!(
            post_token(
                &fake,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &refresh_token),
                    ("client_id", "client123"),
                ],
                None,
            )
            .is_none(),
            "Drop closes without an answer"
        );

        assert_eq!(refresh(&fake, &refresh_token).status, 200);
        assert_eq!(fake.token_request_count(), 6);
        assert_eq!(fake.issued_access_tokens().len(), 1);
    }

    #[test]
    fn delay_holds_back_token_answers() {
        let fake = FakeSpotify::start();
        let refresh_token = fake.issue_refresh_token();
        fake.set_delay(Duration::from_millis(200));
        let started = Instant::now();
        assert_eq!(refresh(&fake, &refresh_token).status, 200);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(fake.token_requests()[0].at < started + Duration::from_millis(200));
    }

    #[test]
    fn pkce_exchange_checks_the_verifier() {
        let fake = FakeSpotify::start();
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = pkce_challenge(verifier);
        let redirect_uri = "http://127.0.0.1:8888/callback";

        let code = authorize(&fake, &challenge, redirect_uri);
        assert_eq!(
            fake.authorize_requests()[0].get("code_challenge"),
            Some(&challenge)
        );
        let exchange = |code: &str, verifier: &str| {
            token(
                &fake,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", code),
                    ("redirect_uri", redirect_uri),
                    ("client_id", "client123"),
                    ("code_verifier", verifier),
                ],
            )
        };
        let reply = exchange(&code, verifier);
        assert_eq!(reply.status, 200, "{reply:?}");
        let body = reply.json();
        assert!(body["access_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("BQ")));
        assert!(body["refresh_token"]
            .as_str()
            .is_some_and(|t| t.starts_with("AQ")));
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["scope"], "user-read-private user-read-email");
        assert_eq!(
            fake.issued_refresh_tokens(),
            [body["refresh_token"].clone()]
        );

        assert_oauth_error(
            &exchange(&code, verifier),
            "invalid_grant",
            "Invalid authorization code",
        );

        let code = authorize(&fake, &challenge, redirect_uri);
        assert_oauth_error(
            &exchange(&code, "wrong-verifier-wrong-verifier-wrong-verifier"),
            "invalid_grant",
            "code_verifier was incorrect",
        );
    }

    #[test]
    fn authorize_can_redirect_with_an_error() {
        let fake = FakeSpotify::start();
        fake.set_authorize_error(Some("access_denied"));
        let reply = get(
            &fake,
            concat!(
                "/authorize?client_id=c&response_type=code",
                "&redirect_uri=http%3A%2F%2F127.0.0.1%3A1%2Fcb&state=xyz",
            ),
            None,
        );
        assert_eq!(reply.status, 303);
        assert_eq!(
            reply.header("location"),
            Some("http://127.0.0.1:1/cb?error=access_denied&state=xyz")
        );
        let reply = get(&fake, "/authorize?response_type=code", None);
        assert_eq!(reply.status, 400);
    }

    #[test]
    fn a_client_secret_requires_basic_auth() {
        let fake = FakeSpotify::start();
        fake.set_client_secret("id", "secret");
        let refresh_token = fake.issue_refresh_token();
        let fields = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.as_str()),
        ];
        let good = format!(
            "Basic {}",
            base64_encode(b"id:secret", BASE64_STANDARD, true)
        );
        let bad = format!(
            "Basic {}",
            base64_encode(b"id:wrong", BASE64_STANDARD, true)
        );

        let reply = post_token(&fake, &fields, Some(&good)).expect("answered");
        assert_eq!(reply.status, 200, "{reply:?}");
        let reply = post_token(&fake, &fields, Some(&bad)).expect("answered");
        assert_oauth_error(&reply, "invalid_client", "Invalid client");
        assert_oauth_error(
            &refresh(&fake, &refresh_token),
            "invalid_client",
            "Invalid client",
        );
    }

    #[test]
    fn expired_and_unknown_access_tokens_are_refused() {
        let fake = FakeSpotify::start();
        fake.set_expires_in(0);
        let refresh_token = fake.issue_refresh_token();
        let reply = refresh(&fake, &refresh_token);
        let access_token = reply.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned();

        let reply = get(&fake, "/v1/me", Some(&format!("Bearer {access_token}")));
        assert_eq!(reply.status, 401);
        assert_eq!(
            reply.json(),
            json!({ "error": { "status": 401, "message": "The access token expired" } })
        );
        let reply = get(&fake, "/v1/me", Some("Bearer BQnope"));
        assert_eq!(
            reply.json(),
            json!({ "error": { "status": 401, "message": "Invalid access token" } })
        );

        fake.push_api(502, "bad gateway");
        let reply = get(&fake, "/v1/me", None);
        assert_eq!((reply.status, reply.body.as_str()), (502, "bad gateway"));
        assert_eq!(fake.api_requests().len(), 3);
    }

    #[test]
    fn drop_stops_the_server() {
        let fake = FakeSpotify::start();
        let addr = fake.addr;
        drop(fake);
        assert!(TcpStream::connect(addr).is_err());
    }
}
