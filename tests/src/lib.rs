//! Black-box tests for spotok: the real `spotokd` and `spotokctl` binaries, in a private
//! `HOME`/`XDG_*` tree, against [`fake_spotify::FakeSpotify`] on loopback.
//!
//! # Layout
//! - [`fake_spotify`]: the fake accounts service and Web API.
//! - [`Env`]: one isolated user (temp folders, config, socket) and the commands run as it.
//! - [`Daemon`]: a running `spotokd`, started and awaited through a `NOTIFY_SOCKET` the test
//!   listens on (readiness, never sleeps), killed on drop.
//! - [`Bus`]: a private `dbus-daemon`, stopped on drop.
//! - [`Keyring`]: a real `gnome-keyring-daemon` on such a bus, its login keyring unlocked,
//!   stopped on drop.
//!
//! Every wait has a deadline; every process started is stopped.

// Helpers such as `Output::ok` are called for their assertions; their results may be ignored.
#![allow(clippy::must_use_candidate)]

pub mod fake_spotify;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use fake_spotify::{FakeSpotify, Scripted};

/// How long any single command may run before the test fails.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// The folder holding the built binaries (`target/debug`), found from the test executable.
#[must_use]
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf();
    for name in ["spotokd", "spotokctl"] {
        assert!(
            dir.join(name).exists(),
            "{} is missing: run `cargo build --workspace` first (scripts/test.sh does)",
            dir.join(name).display()
        );
    }
    dir
}

/// The path of a built binary.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Polls `check` every 20 ms until it is true or `deadline` passes.
pub fn wait_until(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Output {
    /// Panics with both streams unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless it succeeded.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.expect_code(0)
    }
}

/// Runs `cmd` to completion with `input` on stdin, killing it after `deadline`.
#[must_use]
pub fn run(mut cmd: Command, input: Option<&str>, deadline: Duration) -> Output {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        let text = text.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_child(&mut child, deadline)
        .unwrap_or_else(|| panic!("{cmd:?} still running after {deadline:?}; killed"));
    Output {
        code: status.code(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Waits for `child` up to `deadline`; kills it and returns `None` past that.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One isolated user: a temp `HOME` with its own XDG folders, config and socket.
#[derive(Debug)]
pub struct Env {
    /// Owns the folders; removed on drop.
    pub dir: tempfile::TempDir,
    /// `$HOME`.
    pub home: PathBuf,
    /// `$XDG_CONFIG_HOME/spotok/config.toml`.
    pub config: PathBuf,
    /// `$XDG_STATE_HOME/spotok`.
    pub state: PathBuf,
    /// `$XDG_RUNTIME_DIR`.
    pub runtime: PathBuf,
    /// `$XDG_RUNTIME_DIR/spotok/spotokd.sock`.
    pub socket: PathBuf,
    /// `DBUS_SESSION_BUS_ADDRESS` for the commands; by default a bus that does not exist.
    pub bus: String,
    /// Extra environment for every command.
    pub vars: Vec<(String, String)>,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// Fresh folders, no config.
    #[must_use]
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spotok-test-")
            .tempdir()
            .expect("tempdir");
        let home = dir.path().join("home");
        let runtime = dir.path().join("run");
        for d in [&home, &runtime] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        Self {
            config: home.join(".config/spotok/config.toml"),
            state: home.join(".local/state/spotok"),
            socket: runtime.join("spotok/spotokd.sock"),
            bus: format!("unix:path={}", dir.path().join("no-bus").display()),
            vars: Vec::new(),
            home,
            runtime,
            dir,
        }
    }

    /// A fresh user whose commands talk to a private bus, started here (stop it with the
    /// returned [`Bus`], which also stops on drop).
    #[must_use]
    pub fn with_bus() -> (Self, Bus) {
        let mut env = Self::new();
        let bus = Bus::start(env.dir.path());
        env.bus.clone_from(&bus.address);
        (env, bus)
    }

    /// Writes the config file.
    pub fn write_config(&self, text: &str) {
        std::fs::create_dir_all(self.config.parent().expect("parent")).expect("mkdir");
        std::fs::write(&self.config, text).expect("write config");
    }

    /// A config for `fake`, with `extra` lines appended (e.g. `refresh_margin = "2s"`).
    pub fn configure(&self, fake: &FakeSpotify, extra: &str) {
        self.write_config(&format!(
            "client_id = \"testclient\"\nstore = \"file\"\nnotify = false\n\
             auth_url = \"{}\"\ntoken_url = \"{}\"\napi_url = \"{}\"\n{extra}\n",
            fake.auth_url(),
            fake.token_url(),
            fake.api_url()
        ));
    }

    /// A command for `bin` with this user's environment and nothing of the caller's.
    #[must_use]
    pub fn command(&self, bin_name: &str) -> Command {
        let mut cmd = Command::new(bin(bin_name));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("XDG_STATE_HOME", self.home.join(".local/state"))
            .env("XDG_DATA_HOME", self.home.join(".local/share"))
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("SPOTOK_LOG", "debug");
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `spotokctl args…`.
    #[must_use]
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.command("spotokctl");
        cmd.args(args);
        run(cmd, None, COMMAND_DEADLINE)
    }

    /// Runs `spotokctl args…` with `input` on stdin.
    #[must_use]
    pub fn ctl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut cmd = self.command("spotokctl");
        cmd.args(args);
        run(cmd, Some(input), COMMAND_DEADLINE)
    }

    /// Imports a fresh refresh token from `fake` and checks it worked.
    pub fn import(&self, fake: &FakeSpotify) -> String {
        let token = fake.issue_refresh_token();
        self.ctl_stdin(&["import"], &token).ok();
        token
    }

    /// Starts `spotokd args…` and waits for `READY=1`.
    #[must_use]
    pub fn daemon(&self, args: &[&str]) -> Daemon {
        let daemon = self.spawn_daemon(args);
        assert!(
            daemon.wait_for("READY=1", Duration::from_secs(20)),
            "spotokd did not become ready; its log:\n{}",
            daemon.log()
        );
        daemon
    }

    /// Starts `spotokd args…` without waiting.
    #[must_use]
    pub fn spawn_daemon(&self, args: &[&str]) -> Daemon {
        let n = std::sync::atomic::AtomicUsize::new(0);
        let tag = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let notify_path =
            self.dir
                .path()
                .join(format!("notify-{}-{tag}-{}", std::process::id(), unique()));
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        let log_path = self.dir.path().join(format!("spotokd-{}.log", unique()));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = self.command("spotokd");
        cmd.args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn spotokd");
        Daemon {
            child,
            notify,
            log: log_path,
            seen: std::cell::RefCell::new(Vec::new()),
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running `spotokd`; killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Where it sends `sd_notify` messages.
    notify: UnixDatagram,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Every notify message received so far.
    seen: std::cell::RefCell<Vec<String>>,
}

impl Daemon {
    /// Its PID.
    #[must_use]
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits")
    }

    /// Its log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a notify message containing the line `what` arrives (or was seen and not
    /// yet consumed); consumes it.
    pub fn wait_for(&self, what: &str, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            {
                let mut seen = self.seen.borrow_mut();
                if let Some(i) = seen.iter().position(|m| m.lines().any(|l| l == what)) {
                    seen.remove(i);
                    return true;
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self
                .notify
                .set_read_timeout(Some(left.min(Duration::from_millis(200))));
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.notify.recv(&mut buf) {
                self.seen
                    .borrow_mut()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Every notify message received and not consumed.
    #[must_use]
    pub fn messages(&self) -> Vec<String> {
        let _ = self.wait_for("\u{0}never", Duration::from_millis(50));
        self.seen.borrow().clone()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).expect("pid");
        let _ = rustix::process::kill_process(pid, sig);
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        wait_child(&mut self.child, Duration::from_secs(10)).expect("spotokd stops within 10 s")
    }

    /// SIGKILL, then reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A private `dbus-daemon` (session bus configuration), stopped on drop.
#[derive(Debug)]
pub struct Bus {
    /// The process.
    child: Child,
    /// `DBUS_SESSION_BUS_ADDRESS` for clients.
    pub address: String,
}

impl Bus {
    /// Starts a bus listening in `dir`. Panics with a hint when `dbus-daemon` is missing.
    #[must_use]
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join(format!("bus-{}", unique()));
        Self::start_at(dir, &format!("unix:path={}", socket.display()))
    }

    /// Starts a bus listening on `address` (`unix:path=…`), e.g. the address of a bus that was
    /// stopped, to play a restart of the session bus. Its config file goes in `dir`.
    #[must_use]
    pub fn start_at(dir: &Path, address: &str) -> Self {
        let address = address.to_string();
        let config = dir.join(format!("bus-{}.conf", unique()));
        std::fs::write(
            &config,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                 <busconfig><type>session</type><listen>{address}</listen>\
                 <auth>EXTERNAL</auth>\
                 <policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>\
                 <allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>\n"
            ),
        )
        .expect("bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .arg("--print-address")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "dbus-daemon is missing: run scripts/test.sh, which installs it (package dbus)",
            );
        let mut out = child.stdout.take().expect("stdout");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert!(!line.is_empty(), "dbus-daemon did not start");
        Self { child, address }
    }

    /// Stops the bus.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP/1.1 GET on loopback (no redirects followed): status, headers, body;
/// status 0 when the connection is refused.
#[must_use]
pub fn http_get(url: &str) -> (u16, Vec<(String, String)>, String) {
    let url = url::Url::parse(url).expect("url");
    let host = url.host_str().expect("host").trim_matches(['[', ']']);
    let port = url.port_or_known_default().expect("port");
    let mut stream = match std::net::TcpStream::connect((host, port)) {
        Ok(s) => s,
        // Status 0: nobody listens (e.g. the login's redirect listener has closed).
        Err(e) => return (0, Vec::new(), e.to_string()),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// A `spotokctl login` running in the background, its stderr read line by line.
#[derive(Debug)]
pub struct LoginRun {
    /// The process.
    pub child: Child,
    /// Its stdin, for pasting URLs.
    pub stdin: Option<std::process::ChildStdin>,
    /// Lines of its stderr.
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line so far.
    pub seen: Vec<String>,
}

impl LoginRun {
    /// Starts `spotokctl login args…`.
    #[must_use]
    pub fn start(env: &Env, args: &[&str]) -> Self {
        let mut cmd = env.command("spotokctl");
        cmd.arg("login")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn login");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line matching `pred`.
    pub fn line(&mut self, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        let end = Instant::now() + Duration::from_secs(30);
        while let Ok(line) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
        None
    }

    /// The authorize URL it printed.
    #[must_use]
    pub fn url(&mut self) -> String {
        self.line(|l| l.trim_start().starts_with("http"))
            .unwrap_or_else(|| panic!("no URL printed: {:?}", self.seen))
            .trim()
            .to_string()
    }

    /// Pastes a line on its stdin.
    pub fn paste(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{text}").expect("paste");
        stdin.flush().expect("flush");
    }

    /// Waits for the exit; returns the code and everything it wrote to stderr.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let status = wait_child(&mut self.child, Duration::from_secs(30));
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        (status.and_then(|s| s.code()), self.seen.join("\n"))
    }
}

impl Drop for LoginRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `gnome-keyring-daemon` (the `secrets` component only) serving
/// `org.freedesktop.secrets` on a private [`Bus`], headless: its `HOME`, data and runtime
/// folders are its own, and its "login" keyring is created and unlocked with
/// [`Keyring::PASSWORD`] at start (`--unlock`). Killed on drop.
#[derive(Debug)]
pub struct Keyring {
    /// The process.
    child: Child,
    /// The bus it serves on.
    bus: String,
    /// Its `HOME`, `XDG_DATA_HOME` and `XDG_RUNTIME_DIR` live here.
    pub root: PathBuf,
}

/// A Secret Service secret: session, parameters, value, content type.
type SecretValue = (zbus::zvariant::OwnedObjectPath, Vec<u8>, Vec<u8>, String);

impl Keyring {
    /// The login keyring's password.
    pub const PASSWORD: &'static str = "spotok-test-keyring";
    /// The login keyring, which `--unlock` makes the default collection.
    pub const COLLECTION: &'static str = "/org/freedesktop/secrets/collection/login";

    /// Starts it on `bus`, its folders under `dir`, and waits until it owns
    /// `org.freedesktop.secrets` with an unlocked default collection. Panics with a hint when
    /// `gnome-keyring-daemon` is missing.
    #[must_use]
    pub fn start(bus: &Bus, dir: &Path) -> Self {
        let keyring = Self::spawn(bus, dir, true);
        assert_eq!(keyring.default_collection(), Self::COLLECTION);
        assert!(!keyring.is_locked(), "the login keyring starts unlocked");
        keyring
    }

    /// Starts one that was never given a password: no login keyring, no default collection
    /// (making one would need a prompt).
    #[must_use]
    pub fn start_without_login_keyring(bus: &Bus, dir: &Path) -> Self {
        let keyring = Self::spawn(bus, dir, false);
        assert_eq!(keyring.default_collection(), "/");
        keyring
    }

    fn spawn(bus: &Bus, dir: &Path, unlock: bool) -> Self {
        let root = dir.join(format!("keyring-{}", unique()));
        let run = root.join("run");
        for d in [root.join("home"), root.join("data"), run.clone()] {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let log = std::fs::File::create(root.join("keyring.log")).expect("log file");
        let mut child = Command::new("gnome-keyring-daemon")
            .args(if unlock { &["--unlock"][..] } else { &[] })
            .args(["--components=secrets", "--foreground"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", root.join("home"))
            .env("XDG_DATA_HOME", root.join("data"))
            .env("XDG_RUNTIME_DIR", &run)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("gnome-keyring-daemon is missing: install gnome-keyring");
        // --unlock reads the password up to end of input.
        let mut stdin = child.stdin.take().expect("stdin");
        if unlock {
            stdin
                .write_all(Self::PASSWORD.as_bytes())
                .expect("password");
        }
        drop(stdin);
        let keyring = Self {
            child,
            bus: bus.address.clone(),
            root,
        };
        assert!(
            wait_until(Duration::from_secs(20), || keyring.running()),
            "gnome-keyring-daemon did not take org.freedesktop.secrets; its log:\n{}",
            std::fs::read_to_string(keyring.root.join("keyring.log")).unwrap_or_default()
        );
        keyring
    }

    /// A fresh connection to its bus.
    fn connection(&self) -> zbus::blocking::Connection {
        zbus::blocking::connection::Builder::address(self.bus.as_str())
            .expect("bus address")
            .method_timeout(Duration::from_secs(10))
            .build()
            .expect("connect to the test bus")
    }

    fn call<B, R>(
        conn: &zbus::blocking::Connection,
        path: &str,
        iface: &str,
        method: &str,
        body: &B,
    ) -> R
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        conn.call_method(
            Some("org.freedesktop.secrets"),
            path,
            Some(iface),
            method,
            body,
        )
        .unwrap_or_else(|e| panic!("{iface}.{method}: {e}"))
        .body()
        .deserialize()
        .unwrap_or_else(|e| panic!("{iface}.{method} reply: {e}"))
    }

    /// Whether it owns `org.freedesktop.secrets` on the bus.
    #[must_use]
    pub fn running(&self) -> bool {
        let Ok(conn) = zbus::blocking::connection::Builder::address(self.bus.as_str())
            .and_then(zbus::blocking::connection::Builder::build)
        else {
            return false;
        };
        conn.call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "NameHasOwner",
            &("org.freedesktop.secrets",),
        )
        .ok()
        .and_then(|reply| reply.body().deserialize::<bool>().ok())
        .unwrap_or(false)
    }

    /// The object path of the collection aliased `default`.
    #[must_use]
    pub fn default_collection(&self) -> String {
        let conn = self.connection();
        let path: zbus::zvariant::OwnedObjectPath = Self::call(
            &conn,
            "/org/freedesktop/secrets",
            "org.freedesktop.Secret.Service",
            "ReadAlias",
            &("default",),
        );
        path.as_str().to_string()
    }

    /// Whether the login keyring is locked.
    #[must_use]
    pub fn is_locked(&self) -> bool {
        let conn = self.connection();
        let value: zbus::zvariant::OwnedValue = Self::call(
            &conn,
            Self::COLLECTION,
            "org.freedesktop.DBus.Properties",
            "Get",
            &("org.freedesktop.Secret.Collection", "Locked"),
        );
        bool::try_from(value).expect("Locked is a boolean")
    }

    /// Locks the login keyring (`Service.Lock`, which needs no prompt).
    pub fn lock(&self) {
        let conn = self.connection();
        let collection =
            zbus::zvariant::ObjectPath::try_from(Self::COLLECTION).expect("object path");
        let (locked, prompt): (
            Vec<zbus::zvariant::OwnedObjectPath>,
            zbus::zvariant::OwnedObjectPath,
        ) = Self::call(
            &conn,
            "/org/freedesktop/secrets",
            "org.freedesktop.Secret.Service",
            "Lock",
            &(vec![collection],),
        );
        assert_eq!(prompt.as_str(), "/", "locking needs no prompt");
        assert_eq!(locked.len(), 1);
        assert!(self.is_locked());
    }

    /// Unlocks the login keyring with its password, without a prompt: gnome-keyring's
    /// `InternalUnsupportedGuiltRiddenInterface.UnlockWithMasterPassword`, the password sent
    /// in a `plain` session.
    pub fn unlock(&self) {
        let conn = self.connection();
        let (_, session): (zbus::zvariant::OwnedValue, zbus::zvariant::OwnedObjectPath) =
            Self::call(
                &conn,
                "/org/freedesktop/secrets",
                "org.freedesktop.Secret.Service",
                "OpenSession",
                &("plain", zbus::zvariant::Value::from("")),
            );
        let master: SecretValue = (
            session,
            Vec::new(),
            Self::PASSWORD.as_bytes().to_vec(),
            "text/plain".into(),
        );
        let collection =
            zbus::zvariant::ObjectPath::try_from(Self::COLLECTION).expect("object path");
        let () = Self::call(
            &conn,
            "/org/freedesktop/secrets",
            "org.gnome.keyring.InternalUnsupportedGuiltRiddenInterface",
            "UnlockWithMasterPassword",
            &(collection, master),
        );
        assert!(!self.is_locked(), "unlocked with the password");
    }

    /// Items with `attributes`, locked or not (no secret is read, nothing is unlocked).
    #[must_use]
    pub fn items(&self, attributes: &[(&str, &str)]) -> Vec<String> {
        let conn = self.connection();
        let attributes: std::collections::HashMap<&str, &str> =
            attributes.iter().copied().collect();
        let (unlocked, locked): (
            Vec<zbus::zvariant::OwnedObjectPath>,
            Vec<zbus::zvariant::OwnedObjectPath>,
        ) = Self::call(
            &conn,
            "/org/freedesktop/secrets",
            "org.freedesktop.Secret.Service",
            "SearchItems",
            &(attributes,),
        );
        unlocked
            .iter()
            .chain(&locked)
            .map(|p| p.as_str().to_string())
            .collect()
    }

    /// Runs `secret-tool args…` against this keyring.
    #[must_use]
    pub fn secret_tool(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("secret-tool");
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.root.join("home"))
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus);
        run(cmd, None, COMMAND_DEADLINE)
    }

    /// Kills it (the bus then has no provider).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        self.stop();
    }
}
