//! The one log format of the project's daemons (`ublk-mirror`, `nbd-proxy`): plain lines on
//! stderr, never colour (whatever the terminal, `NO_COLOR` or `RUST_LOG_STYLE` say), so a log
//! reads the same in a terminal, a file or the journal:
//!
//! ```text
//! 2025-01-31T12:00:00.123Z INFO ublk-mirror[4242][vm1 disk0]: control socket /run/ublk-mirror/0.sock
//! ```
//!
//! Timestamp in UTC with milliseconds, level, `program[pid]` (and `[label]` when there is one),
//! message. `RUST_LOG` picks the level (default `info`).

use std::io::Write;

/// Installs the logger for `program`; `label` (may be empty) goes into every line.
pub fn init(program: &str, label: &str) {
    let tag = if label.is_empty() {
        format!("{program}[{}]", std::process::id())
    } else {
        format!("{program}[{}][{label}]", std::process::id())
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .write_style(env_logger::WriteStyle::Never)
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {} {tag}: {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        })
        .init();
}
