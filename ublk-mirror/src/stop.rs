//! Why the device is being stopped: sent to the main thread by signals, queue threads and
//! the control command `shutdown`.

/// Why the device is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal(i32),
    QueueFailed(u16),
    /// A queue ended without a stop request: the device was stopped from outside.
    QueueStopped(u16),
    /// The control command `shutdown`.
    Control,
    /// The control command `shutdown --keep`: leave the device to `recover`.
    Detach,
    ChannelClosed,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Signal(libc::SIGTERM) => write!(f, "SIGTERM"),
            StopReason::Signal(libc::SIGINT) => write!(f, "SIGINT"),
            StopReason::Signal(s) => write!(f, "signal {s}"),
            StopReason::QueueFailed(q) => write!(f, "queue {q} failed"),
            StopReason::QueueStopped(q) => {
                write!(
                    f,
                    "queue {q} stopped (device stopped from outside the daemon)"
                )
            }
            StopReason::Control => write!(f, "control command shutdown"),
            StopReason::Detach => write!(f, "control command shutdown --keep (detach)"),
            StopReason::ChannelClosed => write!(f, "stop channel closed"),
        }
    }
}
