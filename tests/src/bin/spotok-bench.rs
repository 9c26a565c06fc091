//! `spotok-bench`: spotok's performance figures (issue 7), measured side by side in one run.
//!
//! ```text
//! cargo build --release --workspace && cargo run --release -p spotok-tests --bin spotok-bench -- [--quick]
//! ```
//!
//! It runs the release `spotokd` and `spotokctl` found next to its own executable, against
//! [`FakeSpotify`] on loopback, in a temp `HOME`, with a private `dbus-daemon`, and prints one
//! Markdown table: each figure, its goal and PASS / MISS. Figures that are ratios (`get` vs
//! `cat`, `GetAccessToken` vs `Ping`) are measured interleaved, so a noisy machine slows both
//! sides alike. This is a measuring tool, not a test: nothing here asserts on a time.
//!
//! Every process it starts is stopped: by `Drop` on the normal path and on errors, and by a
//! panic hook otherwise (the release profile aborts on panic, so `Drop` never runs then).
//! Ctrl-C reaches the whole process group; spotokd and dbus-daemon exit on it too.
//!
//! Profiling aids (BENCHMARKS.md): `--serve` starts the same set-up and waits, `--rtt SOCKET`
//! times round trips to any running spotokd, `--compare 'CMD' …` times commands interleaved.

// Counts and nanoseconds stay far below 2^52, where `as f64` would start to round.
#![allow(clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use spotok_proto::{Reply, Request, PROTOCOL_VERSION};
use spotok_tests::{run, wait_child, Env, FakeSpotify};

/// Errors end the run with a message; `Send + Sync` so worker threads can return them.
type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// D-Bus names from SPEC (spelled out, so the bench runs against any daemon build).
const BUS_NAME: &str = "org.spotok.Spotokd";
const BUS_PATH: &str = "/org/spotok/Spotokd";
const BUS_INTERFACE: &str = "org.spotok.Spotokd1";

/// How much work each figure gets.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// `--quick`.
    quick: bool,
    /// Interleaved rounds of `/bin/true`, `cat`, `spotokctl get`.
    exec_rounds: usize,
    /// Timed `get`s on one persistent connection (and as many on the echo floor).
    rtt_requests: usize,
    /// Rounds of the 1 / 16 / 256-connection throughput runs (median reported).
    tput_rounds: usize,
    /// Length of one throughput run.
    tput_run: Duration,
    /// Timed `GetAccessToken` calls (and as many `Ping`s).
    dbus_calls: usize,
    /// Requests in the memory soak.
    soak_requests: u64,
    /// Length of each idle wake-up window.
    idle: Duration,
    /// Timed daemon starts.
    starts: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                exec_rounds: 100,
                rtt_requests: 20_000,
                tput_rounds: 1,
                tput_run: Duration::from_secs(1),
                dbus_calls: 1_000,
                soak_requests: 100_000,
                idle: Duration::from_secs(10),
                starts: 10,
            }
        } else {
            Self {
                quick,
                exec_rounds: 300,
                rtt_requests: 200_000,
                tput_rounds: 3,
                tput_run: Duration::from_secs(3),
                dbus_calls: 5_000,
                soak_requests: 1_000_000,
                idle: Duration::from_secs(60),
                starts: 20,
            }
        }
    }
}

fn main() -> ExitCode {
    let mut quick = false;
    let mut serve_only = false;
    let mut rtt_only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--serve" => serve_only = true,
            "--rtt" => {
                let Some(socket) = args.next() else {
                    eprintln!("spotok-bench: --rtt needs the socket path");
                    return ExitCode::from(2);
                };
                rtt_only = Some(PathBuf::from(socket));
            }
            "--compare" => {
                return match compare(&args.collect::<Vec<_>>()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("spotok-bench --compare: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            // Internal: the round-trip floor (see `rtt_figures`).
            "--echo-server" => {
                let path = args.next().map(PathBuf::from);
                let len = args.next().and_then(|n| n.parse().ok());
                let (Some(path), Some(len)) = (path, len) else {
                    return ExitCode::from(2);
                };
                return match echo_server(&path, len) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("spotok-bench --echo-server: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            "-h" | "--help" => {
                println!(
                    "usage: cargo build --release --workspace && \
                     cargo run --release -p spotok-tests --bin spotok-bench -- [--quick]\n\
                     \n  --quick  fewer requests and shorter idle windows\
                     \n  --serve  only start the fake Spotify and a logged-in spotokd, print \
                     the environment to reach it (for profiling), and wait for Enter\
                     \n  --rtt SOCKET  only time 20,000 gets on one connection to a running \
                     spotokd (e.g. one under valgrind or perf)\
                     \n  --compare 'CMD ARGS' 'CMD ARGS'…  only time these commands, \
                     interleaved, 300 rounds (e.g. two builds of spotokctl)"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!(
                    "spotok-bench: unknown argument {other:?}; \
                     options: --quick, --serve, --rtt SOCKET, --help"
                );
                return ExitCode::from(2);
            }
        }
    }
    install_panic_cleanup();
    let result = if let Some(socket) = rtt_only {
        rtt_only_run(&socket)
    } else if serve_only {
        serve()
    } else {
        bench(Plan::new(quick))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spotok-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clean-up on panic
// ---------------------------------------------------------------------------------------

/// Something to undo if the bench panics.
enum Leftover {
    /// A child process to kill.
    Pid(u32),
    /// A folder to remove.
    Dir(PathBuf),
}

/// Everything started so far; `Drop` impls take their entries out again.
static LEFTOVERS: Mutex<Vec<Leftover>> = Mutex::new(Vec::new());

fn track(leftover: Leftover) {
    if let Ok(mut list) = LEFTOVERS.lock() {
        list.push(leftover);
    }
}

fn untrack_pid(pid: u32) {
    if let Ok(mut list) = LEFTOVERS.lock() {
        list.retain(|l| !matches!(l, Leftover::Pid(p) if *p == pid));
    }
}

/// Kills every tracked process and removes every tracked folder before the panic aborts.
fn install_panic_cleanup() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(list) = LEFTOVERS.try_lock() {
            for leftover in list.iter() {
                if let Leftover::Pid(pid) = leftover {
                    kill(*pid, rustix::process::Signal::KILL);
                }
            }
            for leftover in list.iter() {
                if let Leftover::Dir(dir) = leftover {
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        default(info);
    }));
}

fn kill(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

// ---------------------------------------------------------------------------------------
// Processes: binaries, environment, spotokd, dbus-daemon
// ---------------------------------------------------------------------------------------

/// The release binaries under test.
#[derive(Debug)]
struct Bins {
    spotokd: PathBuf,
    spotokctl: PathBuf,
}

impl Bins {
    /// `spotokd` and `spotokctl` next to this executable (`target/release`).
    fn find() -> Res<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().ok_or("the bench executable has no folder")?;
        let bins = Self {
            spotokd: dir.join("spotokd"),
            spotokctl: dir.join("spotokctl"),
        };
        for bin in [&bins.spotokd, &bins.spotokctl] {
            if !bin.exists() {
                return Err(format!(
                    "{} is missing: run `cargo build --release --workspace` first",
                    bin.display()
                )
                .into());
            }
        }
        if cfg!(debug_assertions) {
            eprintln!("spotok-bench: warning: the bench itself is a debug build; use --release");
        }
        Ok(bins)
    }
}

/// `program` with `env`'s user environment and nothing of the caller's. Like the harness's
/// `Env::command`, but for any program, and with spotokd's default log level (`info`), as a
/// user runs it.
fn command(env: &Env, program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &env.home)
        .env("XDG_CONFIG_HOME", env.home.join(".config"))
        .env("XDG_STATE_HOME", env.home.join(".local/state"))
        .env("XDG_DATA_HOME", env.home.join(".local/share"))
        .env("XDG_RUNTIME_DIR", &env.runtime)
        .env("DBUS_SESSION_BUS_ADDRESS", &env.bus)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    cmd
}

/// A fresh [`Env`] configured for `fake`, removed by the panic hook too.
fn new_env(fake: &FakeSpotify) -> Env {
    let env = Env::new();
    track(Leftover::Dir(env.dir.path().to_path_buf()));
    env.configure(fake, "");
    env
}

/// Imports a refresh token from `fake` through `spotokctl import`, as the tests do.
fn import(env: &Env, bins: &Bins, fake: &FakeSpotify) -> Res<()> {
    let mut cmd = command(env, &bins.spotokctl);
    cmd.arg("import");
    let out = run(
        cmd,
        Some(&fake.issue_refresh_token()),
        Duration::from_secs(60),
    );
    if out.code == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "spotokctl import failed ({:?}): {}",
            out.code,
            out.stderr.trim()
        )
        .into())
    }
}

/// A running `spotokd`, whose readiness arrives on a `NOTIFY_SOCKET` the bench binds.
struct Spotokd {
    child: Child,
    /// Receives the `sd_notify` datagrams.
    notify: UnixDatagram,
    /// Just before `spawn`: the start of the spawn-to-ready time.
    spawned: Instant,
    /// Its stdout and stderr.
    log: PathBuf,
}

impl Spotokd {
    fn spawn(env: &Env, bins: &Bins, tag: usize) -> Res<Self> {
        let notify_path = env.dir.path().join(format!("notify-{tag}"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        let log = env.dir.path().join(format!("spotokd-{tag}.log"));
        let file = File::create(&log)?;
        let mut cmd = command(env, &bins.spotokd);
        cmd.env("NOTIFY_SOCKET", &notify_path)
            .stdout(file.try_clone()?)
            .stderr(file);
        let spawned = Instant::now();
        let child = cmd.spawn()?;
        track(Leftover::Pid(child.id()));
        Ok(Self {
            child,
            notify,
            spawned,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `READY=1`; returns the time from spawn to the datagram's arrival.
    fn ready(&mut self, deadline: Duration) -> Res<Duration> {
        let end = self.spawned + deadline;
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.child.try_wait()?.is_some() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("spotokd did not become ready; its log:\n{log}").into());
            }
            self.notify
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let at = Instant::now();
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        return Ok(at - self.spawned);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// SIGTERM and wait (10 s, then SIGKILL); the exit code, `None` if it had to be killed.
    fn stop(&mut self) -> Option<i32> {
        kill(self.pid(), rustix::process::Signal::TERM);
        let status = wait_child(&mut self.child, Duration::from_secs(10));
        untrack_pid(self.pid());
        status.and_then(|s| s.code())
    }
}

impl Drop for Spotokd {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        untrack_pid(self.pid());
    }
}

/// A private `dbus-daemon` with the session configuration (as the harness's `Bus`, whose
/// process id the panic hook could not reach).
struct PrivateBus {
    child: Child,
    address: String,
}

impl PrivateBus {
    fn start(dir: &Path) -> Res<Self> {
        let address = format!("unix:path={}", dir.join("bus").display());
        let config = dir.join("bus.conf");
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
        )?;
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start dbus-daemon: {e}"))?;
        track(Leftover::Pid(child.id()));
        let mut bus = Self { child, address };
        // It prints its address once it listens.
        let mut out = bus.child.stdout.take().ok_or("dbus-daemon stdout")?;
        let mut byte = [0u8; 1];
        let mut printed = false;
        while out.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
            printed = true;
        }
        if printed {
            Ok(bus)
        } else {
            bus.stop();
            Err("dbus-daemon did not start".into())
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        untrack_pid(self.child.id());
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The socket client
// ---------------------------------------------------------------------------------------

/// The request lines, made from the protocol types so they follow `spotok-proto`.
#[derive(Debug, Clone)]
struct Lines {
    hello: Vec<u8>,
    get: Vec<u8>,
}

impl Lines {
    fn new() -> Res<Self> {
        let line = |r: &Request| -> Res<Vec<u8>> {
            let mut bytes = serde_json::to_vec(r)?;
            bytes.push(b'\n');
            Ok(bytes)
        };
        Ok(Self {
            hello: line(&Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: "spotok-bench".into(),
            })?,
            get: line(&Request::Get {
                min_valid_secs: 60,
                scopes: Vec::new(),
                wait_secs: 30,
            })?,
        })
    }
}

/// The start of every token reply; cheaper to check than a full parse in the hot loops.
const TOKEN_REPLY: &[u8] = br#"{"reply":"token""#;

/// A persistent, greeted connection to spotokd.
struct Client {
    stream: BufReader<UnixStream>,
    line: Vec<u8>,
    get: Vec<u8>,
}

impl Client {
    fn connect(socket: &Path, lines: &Lines) -> Res<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut client = Self {
            stream: BufReader::with_capacity(4096, stream),
            line: Vec::with_capacity(512),
            get: lines.get.clone(),
        };
        client.stream.get_mut().write_all(&lines.hello)?;
        client.read_line()?;
        match serde_json::from_slice::<Reply>(&client.line)? {
            Reply::Hello { protocol, .. } if protocol == PROTOCOL_VERSION => Ok(client),
            other => Err(format!("unexpected hello reply: {other:?}").into()),
        }
    }

    fn read_line(&mut self) -> Res<()> {
        self.line.clear();
        if self.stream.read_until(b'\n', &mut self.line)? == 0 {
            return Err("spotokd closed the connection".into());
        }
        Ok(())
    }

    /// One `get` round trip; the reply must be a token.
    fn get(&mut self) -> Res<()> {
        self.stream.get_mut().write_all(&self.get)?;
        self.read_line()?;
        if self.line.starts_with(TOKEN_REPLY) {
            Ok(())
        } else {
            Err(format!(
                "expected a token reply, got {}",
                String::from_utf8_lossy(&self.line).trim()
            )
            .into())
        }
    }
}

// ---------------------------------------------------------------------------------------
// Statistics and /proc
// ---------------------------------------------------------------------------------------

/// Sorted samples.
struct Samples(Vec<Duration>);

impl Samples {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Self(v)
    }

    /// Nearest-rank percentile, `p` in 0..=100.
    fn pct(&self, p: usize) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let i = (self.0.len() * p).div_ceil(100).clamp(1, self.0.len()) - 1;
        self.0[i]
    }

    fn median(&self) -> Duration {
        self.pct(50)
    }
}

fn micros(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e3
}

fn millis(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_nanos() as f64 / b.as_nanos().max(1) as f64
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// Memory of a process from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    /// `VmRSS`: what the goal is about.
    rss: u64,
    /// `VmHWM`: the peak of `VmRSS`.
    hwm: u64,
    /// `RssAnon`: private memory (heap, stacks).
    anon: u64,
    /// `RssFile`: mapped file pages (code, shared with the page cache).
    file: u64,
}

impl Memory {
    fn of(pid: u32) -> Res<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Res<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("no {name} in /proc/{pid}/status").into())
        };
        Ok(Self {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:")?,
        })
    }

    /// `VmRSS` and its parts, in MB.
    fn describe(self) -> String {
        format!(
            "{:.2} MB (anon {:.2}, file {:.2})",
            mb(self.rss),
            mb(self.anon),
            mb(self.file)
        )
    }
}

/// Megabytes (10^6 bytes), the unit of the goal.
fn mb(kib: u64) -> f64 {
    (kib * 1024) as f64 / 1e6
}

/// Every thread of `pid`: its id → (name, voluntary + nonvoluntary context switches).
fn switches(pid: u32) -> Res<BTreeMap<u32, (String, u64)>> {
    let mut threads = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read: skip it.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let mut name = String::new();
        let mut count = 0;
        for line in status.lines() {
            if let Some(n) = line.strip_prefix("Name:") {
                name = n.trim().to_string();
            } else if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                count += n.trim().parse::<u64>().unwrap_or(0);
            }
        }
        threads.insert(tid, (name, count));
    }
    Ok(threads)
}

/// Context switches of every thread of `pid` over `window`, sampled each second so threads
/// that start or end inside the window are counted too (an ended thread counts one, for the
/// wake-up that ended it). Returns the total and a break-down by thread name.
fn wakeups(pid: u32, window: Duration) -> Res<(u64, BTreeMap<String, u64>)> {
    let end = Instant::now() + window;
    let mut last = switches(pid)?;
    let mut total = 0;
    let mut by_name = BTreeMap::<String, u64>::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_secs(1)));
        let now = switches(pid)?;
        for (tid, (name, count)) in &now {
            let before = last.get(tid).map_or(0, |(_, c)| *c);
            let delta = count.saturating_sub(before);
            if delta > 0 {
                total += delta;
                *by_name.entry(name.clone()).or_default() += delta;
            }
        }
        for (tid, (name, _)) in &last {
            if !now.contains_key(tid) {
                total += 1;
                *by_name.entry(format!("{name} (exited)")).or_default() += 1;
            }
        }
        last = now;
    }
    Ok((total, by_name))
}

/// Time on CPU (`/proc/PID/task/*/schedstat`) and context switches, summed over the
/// threads of `pid`.
fn cpu_and_switches(pid: u32) -> Res<(Duration, u64)> {
    let mut cpu = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(s) = std::fs::read_to_string(entry?.path().join("schedstat")) {
            cpu += s
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let switched = switches(pid)?.values().map(|(_, c)| c).sum();
    Ok((Duration::from_nanos(cpu), switched))
}

fn breakdown(by_name: &BTreeMap<String, u64>) -> String {
    if by_name.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = by_name.iter().map(|(n, c)| format!("{n}: {c}")).collect();
    format!(" ({})", parts.join(", "))
}

// ---------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Verdict {
    Pass,
    Miss,
    /// Could not be measured.
    NotAvailable,
}

impl Verdict {
    fn of(pass: bool) -> Self {
        if pass {
            Self::Pass
        } else {
            Self::Miss
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Miss => "MISS",
            Self::NotAvailable => "n/a",
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    rows: Vec<(String, String, String, Option<Verdict>)>,
}

impl Table {
    fn row(&mut self, figure: &str, measured: String, goal: &str, verdict: Verdict) {
        println!("  {figure}: {measured}   [{}]", verdict.as_str());
        self.rows
            .push((figure.into(), measured, goal.into(), Some(verdict)));
    }

    fn info(&mut self, figure: &str, measured: String) {
        println!("  {figure}: {measured}");
        self.rows
            .push((figure.into(), measured, String::new(), None));
    }

    fn print(&self) {
        println!("| figure | measured | goal | verdict |");
        println!("|---|---|---|---|");
        for (figure, measured, goal, verdict) in &self.rows {
            let verdict = verdict.map_or("", Verdict::as_str);
            println!("| {figure} | {measured} | {goal} | {verdict} |");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The bench's world: a fake Spotify, a user, a private bus and a logged-in spotokd.
/// Fields drop in order: the daemon before the bus, both before the folders.
struct Setup {
    daemon: Spotokd,
    bus: Option<PrivateBus>,
    env: Env,
    fake: FakeSpotify,
}

impl Setup {
    /// Starts everything and imports a login through `spotokctl import`, like the tests.
    /// Without `dbus-daemon` the bus is `None` (the D-Bus figure says n/a).
    fn start(bins: &Bins) -> Res<Self> {
        let fake = FakeSpotify::start();
        let mut env = new_env(&fake);
        let bus = match PrivateBus::start(env.dir.path()) {
            Ok(bus) => {
                env.bus.clone_from(&bus.address);
                Some(bus)
            }
            Err(e) => {
                eprintln!("spotok-bench: no D-Bus figures: {e}");
                None
            }
        };
        let mut daemon = Spotokd::spawn(&env, bins, 0)?;
        daemon.ready(Duration::from_secs(20))?;
        import(&env, bins, &fake)?;
        // The token `spotokctl get` prints must be the one the fake issued.
        let mut check = command(&env, &bins.spotokctl);
        check.arg("get");
        let out = run(check, None, Duration::from_secs(60));
        let token = out.stdout.trim();
        if out.code != Some(0) || !fake.issued_access_tokens().iter().any(|t| t == token) {
            return Err(format!("spotokctl get does not work: {}", out.stderr.trim()).into());
        }
        Ok(Self {
            daemon,
            bus,
            env,
            fake,
        })
    }
}

fn bench(plan: Plan) -> Res<()> {
    let bins = Bins::find()?;
    let lines = Lines::new()?;
    let started = Instant::now();
    println!(
        "spotok-bench{}: {} CPUs ({}), kernel {}, load average {}",
        if plan.quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        loadavg()
    );
    println!(
        "binaries: {}, {}",
        bins.spotokd.display(),
        bins.spotokctl.display()
    );
    let mut setup = Setup::start(&bins)?;
    let (env, pid) = (&setup.env, setup.daemon.pid());
    let mut table = Table::default();
    // A second, logged-in daemon with no session bus at all (a headless machine), started
    // now so that it is past its start-up by the time its idle wake-ups are counted.
    let headless_env = new_env(&setup.fake);
    let mut headless = Spotokd::spawn(&headless_env, &bins, 0)?;
    headless.ready(Duration::from_secs(20))?;
    import(&headless_env, &bins, &setup.fake)?;
    let headless_started = Instant::now();

    println!("\n[1/7] memory and wake-ups while idle, right after a refresh (the import's)");
    std::thread::sleep(Duration::from_secs(1));
    let idle = Memory::of(pid)?;
    table.row(
        "spotokd VmRSS, idle",
        idle.describe(),
        "≤ 6 MB",
        Verdict::of(idle.rss * 1024 <= 6_000_000),
    );
    wakeup_figure(pid, "after a refresh", plan, &mut table)?;

    println!("\n[2/7] `spotokctl get` vs `/bin/true` and `cat`, interleaved");
    exec_figures(env, &bins, plan, &mut table)?;

    println!("\n[3/7] socket round trip on one connection");
    rtt_figures(env, &lines, pid, plan, &mut table)?;

    println!("\n[4/7] throughput");
    throughput_figures(&env.socket, &lines, plan, &mut table)?;

    println!("\n[5/7] D-Bus");
    let address = setup.bus.as_ref().map(|b| b.address.as_str());
    dbus_figures(address, plan, &mut table)?;

    println!(
        "\n[6/7] memory over {} requests, then idle",
        plan.soak_requests
    );
    soak_figures(&env.socket, &lines, pid, idle, plan, &mut table)?;
    wakeup_figure(pid, "after the load", plan, &mut table)?;
    let code = setup.daemon.stop();
    if code != Some(0) {
        eprintln!("spotok-bench: spotokd exited with {code:?} on SIGTERM");
    }

    println!("\n[7/7] idle without a session bus, and spawn to READY=1");
    let up = headless_started.elapsed().as_secs();
    wakeup_figure(
        headless.pid(),
        &format!("without a session bus (up {up} s)"),
        plan,
        &mut table,
    )?;
    headless.stop();
    ready_figures(&bins, &setup.fake, plan, &mut table)?;
    drop(setup);

    println!(
        "\nResults ({}; load average now {}; {:.0} s):\n",
        if plan.quick { "--quick" } else { "full run" },
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    table.print();
    Ok(())
}

/// Context switches of every thread of `pid` over the idle window, as a goal row.
fn wakeup_figure(pid: u32, when: &str, plan: Plan, table: &mut Table) -> Res<()> {
    let (woke, by_name) = wakeups(pid, plan.idle)?;
    table.row(
        &format!("wake-ups idle {when}, {} s", plan.idle.as_secs()),
        format!("{woke}{}", breakdown(&by_name)),
        "0",
        Verdict::of(woke == 0),
    );
    Ok(())
}

/// Allowed `VmRSS` growth over the second half of the soak: allocator noise (a few pages
/// moving between arenas), far below what any per-request leak would show (64 KiB over
/// 500,000 requests is 0.13 bytes a request).
const GROWTH_NOISE_KIB: i64 = 64;

/// Memory after `plan.soak_requests` gets, sampled every quarter, and its growth over the
/// second half of them (a leak grows in every quarter; allocator noise does not).
fn soak_figures(
    socket: &Path,
    lines: &Lines,
    pid: u32,
    idle: Memory,
    plan: Plan,
    table: &mut Table,
) -> Res<()> {
    let mut quarters = Vec::new();
    for _ in 0..4 {
        soak(socket, lines, plan.soak_requests / 4)?;
        quarters.push(Memory::of(pid)?);
    }
    std::thread::sleep(Duration::from_secs(1));
    let full = Memory::of(pid)?;
    table.row(
        &format!("spotokd VmRSS after {} requests", plan.soak_requests),
        format!("{}; VmHWM {:.2} MB", full.describe(), mb(full.hwm)),
        "≤ 6 MB",
        Verdict::of(full.rss * 1024 <= 6_000_000),
    );
    let growth = |from: Memory| full.rss as i64 - from.rss as i64;
    let steps: Vec<String> = quarters
        .iter()
        .map(|m| format!("{:.2}", mb(m.rss)))
        .collect();
    table.row(
        "VmRSS growth, 2nd half of the soak",
        format!(
            "{:+} KiB ({:+} KiB since idle; MB after each quarter: {})",
            growth(quarters[1]),
            growth(idle),
            steps.join(", ")
        ),
        &format!("no growth (≤ {GROWTH_NOISE_KIB} KiB)"),
        Verdict::of(growth(quarters[1]) <= GROWTH_NOISE_KIB),
    );
    Ok(())
}

/// `--serve`: the bench's set-up alone, for profiling by hand (see BENCHMARKS.md).
fn serve() -> Res<()> {
    let bins = Bins::find()?;
    let mut setup = Setup::start(&bins)?;
    let daemon = &setup.daemon;
    println!("spotokd pid {}, log {}", daemon.pid(), daemon.log.display());
    println!("export SPOTOK_SOCKET={}", setup.env.socket.display());
    println!("export DBUS_SESSION_BUS_ADDRESS={}", setup.env.bus);
    println!("Press Enter to stop.");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    setup.daemon.stop();
    Ok(())
}

/// `--echo-server PATH LEN`: answers each line on one connection at `PATH` with a token-like
/// line of `LEN` bytes, until the peer hangs up. Says "ready" on stdout once listening.
fn echo_server(path: &Path, len: usize) -> Res<()> {
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (stream, _) = listener.accept()?;
    drop(listener);
    let _ = std::fs::remove_file(path);
    let mut reply = TOKEN_REPLY.to_vec();
    reply.resize(len.max(TOKEN_REPLY.len() + 1) - 1, b'x');
    reply.push(b'\n');
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        // A hello gets a hello, so `--rtt` works against this process too.
        if std::mem::take(&mut first) && line.starts_with(br#"{"op":"hello""#) {
            let hello = Reply::Hello {
                protocol: PROTOCOL_VERSION,
                version: "echo".into(),
            };
            let mut bytes = serde_json::to_vec(&hello)?;
            bytes.push(b'\n');
            writer.write_all(&bytes)?;
        } else {
            writer.write_all(&reply)?;
        }
    }
}

/// `--compare CMD…`: wall time of each command (split at spaces, run with this process's
/// environment, output discarded), interleaved as in the `get` vs `cat` figure.
fn compare(commands: &[String]) -> Res<()> {
    let mut cmds = Vec::new();
    for text in commands {
        let mut words = text.split_whitespace();
        let mut cmd = Command::new(words.next().ok_or("an empty command")?);
        cmd.args(words)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmds.push(cmd);
    }
    let mut times = vec![Vec::new(); cmds.len()];
    for round in 0..310 {
        for k in 0..cmds.len() {
            let which = (round + k) % cmds.len();
            let t = Instant::now();
            let status = cmds[which].status()?;
            let elapsed = t.elapsed();
            if !status.success() {
                return Err(format!("{} failed: {status}", commands[which]).into());
            }
            if round >= 10 {
                times[which].push(elapsed);
            }
        }
    }
    let first = Samples::new(times[0].clone()).median();
    for (text, t) in commands.iter().zip(times) {
        let s = Samples::new(t);
        println!(
            "median {:7.0} µs  p90 {:7.0} µs  {:.2}× the first  {text}",
            micros(s.median()),
            micros(s.pct(90)),
            ratio(s.median(), first)
        );
    }
    Ok(())
}

/// `--rtt SOCKET`: round trips on one connection to a daemon started elsewhere.
fn rtt_only_run(socket: &Path) -> Res<()> {
    let lines = Lines::new()?;
    let mut client = Client::connect(socket, &lines)?;
    for _ in 0..1_000 {
        client.get()?;
    }
    let mut times = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        client.get()?;
        times.push(t.elapsed());
    }
    let s = Samples::new(times);
    println!(
        "{} gets: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs",
        s.0.len(),
        micros(s.median()),
        micros(s.pct(90)),
        micros(s.pct(99))
    );
    Ok(())
}

/// `spotokctl get` against the floor of any process start: `/bin/true`, and `cat` of a
/// token-sized file. Rounds rotate the order, so none of the three always goes first.
fn exec_figures(env: &Env, bins: &Bins, plan: Plan, table: &mut Table) -> Res<()> {
    let small = env.dir.path().join("token.txt");
    std::fs::write(&small, format!("{}\n", "B".repeat(300)))?;
    let mut commands = [
        command(env, Path::new("/bin/true")),
        command(env, Path::new("/bin/cat")),
        command(env, &bins.spotokctl),
    ];
    commands[1].arg(&small);
    commands[2].arg("get");
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round in 0..plan.exec_rounds + 10 {
        for k in 0..3 {
            let which = (round + k) % 3;
            let t = Instant::now();
            let status = commands[which].status()?;
            let elapsed = t.elapsed();
            if !status.success() {
                return Err(format!("{:?} failed: {status}", commands[which]).into());
            }
            // The first rounds warm the page cache and the daemon.
            if round >= 10 {
                times[which].push(elapsed);
            }
        }
    }
    let [t_true, t_cat, t_get] = times.map(Samples::new);
    let show = |s: &Samples| {
        format!(
            "median {:.0} µs, p90 {:.0} µs",
            micros(s.median()),
            micros(s.pct(90))
        )
    };
    table.info("`/bin/true` (floor)", show(&t_true));
    table.info("`cat` small file (floor)", show(&t_cat));
    table.info("`spotokctl get`", show(&t_get));
    let r = ratio(t_get.median(), t_cat.median());
    table.row(
        "`spotokctl get` / `cat`, medians",
        format!("{r:.2}×"),
        "≤ 1.10×",
        Verdict::of(r <= 1.10),
    );
    Ok(())
}

/// Where the round-trip runs put the client thread, spotokd and the echo process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Wherever the scheduler puts them (the figure with the goal).
    Free,
    /// All pinned to one CPU.
    SameCpu,
    /// The client on one CPU, the servers on another.
    OtherCpu,
}

/// Pins `pid` (every thread with `all_threads`, else the one thread whose id it is) to the
/// CPU list `cpus`, with `taskset` (util-linux). False when that failed.
fn pin(pid: u32, all_threads: bool, cpus: &str) -> bool {
    let mut cmd = Command::new("taskset");
    if all_threads {
        cmd.arg("-a");
    }
    cmd.arg("-pc")
        .arg(cpus)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().is_ok_and(|s| s.success())
}

/// The CPUs this process may run on (`Cpus_allowed_list`), e.g. `0-1`.
fn allowed_cpus() -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_string())
}

/// Round-trip samples of spotokd and the echo floor, with their CPU use.
#[derive(Default)]
struct RoundTrips {
    daemon: Vec<Duration>,
    echo: Vec<Duration>,
    daemon_cpu: Duration,
    daemon_switches: u64,
    echo_cpu: Duration,
    echo_switches: u64,
}

/// `n` gets to spotokd and `n` lines to the echo process, in alternating blocks of 1,000.
fn round_trips(
    client: &mut Client,
    floor: &mut Client,
    pids: (u32, u32),
    n: usize,
) -> Res<RoundTrips> {
    let block = 1_000;
    let mut r = RoundTrips::default();
    for _ in 0..n.div_ceil(block) {
        for (c, times, pid, cpu, switched) in [
            (
                &mut *client,
                &mut r.daemon,
                pids.0,
                &mut r.daemon_cpu,
                &mut r.daemon_switches,
            ),
            (
                &mut *floor,
                &mut r.echo,
                pids.1,
                &mut r.echo_cpu,
                &mut r.echo_switches,
            ),
        ] {
            let before = cpu_and_switches(pid)?;
            for _ in 0..block {
                let t = Instant::now();
                c.get()?;
                times.push(t.elapsed());
            }
            let after = cpu_and_switches(pid)?;
            *cpu += after.0.saturating_sub(before.0);
            *switched += after.1.saturating_sub(before.1);
        }
    }
    Ok(r)
}

/// Starts the echo process (this executable, `--echo-server`) answering lines of
/// `reply_len` bytes, and connects to it.
fn start_echo(env: &Env, lines: &Lines, reply_len: usize) -> Res<(Child, Client)> {
    let path = env.dir.path().join("echo.sock");
    let mut echo = Command::new(std::env::current_exe()?)
        .arg("--echo-server")
        .arg(&path)
        .arg(reply_len.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    track(Leftover::Pid(echo.id()));
    // It says "ready" once it listens.
    let mut said = String::new();
    BufReader::new(echo.stdout.take().ok_or("echo stdout")?).read_line(&mut said)?;
    let stream = UnixStream::connect(&path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut floor = Client {
        stream: BufReader::new(stream),
        line: Vec::new(),
        get: lines.get.clone(),
    };
    floor.stream.get_mut().write_all(&lines.hello)?;
    floor.read_line()?;
    Ok((echo, floor))
}

/// One table row per placement; the unpinned one carries the goal.
fn report_round_trips(results: Vec<(Placement, RoundTrips)>, table: &mut Table) {
    for (placement, r) in results {
        let (d, f) = (Samples::new(r.daemon), Samples::new(r.echo));
        let (n, m) = (d.0.len() as f64, f.0.len() as f64);
        let detail = format!(
            "spotokd p50 {:.1} µs, p99 {:.1} µs ({:.1} µs CPU, {:.2} switches a get); \
             echo p50 {:.1} µs, p99 {:.1} µs ({:.1} µs CPU, {:.2} switches a line)",
            micros(d.median()),
            micros(d.pct(99)),
            micros(r.daemon_cpu) / n,
            r.daemon_switches as f64 / n,
            micros(f.median()),
            micros(f.pct(99)),
            micros(r.echo_cpu) / m,
            r.echo_switches as f64 / m,
        );
        match placement {
            Placement::Free => {
                table.info("round trip vs echo process, unpinned", detail);
                table.row(
                    &format!("socket round trip, {} gets, one connection", d.0.len()),
                    format!(
                        "p50 {:.1} µs, p99 {:.1} µs",
                        micros(d.median()),
                        micros(d.pct(99))
                    ),
                    "p50 ≤ 25 µs",
                    Verdict::of(d.median() <= Duration::from_micros(25)),
                );
            }
            Placement::SameCpu => table.info("round trip, all on one CPU", detail),
            Placement::OtherCpu => {
                table.info("round trip, client and servers on two CPUs", detail);
            }
        }
    }
}

/// Round trips on one persistent connection, interleaved in blocks with the floor: the same
/// line exchange with a trivial echo process (this executable, `--echo-server`) over a Unix
/// socket, so both sides pay the same cross-process wake-ups and only spotokd's own work
/// differs. On a small VM the figure depends mostly on whether the scheduler puts client and
/// server on one CPU, so it is also taken pinned both ways.
fn rtt_figures(env: &Env, lines: &Lines, pid: u32, plan: Plan, table: &mut Table) -> Res<()> {
    let mut client = Client::connect(&env.socket, lines)?;
    client.get()?;
    let (mut echo, mut floor) = start_echo(env, lines, client.line.len())?;
    let pids = (pid, echo.id());
    round_trips(&mut client, &mut floor, pids, 2_000)?;

    // Pinning with `taskset`, when it exists and at least two CPUs are allowed.
    let me = std::process::id(); // The main thread's id: this function runs on it.
    let all = allowed_cpus().filter(|all| pin(me, false, all));
    let (first, second) = {
        let cpus: Vec<String> = all
            .as_deref()
            .map(|a| a.split([',', '-']).take(2).map(str::to_string).collect())
            .unwrap_or_default();
        (cpus.first().cloned(), cpus.get(1).cloned())
    };
    let mut results = vec![(
        Placement::Free,
        round_trips(&mut client, &mut floor, pids, plan.rtt_requests)?,
    )];
    if let (Some(all), Some(first), Some(second)) = (&all, &first, &second) {
        for (placement, servers) in [(Placement::SameCpu, first), (Placement::OtherCpu, second)] {
            if pin(me, false, first) && pin(pids.0, true, servers) && pin(pids.1, true, servers) {
                let n = plan.rtt_requests / 4;
                results.push((placement, round_trips(&mut client, &mut floor, pids, n)?));
            }
        }
        pin(me, false, all);
        pin(pids.0, true, all);
        pin(pids.1, true, all);
    }
    drop(floor);
    if wait_child(&mut echo, Duration::from_secs(10)).is_none() {
        eprintln!("spotok-bench: the echo process did not stop; killed");
    }
    untrack_pid(echo.id());

    report_round_trips(results, table);

    // A fresh connection per request, as `spotokctl get` makes, without the process start;
    // also with the hello and the get sent in one write (one round trip instead of two).
    let mut fresh = [Vec::new(), Vec::new()];
    for _ in 0..plan.rtt_requests / 100 {
        for (pipelined, times) in [false, true].into_iter().zip(&mut fresh) {
            times.push(fresh_get(&env.socket, lines, pipelined)?);
        }
    }
    let [sequential, pipelined] = fresh.map(Samples::new);
    table.info(
        "connect, hello, get: new connection each",
        format!(
            "p50 {:.1} µs, p99 {:.1} µs; hello and get in one write: p50 {:.1} µs, p99 {:.1} µs",
            micros(sequential.median()),
            micros(sequential.pct(99)),
            micros(pipelined.median()),
            micros(pipelined.pct(99))
        ),
    );
    Ok(())
}

/// Connect, hello, get, on a new connection; `pipelined` sends both lines in one write.
fn fresh_get(socket: &Path, lines: &Lines, pipelined: bool) -> Res<Duration> {
    let t = Instant::now();
    if !pipelined {
        Client::connect(socket, lines)?.get()?;
        return Ok(t.elapsed());
    }
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(&[lines.hello.as_slice(), &lines.get].concat())?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    line.clear();
    reader.read_until(b'\n', &mut line)?;
    let elapsed = t.elapsed();
    if line.starts_with(TOKEN_REPLY) {
        Ok(elapsed)
    } else {
        Err("no token reply to a pipelined get".into())
    }
}

/// Requests per second with `conns` threads, each with its own connection doing `get` in a
/// loop, for `run`.
fn throughput(socket: &Path, lines: &Lines, conns: usize, run: Duration) -> Res<f64> {
    // Connect in this thread: a failure here must not leave workers stuck at the barrier.
    let clients = (0..conns)
        .map(|_| Client::connect(socket, lines))
        .collect::<Res<Vec<_>>>()?;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let (barrier, stop) = (barrier.clone(), stop.clone());
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || -> Res<u64> {
                    barrier.wait();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        client.get()?;
                        n += 1;
                    }
                    Ok(n)
                })
        })
        .collect::<std::io::Result<_>>()?;
    barrier.wait();
    let t = Instant::now();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        total += worker.join().map_err(|_| "a worker panicked")??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

fn throughput_figures(socket: &Path, lines: &Lines, plan: Plan, table: &mut Table) -> Res<()> {
    let levels = [1, 16, 256];
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..plan.tput_rounds {
        for (i, conns) in levels.iter().enumerate() {
            rates[i].push(throughput(socket, lines, *conns, plan.tput_run)?);
        }
    }
    let note = format!(
        "median of {} × {} s",
        plan.tput_rounds,
        plan.tput_run.as_secs()
    );
    for (conns, rates) in levels.iter().zip(rates) {
        let rate = median_f64(rates);
        let figure = format!(
            "throughput, {conns} connection{}",
            if *conns == 1 { "" } else { "s" }
        );
        let measured = format!("{rate:.0} req/s ({note})");
        if *conns == 16 {
            table.row(
                &figure,
                measured,
                "≥ 50,000 req/s",
                Verdict::of(rate >= 50_000.0),
            );
        } else {
            table.info(&figure, measured);
        }
    }
    Ok(())
}

/// `requests` gets over 16 connections, each reconnecting every 1,000 requests so that
/// connection set-up and tear-down are part of the load.
fn soak(socket: &Path, lines: &Lines, requests: u64) -> Res<()> {
    let tickets = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (tickets, socket, lines) = (tickets.clone(), socket.to_path_buf(), lines.clone());
            std::thread::spawn(move || -> Res<()> {
                loop {
                    let mut client = Client::connect(&socket, &lines)?;
                    for _ in 0..1_000 {
                        if tickets.fetch_add(1, Ordering::Relaxed) >= requests {
                            return Ok(());
                        }
                        client.get()?;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "a soak worker panicked")??;
    }
    Ok(())
}

/// A connection to the bus at `address` once spotokd owns its name there; `Err(why)` when
/// the bus does not answer or the name never appears.
fn dbus_connect(address: &str) -> Res<Result<zbus::blocking::Connection, &'static str>> {
    // zbus's connection set-up has no deadline of its own: give it one from another thread
    // (left behind on timeout; it ends with the process).
    let (tx, rx) = std::sync::mpsc::channel();
    let address = address.to_string();
    std::thread::spawn(move || {
        let conn = zbus::blocking::connection::Builder::address(address.as_str())
            .and_then(|b| b.method_timeout(Duration::from_secs(30)).build());
        let _ = tx.send(conn);
    });
    let Ok(conn) = rx.recv_timeout(Duration::from_secs(30)) else {
        return Ok(Err("the bus does not answer"));
    };
    let conn = conn?;
    let proxy = zbus::blocking::fdo::DBusProxy::new(&conn)?;
    let end = Instant::now() + Duration::from_secs(15);
    while !proxy.name_has_owner(BUS_NAME.try_into()?)? {
        if Instant::now() > end {
            return Ok(Err("no D-Bus service"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Ok(conn))
}

/// `GetAccessToken` against `org.freedesktop.DBus.Peer.Ping` on the same daemon, alternating.
fn dbus_figures(address: Option<&str>, plan: Plan, table: &mut Table) -> Res<()> {
    let figure = "D-Bus GetAccessToken / Peer.Ping, medians";
    let goal = "≤ 1.3×";
    let Some(address) = address else {
        table.row(
            figure,
            "n/a (no dbus-daemon)".into(),
            goal,
            Verdict::NotAvailable,
        );
        return Ok(());
    };
    let conn = match dbus_connect(address)? {
        Ok(conn) => conn,
        Err(why) => {
            table.row(figure, format!("n/a ({why})"), goal, Verdict::NotAvailable);
            return Ok(());
        }
    };
    let get = || -> Res<(String, i32)> {
        let reply = conn.call_method(
            Some(BUS_NAME),
            BUS_PATH,
            Some(BUS_INTERFACE),
            "GetAccessToken",
            &(),
        )?;
        Ok(reply.body().deserialize()?)
    };
    let ping = || -> Res<()> {
        conn.call_method(
            Some(BUS_NAME),
            BUS_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        )?;
        Ok(())
    };
    let (token, expires_in) = get()?;
    if token.is_empty() || expires_in <= 0 {
        return Err(format!(
            "GetAccessToken answered ({} chars, {expires_in})",
            token.len()
        )
        .into());
    }
    for _ in 0..200 {
        get()?;
        ping()?;
    }
    let mut gets = Vec::with_capacity(plan.dbus_calls);
    let mut pings = Vec::with_capacity(plan.dbus_calls);
    for i in 0..plan.dbus_calls {
        for k in 0..2 {
            let t = Instant::now();
            if (i + k) % 2 == 0 {
                get()?;
                gets.push(t.elapsed());
            } else {
                ping()?;
                pings.push(t.elapsed());
            }
        }
    }
    let (g, p) = (Samples::new(gets), Samples::new(pings));
    table.info(
        "D-Bus Peer.Ping (floor)",
        format!(
            "median {:.0} µs, p90 {:.0} µs",
            micros(p.median()),
            micros(p.pct(90))
        ),
    );
    table.info(
        "D-Bus GetAccessToken",
        format!(
            "median {:.0} µs, p90 {:.0} µs",
            micros(g.median()),
            micros(g.pct(90))
        ),
    );
    let r = ratio(g.median(), p.median());
    table.row(figure, format!("{r:.2}×"), goal, Verdict::of(r <= 1.3));
    Ok(())
}

/// Spawn to `READY=1`, over several starts of a daemon with a stored login (no D-Bus: the
/// session bus is absent, as in the tests).
fn ready_figures(bins: &Bins, fake: &FakeSpotify, plan: Plan, table: &mut Table) -> Res<()> {
    let env = new_env(fake);
    {
        let mut first = Spotokd::spawn(&env, bins, 0)?;
        first.ready(Duration::from_secs(20))?;
        import(&env, bins, fake)?;
        first.stop();
    }
    let mut times = Vec::with_capacity(plan.starts);
    for i in 1..=plan.starts {
        let mut daemon = Spotokd::spawn(&env, bins, i)?;
        times.push(daemon.ready(Duration::from_secs(20))?);
        if daemon.stop() != Some(0) {
            return Err("spotokd did not stop cleanly on SIGTERM".into());
        }
    }
    let s = Samples::new(times);
    table.row(
        &format!("spawn to READY=1, {} starts", s.0.len()),
        format!(
            "median {:.1} ms, p90 {:.1} ms",
            millis(s.median()),
            millis(s.pct(90))
        ),
        "≤ 20 ms",
        Verdict::of(s.median() <= Duration::from_millis(20)),
    );
    Ok(())
}
