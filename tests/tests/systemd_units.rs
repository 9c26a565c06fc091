//! The systemd units, the D-Bus activation file and the install scripts:
//! `systemd-analyze verify` and a private `dbus-daemon` accept the files, the sandbox stays in
//! place, and `scripts/install.sh` lays out every file that `scripts/uninstall.sh` removes.
//!
//! The tools are not optional here: a missing one fails the test with a pointer to
//! `scripts/test.sh`, which installs them, rather than letting the test pass silently.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use spotok_tests::{bin_dir, run, wait_until, Output, COMMAND_DEADLINE};

/// The unit-ish files, as shipped in `systemd/`.
const SERVICE: &str = "spotokd.service";
const SOCKET: &str = "spotokd.socket";
const ACTIVATION: &str = "org.spotok.Spotokd.service";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// Fails the test when `tool` is not installed.
fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    assert!(
        found,
        "{tool} is not installed: run scripts/test.sh, which installs the test prerequisites \
         (Debian package {package})"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create a test folder");
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A shipped file from `systemd/`.
fn shipped(name: &str) -> String {
    read(&repo_root().join("systemd").join(name))
}

/// The lines that are settings: trimmed, without blanks and `#`/`;` comments.
fn settings(text: &str) -> BTreeSet<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .collect()
}

/// Runs `cmd` (killed past [`COMMAND_DEADLINE`]) and fails the test unless it succeeded.
fn run_ok(cmd: Command) -> Output {
    let out = run(cmd, None, COMMAND_DEADLINE);
    out.ok();
    out
}

/// A background process, killed when dropped so no test leaves one behind.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Copies the shipped files `names` into `dir` with `@BINDIR@` filled in, as install.sh does.
fn install_copies(dir: &Path, bindir: &Path, names: &[&str]) {
    let bindir = bindir.to_str().expect("target folder is UTF-8");
    for name in names {
        write(&dir.join(name), &shipped(name).replace("@BINDIR@", bindir));
    }
}

/// A private runtime folder: `systemd-analyze --user` refuses to start without one.
fn runtime_dir(tmp: &Path) -> PathBuf {
    let run = tmp.join("run");
    std::fs::create_dir_all(&run).expect("create runtime folder");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
        .expect("chmod runtime folder");
    run
}

/// Runs `systemd-analyze --user verify` on the service and socket in `dir` (with any drop-ins
/// in `dir/spotokd.service.d/`), failing the test on an error or on any complaint about them.
fn verify(dir: &Path, scratch: &Path) {
    require("systemd-analyze", "systemd");
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(["--user", "--man=no", "verify"])
        .arg(dir.join(SERVICE))
        .arg(dir.join(SOCKET))
        // Away from the host user's own units and runtime folder.
        .env("HOME", scratch.join("verify-home"))
        .env("XDG_CONFIG_HOME", scratch.join("verify-home/.config"))
        .env("XDG_RUNTIME_DIR", runtime_dir(scratch))
        .env_remove("SYSTEMD_UNIT_PATH");
    let out = run(cmd, None, COMMAND_DEADLINE);
    // The host's own units may draw warnings; only ours count.
    let ours: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("spotokd") || l.contains(dir.to_string_lossy().as_ref()))
        .collect();
    assert!(
        out.code == Some(0) && ours.is_empty(),
        "systemd-analyze verify rejected the units in {} (exit {:?}):\n{}",
        dir.display(),
        out.code,
        out.stderr
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_service_and_socket() {
    require("systemd-analyze", "systemd");
    let bin = bin_dir();
    let tmp = tempfile::tempdir().expect("temp dir");
    let units = tmp.path().join("units");
    install_copies(&units, &bin, &[SERVICE, SOCKET]);
    verify(&units, tmp.path());
}

#[test]
fn dbus_daemon_lists_the_activation_file() {
    require("dbus-daemon", "dbus");
    require("busctl", "systemd");
    let bin = bin_dir();
    let tmp = tempfile::tempdir().expect("temp dir");
    let services = tmp.path().join("services");
    install_copies(&services, &bin, &[ACTIVATION]);
    let socket = tmp.path().join("bus");
    let config = tmp.path().join("bus.conf");
    write(
        &config,
        &format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <servicedir>{}</servicedir>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            socket.display(),
            services.display()
        ),
    );
    // Its complaints (it cannot raise the fd limit, …) go to a file, shown if it fails.
    let log_path = tmp.path().join("dbus-daemon.log");
    let log = std::fs::File::create(&log_path).expect("create dbus-daemon log");
    let _bus = Reaper(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dbus-daemon"),
    );
    assert!(
        wait_until(COMMAND_DEADLINE, || socket.exists()),
        "dbus-daemon did not create {} within {COMMAND_DEADLINE:?}:\n{}",
        socket.display(),
        read(&log_path)
    );

    let mut busctl = Command::new("busctl");
    busctl
        .arg(format!("--address=unix:path={}", socket.display()))
        .args([
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ListActivatableNames",
        ]);
    let names = run_ok(busctl).stdout;
    assert!(
        names.contains("\"org.spotok.Spotokd\""),
        "dbus-daemon did not accept {ACTIVATION} as an activatable service: {names}"
    );
}

#[test]
fn service_and_socket_keep_their_contract_and_sandbox() {
    let service = shipped(SERVICE);
    let service = settings(&service);
    for line in [
        "Type=notify",
        "ExecStart=@BINDIR@/spotokd",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "BusName=org.spotok.Spotokd",
        "Requires=spotokd.socket",
        "After=spotokd.socket",
        "Also=spotokd.socket",
        // Without it systemd 252 (Debian 12) ignores every namespace option in a user unit.
        "PrivateUsers=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "StateDirectory=spotok",
        "StateDirectoryMode=0700",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "SystemCallArchitectures=native",
        "UMask=0077",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "RestrictSUIDSGID=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "CapabilityBoundingSet=",
    ] {
        assert!(service.contains(line), "{SERVICE} lacks `{line}`");
    }

    let socket = shipped(SOCKET);
    let socket = settings(&socket);
    for line in [
        "ListenStream=%t/spotok/spotokd.sock",
        "SocketMode=0600",
        "DirectoryMode=0700",
        "WantedBy=sockets.target",
    ] {
        assert!(socket.contains(line), "{SOCKET} lacks `{line}`");
    }

    let activation = shipped(ACTIVATION);
    let activation = settings(&activation);
    for line in [
        "[D-BUS Service]",
        "Name=org.spotok.Spotokd",
        "Exec=@BINDIR@/spotokd",
        "SystemdService=spotokd.service",
    ] {
        assert!(activation.contains(line), "{ACTIVATION} lacks `{line}`");
    }
}

/// Every file install.sh puts down, for a `$tmp` home laid out as in
/// [`install_then_uninstall`].
fn installed_files(tmp: &Path) -> Vec<PathBuf> {
    let (config, data) = (tmp.join("config"), tmp.join("data"));
    vec![
        tmp.join("prefix/bin/spotokd"),
        tmp.join("prefix/bin/spotokctl"),
        config.join("systemd/user").join(SERVICE),
        config.join("systemd/user").join(SOCKET),
        data.join("dbus-1/services").join(ACTIVATION),
        data.join("bash-completion/completions/spotokctl"),
        data.join("zsh/site-functions/_spotokctl"),
        config.join("fish/completions/spotokctl.fish"),
        data.join("man/man1/spotokctl.1"),
    ]
}

/// `bash scripts/<name> args…` in a home of its own under `tmp`, taking the binaries from
/// `bin`, starting nothing, with `SPOTOK_USERNS=userns`.
fn script(tmp: &Path, bin: &Path, name: &str, args: &[&str], userns: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts").join(name))
        .args(args)
        .current_dir(tmp)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", tmp.join("home"))
        .env("XDG_CONFIG_HOME", tmp.join("config"))
        .env("XDG_DATA_HOME", tmp.join("data"))
        .env("XDG_STATE_HOME", tmp.join("state"))
        .env("XDG_RUNTIME_DIR", runtime_dir(tmp))
        .env("PREFIX", tmp.join("prefix"))
        .env("SPOTOK_NO_BUILD", "1")
        .env("SPOTOK_BIN_DIR", bin)
        .env("SPOTOK_NO_START", "1")
        .env("SPOTOK_USERNS", userns);
    cmd
}

#[test]
fn install_then_uninstall() {
    let bin = bin_dir();
    let tmp = tempfile::tempdir().expect("temp dir");
    let tmp = tmp.path();
    std::fs::create_dir_all(tmp.join("home")).expect("create home");

    let units = tmp.join("config/systemd/user");
    let dropin = units.join("spotokd.service.d/50-no-userns.conf");

    // First as on a host without unprivileged user namespaces: the drop-in that shrinks the
    // sandbox must still make units systemd accepts.
    run_ok(script(tmp, &bin, "install.sh", &[], "no"));
    assert!(
        dropin.is_file(),
        "install.sh did not write {}",
        dropin.display()
    );
    verify(&units, tmp);
    // Then again (an upgrade) with user namespaces: the full sandbox, no drop-in.
    run_ok(script(tmp, &bin, "install.sh", &[], "yes"));
    assert!(!dropin.exists(), "install.sh left {}", dropin.display());
    verify(&units, tmp);
    run_ok(script(tmp, &bin, "install.sh", &[], "no"));

    for file in installed_files(tmp) {
        let meta = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("install.sh did not create {}: {e}", file.display()));
        assert!(meta.len() > 0, "{} is empty", file.display());
    }
    for name in ["spotokd", "spotokctl"] {
        let installed = tmp.join("prefix/bin").join(name);
        let mode = std::fs::metadata(&installed)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o755,
            "{} has mode {mode:o}",
            installed.display()
        );
        assert!(
            std::fs::read(&installed).expect("read binary")
                == std::fs::read(bin.join(name)).expect("read binary"),
            "{} is not a copy of {}",
            installed.display(),
            bin.join(name).display()
        );
    }
    let real = tmp.join("prefix/bin/spotokd");
    let service = read(&tmp.join("config/systemd/user").join(SERVICE));
    let activation = read(&tmp.join("data/dbus-1/services").join(ACTIVATION));
    assert!(
        settings(&service).contains(format!("ExecStart={}", real.display()).as_str()),
        "installed {SERVICE} does not start {}:\n{service}",
        real.display()
    );
    assert!(
        settings(&activation).contains(format!("Exec={}", real.display()).as_str()),
        "installed {ACTIVATION} does not run {}:\n{activation}",
        real.display()
    );
    for unit in [SERVICE, SOCKET] {
        let text = read(&tmp.join("config/systemd/user").join(unit));
        assert!(
            !text.contains("@BINDIR@"),
            "installed {unit} still has @BINDIR@"
        );
    }
    assert!(
        !activation.contains("@BINDIR@"),
        "installed {ACTIVATION} still has @BINDIR@"
    );

    // Without --purge the user's config and login stay.
    let config = tmp.join("config/spotok/config.toml");
    let state = tmp.join("state/spotok/token.json");
    write(&config, "client_id = \"test\"\n");
    write(&state, "{}\n");
    let out = run_ok(script(tmp, &bin, "uninstall.sh", &[], "auto"));
    for file in installed_files(tmp).iter().chain([&dropin]) {
        assert!(!file.exists(), "uninstall.sh left {}", file.display());
    }
    assert!(
        config.exists() && state.exists(),
        "uninstall.sh without --purge deleted the config or login"
    );
    assert!(
        out.stdout.contains("kept"),
        "uninstall.sh does not say what it kept"
    );

    // Uninstalling again is harmless; --purge then takes the config and login too.
    run_ok(script(tmp, &bin, "uninstall.sh", &["--purge"], "auto"));
    assert!(
        !config.exists(),
        "uninstall.sh --purge kept {}",
        config.display()
    );
    assert!(
        !state.exists(),
        "uninstall.sh --purge kept {}",
        state.display()
    );
}
