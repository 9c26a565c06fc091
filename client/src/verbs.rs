//! One function per verb.

use std::fmt::Write as _;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::CommandFactory;
use spotok_proto::wire::{State, Status};
use spotok_proto::{ErrorKind, RefreshToken, Reply, Request};

use crate::conn::{unexpected, Conn};
use crate::{Cli, Fail, Verb};

/// Runs the verb.
pub fn run(cli: Cli) -> Result<(), Fail> {
    let socket = socket_path(cli.socket.as_deref());
    let json = cli.json;
    match cli.verb {
        Verb::Get {
            min_valid,
            scopes,
            header,
            timeout,
        } => get(&socket, min_valid, scopes, header, json, timeout),
        Verb::Status => status(&socket, json),
        Verb::Login {
            no_browser,
            client_id,
            scopes,
        } => login(&socket, no_browser, client_id, scopes, json),
        Verb::Logout => logout(&socket),
        Verb::Refresh => refresh(&socket, json),
        Verb::Import => import(&socket),
        Verb::Whoami => whoami(&socket, json),
        Verb::Exec {
            env,
            min_valid,
            command,
        } => exec(&socket, &env, min_valid, &command),
        Verb::Watch => watch(&socket, json),
        Verb::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "spotokctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Verb::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| Fail::new(ErrorKind::Failed, e.to_string())),
    }
}

fn socket_path(flag: Option<&std::path::Path>) -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    spotok_proto::paths::socket(&|k| std::env::var_os(k), flag, uid)
}

fn out(text: &str) -> Result<(), Fail> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Fail::new(ErrorKind::Failed, format!("cannot write to stdout: {e}")))
}

fn json_line(value: &serde_json::Value) -> Result<(), Fail> {
    out(&format!("{value}\n"))
}

/// Asks for a token; shared by `get` and `exec`.
fn token(
    socket: &std::path::Path,
    min_valid: Duration,
    scopes: Vec<String>,
    timeout: Duration,
) -> Result<(String, u64, Vec<String>), Fail> {
    // The daemon answers `unavailable` itself once it knows it cannot make the deadline;
    // the read timeout is the backstop.
    let request = Request::Get {
        min_valid_secs: min_valid.as_secs(),
        scopes,
        wait_secs: timeout.as_secs(),
    };
    let read_timeout = Some(timeout + Duration::from_secs(2));
    match Conn::open_with(socket, read_timeout, Some(&request))?.1 {
        None => Err(Fail::new(ErrorKind::Failed, "spotokd sent no reply")),
        Some(Reply::Token {
            access_token,
            expires_at,
            scopes,
        }) => Ok((access_token.expose().to_string(), expires_at, scopes)),
        Some(other) => Err(unexpected(&other)),
    }
}

fn get(
    socket: &std::path::Path,
    min_valid: Duration,
    scopes: Vec<String>,
    header: bool,
    json: bool,
    timeout: Duration,
) -> Result<(), Fail> {
    let (token, expires_at, scopes) = token(socket, min_valid, scopes, timeout)?;
    if json {
        json_line(&serde_json::json!({
            "access_token": token,
            "expires_at": expires_at,
            "scopes": scopes,
        }))
    } else if header {
        out(&format!("Authorization: Bearer {token}\n"))
    } else {
        out(&format!("{token}\n"))
    }
}

fn status(socket: &std::path::Path, json: bool) -> Result<(), Fail> {
    let mut conn = Conn::open(socket, Some(Duration::from_secs(10)))?;
    let Reply::Status(status) = conn.ask(&Request::Status)? else {
        return Err(Fail::new(
            ErrorKind::ProtocolMismatch,
            "unexpected reply to status",
        ));
    };
    if json {
        return json_line(&serde_json::to_value(&status).unwrap_or_default());
    }
    out(&render_status(&status))?;
    if let Some(hint) = hint(&status) {
        eprintln!("spotokctl: {hint}");
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "in 54m" / "3m ago".
fn relative(at: u64) -> String {
    let now = now();
    if at >= now {
        format!("in {}", human(at - now))
    } else {
        format!("{} ago", human(now - at))
    }
}

fn human(secs: u64) -> String {
    if secs >= 2 * 86_400 {
        format!("{}d", secs / 86_400)
    } else {
        spotok_proto::duration::format(Duration::from_secs(secs))
    }
}

fn render_status(s: &Status) -> String {
    let mut text = format!("state:        {}\n", s.state.as_str());
    if let Some(at) = s.expires_at {
        let verb = if at > now() { "expires" } else { "expired" };
        let _ = writeln!(text, "token:        {verb} {} (unix {at})", relative(at));
    }
    if let Some(at) = s.refresh_at {
        let _ = writeln!(text, "next refresh: {}", relative(at));
    }
    if !s.scopes.is_empty() {
        let _ = writeln!(text, "scopes:       {}", s.scopes.join(" "));
    }
    if let Some(at) = s.login_expires_at {
        let _ = writeln!(text, "login ends:   {} (unix {at})", relative(at));
    }
    let _ = writeln!(text, "store:        {}", s.store.as_str());
    if let Some(e) = &s.last_error {
        let _ = writeln!(text, "last error:   {e}");
    }
    let _ = writeln!(
        text,
        "version:      spotokd {} (protocol {}), spotokctl {}",
        s.version,
        s.protocol,
        env!("CARGO_PKG_VERSION")
    );
    text
}

/// What to do next, for a state that needs the user.
fn hint(s: &Status) -> Option<String> {
    let ending = s
        .login_expires_at
        .filter(|at| at.saturating_sub(now()) <= 14 * 86_400);
    match s.state {
        State::Unconfigured => Some(
            "no client_id: create an app at https://developer.spotify.com/dashboard, then run \
             `spotokctl login --client-id ID`"
                .into(),
        ),
        State::LoggedOut | State::NeedsLogin => Some("log in with `spotokctl login`".into()),
        _ => ending.map(|at| {
            format!(
                "the login ends {} (Spotify ends logins after six months): run `spotokctl login` to renew it",
                relative(at)
            )
        }),
    }
}

fn login(
    socket: &std::path::Path,
    no_browser: bool,
    client_id: Option<String>,
    scopes: Vec<String>,
    json: bool,
) -> Result<(), Fail> {
    let mut conn = Conn::open(socket, Some(Duration::from_secs(700)))?;
    let (url, redirect_uri) = match conn.ask(&Request::Login { client_id, scopes })? {
        Reply::LoginStarted { url, redirect_uri } => (url, redirect_uri),
        other => return Err(unexpected(&other)),
    };
    let display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    eprintln!("Open this URL in a browser to log in to Spotify:\n\n  {url}\n");
    eprintln!("(Your Spotify app must list {redirect_uri} as a redirect URI.)");
    if !no_browser && display {
        let opened = std::process::Command::new("xdg-open")
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if opened.is_err() {
            eprintln!("(Could not start xdg-open; open the URL yourself.)");
        }
    }
    if no_browser {
        eprintln!(
            "If the browser is on another machine, log in there, then paste the address it \
             ends on (it starts with {redirect_uri}) here and press Enter."
        );
        let socket = socket.to_path_buf();
        std::thread::spawn(move || paste(&socket));
    }
    eprintln!("Waiting for the login to finish…");
    match conn.ask(&Request::LoginWait)? {
        Reply::Status(status) => {
            if json {
                json_line(&serde_json::to_value(&status).unwrap_or_default())
            } else {
                let scopes = if status.scopes.is_empty() {
                    "no scopes".to_string()
                } else {
                    status.scopes.join(" ")
                };
                eprintln!("Logged in ({scopes}). Try `spotokctl whoami`.");
                Ok(())
            }
        }
        other => Err(unexpected(&other)),
    }
}

/// Reads pasted redirect URLs from stdin until one completes the login.
fn paste(socket: &std::path::Path) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        let url = line.trim();
        if url.is_empty() {
            continue;
        }
        let result = Conn::open(socket, Some(Duration::from_secs(60))).and_then(|mut c| {
            c.ask(&Request::LoginRedirect {
                url: url.to_string(),
            })
        });
        match result {
            Ok(_) => return,
            Err(f) => eprintln!("spotokctl: {}", f.message),
        }
    }
}

fn logout(socket: &std::path::Path) -> Result<(), Fail> {
    let mut conn = Conn::open(socket, Some(Duration::from_secs(30)))?;
    let store = match conn.ask(&Request::Status)? {
        Reply::Status(s) => s.store.as_str(),
        other => return Err(unexpected(&other)),
    };
    conn.ask(&Request::Logout)?;
    eprintln!(
        "Logged out: the refresh token was removed from the {store} store. To revoke spotok's \
         access at Spotify too, remove the app at https://www.spotify.com/account/apps/"
    );
    Ok(())
}

fn refresh(socket: &std::path::Path, json: bool) -> Result<(), Fail> {
    let mut conn = Conn::open(socket, Some(Duration::from_secs(60)))?;
    match conn.ask(&Request::Refresh)? {
        Reply::Refreshed { expires_at } if json => {
            json_line(&serde_json::json!({ "expires_at": expires_at }))
        }
        Reply::Refreshed { expires_at } => out(&format!(
            "refreshed; the token expires {} (unix {expires_at})\n",
            relative(expires_at)
        )),
        other => Err(unexpected(&other)),
    }
}

fn import(socket: &std::path::Path) -> Result<(), Fail> {
    let stdin = std::io::stdin();
    let mut text = String::new();
    if stdin.is_terminal() {
        eprint!("Paste the refresh token and press Enter: ");
        stdin
            .lock()
            .read_line(&mut text)
            .map_err(|e| Fail::new(ErrorKind::Failed, e.to_string()))?;
    } else {
        stdin
            .lock()
            .take(64 * 1024)
            .read_to_string(&mut text)
            .map_err(|e| Fail::new(ErrorKind::InvalidArgs, format!("cannot read stdin: {e}")))?;
    }
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Fail::new(
            ErrorKind::InvalidArgs,
            "no refresh token on stdin: pipe exactly one token, e.g. `spotokctl import < token.txt`",
        ));
    }
    let mut conn = Conn::open(socket, Some(Duration::from_secs(60)))?;
    match conn.ask(&Request::Import {
        refresh_token: RefreshToken::new(token.to_string()),
    })? {
        Reply::Refreshed { .. } => {
            eprintln!("Imported: Spotify accepted the refresh token and spotokd stored it.");
            Ok(())
        }
        other => Err(unexpected(&other)),
    }
}

fn whoami(socket: &std::path::Path, json: bool) -> Result<(), Fail> {
    let mut conn = Conn::open(socket, Some(Duration::from_secs(60)))?;
    match conn.ask(&Request::Whoami)? {
        Reply::Me { display_name, id } if json => {
            json_line(&serde_json::json!({ "display_name": display_name, "id": id }))
        }
        Reply::Me { display_name, id } if display_name.is_empty() => out(&format!("{id}\n")),
        Reply::Me { display_name, id } => out(&format!("{display_name} ({id})\n")),
        other => Err(unexpected(&other)),
    }
}

fn exec(
    socket: &std::path::Path,
    env: &str,
    min_valid: Duration,
    command: &[String],
) -> Result<(), Fail> {
    use std::os::unix::process::CommandExt;
    if env.is_empty() || env.contains('=') || env.contains('\0') {
        return Err(Fail::new(
            ErrorKind::InvalidArgs,
            format!("{env:?} is not a variable name"),
        ));
    }
    let (token, _, _) = token(socket, min_valid, Vec::new(), Duration::from_secs(30))?;
    let error = std::process::Command::new(&command[0])
        .args(&command[1..])
        .env(env, token)
        .exec();
    Err(Fail::new(
        ErrorKind::Failed,
        format!("cannot run {}: {error}", command[0]),
    ))
}

fn watch(socket: &std::path::Path, json: bool) -> Result<(), Fail> {
    let mut conn = Conn::open(socket, None)?;
    conn.send(&Request::Watch)?;
    loop {
        let Reply::Status(s) = conn.read()? else {
            return Err(Fail::new(
                ErrorKind::ProtocolMismatch,
                "unexpected reply to watch",
            ));
        };
        if json {
            json_line(&serde_json::to_value(&s).unwrap_or_default())?;
        } else {
            let expiry = s
                .expires_at
                .map(|at| format!(" token expires {}", relative(at)))
                .unwrap_or_default();
            let error = s
                .last_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            out(&format!("{}{expiry}{error}\n", s.state.as_str()))?;
        }
    }
}
