//! How a call fails: tap-ctl's way. Its `main` prints `strerror(abs(ret))` on stderr and exits
//! with `abs(ret)`, the errno (blktap `control/tap-ctl.c`). We print one line of our own
//! first, saying why, and map every failure to the errno tapdisk or tap-ctl would have given
//! (the table is in help.txt, ERRORS).

use std::io;

use control::client::ClientError;
use control::protocol::code;

/// A failed call: its exit status (an errno) and what goes to stderr before the strerror line.
#[derive(Debug)]
pub struct Failure {
    pub errno: i32,
    /// Our lines (each ending in a newline): why, or a usage text.
    pub stderr: String,
    /// Whether tap-ctl's strerror line follows (not after the real tap-ctl's own failure).
    pub strerror: bool,
}

impl Failure {
    /// `errno`, with one line saying why.
    pub fn new(errno: i32, why: impl std::fmt::Display) -> Failure {
        Failure::text(errno, format!("ublk-tap-ctl: {why}\n"))
    }

    /// `errno`, with `text` (whole lines) on stderr as it is.
    pub fn text(errno: i32, text: String) -> Failure {
        Failure {
            errno,
            stderr: text,
            strerror: true,
        }
    }

    /// The real tap-ctl exited with `status` and said why itself.
    pub fn exited(status: i32) -> Failure {
        Failure {
            errno: status,
            stderr: String::new(),
            strerror: false,
        }
    }

    /// The daemon's `what` failed with `e`.
    pub fn client(what: &str, e: &ClientError) -> Failure {
        Failure::new(of_client(e), format_args!("{what}: {}", describe(e)))
    }

    /// An I/O error of ours (stdout, exec).
    pub fn io(what: &str, e: &io::Error) -> Failure {
        Failure::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format_args!("{what}: {e}"),
        )
    }

    /// Prints the failure as tap-ctl would and returns the exit status.
    pub fn report(&self) -> i32 {
        eprint!("{}", self.stderr);
        if self.strerror {
            eprintln!("{}", strerror(self.errno));
        }
        self.errno
    }
}

/// `e` and its causes, joined by ": ".
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// The C library's text for `errno`, without Rust's " (os error N)".
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// The errno of a failed exchange with a daemon.
pub fn of_client(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        // A socket read timeout shows as EAGAIN: tap-ctl's select() timing out is ETIMEDOUT.
        ClientError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            libc::ETIMEDOUT
        }
        ClientError::Io(io) => io.raw_os_error().unwrap_or(libc::EIO),
        // tap-ctl reads EOF as EIO (tap_ctl_read_raw).
        ClientError::Closed => libc::EIO,
        ClientError::BadReply(_) => libc::EPROTO,
        ClientError::Refused { code, .. } => of_code(code),
        ClientError::Invalid(_) => libc::EINVAL,
        _ => libc::EIO,
    }
}

/// The errno for one of the daemon's error codes (PROTOCOL.md, "Error codes").
pub fn of_code(c: &str) -> i32 {
    match c {
        // tapdisk answers EINVAL to a message it does not serve and to the resume of a disk
        // that is not paused.
        code::BAD_REQUEST | code::UNKNOWN_COMMAND | code::BAD_STATE => libc::EINVAL,
        code::BAD_VERSION => libc::EPROTO,
        code::BAD_FD | code::NO_SUCH_FD => libc::EBADF,
        code::TOO_MANY_FDS => libc::EMFILE,
        code::TIMEOUT => libc::ETIMEDOUT,
        code::MIRROR_REFUSED => libc::EREMOTEIO,
        // tapdisk's resume answer when the reopened image does not fit.
        code::BAD_IMAGE => libc::EMEDIUMTYPE,
        "permission-denied" => libc::EACCES,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code, its errno's name and number: the table in help.txt says the same.
    const TABLE: &[(&str, &str, i32)] = &[
        (code::BAD_REQUEST, "EINVAL 22", 22),
        (code::UNKNOWN_COMMAND, "EINVAL 22", 22),
        (code::BAD_VERSION, "EPROTO 71", 71),
        (code::BAD_FD, "EBADF 9", 9),
        (code::NO_SUCH_FD, "EBADF 9", 9),
        (code::TOO_MANY_FDS, "EMFILE 24", 24),
        (code::TIMEOUT, "ETIMEDOUT 110", 110),
        (code::MIRROR_REFUSED, "EREMOTEIO 121", 121),
        (code::BAD_IMAGE, "EMEDIUMTYPE 124", 124),
        (code::BAD_STATE, "EINVAL 22", 22),
        ("permission-denied", "EACCES 13", 13),
        (code::FAILED, "EIO 5", 5),
    ];

    #[test]
    fn daemon_codes_map_to_the_documented_errno() {
        let help = include_str!("help.txt");
        let (_, table) = help.split_once("\nERRORS\n").expect("an ERRORS section");
        for &(c, name, n) in TABLE {
            assert_eq!(of_code(c), n, "{c}");
            let line = table
                .lines()
                .find(|l| {
                    let rest = l.trim_start().strip_prefix(c);
                    rest.is_some_and(|r| r.starts_with([' ', ',']))
                })
                .unwrap_or_else(|| panic!("{c} is not in help.txt's table"));
            assert!(line.contains(name), "{line:?} should say {name}");
        }
        assert_eq!(of_code("something-new"), libc::EIO);
    }

    #[test]
    fn client_errors_map_as_tap_ctl_reads_its_socket() {
        let refused = ClientError::Refused {
            code: "timeout".into(),
            message: "drain took too long".into(),
        };
        assert_eq!(of_client(&refused), libc::ETIMEDOUT);
        let slow = ClientError::Io(io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(of_client(&slow), libc::ETIMEDOUT);
        assert_eq!(of_client(&ClientError::Closed), libc::EIO);
        assert_eq!(of_client(&ClientError::BadReply("x".into())), libc::EPROTO);
        let gone = ClientError::Connect {
            path: "/run/ublk-mirror/4.sock".into(),
            source: io::Error::from_raw_os_error(libc::ECONNREFUSED),
        };
        assert_eq!(of_client(&gone), libc::ECONNREFUSED);
    }

    #[test]
    fn strerror_is_the_c_librarys_text_alone() {
        assert_eq!(strerror(libc::EINVAL), "Invalid argument");
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
        let f = Failure::new(libc::ENODEV, "pause: pid 12 serves dev-id 3, not minor 4");
        assert_eq!(
            f.stderr,
            "ublk-tap-ctl: pause: pid 12 serves dev-id 3, not minor 4\n"
        );
    }
}
