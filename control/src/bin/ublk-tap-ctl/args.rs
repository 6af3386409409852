//! tap-ctl's command line, parsed as blktap's `control/tap-ctl.c` parses it: the verb first,
//! then GNU getopt(3) over short options (clusters `-p123`, a value in the next argument,
//! non-options skipped, `--` ending the options, `--debug` dropped anywhere by `main`), with
//! values read by atoi(3) and -1 meaning "not given". Each verb takes its options in order:
//! `-h` prints its usage on stdout and stops; an unknown option or a missing value prints
//! getopt's complaint and the usage on stderr (EINVAL).

use crate::errno::Failure;

/// The verbs we serve ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    List,
    Stats,
    Pause,
    Unpause,
}

impl Verb {
    pub fn of(name: &str) -> Option<Verb> {
        Some(match name {
            "list" => Verb::List,
            "stats" => Verb::Stats,
            "pause" => Verb::Pause,
            "unpause" => Verb::Unpause,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Verb::List => "list",
            Verb::Stats => "stats",
            Verb::Pause => "pause",
            Verb::Unpause => "unpause",
        }
    }

    /// The verb's usage text, tap-ctl's own.
    pub fn usage(self) -> String {
        match self {
            Verb::List => format!(
                "usage: list [-h] [-p pid] [-m minor] [-t type] [-f file]\n\n\
                 Lists tapdisks in the following format:\n{:>8} {:>4} {:>4} {:>10} {}\n",
                "pid", "minor", "state", "type", "file"
            ),
            Verb::Stats => "usage: stats <-p pid> <-m minor>\n\n\
                 Prints a Python dictionary with the VBD stats. The images are listed in \
                 reverse order (leaf to root)\n"
                .into(),
            Verb::Pause => "usage: pause <-p pid> <-m minor> [-t timeout secs]\n".into(),
            Verb::Unpause => "usage: unpause <-p pid> <-m minor> [-a type:/path/to/file] \
                 [-2 secondary] [-c </path/to/logfile> insert log layer to track changed \
                 blocks]\n"
                .into(),
        }
    }

    /// getopt's option string for the verb.
    fn spec(self) -> &'static str {
        match self {
            Verb::List => "m:p:t:f:h",
            Verb::Stats => "p:m:h",
            Verb::Pause => "p:m:t:h",
            Verb::Unpause => "p:m:a:2:c:h",
        }
    }
}

/// tap-ctl's verbs, in its order: its top-level usage lists them.
pub const TAP_CTL_VERBS: [&str; 13] = [
    "list", "allocate", "free", "create", "destroy", "spawn", "attach", "detach", "open", "close",
    "pause", "unpause", "stats",
];

/// tap-ctl's top-level usage (`help()`), printed on stdout for no verb or an unknown one.
pub fn top_usage() -> String {
    format!(
        "usage: tap-ctl COMMAND [OPTIONS]\nCOMMAND := {{ {} }}\n",
        TAP_CTL_VERBS.join(" | ")
    )
}

/// A disk: `-p PID -m MINOR`, both required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub pid: i32,
    pub minor: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListArgs {
    pub pid: Option<i32>,
    pub minor: Option<i32>,
    pub ty: Option<String>,
    pub file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpauseArgs {
    pub target: Target,
    /// `-a TYPE:PATH`.
    pub image: Option<String>,
    /// `-2 SECONDARY`.
    pub secondary: Option<String>,
    /// `-c LOG`.
    pub log: Option<String>,
}

/// A parsed call of one of our verbs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `-h`: the verb's usage on stdout, exit 0.
    Help(Verb),
    List(ListArgs),
    Stats(Target),
    /// With `-t SECS` (ours: tap-ctl falls through to its usage).
    Pause(Target, Option<u32>),
    Unpause(UnpauseArgs),
}

/// Parses `args` (after the verb, `--debug` already dropped) as tap-ctl parses `verb`'s.
pub fn parse(verb: Verb, args: &[String]) -> Result<Call, Failure> {
    let mut p = Given::default();
    for got in getopt(verb.name(), args, verb.spec()) {
        match got {
            Got::Opt('h', _) => return Ok(Call::Help(verb)),
            Got::Opt(c, v) => p.set(c, v.unwrap_or_default()),
            Got::Bad(msg) => return Err(usage(verb, Some(&msg))),
        }
    }
    let target = || match (p.pid, p.minor) {
        (Some(pid), Some(minor)) => Ok(Target { pid, minor }),
        _ => Err(usage(verb, None)),
    };
    Ok(match verb {
        Verb::List => Call::List(ListArgs {
            pid: p.pid,
            minor: p.minor,
            ty: p.ty,
            file: p.file,
        }),
        Verb::Stats => Call::Stats(target()?),
        Verb::Pause => {
            let secs = match p.ty.as_deref().map(atoi) {
                None => None,
                Some(s @ 1..=86_400) => Some(s.unsigned_abs()),
                Some(_) => return Err(usage(verb, None)),
            };
            Call::Pause(target()?, secs)
        }
        Verb::Unpause => Call::Unpause(UnpauseArgs {
            target: target()?,
            image: p.image,
            secondary: p.secondary,
            log: p.log,
        }),
    })
}

/// The usage error: getopt's complaint (if any) and the verb's usage on stderr, EINVAL.
fn usage(verb: Verb, getopt: Option<&str>) -> Failure {
    let complaint = getopt.map(|m| format!("{m}\n")).unwrap_or_default();
    Failure::text(libc::EINVAL, complaint + &verb.usage())
}

/// The options given, the last one winning as in tap-ctl's loops; -1 is "not given".
#[derive(Default)]
struct Given {
    pid: Option<i32>,
    minor: Option<i32>,
    /// `-t`: list's type, pause's timeout.
    ty: Option<String>,
    file: Option<String>,
    image: Option<String>,
    secondary: Option<String>,
    log: Option<String>,
}

impl Given {
    fn set(&mut self, c: char, v: String) {
        let id = || Some(atoi(&v)).filter(|&n| n != -1);
        match c {
            'p' => self.pid = id(),
            'm' => self.minor = id(),
            't' => self.ty = Some(v),
            'f' => self.file = Some(v),
            'a' => self.image = Some(v),
            '2' => self.secondary = Some(v),
            'c' => self.log = Some(v),
            _ => {}
        }
    }
}

/// One step of getopt(3).
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Opt(char, Option<String>),
    /// What glibc's getopt prints for an unknown option or a missing value; the last item.
    Bad(String),
}

/// GNU getopt(3) over `args` with `spec`, in order, up to the first bad option. `prog` is
/// the name getopt prints: tap-ctl hands each verb an argv whose first word is the verb.
fn getopt(prog: &str, args: &[String], spec: &str) -> Vec<Got> {
    let mut out = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            break;
        }
        // GNU getopt permutes non-options to the end; tap-ctl never reads them.
        let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) else {
            continue;
        };
        for (i, c) in cluster.char_indices() {
            match takes_value(spec, c) {
                None => {
                    out.push(Got::Bad(format!("{prog}: invalid option -- '{c}'")));
                    return out;
                }
                Some(false) => out.push(Got::Opt(c, None)),
                Some(true) => {
                    let glued = &cluster[i + c.len_utf8()..];
                    let value = if glued.is_empty() {
                        rest.next().cloned()
                    } else {
                        Some(glued.to_owned())
                    };
                    match value {
                        Some(v) => out.push(Got::Opt(c, Some(v))),
                        None => {
                            let msg = format!("{prog}: option requires an argument -- '{c}'");
                            out.push(Got::Bad(msg));
                            return out;
                        }
                    }
                    break;
                }
            }
        }
    }
    out
}

/// Whether `c` is an option of `spec` (None if not) and takes a value.
fn takes_value(spec: &str, c: char) -> Option<bool> {
    if c == ':' {
        return None;
    }
    let at = spec.find(c)?;
    Some(spec[at + c.len_utf8()..].starts_with(':'))
}

/// C's atoi(3): leading blanks, a sign, digits up to the first non-digit; 0 if none (so
/// `-p abc` is pid 0, as in tap-ctl). Saturates instead of overflowing.
pub fn atoi(s: &str) -> i32 {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let mut n: i64 = 0;
    for d in digits.bytes().take_while(u8::is_ascii_digit) {
        n = (n * 10 + i64::from(d - b'0')).min(1 << 32);
    }
    let n = if negative { -n } else { n };
    i32::try_from(n).unwrap_or(if negative { i32::MIN } else { i32::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(line: &str) -> Result<Call, Failure> {
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        let verb = Verb::of(&words[0]).expect("one of our verbs");
        parse(verb, &words[1..])
    }

    fn usage_error(line: &str) -> String {
        let f = call(line).expect_err("a usage error");
        assert_eq!(f.errno, libc::EINVAL, "{line}");
        f.stderr
    }

    const DISK: Target = Target { pid: 123, minor: 4 };

    #[test]
    fn sm_and_xapi_calls_parse() {
        assert_eq!(call("stats -p 123 -m 4").expect("stats"), Call::Stats(DISK));
        assert_eq!(call("list").expect("list"), Call::List(ListArgs::default()));
        let by_minor = ListArgs {
            minor: Some(4),
            ..ListArgs::default()
        };
        assert_eq!(call("list -m 4").expect("list -m"), Call::List(by_minor));
        // SM's order: -m first, then -p.
        let both = ListArgs {
            pid: Some(123),
            minor: Some(4),
            ..ListArgs::default()
        };
        assert_eq!(
            call("list -m 4 -p 123").expect("list -m -p"),
            Call::List(both)
        );
        assert_eq!(
            call("pause -p 123 -m 4").expect("pause"),
            Call::Pause(DISK, None)
        );
        let unpause = call("unpause -p 123 -m 4 -a aio:/x -2 nbd:mirror_vbd/1/xvda");
        assert_eq!(
            unpause.expect("unpause"),
            Call::Unpause(UnpauseArgs {
                target: DISK,
                image: Some("aio:/x".into()),
                secondary: Some("nbd:mirror_vbd/1/xvda".into()),
                log: None,
            })
        );
        // SM puts -2 before -a.
        let Call::Unpause(a) = call("unpause -p 123 -m 4 -2 null -a aio:/x").expect("null") else {
            panic!("not unpause");
        };
        assert_eq!(
            (a.secondary.as_deref(), a.image.as_deref()),
            (Some("null"), Some("aio:/x"))
        );
        let Call::Unpause(a) = call("unpause -p 123 -m 4 -c /log").expect("-c parses") else {
            panic!("not unpause");
        };
        assert_eq!(a.log.as_deref(), Some("/log"));
    }

    #[test]
    fn getopt_forms() {
        // Glued values, permuted non-options, and `--` ending the options.
        assert_eq!(
            call("stats -p123 junk -m4").expect("glued"),
            Call::Stats(DISK)
        );
        assert_eq!(
            call("stats -m -1 -p 123 -m 4").expect("last wins"),
            Call::Stats(DISK)
        );
        assert!(usage_error("stats -p 123 -- -m 4").contains("usage: stats"));
        // -h wins if it comes before a bad option, and prints nothing from getopt.
        assert_eq!(
            call("pause -p 1 -h -x").expect("help"),
            Call::Help(Verb::Pause)
        );
        let e = usage_error("pause -x -h");
        assert!(
            e.starts_with("pause: invalid option -- 'x'\nusage: pause "),
            "{e}"
        );
        let e = usage_error("stats -p 123 -m");
        assert!(
            e.starts_with("stats: option requires an argument -- 'm'\n"),
            "{e}"
        );
        // Clustered flags: -h inside a cluster.
        assert_eq!(call("list -hp 3").expect("cluster"), Call::Help(Verb::List));
        // getopt has no long options: --help is the options '-', 'h', ...
        assert!(usage_error("list --help").starts_with("list: invalid option -- '-'\n"));
    }

    #[test]
    fn missing_disk_and_bad_timeouts_are_usage_errors() {
        assert!(usage_error("stats -p 123").ends_with("(leaf to root)\n"));
        assert!(usage_error("pause -m 4").starts_with("usage: pause <-p pid> <-m minor>"));
        assert!(usage_error("unpause -p -1 -m 4").starts_with("usage: unpause"));
        assert!(usage_error("pause -p 1 -m 4 -t 0").starts_with("usage: pause"));
        assert!(usage_error("pause -p 1 -m 4 -t soon").starts_with("usage: pause"));
        assert!(usage_error("pause -p 1 -m 4 -t 86401").starts_with("usage: pause"));
        assert_eq!(
            call("pause -p 123 -m 4 -t 30").expect("-t"),
            Call::Pause(DISK, Some(30))
        );
        // `-p abc` is pid 0 for atoi, as for tap-ctl: a pid, not a usage error.
        let Call::Stats(t) = call("stats -p abc -m 4").expect("atoi") else {
            panic!("not stats");
        };
        assert_eq!(t.pid, 0);
    }

    #[test]
    fn usage_texts_are_tap_ctls() {
        assert_eq!(
            Verb::List.usage(),
            "usage: list [-h] [-p pid] [-m minor] [-t type] [-f file]\n\nLists tapdisks in \
             the following format:\n     pid minor state       type file\n"
        );
        assert_eq!(
            top_usage(),
            "usage: tap-ctl COMMAND [OPTIONS]\nCOMMAND := { list | allocate | free | create \
             | destroy | spawn | attach | detach | open | close | pause | unpause | stats }\n"
        );
    }

    #[test]
    fn atoi_is_cs() {
        assert_eq!(atoi("42"), 42);
        assert_eq!(atoi("  -7x"), -7);
        assert_eq!(atoi("+3"), 3);
        assert_eq!(atoi("abc"), 0);
        assert_eq!(atoi(""), 0);
        assert_eq!(atoi("99999999999"), i32::MAX);
        assert_eq!(atoi("-99999999999"), i32::MIN);
    }
}
