//! Our daemon's replies in tapdisk's shapes, and tapdisk's arguments in our commands.
//!
//! - `list`'s line: `tap_cli_list_dict` in blktap's `control/tap-ctl.c`, with tapdisk's
//!   TD_VBD_* state bits (`drivers/tapdisk-vbd.h`).
//! - `stats`' JSON: `tapdisk_vbd_stats` (`drivers/tapdisk-vbd.c`), `tapdisk_image_stats`
//!   (`drivers/tapdisk-image.c`), `tapdisk_driver_stats` (`drivers/tapdisk-driver.c`),
//!   `tdaio_stats` (`drivers/block-aio.c`), written as `drivers/tapdisk-stats.c` writes it:
//!   `{ "key": value, ... }`, `[ a, b ]`, numbers bare, strings quoted.
//! - `unpause`'s `-a`, `-2` and `-c` as our `unpause` command's `image` and `mirror`.

use control::protocol::{Command, InfoReply, MirrorReport, StatsReply};

use crate::args::UnpauseArgs;
use crate::errno::Failure;

/// tapdisk's VBD state bits (blktap `drivers/tapdisk-vbd.h`).
mod td_vbd {
    pub const CLOSED: u32 = 0x0002;
    pub const QUIESCE_REQUESTED: u32 = 0x0004;
    pub const QUIESCED: u32 = 0x0008;
    pub const PAUSE_REQUESTED: u32 = 0x0010;
    pub const PAUSED: u32 = 0x0020;
    pub const SHUTDOWN_REQUESTED: u32 = 0x0040;
}

/// The tapdisk state of one of our device states (`info.state`); None for a state we do not
/// know (a newer daemon's), which tap-ctl's line then leaves out as it does an unknown one.
pub fn state_bits(state: &str) -> Option<u32> {
    use td_vbd::*;
    Some(match state {
        "running" => 0,
        // `serve --paused`: it waits for an unpause, and SM unpauses only a disk with PAUSED
        // set; but the image is open (not CLOSED) and reads are served (not QUIESCED).
        "attached" => PAUSED,
        // Draining: tapdisk_vbd_pause has set PAUSE_REQUESTED, and tapdisk_vbd_quiesce_queue
        // QUIESCE_REQUESTED while requests are pending.
        "pausing" => PAUSE_REQUESTED | QUIESCE_REQUESTED,
        // Drained and the image closed: exactly tapdisk's paused 0x2a, which xapi's
        // is_paused compares and SM reads with int(v, 16).
        "paused" => PAUSED | QUIESCED | CLOSED,
        // tapdisk_vbd_close while requests remain.
        "stopping" => SHUTDOWN_REQUESTED,
        _ => return None,
    })
}

/// C's `%#x`: `0` for zero, `0x2a` otherwise.
pub fn hash_x(v: u32) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// tapdisk's type name for our raw images.
const AIO: &str = "aio";

/// The disk's `list` line, without its newline: `pid=P minor=M state=S args=aio:PATH`, each
/// field left out as tap-ctl leaves out one it does not know (pid 0: a daemon too old to say).
pub fn list_line(info: &InfoReply) -> String {
    let mut fields = Vec::new();
    if info.pid != 0 {
        fields.push(format!("pid={}", info.pid));
    }
    fields.push(format!("minor={}", info.dev_id));
    if let Some(bits) = state_bits(&info.state) {
        fields.push(format!("state={}", hash_x(bits)));
    }
    if !info.image.is_empty() {
        fields.push(format!("args={AIO}:{}", info.image));
    }
    fields.join(" ")
}

/// Whether `list`'s filters keep the disk: tap_cli_list's tests, on our fields.
pub fn list_keeps(a: &crate::args::ListArgs, info: &InfoReply) -> bool {
    let minor_ok = a
        .minor
        .is_none_or(|m| m < 0 || i64::from(m) == i64::from(info.dev_id));
    let pid_ok = a
        .pid
        .is_none_or(|p| p < 0 || i64::from(p) == i64::from(info.pid));
    let type_ok = a.ty.as_deref().is_none_or(|t| t == AIO);
    let file_ok = a.file.as_deref().is_none_or(|f| f == info.image);
    minor_ok && pid_ok && type_ok && file_ok
}

/// A JSON value as tapdisk's stats writer spells it.
enum J {
    Int(u64),
    Str(String),
    Null,
    Arr(Vec<J>),
    Obj(Vec<(&'static str, J)>),
}

impl J {
    fn write(&self, out: &mut String) {
        match self {
            J::Int(n) => out.push_str(&n.to_string()),
            // tapdisk prints the bytes as they are; we escape (a quote in a path stays JSON).
            J::Str(s) => out.push_str(&serde_json::Value::from(s.as_str()).to_string()),
            J::Null => out.push_str("null"),
            J::Arr(items) => {
                out.push_str("[ ");
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out);
                }
                out.push_str(" ]");
            }
            J::Obj(fields) => {
                out.push_str("{ ");
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&format!("\"{k}\": "));
                    v.write(out);
                }
                out.push_str(" }");
            }
        }
    }
}

/// tapdisk counts in 512-byte sectors whatever the device's block size.
fn sectors(bytes: u64) -> J {
    J::Int(bytes / 512)
}

fn pair(a: J, b: J) -> J {
    J::Arr(vec![a, b])
}

/// `tap-ctl stats`' JSON (without its trailing newlines) for our disk.
pub fn stats_json(info: &InfoReply, stats: &StatsReply) -> String {
    let (read, write) = (stats.ops.read.bytes, stats.ops.write.bytes);
    // tapdisk closes its images while paused (tapdisk_vbd_close_vdi): none is listed.
    let mut images = Vec::new();
    if info.image_open {
        images.push(aio_image(info, stats));
        images.extend(secondary(stats));
    }
    let vbd = J::Obj(vec![
        ("name", J::Str(format!("{AIO}:{}", info.image))),
        ("secs", pair(sectors(read), sectors(write))),
        ("images", J::Arr(images)),
        ("FIXME_enospc_redirect_count", J::Int(0)),
        ("nbd_mirror_failed", J::Int(stats.nbd_mirror_failed.into())),
        // tapdisk counts the requests it holds, new ones included: ours parked by a pause too.
        (
            "reqs_outstanding",
            J::Int(stats.reqs_outstanding + stats.reqs_parked),
        ),
        // true only with tapdisk's -D (no O_DIRECT); the daemon reads with O_DIRECT.
        ("read_caching", J::Str("false".into())),
    ]);
    let mut out = String::new();
    vbd.write(&mut out);
    out
}

/// The raw image, as tapdisk's aio leaf: named by its bare path (tapdisk's image name is the
/// path after `aio:`). Failed requests go in the write slot: the daemon counts them whatever
/// their kind, and not in sectors.
fn aio_image(info: &InfoReply, stats: &StatsReply) -> J {
    let (read, write) = (stats.ops.read.bytes, stats.ops.write.bytes);
    let reqs = J::Obj(vec![
        (
            "max",
            J::Int(u64::from(info.queues) * u64::from(info.depth)),
        ),
        ("pending", J::Int(stats.reqs_outstanding)),
    ]);
    J::Obj(vec![
        ("name", J::Str(info.image.clone())),
        ("hits", pair(sectors(read), sectors(write))),
        ("fail", pair(J::Int(0), J::Int(stats.ops.errors))),
        (
            "driver",
            J::Obj(vec![
                ("type", J::Int(0)),
                ("name", J::Str(AIO.into())),
                ("status", J::Obj(vec![("reqs", reqs)])),
            ]),
        ),
    ])
}

/// The NBD secondary while a mirror is attached and has not failed: tapdisk puts it in its
/// image list after the leaf, named by the fd's name, and takes it out when it fails.
fn secondary(stats: &StatsReply) -> Option<J> {
    let MirrorReport::Attached(m) = &stats.mirror else {
        return None;
    };
    if m.state == "failed" {
        return None;
    }
    Some(J::Obj(vec![
        ("name", J::Str(m.target.clone())),
        ("hits", pair(J::Int(0), sectors(m.bytes_mirrored))),
        ("fail", pair(J::Int(0), J::Int(0))),
        (
            "driver",
            J::Obj(vec![
                ("type", J::Int(15)),
                ("name", J::Str("nbd".into())),
                // block-nbd.c has no td_stats.
                ("status", J::Null),
            ]),
        ),
    ]))
}

/// Our `unpause` for tap-ctl's `-a`, `-2` and `-c`, or why ublk-mirror cannot do it.
/// `current` is the image's path now: `-a` naming it is no change (SM always passes `-a`).
pub fn unpause_command(a: &UnpauseArgs, current: &str) -> Result<Command, Failure> {
    if let Some(log) = &a.log {
        return Err(unsupported(format_args!(
            "-c {log}: ublk-mirror keeps no changed-block log"
        )));
    }
    let image = match a.image.as_deref().map(|s| (s, s.split_once(':'))) {
        None => None,
        Some((s, None | Some((_, "")))) => return Err(malformed("-a", s, "TYPE:PATH")),
        Some((_, Some(("aio" | "sync", path)))) => (path != current).then(|| path.to_owned()),
        Some((s, Some(_))) => {
            return Err(unsupported(format_args!(
                "-a {s}: ublk-mirror serves raw images only (aio:PATH)"
            )))
        }
    };
    let mirror = match a.secondary.as_deref().map(|s| (s, s.split_once(':'))) {
        None => None,
        Some(("null", _)) => Some("null".to_owned()),
        Some((_, Some(("nbd", name)))) if !name.is_empty() => Some(name.to_owned()),
        Some((s, None | Some(("nbd", _)))) => {
            return Err(malformed("-2", s, "nbd:NAME or null"));
        }
        Some((s, Some(_))) => {
            return Err(unsupported(format_args!(
                "-2 {s}: ublk-mirror mirrors to an NBD fd only (-2 nbd:NAME or -2 null)"
            )))
        }
    };
    Ok(Command::Unpause { image, mirror })
}

fn unsupported(why: std::fmt::Arguments<'_>) -> Failure {
    Failure::new(libc::EOPNOTSUPP, format_args!("unpause: {why}"))
}

fn malformed(opt: &str, given: &str, want: &str) -> Failure {
    Failure::new(
        libc::EINVAL,
        format_args!("unpause: {opt} {given}: expected {want}"),
    )
}

#[cfg(test)]
#[path = "tapdisk/tests.rs"]
mod tests;
