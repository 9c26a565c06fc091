//! `spotokctl`: the thin, synchronous client of spotokd.
//!
//! stdout carries data only; every diagnostic is one line on stderr that says what to do,
//! and the exit code is the [`ErrorKind`]'s (SPEC: exit codes).

mod conn;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use spotok_proto::ErrorKind;

/// A failure, with its exit code.
#[derive(Debug)]
pub struct Fail {
    /// Decides the exit code.
    pub kind: ErrorKind,
    /// The one line for stderr.
    pub message: String,
}

impl Fail {
    /// A failure of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Get a current Spotify access token from spotokd, and manage its login.
#[derive(Debug, Parser)]
#[allow(clippy::doc_markdown)] // These doc comments are the --help text, not rustdoc.
#[command(name = "spotokctl", version, about, propagate_version = true)]
pub struct Cli {
    /// spotokd's socket [default: $SPOTOK_SOCKET, else $XDG_RUNTIME_DIR/spotok/spotokd.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub verb: Verb,
}

fn duration(s: &str) -> Result<Duration, String> {
    spotok_proto::duration::parse(s)
}

/// What to do.
#[derive(Debug, Subcommand)]
#[allow(clippy::doc_markdown)] // These doc comments are the --help text, not rustdoc.
pub enum Verb {
    /// Print a current access token
    Get {
        /// Answer from memory only if the token has this long left; else wait for a refresh
        #[arg(long, value_name = "DUR", default_value = "60s", value_parser = duration)]
        min_valid: Duration,
        /// Fail (exit 5) unless the login has this scope; repeatable
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<String>,
        /// Print `Authorization: Bearer …`
        #[arg(long)]
        header: bool,
        /// Give up after this long (exit 6)
        #[arg(long, value_name = "DUR", default_value = "30s", value_parser = duration)]
        timeout: Duration,
    },
    /// Show the state, expiry, scopes, login expiry, store and last error
    Status,
    /// Log in to Spotify in the browser (Authorization Code with PKCE)
    Login {
        /// Do not open a browser; also accept the final redirected URL pasted on stdin
        #[arg(long)]
        no_browser: bool,
        /// Write this client id to a config that has none
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
        /// Ask for this scope too; repeatable
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<String>,
    },
    /// Forget the stored login
    Logout,
    /// Refresh the token now and print the new expiry
    Refresh,
    /// Store a refresh token read from stdin, after checking it with one refresh
    Import,
    /// Print the Spotify user the login belongs to
    Whoami,
    /// Run a command with a current token in its environment
    Exec {
        /// The variable to set
        #[arg(long, value_name = "NAME", default_value = "SPOTIFY_ACCESS_TOKEN")]
        env: String,
        /// The token must stay valid at least this long
        #[arg(long, value_name = "DUR", default_value = "60s", value_parser = duration)]
        min_valid: Duration,
        /// The command and its arguments
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print a line whenever the token or the state changes, until interrupted
    Watch,
    /// Print a shell completion script
    Completions {
        /// bash, zsh or fish
        shell: clap_complete::Shell,
    },
    /// Print the man page
    Man,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match verbs::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("spotokctl: {}", f.message);
            ExitCode::from(f.kind.exit_code())
        }
    }
}
