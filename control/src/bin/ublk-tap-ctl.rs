#![doc = concat!("```text\n", include_str!("ublk-tap-ctl/help.txt"), "```\n")]
//!
//! The text above is also `--help`. The code follows one call: `main` splits off the real
//! tap-ctl (`--real PATH` or `UBLK_TAP_CTL_REAL`), [`args`] parses the verb as tap-ctl's
//! getopt loops do, [`daemons`] finds the disk's daemon by its pid, [`tapdisk`] turns our
//! replies into tapdisk's shapes and tap-ctl's arguments into our commands, and [`errno`]
//! ends a failed call as tap-ctl ends it (strerror on stderr, the errno as exit status).
//! Facts are from blktap's `control/tap-ctl*.c` and `drivers/tapdisk-*.c`, xen-api's
//! `ocaml/tapctl/tapctl.ml` and sm's `libs/sm/blktap2.py`.

#[path = "ublk-tap-ctl/args.rs"]
mod args;
#[path = "ublk-tap-ctl/daemons.rs"]
mod daemons;
#[path = "ublk-tap-ctl/errno.rs"]
mod errno;
#[path = "ublk-tap-ctl/tapdisk.rs"]
mod tapdisk;

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use control::client::{ClientError, Ignored};
use control::protocol::{Command, StatsReply};
use serde_json::Value;

use crate::args::{Call, ListArgs, Target, UnpauseArgs, Verb};
use crate::daemons::{Daemon, Found};
use crate::errno::Failure;

const HELP: &str = include_str!("ublk-tap-ctl/help.txt");
/// Names the real tap-ctl when `--real` does not.
const REAL_ENV: &str = "UBLK_TAP_CTL_REAL";
/// Set for the real tap-ctl we run: if it turns out to be us again, we stop instead of looping.
const PASSED_ENV: &str = "UBLK_TAP_CTL_PASSED";
/// How much longer than `pause -t SECS` its reply may take.
const SLACK: Duration = Duration::from_secs(10);

fn main() {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    let status = match run(argv) {
        Ok(()) => 0,
        Err(f) => f.report(),
    };
    std::process::exit(status);
}

fn run(argv: Vec<OsString>) -> Result<(), Failure> {
    let (real, rest) = split_real(argv)?;
    let real = real.map(|path| Real {
        path,
        args: rest.clone(),
    });
    let Some(first) = rest.first() else {
        return out(&args::top_usage());
    };
    let name = first.to_string_lossy();
    if name == "--help" || name == "-h" {
        return out(HELP);
    }
    let Some(verb) = Verb::of(&name) else {
        return other_verb(real.as_ref(), &name);
    };
    // tap-ctl's main drops --debug wherever it is.
    let words: Option<Vec<String>> = rest[1..]
        .iter()
        .filter(|a| *a != "--debug")
        .map(|a| a.to_str().map(String::from))
        .collect();
    let parsed = match words {
        Some(words) => args::parse(verb, &words),
        None => Err(Failure::new(libc::EINVAL, "arguments must be UTF-8")),
    };
    match (parsed, &real) {
        (Ok(call), _) => dispatch(call, real.as_ref()),
        // The real tap-ctl is the authority on its syntax (another version may know more).
        (Err(_), Some(r)) => Err(r.exec()),
        (Err(usage), None) => Err(usage),
    }
}

/// The real tap-ctl given as `--real PATH` (or `--real=PATH`) before the verb, else by
/// UBLK_TAP_CTL_REAL; and the arguments left.
fn split_real(mut argv: Vec<OsString>) -> Result<(Option<PathBuf>, Vec<OsString>), Failure> {
    let first = argv.first().map(|a| a.as_bytes().to_vec());
    match first.as_deref() {
        Some(b"--real") => {
            if argv.len() < 2 {
                return Err(Failure::new(libc::EINVAL, "--real needs a PATH"));
            }
            let path = argv.remove(1);
            argv.remove(0);
            Ok((Some(path.into()), argv))
        }
        Some(a) if a.starts_with(b"--real=") => {
            let path = OsStr::from_bytes(&a[b"--real=".len()..]).to_owned();
            argv.remove(0);
            Ok((Some(path.into()), argv))
        }
        _ => {
            let env = std::env::var_os(REAL_ENV).filter(|v| !v.is_empty());
            Ok((env.map(PathBuf::from), argv))
        }
    }
}

/// A verb that is not ours: the real tap-ctl's, or what tap-ctl does without it.
fn other_verb(real: Option<&Real>, verb: &str) -> Result<(), Failure> {
    if let Some(r) = real {
        return Err(r.exec());
    }
    if args::TAP_CTL_VERBS.contains(&verb) {
        return Err(Failure::new(
            libc::ENOSYS,
            format_args!("{verb}: a blktap verb, and no real tap-ctl is configured {HOW}"),
        ));
    }
    // tap-ctl logs this to syslog, prints its usage on stdout and exits 0.
    eprintln!("ublk-tap-ctl: invalid COMMAND {verb}");
    out(&args::top_usage())
}

/// How to configure the real tap-ctl, for messages.
const HOW: &str = "(--real PATH or UBLK_TAP_CTL_REAL)";

fn dispatch(call: Call, real: Option<&Real>) -> Result<(), Failure> {
    match call {
        Call::Help(verb) => out(&verb.usage()),
        Call::List(a) => list(&a, real),
        Call::Stats(t) => stats(ours(t, real)?),
        Call::Pause(t, secs) => pause(ours(t, real)?, secs),
        Call::Unpause(a) => unpause(ours(a.target, real)?, &a),
    }
}

/// The daemon `-p PID -m MINOR` names, or the real tap-ctl's answer (it runs in our place),
/// or tap-ctl's failure without one.
fn ours(t: Target, real: Option<&Real>) -> Result<Daemon, Failure> {
    match daemons::find(t.pid, t.minor) {
        Found::Ours(d) => Ok(d),
        // tapdisk answers ENODEV for a minor it does not serve.
        Found::OtherMinor(d) => Err(Failure::new(
            libc::ENODEV,
            format_args!(
                "pid {} is the ublk-mirror daemon of dev-id {}, not of minor {}",
                t.pid, d.info.dev_id, t.minor
            ),
        )),
        Found::NotOurs => match real {
            Some(r) => Err(r.exec()),
            // tap_ctl_connect_id refuses a negative id; a missing ctl<pid> socket is ENOENT.
            None if t.pid < 0 => Err(Failure::new(
                libc::EINVAL,
                format_args!("invalid pid {}", t.pid),
            )),
            None => Err(Failure::new(
                libc::ENOENT,
                format_args!(
                    "pid {} is no ublk-mirror daemon, and no real tap-ctl is configured {HOW}",
                    t.pid
                ),
            )),
        },
    }
}

fn list(a: &ListArgs, real: Option<&Real>) -> Result<(), Failure> {
    let (up, down) = daemons::all();
    for (socket, e) in &down {
        // A connect error names the socket already.
        let why = match e {
            ClientError::Connect { .. } => errno::describe(e),
            _ => format!("{}: {}", socket.display(), errno::describe(e)),
        };
        eprintln!("ublk-tap-ctl: list: {why}; left out");
    }
    if let Some(pid) = a.pid {
        let mine = up
            .iter()
            .any(|d| d.info.pid != 0 && i64::from(d.info.pid) == i64::from(pid));
        if !mine {
            // tap-ctl lists nothing for a pid without tapdisk.
            return real.map_or(Ok(()), |r| Err(r.exec()));
        }
    }
    let lines: String = up
        .iter()
        .filter(|d| tapdisk::list_keeps(a, &d.info))
        .map(|d| tapdisk::list_line(&d.info) + "\n")
        .collect();
    out(&lines)?;
    match (a.pid, real) {
        (None, Some(r)) => r.list(),
        _ => Ok(()),
    }
}

fn stats(mut d: Daemon) -> Result<(), Failure> {
    let what = format!("stats: {}", d.socket.display());
    let s: StatsReply = d
        .client
        .request(Command::Stats)
        .map_err(|e| Failure::client(&what, &e))?;
    // tap_ctl_stats_fwrite ends the JSON with a newline, and tap_cli_stats adds one.
    out(&format!("{}\n\n", tapdisk::stats_json(&d.info, &s)))
}

fn pause(mut d: Daemon, secs: Option<u32>) -> Result<(), Failure> {
    let what = format!("pause: {}", d.socket.display());
    // No limit unless -t: tap-ctl waits as long as the drain takes.
    let (timeout, wait) = match secs {
        None => (0.0, None),
        Some(s) => (f64::from(s), Some(Duration::from_secs(s.into()) + SLACK)),
    };
    let command = Command::Pause {
        timeout: Some(timeout),
    };
    d.client
        .set_timeout(wait)
        .and_then(|()| d.client.request::<Ignored>(command))
        .map_err(|e| Failure::client(&what, &e))?;
    Ok(())
}

fn unpause(mut d: Daemon, a: &UnpauseArgs) -> Result<(), Failure> {
    let what = format!("unpause: {}", d.socket.display());
    let command = tapdisk::unpause_command(a, &d.info.image)?;
    // tap-ctl waits for its RESUME without limit; the daemon bounds the reopen and handshake.
    let reply: Value = d
        .client
        .set_timeout(None)
        .and_then(|()| d.client.request(command))
        .map_err(|e| Failure::client(&what, &e))?;
    // The disk resumed without its secondary, as tapdisk does ("Ignoring failed NBD
    // secondary attach"): not a failure, but say why.
    if let Some(why) = reply.get("mirror_error").and_then(Value::as_str) {
        let secondary = a.secondary.as_deref().unwrap_or("");
        eprintln!(
            "ublk-tap-ctl: unpause: resumed without the secondary {secondary} \
             (nbd_mirror_failed is 1): {why}"
        );
    }
    Ok(())
}

/// Writes to stdout now (before an exec, and so a closed pipe is an error, not a panic).
fn out(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::io("stdout", &e))
}

/// Blktap's tap-ctl and the arguments to hand it (ours after `--real PATH`).
struct Real {
    path: PathBuf,
    args: Vec<OsString>,
}

impl Real {
    fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.path);
        c.args(&self.args).env(PASSED_ENV, "1");
        c
    }

    /// Refuses a real tap-ctl that is this program, directly or through a wrapper.
    fn check(&self) -> Result<(), Failure> {
        let this = std::env::current_exe().and_then(std::fs::canonicalize);
        let same = std::fs::canonicalize(&self.path).is_ok_and(|p| this.is_ok_and(|t| t == p));
        if same || std::env::var_os(PASSED_ENV).is_some() {
            return Err(Failure::new(
                libc::ELOOP,
                format_args!(
                    "the real tap-ctl {} runs ublk-tap-ctl again: it must be blktap's",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Runs in our place (exec), or returns why it cannot.
    fn exec(&self) -> Failure {
        if let Err(f) = self.check() {
            return f;
        }
        let e = self.command().exec();
        Failure::io(&format!("cannot run {}", self.path.display()), &e)
    }

    /// `list` after ours: its lines (its stdout a pipe, so it prints the line form too),
    /// and its exit status.
    fn list(&self) -> Result<(), Failure> {
        self.check()?;
        let done = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| Failure::io(&format!("cannot run {}", self.path.display()), &e))?;
        out(&String::from_utf8_lossy(&done.stdout))?;
        match (done.status.code(), done.status.signal()) {
            (Some(0), _) => Ok(()),
            (Some(status), _) => Err(Failure::exited(status)),
            (None, signal) => Err(Failure::exited(128 + signal.unwrap_or(0))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_real_tap_ctl_is_split_off_before_the_verb() {
        let (real, rest) =
            split_real(os(&["--real", "/usr/sbin/tap-ctl.blktap", "spawn"])).expect("--real PATH");
        assert_eq!(real, Some(PathBuf::from("/usr/sbin/tap-ctl.blktap")));
        assert_eq!(rest, os(&["spawn"]));
        let (real, rest) = split_real(os(&["--real=/t", "list", "-m", "4"])).expect("--real=");
        assert_eq!(real, Some(PathBuf::from("/t")));
        assert_eq!(rest, os(&["list", "-m", "4"]));
        assert_eq!(
            split_real(os(&["--real"])).expect_err("no path").errno,
            libc::EINVAL
        );
        // Only as the first argument: later, it is the verb's (and not one of its options).
        let (_, rest) = split_real(os(&["list", "--real", "/t"])).expect("a verb's argument");
        assert_eq!(rest, os(&["list", "--real", "/t"]));
    }

    #[test]
    fn help_says_what_the_issue_asks() {
        for needed in [
            "--real PATH",
            "UBLK_TAP_CTL_REAL",
            "separate namespaces",
            "0x2a",
            "ETIMEDOUT",
            "raw images only",
        ] {
            assert!(HELP.contains(needed), "help.txt lacks {needed:?}");
        }
        for verb in args::TAP_CTL_VERBS {
            if Verb::of(verb).is_none() {
                assert!(HELP.contains(verb), "help.txt should name {verb}");
            }
        }
    }
}
