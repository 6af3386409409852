//! Where queue threads run. blk-mq maps every CPU to one queue, and the kernel's mask for a
//! queue is the CPUs that submit to it: with 2 queues on 2 CPUs, queue 0 is fed by CPU 0 only.
//! A queue thread pinned inside its own mask then shares that CPU with the very task that
//! feeds it, and a single submitter on a 2-queue device ran at half the speed of 1 queue
//! (issue 13). The threads are therefore moved after start: `away` (the default) puts queue q
//! on every CPU outside its own mask (all CPUs if that leaves none), so a submitter and the
//! thread serving it run in parallel; `any` lets every queue thread use every CPU; `own` keeps
//! the one CPU libublk picked at random from the queue's mask.
//!
//! One queue is fed by every CPU, so no CPU is "away" from its submitters. `away` pins it to
//! one CPU picked from the device id: the last allowed CPU for device 0, the one before for
//! device 1, and so on, so that one daemon always lands in the same place (libublk's random
//! pick swung a 1-queue bench by 2x between daemons started the same way) and many daemons
//! spread over the CPUs. The last CPU first because CPU 0 is where Linux puts most
//! housekeeping and, in the bench, the pinned fio job. A pin, not a float: measured with fio
//! on CPU 0 (bench-placement `1q`, IOPS), floating over both CPUs gave 5815 / 5418 / 608
//! (randread QD32 / randwrite QD32 / randwrite QD1) against 6951 / 6208 / 1035 pinned to
//! CPU 1; the scheduler's migrations cost more than sharing a CPU saves.
//!
//! A mirrored 1-queue device keeps the same rule. bench-placement `mirror` (5 reps, IOPS,
//! with the target in the same 2-CPU VM) put it on fio's CPU instead: randwrite QD1 1.06x and
//! QD32 1.15x (inside the run's noise: per-rep spreads near 2x), randread QD32 0.42x; moving
//! its target off its CPU did as well for writes (1.10x, 1.24x) and kept reads. What the
//! thread shares its CPU with matters more than where fio is.

use libublk::ctrl::{UblkCtrl, UblkQueueAffinity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum QueueCpus {
    /// Every CPU outside the queue's own mask (all CPUs if none is left); a 1-queue device
    /// on one CPU picked from the device id.
    #[default]
    Away,
    /// Every CPU the daemon may run on.
    Any,
    /// One CPU of the queue's own mask (what a 1-queue device always does).
    Own,
}

/// Moves the queue threads as `policy` says; logs where each went. A failure is logged, never
/// fatal: placement only costs speed.
pub fn place_queue_threads(ctrl: &UblkCtrl, queues: u16, policy: QueueCpus) {
    if policy == QueueCpus::Own {
        return;
    }
    let allowed = allowed_cpus();
    let dev_id = ctrl.dev_info().dev_id;
    for q in 0..queues {
        let Ok(tid) = ctrl.get_queue_tid(u32::from(q)) else {
            log::warn!("queue {q}: thread id unknown; left where it is");
            continue;
        };
        let mut own = UblkQueueAffinity::new();
        let own: Vec<usize> = match ctrl.get_queue_affinity(u32::from(q), &mut own) {
            Ok(_) => own.to_bits_vec(),
            Err(_) => Vec::new(),
        };
        let cpus = match policy {
            QueueCpus::Away if queues == 1 => one_for_device(&allowed, dev_id),
            QueueCpus::Away => {
                let away: Vec<usize> = allowed
                    .iter()
                    .copied()
                    .filter(|c| !own.contains(c))
                    .collect();
                if away.is_empty() {
                    allowed.clone()
                } else {
                    away
                }
            }
            _ => allowed.clone(),
        };
        match set_affinity(tid, &cpus) {
            Ok(()) => {
                log::info!("queue {q}: fed by CPUs {own:?}, served on CPUs {cpus:?} ({policy:?})")
            }
            Err(e) => log::warn!("queue {q}: cannot move its thread to CPUs {cpus:?}: {e}"),
        }
    }
}

/// The CPU a 1-queue device's thread is pinned to: counted from the last allowed one by
/// device id, so device 0 gets the last CPU and consecutive devices spread.
fn one_for_device(allowed: &[usize], dev_id: u32) -> Vec<usize> {
    if allowed.is_empty() {
        return Vec::new();
    }
    let from_end = dev_id as usize % allowed.len();
    vec![allowed[allowed.len() - 1 - from_end]]
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: queries this process's mask into a live cpu_set_t of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads a bit of a live set, cpu < CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

fn set_affinity(tid: i32, cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: sets a bit of a live set; c comes from CPU_ISSET's range.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sets thread `tid`'s mask from a live cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::one_for_device;

    #[test]
    fn one_queue_pins_from_the_last_cpu_by_device_id() {
        let cpus = [0, 1, 2, 3];
        assert_eq!(one_for_device(&cpus, 0), vec![3]);
        assert_eq!(one_for_device(&cpus, 1), vec![2]);
        assert_eq!(one_for_device(&cpus, 4), vec![3]);
        assert_eq!(one_for_device(&[5], 7), vec![5]);
        assert!(one_for_device(&[], 0).is_empty());
    }
}
