//! The single owner of the token state.
//!
//! One task ([`Manager::run`]) owns the login, the access token, the schedule and the queue
//! of callers waiting for a refresh. Everyone else holds a [`Handle`]: they read the current
//! [`Snapshot`] from a `watch` channel, which answers almost every request without touching
//! the owner, and send a [`Command`] only when the snapshot is not good enough.
//!
//! Invariants:
//! - At most one token request is in flight; every caller waiting shares its result.
//! - The network call runs in its own task, so a slow Spotify never stalls the owner.
//! - A new refresh token is saved before the access token that came with it is published.
//! - `generation` is bumped by every login and logout; a refresh result from an older
//!   generation is dropped, so a late answer can never resurrect a logged-out login.
//! - Deadlines are wall-clock ([`crate::clock::Alarm`]); idle means no wake-ups at all.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use spotok_proto::wire::{Status, StoreKind};
use spotok_proto::{AccessToken, ErrorKind, RefreshToken, State};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::{self, Alarm};
use crate::config::Config;
use crate::oauth::{self, Grant, TokenError};
use crate::policy;
use crate::store::{Login, Store};

/// A current access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The token.
    pub access: AccessToken,
    /// When it was received.
    pub issued_at: SystemTime,
    /// When it stops working.
    pub expires_at: SystemTime,
}

impl Token {
    fn good_for(&self, now: SystemTime, min_valid: Duration) -> bool {
        policy::fresh_enough(self.expires_at, now, min_valid)
    }
}

/// Everything readers need, published after every change.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// What the daemon is doing.
    pub state: State,
    /// The current access token, if any.
    pub token: Option<Token>,
    /// Scopes of the login.
    pub scopes: Vec<String>,
    /// The next planned token request.
    pub refresh_at: Option<SystemTime>,
    /// When the login happened.
    pub login_at: Option<SystemTime>,
    /// Where the refresh token is kept.
    pub store: StoreKind,
    /// The last error, for people.
    pub last_error: Option<String>,
    /// Bumped on login and logout.
    pub generation: u64,
    /// Count of tokens received; a change means "a new token", for `TokenRefreshed`.
    pub refreshes: u64,
    /// The config in force.
    pub config: Arc<Config>,
}

impl Snapshot {
    /// When the login ends (Spotify: six months after it).
    #[must_use]
    pub fn login_expires_at(&self) -> Option<SystemTime> {
        self.login_at.map(|t| t + policy::LOGIN_LIFETIME)
    }

    /// The `status` reply.
    #[must_use]
    pub fn status(&self) -> Status {
        Status {
            state: self.state,
            expires_at: self.token.as_ref().map(|t| clock::unix(t.expires_at)),
            refresh_at: self.refresh_at.map(clock::unix),
            login_expires_at: self.login_expires_at().map(clock::unix),
            scopes: self.scopes.clone(),
            store: self.store,
            last_error: self.last_error.clone(),
            version: spotok_proto::VERSION.into(),
            protocol: spotok_proto::PROTOCOL_VERSION,
        }
    }

    /// The error for a caller who wants a token now, judged from the state alone.
    fn blocked(&self) -> Option<Failure> {
        match self.state {
            State::Unconfigured => Some(Failure::new(
                ErrorKind::NeedsLogin,
                format!(
                    "spotokd has no client_id: create an app on the Spotify developer \
                     dashboard, then run `spotokctl login --client-id ID` (config: {})",
                    self.config.path.display()
                ),
            )),
            State::LoggedOut => Some(Failure::new(
                ErrorKind::NeedsLogin,
                match &self.last_error {
                    // E.g. a locked keyring: logging in again is not the fix.
                    Some(why) => format!("no login loaded: {why}"),
                    None => "not logged in: run `spotokctl login`".into(),
                },
            )),
            State::NeedsLogin => Some(Failure::new(
                ErrorKind::NeedsLogin,
                format!(
                    "{}: run `spotokctl login`",
                    self.last_error
                        .as_deref()
                        .unwrap_or("a new login is needed")
                ),
            )),
            _ => None,
        }
    }
}

/// Why a caller gets no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// For exit codes and D-Bus error names.
    pub kind: ErrorKind,
    /// One line that says what to do; never a token.
    pub message: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

type TokenReply = oneshot::Sender<Result<Token, Failure>>;

/// What the owner can be asked to do.
#[derive(Debug)]
enum Command {
    /// A token good for `min_valid`; waits across retries until `deadline`.
    Get {
        min_valid: Duration,
        deadline: SystemTime,
        reply: TokenReply,
    },
    /// Refresh now; answered by the outcome of that one attempt.
    Refresh { reply: TokenReply },
    /// Take a new login (from `login` or `import`) with its first grant.
    Adopt {
        login: Login,
        grant: Grant,
        reply: TokenReply,
    },
    /// Forget the login.
    Logout {
        reply: oneshot::Sender<Result<(), Failure>>,
    },
    /// A new config (SIGHUP).
    Reload { config: Arc<Config> },
    /// Finish an in-flight refresh (and save what it brings), then stop.
    Shutdown { reply: oneshot::Sender<()> },
    /// The store became usable (a keyring was unlocked): here is what it holds.
    StoreOpened { login: Option<Login> },
}

/// The outcome of a token request, sent back by the task that made it.
#[derive(Debug)]
struct Done {
    generation: u64,
    result: Result<Grant, TokenError>,
}

/// A caller of `get` waiting for a refresh.
#[derive(Debug)]
struct Waiter {
    deadline: SystemTime,
    reply: TokenReply,
}

/// The cheap, cloneable face of the manager.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Commands to the owner.
    tx: mpsc::Sender<Command>,
    /// The published state.
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// For `import`'s check and for API calls.
    pub http: reqwest::Client,
    /// The pending Authorization Code login, if any.
    pub logins: crate::login::Logins,
}

impl Handle {
    /// The current snapshot.
    #[must_use]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Failure> {
        let gone = || Failure::new(ErrorKind::Failed, "spotokd is shutting down");
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// A token valid for `min_valid` with every scope in `scopes`; waits at most `wait`
    /// for a refresh. Answers from the snapshot when it can.
    pub async fn token(
        &self,
        min_valid: Duration,
        scopes: &[String],
        wait: Duration,
    ) -> Result<Token, Failure> {
        let snap = self.snapshot();
        if let Some(f) = snap.blocked() {
            return Err(f);
        }
        if let Some(missing) = scopes.iter().find(|s| !snap.scopes.contains(s)) {
            return Err(Failure::new(
                ErrorKind::InsufficientScope,
                format!("the login lacks scope {missing}: run `spotokctl login --scope {missing}`"),
            ));
        }
        let now = clock::now();
        if let Some(t) = snap.token.as_ref().filter(|t| t.good_for(now, min_valid)) {
            return Ok(t.clone());
        }
        // `wait` comes off the socket as any u64 of seconds, more than SystemTime can hold.
        let deadline = now
            .checked_add(wait)
            .unwrap_or(now + policy::LOGIN_LIFETIME);
        self.ask(|reply| Command::Get {
            min_valid,
            deadline,
            reply,
        })
        .await?
    }

    /// Refreshes now.
    pub async fn refresh(&self) -> Result<Token, Failure> {
        self.ask(|reply| Command::Refresh { reply }).await?
    }

    /// Checks `refresh_token` with one refresh and, if Spotify takes it, stores it as the login.
    pub async fn import(&self, refresh_token: RefreshToken) -> Result<Token, Failure> {
        let config = self.snapshot().config.clone();
        let client = oauth_client(&config, &self.http)?;
        let grant = client.refresh(&refresh_token).await.map_err(|e| match e {
            TokenError::InvalidGrant(why) => Failure::new(
                ErrorKind::NeedsLogin,
                format!("Spotify refused this refresh token ({why}); nothing was stored"),
            ),
            other => failure(&other),
        })?;
        let login = Login {
            refresh_token: grant.refresh_token.clone().unwrap_or(refresh_token),
            client_id: config.client_id.clone().unwrap_or_default(),
            token_url: config.token_url.to_string(),
            login_at: clock::unix(clock::now()),
            scopes: grant.scopes.clone().unwrap_or_default(),
        };
        self.adopt(login, grant).await
    }

    /// Takes a fresh login with its first grant.
    pub async fn adopt(&self, login: Login, grant: Grant) -> Result<Token, Failure> {
        self.ask(|reply| Command::Adopt {
            login,
            grant,
            reply,
        })
        .await?
    }

    /// Forgets the login.
    pub async fn logout(&self) -> Result<(), Failure> {
        self.ask(|reply| Command::Logout { reply }).await?
    }

    /// Applies a new config.
    pub async fn reload(&self, config: Config) {
        let _ = self
            .tx
            .send(Command::Reload {
                config: Arc::new(config),
            })
            .await;
    }

    /// Tells the owner the store can be used now (a keyring was unlocked) and what it holds:
    /// the owner takes that login if it has none, or finishes a save or delete that failed.
    pub async fn store_opened(&self, login: Option<Login>) {
        let _ = self.tx.send(Command::StoreOpened { login }).await;
    }

    /// Lets an in-flight refresh finish and be saved, then stops the owner.
    pub async fn shutdown(&self) {
        let _ = self.ask(|reply| Command::Shutdown { reply }).await;
    }
}

/// The token endpoint client for `config`, or why there is none.
pub fn oauth_client(config: &Config, http: &reqwest::Client) -> Result<oauth::Client, Failure> {
    let client_id = config.client_id.clone().ok_or_else(|| {
        Failure::new(
            ErrorKind::NeedsLogin,
            "no client_id configured: run `spotokctl login --client-id ID`",
        )
    })?;
    Ok(oauth::Client::new(
        http.clone(),
        config.token_url.clone(),
        client_id,
        config.client_secret.clone(),
    ))
}

/// What a caller is told about a failed token request.
fn failure(e: &TokenError) -> Failure {
    match e {
        TokenError::Transient { reason, .. } => Failure::new(
            ErrorKind::Unavailable,
            format!("Spotify's accounts service is failing ({reason}): try again later"),
        ),
        TokenError::InvalidGrant(why) => Failure::new(
            ErrorKind::NeedsLogin,
            format!("Spotify refused the login ({why}): run `spotokctl login`"),
        ),
        TokenError::Config(msg) => Failure::new(ErrorKind::Failed, msg.clone()),
    }
}

/// The owner of the token state.
#[derive(Debug)]
pub struct Manager {
    /// The config in force.
    config: Arc<Config>,
    /// Where the login is kept.
    store: Store,
    /// Shared HTTP pool.
    http: reqwest::Client,
    /// The login, if any.
    login: Option<Login>,
    /// The login changed in memory but could not be saved yet; retried at this time.
    unsaved_retry: Option<SystemTime>,
    /// The store still holds a login memory has dropped (a logout or a refused login whose
    /// delete failed, e.g. on a locked keyring); deleted when the store opens.
    store_stale: bool,
    /// The current access token.
    token: Option<Token>,
    /// Bumped on login and logout.
    generation: u64,
    /// Tokens received so far.
    refreshes: u64,
    /// A token request is running.
    in_flight: bool,
    /// Consecutive failed attempts (transient or config).
    failures: u32,
    /// When the next token request is due.
    next_refresh: Option<SystemTime>,
    /// Spotify refused the refresh token.
    needs_login: bool,
    /// For people; cleared by success.
    last_error: Option<String>,
    /// Callers of `get` waiting for a token.
    waiters: Vec<Waiter>,
    /// Callers of `refresh` waiting for the next attempt.
    attempt_waiters: Vec<TokenReply>,
    /// Shutdown requested; stop once nothing is in flight.
    stopping: Option<oneshot::Sender<()>>,
    /// Where token request tasks report.
    done_tx: mpsc::Sender<Done>,
    /// The published state.
    publish: watch::Sender<Arc<Snapshot>>,
}

impl Manager {
    /// Builds the owner from a loaded login (or the error loading it), and its handle.
    #[must_use]
    pub fn new(
        config: Config,
        store: Store,
        http: reqwest::Client,
        loaded: Result<Option<Login>, String>,
    ) -> (Self, Handle, Receivers) {
        let (tx, rx) = mpsc::channel(256);
        let (done_tx, done_rx) = mpsc::channel(4);
        let (login, last_error) = match loaded {
            Ok(login) => (login, None),
            Err(e) => (None, Some(e)),
        };
        let now = clock::now();
        let config = Arc::new(config);
        let initial = Arc::new(Snapshot {
            state: State::Unconfigured,
            token: None,
            scopes: Vec::new(),
            refresh_at: None,
            login_at: None,
            store: store.kind(),
            last_error: None,
            generation: 0,
            refreshes: 0,
            config: config.clone(),
        });
        let (publish, snapshot) = watch::channel(initial);
        let manager = Self {
            next_refresh: login.as_ref().map(|_| now),
            config,
            store,
            http: http.clone(),
            login,
            unsaved_retry: None,
            store_stale: false,
            token: None,
            generation: 0,
            refreshes: 0,
            in_flight: false,
            failures: 0,
            needs_login: false,
            last_error,
            waiters: Vec::new(),
            attempt_waiters: Vec::new(),
            stopping: None,
            done_tx,
            publish,
        };
        manager.publish();
        (
            manager,
            Handle {
                tx,
                snapshot,
                http,
                logins: crate::login::Logins::default(),
            },
            Receivers {
                commands: rx,
                done: done_rx,
            },
        )
    }

    /// Runs until shutdown.
    pub async fn run(mut self, mut rx: Receivers) -> std::io::Result<()> {
        let mut alarm = Alarm::new()?;
        loop {
            self.publish();
            if self.stopping.is_some() && !self.in_flight {
                if let Some(reply) = self.stopping.take() {
                    let _ = reply.send(());
                }
                return Ok(());
            }
            alarm.set(self.next_wake())?;
            tokio::select! {
                cmd = rx.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => return Ok(()),
                },
                Some(done) = rx.done.recv() => self.done(done).await,
                () = alarm.fired() => self.alarm().await,
            }
        }
    }

    fn next_wake(&self) -> Option<SystemTime> {
        if self.stopping.is_some() {
            return None;
        }
        let refresh = self
            .next_refresh
            .filter(|_| self.can_refresh() && !self.in_flight);
        match (refresh, self.unsaved_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The login matches the config and Spotify has not refused it.
    fn can_refresh(&self) -> bool {
        self.login.as_ref().is_some_and(|l| self.matches(l)) && !self.needs_login
    }

    fn matches(&self, login: &Login) -> bool {
        self.config.client_id.as_deref() == Some(login.client_id.as_str())
            && self.config.token_url.as_str() == login.token_url
    }

    fn state(&self) -> State {
        match &self.login {
            _ if self.config.client_id.is_none() => State::Unconfigured,
            None if self.needs_login => State::NeedsLogin,
            None => State::LoggedOut,
            Some(login) if !self.matches(login) || self.needs_login => State::NeedsLogin,
            Some(_) if self.in_flight => State::Refreshing,
            Some(_) if self.failures > 0 => State::BackingOff,
            Some(_) => State::Active,
        }
    }

    fn publish(&self) {
        let last_error = match &self.login {
            Some(login) if self.config.client_id.is_some() && !self.matches(login) => {
                Some(format!(
                "the stored login belongs to client id {} at {}, but the config now says {} at {}",
                login.client_id,
                login.token_url,
                self.config.client_id.as_deref().unwrap_or("none"),
                self.config.token_url
            ))
            }
            _ => self.last_error.clone(),
        };
        let snap = Snapshot {
            state: self.state(),
            token: self.token.clone(),
            scopes: self
                .login
                .as_ref()
                .map(|l| l.scopes.clone())
                .unwrap_or_default(),
            refresh_at: self.next_refresh.filter(|_| self.can_refresh()),
            login_at: self.login.as_ref().map(|l| clock::from_unix(l.login_at)),
            store: self.store.kind(),
            last_error,
            generation: self.generation,
            refreshes: self.refreshes,
            config: self.config.clone(),
        };
        self.publish.send_if_modified(|old| {
            if **old == snap {
                false
            } else {
                *old = Arc::new(snap);
                true
            }
        });
    }

    async fn command(&mut self, cmd: Command) {
        let now = clock::now();
        match cmd {
            Command::Get {
                min_valid,
                deadline,
                reply,
            } => {
                if let Some(t) = self.token.as_ref().filter(|t| t.good_for(now, min_valid)) {
                    let _ = reply.send(Ok(t.clone()));
                    return;
                }
                let snap = self.publish.borrow().clone();
                if let Some(f) = snap.blocked() {
                    let _ = reply.send(Err(f));
                    return;
                }
                if self.failures > 0 && !self.in_flight {
                    // Backing off: serve what is still valid rather than hammer Spotify.
                    if let Some(t) = self.valid_token(now) {
                        let _ = reply.send(Ok(t));
                        return;
                    }
                    if self.next_refresh.is_some_and(|at| at > deadline) {
                        let _ = reply.send(Err(self.unavailable()));
                        return;
                    }
                } else {
                    self.start_refresh();
                }
                self.waiters.push(Waiter { deadline, reply });
            }
            Command::Refresh { reply } => {
                if let Some(f) = self.publish.borrow().blocked() {
                    let _ = reply.send(Err(f));
                    return;
                }
                self.attempt_waiters.push(reply);
                self.start_refresh();
            }
            Command::Adopt {
                login,
                grant,
                reply,
            } => {
                self.generation += 1;
                self.in_flight = false;
                self.needs_login = false;
                self.failures = 0;
                self.login = Some(login);
                let saved = self.save().await;
                let token = self.take_grant(grant, now);
                self.last_error.clone_from(&saved.as_ref().err().cloned());
                let _ = reply.send(match saved {
                    Ok(()) => Ok(token.clone()),
                    Err(e) => Err(Failure::new(ErrorKind::Failed, e)),
                });
                self.answer_all(&Ok(token));
            }
            Command::Logout { reply } => {
                self.generation += 1;
                let result = self.store.delete().await;
                // Memory is cleared even if the store could not be: logout must take effect.
                self.login = None;
                self.token = None;
                self.in_flight = false;
                self.failures = 0;
                self.needs_login = false;
                self.next_refresh = None;
                self.unsaved_retry = None;
                self.last_error = result.as_ref().err().map(ToString::to_string);
                self.store_stale = result.is_err();
                self.answer_all(&Err(Failure::new(
                    ErrorKind::NeedsLogin,
                    "logged out: run `spotokctl login`",
                )));
                let _ = reply.send(result.map_err(|e| Failure::new(ErrorKind::Failed, e.0)));
            }
            Command::Reload { config } => {
                let margin_changed = config.refresh_margin != self.config.refresh_margin;
                self.config = config;
                if margin_changed && self.failures == 0 {
                    self.schedule();
                }
                if self.can_refresh() && self.token.is_none() && self.next_refresh.is_none() {
                    self.next_refresh = Some(now);
                }
            }
            Command::Shutdown { reply } => self.stopping = Some(reply),
            Command::StoreOpened { login } => self.store_opened(login, now).await,
        }
    }

    /// The store became usable. Memory wins over the store: a login that could not be saved
    /// is saved now, one that could not be deleted is deleted now; only a daemon with no
    /// login at all takes the stored one (e.g. it started while the keyring was locked).
    async fn store_opened(&mut self, login: Option<Login>, now: SystemTime) {
        if self.unsaved_retry.is_some() {
            if self.save().await.is_ok() {
                tracing::info!("the login was saved after all");
                self.last_error = None;
            }
        } else if self.store_stale {
            match self.store.delete().await {
                Ok(()) => {
                    tracing::info!("the dropped login was removed from the store after all");
                    self.store_stale = false;
                    if !self.needs_login {
                        self.last_error = None;
                    }
                }
                Err(e) => self.last_error = Some(e.0),
            }
        } else if self.login.is_none() && !self.needs_login {
            if let Some(login) = login {
                tracing::info!("picked up the stored login");
                self.generation += 1;
                self.failures = 0;
                self.login = Some(login);
                self.next_refresh = Some(now);
            }
            self.last_error = None;
        }
    }

    fn valid_token(&self, now: SystemTime) -> Option<Token> {
        self.token.clone().filter(|t| t.expires_at > now)
    }

    fn unavailable(&self) -> Failure {
        let when = self
            .next_refresh
            .and_then(|t| t.duration_since(clock::now()).ok())
            .map(|d| format!("; next try in {}", spotok_proto::duration::format(d)))
            .unwrap_or_default();
        Failure::new(
            ErrorKind::Unavailable,
            format!(
                "no valid token: Spotify's accounts service is failing ({}){when}; try again later",
                self.last_error.as_deref().unwrap_or("unknown error")
            ),
        )
    }

    fn start_refresh(&mut self) {
        if self.in_flight || !self.can_refresh() {
            if !self.can_refresh() {
                let f = self.publish.borrow().blocked();
                if let Some(f) = f {
                    self.answer_all(&Err(f));
                }
            }
            return;
        }
        let Some(login) = &self.login else { return };
        let client = match oauth_client(&self.config, &self.http) {
            Ok(c) => c,
            Err(f) => return self.answer_all(&Err(f)),
        };
        self.in_flight = true;
        self.next_refresh = None;
        let token = login.refresh_token.clone();
        let generation = self.generation;
        let done = self.done_tx.clone();
        tracing::debug!(generation, "token request");
        tokio::spawn(async move {
            let result = client.refresh(&token).await;
            let _ = done.send(Done { generation, result }).await;
        });
    }

    async fn done(&mut self, done: Done) {
        if done.generation != self.generation {
            tracing::debug!("dropping a token answer for an older login");
            return;
        }
        self.in_flight = false;
        let now = clock::now();
        match done.result {
            Ok(grant) => {
                let mut saved = Ok(());
                if let Some(new) = grant.refresh_token.clone() {
                    if let Some(login) = &mut self.login {
                        login.refresh_token = new;
                    }
                    if let Some(scopes) = grant.scopes.clone() {
                        if let Some(login) = &mut self.login {
                            login.scopes = scopes;
                        }
                    }
                    saved = self.save().await;
                } else if let Some(scopes) = grant.scopes.clone() {
                    if let Some(login) = self.login.as_mut().filter(|l| l.scopes != scopes) {
                        login.scopes = scopes;
                        saved = self.save().await;
                    }
                }
                self.failures = 0;
                self.last_error = saved.err();
                let token = self.take_grant(grant, now);
                tracing::info!(
                    expires_at = clock::unix(token.expires_at),
                    "token refreshed"
                );
                self.answer_all(&Ok(token));
            }
            Err(TokenError::InvalidGrant(why)) => {
                tracing::warn!("Spotify refused the refresh token ({why}); a new login is needed");
                let dropped = self.store.delete().await;
                self.login = None;
                self.token = None;
                self.needs_login = true;
                self.next_refresh = None;
                self.unsaved_retry = None;
                self.generation += 1;
                self.store_stale = dropped.is_err();
                self.last_error = Some(match dropped {
                    Ok(()) => format!("Spotify refused the refresh token ({why})"),
                    Err(e) => format!("Spotify refused the refresh token ({why}); also: {e}"),
                });
                self.answer_all(&Err(failure(&TokenError::InvalidGrant(why))));
            }
            Err(e) => {
                self.failures += 1;
                let retry_after = match &e {
                    TokenError::Transient { retry_after, .. } => *retry_after,
                    _ => Some(policy::BACKOFF_MAX),
                };
                let wait = policy::backoff(self.failures, retry_after, fastrand::f64());
                self.next_refresh = Some(now + wait);
                tracing::warn!(
                    failures = self.failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "token request failed: {e}"
                );
                self.last_error = Some(e.to_string());
                let f = failure(&e);
                for reply in self.attempt_waiters.drain(..) {
                    let _ = reply.send(Err(f.clone()));
                }
                let valid = self.valid_token(now);
                let next = now + wait;
                let unavailable = self.unavailable();
                // Waiters keep waiting for the next attempt only if there is no valid token
                // to serve them now and their deadline reaches that attempt.
                let (keep, answer): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.deadline >= next && valid.is_none());
                self.waiters = keep;
                for w in answer {
                    let _ = w.reply.send(match &valid {
                        Some(t) if matches!(e, TokenError::Transient { .. }) => Ok(t.clone()),
                        _ if matches!(e, TokenError::Transient { .. }) => Err(unavailable.clone()),
                        _ => Err(f.clone()),
                    });
                }
            }
        }
    }

    /// Records a grant as the current token and plans the next refresh.
    fn take_grant(&mut self, grant: Grant, now: SystemTime) -> Token {
        let token = Token {
            access: grant.access_token,
            issued_at: now,
            expires_at: now + grant.expires_in,
        };
        self.token = Some(token.clone());
        self.refreshes += 1;
        self.schedule();
        token
    }

    fn schedule(&mut self) {
        self.next_refresh = self.token.as_ref().map(|t| {
            policy::refresh_at(
                t.issued_at,
                t.expires_at,
                self.config.refresh_margin,
                fastrand::f64(),
            )
        });
    }

    fn answer_all(&mut self, result: &Result<Token, Failure>) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(result.clone());
        }
        for reply in self.attempt_waiters.drain(..) {
            let _ = reply.send(result.clone());
        }
    }

    /// Saves the login; on failure keeps it in memory and plans a retry.
    async fn save(&mut self) -> Result<(), String> {
        let Some(login) = &self.login else {
            return Ok(());
        };
        match self.store.save(login).await {
            Ok(()) => {
                self.unsaved_retry = None;
                // The saved login replaced whatever the store held.
                self.store_stale = false;
                Ok(())
            }
            Err(e) => {
                tracing::error!("{e}; keeping the login in memory and retrying");
                self.unsaved_retry = Some(clock::now() + Duration::from_secs(30));
                Err(format!(
                    "{e} (the login is kept in memory and the write is retried every 30s)"
                ))
            }
        }
    }

    async fn alarm(&mut self) {
        let now = clock::now();
        if self.unsaved_retry.is_some_and(|t| t <= now) {
            // A refresh in between may have cleared the error: show it again while it lasts.
            match self.save().await {
                Ok(()) => {
                    tracing::info!("the login was saved after all");
                    self.last_error = None;
                }
                Err(e) => self.last_error = Some(e),
            }
        }
        if self.next_refresh.is_some_and(|t| t <= now) {
            self.start_refresh();
        }
    }
}

/// The manager's inboxes, handed to [`Manager::run`].
#[derive(Debug)]
pub struct Receivers {
    /// From handles.
    commands: mpsc::Receiver<Command>,
    /// From token request tasks.
    done: mpsc::Receiver<Done>,
}
