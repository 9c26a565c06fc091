//! Desktop notifications (`org.freedesktop.Notifications`) when a login is needed and when the
//! login nears its end (SPEC: `notify`).
//!
//! [`run`] reads the snapshot watch like any other client of the manager and never asks the
//! manager anything, so a slow or missing notification server cannot stall the tokens. What
//! to say and when is [`Plan`], a pure function of the snapshots and the clock; [`Notifier`]
//! only talks to the server.
//!
//! Rules:
//! - One notification when the state becomes `needs_login`, one when the login enters its
//!   last [`policy::LOGIN_WARNING`], then at most one reminder a day while either lasts; a
//!   reminder replaces the previous notification, and one that no longer applies is closed.
//! - `notify = false` sends nothing. No bus or no server: nothing, and only a debug line.
//! - If the server supports actions, a "Log in" button starts the login and opens the
//!   browser through the desktop portal (`org.freedesktop.portal.OpenURI`), else with
//!   `xdg-open`; the text always says how to do it by hand (`spotokctl login`).
//! - No token ever goes into a notification: the texts carry states, dates and error
//!   messages, which never hold tokens.
//! - Wakes only for a new snapshot, a due reminder (wall-clock, suspend-safe) or a click.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use spotok_proto::State;
use tokio::sync::mpsc;
use zbus::export::futures_core::Stream;
use zbus::zvariant::Value;
use zbus::{Connection, MatchRule, MessageStream};

use crate::clock::{self, Alarm};
use crate::manager::{Handle, Snapshot};
use crate::policy;

/// The notification server's well-known name.
const SERVER: &str = "org.freedesktop.Notifications";
/// Its object.
const PATH: &str = "/org/freedesktop/Notifications";
/// At most one reminder a day.
const REMINDER: Duration = Duration::from_secs(86_400);
/// A notification server that does not answer within this long is skipped.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The action key of the "Log in" button.
const LOGIN_ACTION: &str = "login";

/// What a notification is about; each kind has at most one on screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// The state is `needs_login`.
    NeedsLogin,
    /// The login ends within [`policy::LOGIN_WARNING`].
    LoginEnding,
}

/// A notification to show.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Note {
    /// Which one, so a reminder replaces its predecessor.
    kind: Kind,
    /// The title.
    summary: String,
    /// The text: what happened and what to do.
    body: String,
}

/// What [`Plan::update`] asks the notifier to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Show (or replace) a notification.
    Show(Note),
    /// Take down the notification of this kind: it no longer applies.
    Close(Kind),
}

/// When to notify: the memory of what was said, as a pure function of snapshots and time.
#[derive(Debug, Default)]
struct Plan {
    /// The state of the previous snapshot; `None` before the first.
    last_state: Option<State>,
    /// While `needs_login`: when the next reminder is due.
    needs_login_next: Option<SystemTime>,
    /// While the login ends soon: which login (its `login_at`) and the next reminder.
    ending_next: Option<(SystemTime, SystemTime)>,
    /// When the current login enters its warning period.
    ending_opens: Option<SystemTime>,
}

impl Plan {
    /// Takes in a snapshot (or just the passing of time) and says what to show or close.
    fn update(&mut self, snap: &Snapshot, now: SystemTime) -> Vec<Step> {
        let on = snap.config.notify;
        let mut steps = Vec::new();

        if snap.state == State::NeedsLogin {
            let entered = self.last_state != Some(State::NeedsLogin);
            if entered || self.needs_login_next.is_some_and(|t| t <= now) {
                if on {
                    steps.push(Step::Show(needs_login_note(snap)));
                }
                self.needs_login_next = Some(now + REMINDER);
            }
        } else if self.needs_login_next.take().is_some() {
            steps.push(Step::Close(Kind::NeedsLogin));
        }
        self.last_state = Some(snap.state);

        let login = snap
            .login_at
            .zip(snap.login_expires_at())
            .filter(|_| snap.state != State::NeedsLogin);
        match login {
            Some((login_at, end)) if policy::login_ending(end, now) => {
                let due = match self.ending_next {
                    Some((warned, next)) if warned == login_at => next <= now,
                    _ => true,
                };
                if due {
                    if on {
                        steps.push(Step::Show(ending_note(end, now)));
                    }
                    self.ending_next = Some((login_at, now + REMINDER));
                }
                self.ending_opens = None;
            }
            other => {
                if self.ending_next.take().is_some() {
                    steps.push(Step::Close(Kind::LoginEnding));
                }
                self.ending_opens = other.map(|(_, end)| end - policy::LOGIN_WARNING);
            }
        }
        steps
    }

    /// When [`Plan::update`] must run again even with no new snapshot.
    fn next_wake(&self) -> Option<SystemTime> {
        [
            self.needs_login_next,
            self.ending_next.map(|(_, next)| next),
            self.ending_opens,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

fn needs_login_note(snap: &Snapshot) -> Note {
    let why = snap
        .last_error
        .as_deref()
        .unwrap_or("Spotify no longer accepts the saved login");
    Note {
        kind: Kind::NeedsLogin,
        summary: "Spotify login needed".into(),
        body: format!(
            "spotok cannot get Spotify tokens any more: {why}. Run `spotokctl login` to log in \
             again."
        ),
    }
}

fn ending_note(end: SystemTime, now: SystemTime) -> Note {
    let days = end
        .duration_since(now)
        .map_or(0, |left| left.as_secs().div_ceil(86_400));
    let when = match days {
        0 => "today".to_string(),
        1 => "tomorrow".to_string(),
        n => format!("in {n} days"),
    };
    Note {
        kind: Kind::LoginEnding,
        summary: format!("Spotify login ends {when}"),
        body: format!(
            "Spotify ends spotok's login on {} (six months after it was made). Run `spotokctl \
             login` before then to renew it.",
            date(end)
        ),
    }
}

/// `YYYY-MM-DD` (UTC) of a wall-clock time; the proleptic Gregorian calendar, from the days
/// since 1970 (H. Hinnant's `civil_from_days`).
fn date(t: SystemTime) -> String {
    let days = (clock::unix(t) / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Escapes text for servers that read the body as markup.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The client side of the notification server, connected on first use.
#[derive(Debug, Default)]
struct Notifier {
    /// The session-bus connection, once made; dropped after a bus failure.
    conn: Option<Connection>,
    /// The notification of each kind on screen, by the server's id.
    shown: HashMap<Kind, u32>,
}

impl Notifier {
    /// The connection, made if needed; a new one also starts forwarding button clicks.
    async fn connection(&mut self, clicks: &mpsc::Sender<(u32, String)>) -> Option<Connection> {
        if let Some(conn) = &self.conn {
            return Some(conn.clone());
        }
        let build = async {
            zbus::connection::Builder::session()?
                .method_timeout(CALL_TIMEOUT)
                .build()
                .await
        };
        let conn = match tokio::time::timeout(CALL_TIMEOUT, build).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!("no notification: no session bus ({e})");
                return None;
            }
            Err(_) => {
                tracing::debug!("no notification: the session bus does not answer");
                return None;
            }
        };
        match clicks_stream(&conn).await {
            Ok(stream) => {
                tokio::spawn(forward_clicks(stream, clicks.clone()));
            }
            Err(e) => tracing::debug!("notification buttons will not work: {e}"),
        }
        self.conn = Some(conn.clone());
        Some(conn)
    }

    /// Shows `note`, replacing the previous one of its kind.
    async fn show(&mut self, note: &Note, clicks: &mpsc::Sender<(u32, String)>) {
        let Some(conn) = self.connection(clicks).await else {
            return;
        };
        let caps: Vec<String> = match call(&conn, "GetCapabilities", &()).await {
            Ok(caps) => caps,
            Err(e) => return self.failed(&e),
        };
        let has = |cap: &str| caps.iter().any(|c| c == cap);
        let body = if has("body-markup") {
            escape(&note.body)
        } else {
            note.body.clone()
        };
        let actions: Vec<&str> = if has("actions") {
            vec!["default", "Log in", LOGIN_ACTION, "Log in"]
        } else {
            Vec::new()
        };
        let hints = HashMap::from([("urgency", Value::U8(1))]);
        let replaces = self.shown.get(&note.kind).copied().unwrap_or(0);
        let args = (
            "spotok",
            replaces,
            "dialog-password",
            note.summary.as_str(),
            body.as_str(),
            actions,
            hints,
            -1_i32,
        );
        match call::<_, u32>(&conn, "Notify", &args).await {
            Ok(id) => {
                tracing::info!(kind = ?note.kind, "desktop notification sent");
                self.shown.insert(note.kind, id);
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Takes down the notification of `kind`, if one is shown.
    async fn close(&mut self, kind: Kind) {
        let Some(id) = self.shown.remove(&kind) else {
            return;
        };
        if let Some(conn) = &self.conn {
            if let Err(e) = call::<_, ()>(conn, "CloseNotification", &(id,)).await {
                tracing::debug!("cannot close notification {id}: {e}");
            }
        }
    }

    fn failed(&mut self, e: &zbus::Error) {
        tracing::debug!("no notification: {e}");
        if !matches!(e, zbus::Error::MethodError(..) | zbus::Error::FDO(_)) {
            // Not the server's answer: the bus itself failed; connect afresh next time.
            self.conn = None;
        }
    }

    /// Whether `id` is one of ours (servers broadcast clicks for every client's ids).
    fn owns(&self, id: u32) -> bool {
        self.shown.values().any(|&shown| shown == id)
    }
}

async fn call<B, R>(conn: &Connection, method: &str, body: &B) -> zbus::Result<R>
where
    B: serde::Serialize + zbus::zvariant::DynamicType,
    R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
{
    conn.call_method(Some(SERVER), PATH, Some(SERVER), method, body)
        .await?
        .body()
        .deserialize()
}

async fn clicks_stream(conn: &Connection) -> zbus::Result<MessageStream> {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(SERVER)?
        .member("ActionInvoked")?
        .path(PATH)?
        .build();
    MessageStream::for_match_rule(rule, conn, Some(16)).await
}

/// Passes `ActionInvoked(id, key)` signals on until the connection ends.
async fn forward_clicks(mut stream: MessageStream, clicks: mpsc::Sender<(u32, String)>) {
    while let Some(msg) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next(cx)).await
    {
        let Ok(msg) = msg else { continue };
        if let Ok(click) = msg.body().deserialize::<(u32, String)>() {
            if clicks.send(click).await.is_err() {
                return;
            }
        }
    }
}

/// Starts a login and opens its URL in the browser, for the "Log in" button.
async fn log_in(handle: &Handle, conn: Option<&Connection>) {
    // Ask again for what the current login has, so renewing it keeps every scope.
    let scopes = handle.snapshot().scopes.clone();
    let url = match crate::login::begin(handle, None, scopes).await {
        Ok((url, _)) => url,
        Err(f) => {
            tracing::warn!("cannot start a login from the notification: {}", f.message);
            return;
        }
    };
    tracing::info!("login started from the notification; opening the browser");
    if let Some(conn) = conn {
        // The desktop portal starts the browser in the user's session, outside spotokd's
        // systemd sandbox, where a browser (JIT, its own namespaces) would not run.
        let options: HashMap<&str, Value> = HashMap::new();
        let opened = conn
            .call_method(
                Some("org.freedesktop.portal.Desktop"),
                "/org/freedesktop/portal/desktop",
                Some("org.freedesktop.portal.OpenURI"),
                "OpenURI",
                &("", url.as_str(), options),
            )
            .await;
        match opened {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!("no desktop portal to open the browser ({e}); trying xdg-open");
            }
        }
    }
    let spawned = std::process::Command::new("xdg-open")
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            // Reaped off the async workers; xdg-open returns once the browser has the URL.
            tokio::task::spawn_blocking(move || child.wait());
        }
        Err(e) => tracing::warn!(
            "cannot run xdg-open ({e}); finish the login with `spotokctl login` instead"
        ),
    }
}

/// Watches the snapshots and notifies; returns when the manager is gone.
pub async fn run(handle: Handle) {
    let mut snapshots = handle.subscribe();
    let mut alarm = match Alarm::new() {
        Ok(alarm) => alarm,
        Err(e) => {
            tracing::warn!("no desktop notifications: cannot make a timer ({e})");
            return;
        }
    };
    let (clicks_tx, mut clicks) = mpsc::channel(8);
    let mut plan = Plan::default();
    let mut notifier = Notifier::default();
    loop {
        let snap = snapshots.borrow_and_update().clone();
        for step in plan.update(&snap, clock::now()) {
            match step {
                Step::Show(note) => notifier.show(&note, &clicks_tx).await,
                Step::Close(kind) => notifier.close(kind).await,
            }
        }
        if let Err(e) = alarm.set(plan.next_wake()) {
            tracing::warn!("cannot set the reminder timer: {e}");
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            () = alarm.fired() => {}
            Some((id, key)) = clicks.recv() => {
                if notifier.owns(id) && (key == LOGIN_ACTION || key == "default") {
                    log_in(&handle, notifier.conn.as_ref()).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T0: u64 = 1_800_000_000;
    const DAY: u64 = 86_400;

    fn at(secs: u64) -> SystemTime {
        clock::from_unix(T0 + secs)
    }

    fn snap(state: State, login_at: Option<SystemTime>, notify: bool) -> Snapshot {
        let mut config = crate::config::Config::parse(
            "",
            std::path::Path::new("/c/config.toml"),
            std::path::Path::new("/s"),
            None,
        )
        .unwrap();
        config.notify = notify;
        Snapshot {
            state,
            token: None,
            scopes: Vec::new(),
            refresh_at: None,
            login_at,
            store: spotok_proto::wire::StoreKind::File,
            last_error: Some("Spotify refused the refresh token (Invalid refresh token)".into()),
            generation: 0,
            refreshes: 0,
            config: Arc::new(config),
        }
    }

    fn shows(steps: &[Step]) -> Vec<Kind> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Show(n) => Some(n.kind),
                Step::Close(_) => None,
            })
            .collect()
    }

    #[test]
    fn needs_login_once_per_change_then_daily() {
        let mut plan = Plan::default();
        assert!(plan
            .update(&snap(State::Active, None, true), at(0))
            .is_empty());
        assert_eq!(plan.next_wake(), None, "nothing to remind of: no wake-up");
        let steps = plan.update(&snap(State::NeedsLogin, None, true), at(10));
        assert_eq!(shows(&steps), [Kind::NeedsLogin]);
        let Step::Show(note) = &steps[0] else {
            panic!()
        };
        assert!(
            note.body.contains("Invalid refresh token") && note.body.contains("spotokctl login")
        );
        // The same state again (another snapshot field changed): nothing new.
        assert!(plan
            .update(&snap(State::NeedsLogin, None, true), at(20))
            .is_empty());
        assert_eq!(plan.next_wake(), Some(at(10 + DAY)));
        assert!(plan
            .update(&snap(State::NeedsLogin, None, true), at(DAY))
            .is_empty());
        let steps = plan.update(&snap(State::NeedsLogin, None, true), at(10 + DAY));
        assert_eq!(shows(&steps), [Kind::NeedsLogin]);
        // Logged in again: the notification is taken down, no more reminders.
        let steps = plan.update(&snap(State::Active, Some(at(2 * DAY)), true), at(2 * DAY));
        assert_eq!(steps, [Step::Close(Kind::NeedsLogin)]);
    }

    #[test]
    fn a_needs_login_daemon_start_notifies() {
        let mut plan = Plan::default();
        let steps = plan.update(&snap(State::NeedsLogin, None, true), at(0));
        assert_eq!(shows(&steps), [Kind::NeedsLogin]);
    }

    #[test]
    fn login_end_warned_from_fourteen_days_before_then_daily() {
        let mut plan = Plan::default();
        let login_at = at(0);
        let end = login_at + policy::LOGIN_LIFETIME;
        let opens = end - policy::LOGIN_WARNING;
        assert!(plan
            .update(&snap(State::Active, Some(login_at), true), at(60))
            .is_empty());
        assert_eq!(
            plan.next_wake(),
            Some(opens),
            "one wake-up, when the warning is due"
        );
        let steps = plan.update(&snap(State::Active, Some(login_at), true), opens);
        assert_eq!(shows(&steps), [Kind::LoginEnding]);
        let Step::Show(note) = &steps[0] else {
            panic!()
        };
        assert_eq!(note.summary, "Spotify login ends in 14 days");
        assert!(note.body.contains(&date(end)), "{}", note.body);
        // Refreshes flip the state; no new warning for the same login on the same day.
        assert!(plan
            .update(
                &snap(State::Refreshing, Some(login_at), true),
                opens + Duration::from_secs(5)
            )
            .is_empty());
        assert!(plan
            .update(
                &snap(State::Active, Some(login_at), true),
                opens + Duration::from_secs(9)
            )
            .is_empty());
        let next = opens + REMINDER;
        assert_eq!(plan.next_wake(), Some(next));
        let steps = plan.update(&snap(State::Active, Some(login_at), true), next);
        assert_eq!(shows(&steps), [Kind::LoginEnding]);
        // A new login ends the warnings and takes the notification down.
        let renewed = next + Duration::from_secs(60);
        let steps = plan.update(&snap(State::Active, Some(renewed), true), renewed);
        assert_eq!(steps, [Step::Close(Kind::LoginEnding)]);
        assert_eq!(
            plan.next_wake(),
            Some(renewed + policy::LOGIN_LIFETIME - policy::LOGIN_WARNING)
        );
    }

    #[test]
    fn notify_false_shows_nothing() {
        let mut plan = Plan::default();
        let login_at = at(0);
        let end = login_at + policy::LOGIN_LIFETIME;
        assert!(shows(&plan.update(&snap(State::NeedsLogin, None, false), at(0))).is_empty());
        assert!(shows(&plan.update(&snap(State::Active, Some(login_at), false), end)).is_empty());
    }

    #[test]
    fn dates_and_markup() {
        assert_eq!(date(clock::from_unix(0)), "1970-01-01");
        assert_eq!(date(clock::from_unix(951_782_400)), "2000-02-29");
        assert_eq!(date(clock::from_unix(1_800_000_000)), "2027-01-15");
        assert_eq!(escape("a <b> & c"), "a &lt;b&gt; &amp; c");
    }
}
