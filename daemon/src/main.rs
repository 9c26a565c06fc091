//! `spotokd`: parses the command line, daemonizes if asked (before any thread exists), then
//! builds the tokio runtime and runs [`spotokd::daemon::run`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spotok_proto::paths;
use spotokd::daemon::{self, Listen, Options};

/// spotokd keeps your Spotify login and serves current access tokens to local programs.
#[derive(Debug, Parser)]
#[command(version, about)]
#[allow(clippy::doc_markdown)] // These doc comments are the --help text, not rustdoc.
struct Args {
    /// Config file [default: $XDG_CONFIG_HOME/spotok/config.toml]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Socket to listen on [default: $XDG_RUNTIME_DIR/spotok/spotokd.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Run in the background; return once the socket answers
    #[arg(long)]
    daemonize: bool,
    /// With --daemonize: write (and lock) the daemon's PID here
    #[arg(long, value_name = "PATH", requires = "daemonize")]
    pidfile: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match start(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spotokd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(args: &Args) -> anyhow::Result<ExitCode> {
    let env = |k: &str| std::env::var_os(k);
    let uid = rustix::process::getuid().as_raw();
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let absolute = |p: PathBuf| if p.is_absolute() { p } else { cwd.join(p) };
    let listen = match spotokd::sd::take_listen_fd() {
        Some(fd) => Listen::Inherited(fd),
        None => Listen::Path(absolute(paths::socket(&env, args.socket.as_deref(), uid))),
    };
    let opts = Options {
        config: absolute(paths::config_file(&env, args.config.as_deref())),
        listen,
        state_dir: paths::state_dir(&env),
        credentials: env("CREDENTIALS_DIRECTORY").map(PathBuf::from),
    };
    init_logging();

    if !args.daemonize {
        return run(opts, || {}).map(|()| ExitCode::SUCCESS);
    }

    // Fork now, while the process has one thread; report readiness through a pipe so the
    // parent returns only once the socket answers (or with the child's reason).
    let (mut reader, mut writer) = std::io::pipe().context("cannot create a pipe")?;
    let log = open_log(&opts.state_dir, uid)?;
    let mut d = daemonize::Daemonize::new()
        .working_directory("/")
        .umask(0o077)
        .stderr(log);
    if let Some(p) = &args.pidfile {
        d = d.pid_file(absolute(p.clone()));
    }
    match d.execute() {
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(writer);
            let mut said = String::new();
            let _ = reader.read_to_string(&mut said);
            if said == "ready" {
                Ok(ExitCode::SUCCESS)
            } else if said.is_empty() {
                anyhow::bail!("the daemon exited during start-up; see its log")
            } else {
                anyhow::bail!("{said}")
            }
        }
        daemonize::Outcome::Parent(Err(e)) => Err(e).context("cannot daemonize"),
        daemonize::Outcome::Child(Err(e)) => {
            let message = match &args.pidfile {
                Some(p) => format!(
                    "cannot daemonize ({e}): is another spotokd holding {}?",
                    p.display()
                ),
                None => format!("cannot daemonize: {e}"),
            };
            let _ = writer.write_all(message.as_bytes());
            Ok(ExitCode::FAILURE)
        }
        daemonize::Outcome::Child(Ok(_)) => {
            drop(reader);
            let mut pipe = Some(writer);
            let result = run(opts, || {
                if let Some(mut w) = pipe.take() {
                    let _ = w.write_all(b"ready");
                }
            });
            // Not ready: this process is gone after this line; say why to the parent.
            if let (Err(e), Some(mut w)) = (&result, pipe.take()) {
                let _ = w.write_all(format!("{e:#}").as_bytes());
            }
            result.map(|()| ExitCode::SUCCESS)
        }
    }
}

fn run(opts: Options, ready: impl FnOnce()) -> anyhow::Result<()> {
    // One thread: a request is ~3 µs of work, so a second worker buys nothing, and one thread
    // means one malloc arena (BENCHMARKS.md). Blocking-pool threads (file store, DNS) stay
    // parked instead of exiting after 10 s, so an idle daemon is not woken by their exits.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .thread_keep_alive(std::time::Duration::MAX)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime
        .block_on(daemon::run(opts, ready))
        .map_err(anyhow::Error::msg)
}

/// `SPOTOK_LOG` (or `RUST_LOG`) filters; colours only on a terminal; no timestamps under
/// journald, which adds its own.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("SPOTOK_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    // A bare level is for spotokd's own lines: libraries stay at warn, so their debug output
    // (HTTP and D-Bus internals) never reaches the log unless asked for by name.
    let filter = if filter.contains(['=', ',']) {
        filter
    } else {
        format!("warn,spotokd={filter}")
    };
    // `Targets` rather than `EnvFilter`: the same `target=level` syntax without the regex
    // engine (a quarter of a megabyte of code mapped into every spotokd).
    let targets: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_else(|e| {
        eprintln!("spotokd: ignoring SPOTOK_LOG={filter:?} ({e}); logging at info");
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::WARN)
            .with_target("spotokd", tracing::Level::INFO)
    });
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().finish().with(targets).init();
    } else {
        builder.finish().with(targets).init();
    }
}

fn open_log(state_dir: &Path, uid: u32) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    paths::private_dir(state_dir, uid).map_err(anyhow::Error::msg)?;
    let path = state_dir.join("spotokd.log");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the log {}", path.display()))
}
