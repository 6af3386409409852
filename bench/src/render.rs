//! The markdown table and the SVG plot of a matrix.

use std::fmt::Write as _;

use crate::matrix::{Matrix, Stat};
use crate::scale::Scale;
use crate::targets::{self, Goal, Target};
use crate::{DEVICES, DIRECT, JOBS, MET_RULE, MIRROR_PAIRS, SUBMITTER_RULE};

fn si(v: f64) -> String {
    match v {
        v if v >= 10_000.0 => format!("{:.1}k", v / 1000.0),
        v if v >= 100.0 => format!("{v:.0}"),
        v => format!("{v:.1}"),
    }
}

fn range(s: &Stat) -> String {
    format!("{}–{}", si(s.min), si(s.max))
}

fn machine_line(m: &Matrix, host: &str) -> String {
    let g = |k: &str| {
        m.machine
            .get(k)
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .unwrap_or_default()
    };
    let mem_gib = m.machine["mem_kb"].as_f64().unwrap_or(0.0) / 1048576.0;
    let nullb_us = m.machine["nullb_completion_nsec"]
        .as_f64()
        .unwrap_or(f64::NAN)
        / 1e3;
    // Runs before 2026-12-02 name no storage: their images were all on tmpfs.
    let storage = match m.machine.get("storage").and_then(|v| v.as_str()) {
        Some("ext4") => {
            "the devices' images on ext4 on a memory-backed null_blk device completing every \
             I/O inline, the target's exports on the guest's tmpfs"
        }
        Some("ext4-irq") => {
            "the devices' images on ext4 on a memory-backed null_blk device completing every \
             I/O from a timer interrupt 20 µs after it was issued (as a disk completes from \
             its interrupt), the target's exports on the guest's tmpfs"
        }
        _ => "images on the guest's tmpfs",
    };
    format!(
        "Guest: Linux {}, {} vCPUs ({}), {mem_gib:.1} GiB; host: {host}. {} reps of {} s \
         (after 1 s ramp) per device and job, devices interleaved; {} MiB {storage}; \
         `mirrored-bitmap` keeps its bitmap on ext4 on a memory-backed null_blk device \
         with a write cache and {nullb_us:.0} µs per I/O; {}, {}, {}.",
        g("kernel"),
        g("cpus"),
        g("cpu_model"),
        m.reps,
        g("secs"),
        g("size_mib"),
        g("fio"),
        g("rublk"),
        g("ublk_mirror"),
    )
}

pub fn markdown(m: &Matrix, stamp: &str, host: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# ublk-mirror benchmark {stamp}\n");
    let _ = writeln!(o, "{}\n", machine_line(m, host));
    let _ = writeln!(
        o,
        "Under QEMU TCG absolute numbers mean little: read the ratios, measured side by side in \
         one VM run. `loop2` is a second kernel loop device: its ratio to `loop` is the noise \
         floor. Reproduce with `bench/run`.\n"
    );
    let _ = writeln!(o, "{SUBMITTER_RULE}\n\n{MET_RULE}");
    device_tables(&mut o, m);
    let d = m.cell(DIRECT.1, DIRECT.0);
    let _ = writeln!(
        o,
        "\nThe NBD target on its own (fio's nbd engine straight to `nbd-proxy serve`, {}): \
         {} IOPS, mean {} µs, p99 {} µs.",
        DIRECT.1,
        si(d.iops.median),
        si(d.lat_mean_us.median),
        si(d.p99_us.median)
    );
    for &pair in MIRROR_PAIRS {
        pair_section(&mut o, m, pair);
    }
    scale_section(&mut o, m);
    noise_section(&mut o, m);
    copy_section(&mut o, m);
    targets_section(&mut o, "Targets (issue 13)", &targets::issue13(m));
    targets_section(
        &mut o,
        "Earlier targets (issue 7, those issue 13 does not restate)",
        &targets::issue7(m),
    );
    let _ = writeln!(
        o,
        "\n![IOPS and p99 latency per device and job]({stamp}.svg)"
    );
    o
}

/// IOPS (with the ratio to loop and the spread), throughput and latency, per job and device.
fn device_tables(o: &mut String, m: &Matrix) {
    device_table(
        o,
        "IOPS: median (ratio to kernel loop) [min–max]",
        |job, d| {
            let c = m.cell(job, d);
            format!(
                "{} ({:.2}x) [{}]",
                si(c.iops.median),
                m.iops_ratio(job, d, "loop"),
                range(&c.iops)
            )
        },
    );
    device_table(o, "Throughput, MB/s (median)", |job, d| {
        si(m.cell(job, d).mb_s.median)
    });
    device_table(
        o,
        "Latency, µs: mean / p99 (median over reps)",
        |job, d| {
            let c = m.cell(job, d);
            format!("{} / {}", si(c.lat_mean_us.median), si(c.p99_us.median))
        },
    );
}

/// A ublk-mirror mirror vs the dm-raid1 with as many connections to the same target, per job.
fn pair_section(o: &mut String, m: &Matrix, (a, b): (&str, &str)) {
    let _ = writeln!(o, "\n## Mirrored: {a} vs {b} over the same target\n");
    let _ = writeln!(
        o,
        "| job | {a} IOPS | {b} IOPS | ratio | {a} p99 µs | {b} p99 µs |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for job in JOBS {
        let (ca, cb) = (m.cell(job, a), m.cell(job, b));
        let _ = writeln!(
            o,
            "| {job} | {} | {} | {:.2}x | {} | {} |",
            si(ca.iops.median),
            si(cb.iops.median),
            m.iops_ratio(job, a, b),
            si(ca.p99_us.median),
            si(cb.p99_us.median)
        );
    }
}

fn mib(kb: f64) -> String {
    format!("{:.1}", kb / 1024.0)
}

/// N daemons at once against one alone (and the same on kernel loop), and their RSS.
fn scale_section(o: &mut String, m: &Matrix) {
    let s = &m.scale;
    let (one, all) = (&s.one.iops, &s.all.iops);
    let per_rep: Vec<String> = all
        .reps
        .iter()
        .zip(&one.reps)
        .map(|(a, b)| format!("{:.2}", a / b))
        .collect();
    let _ = writeln!(
        o,
        "\n## Scale: {} daemons at once, 4k randread QD32\n",
        s.devices
    );
    let _ = writeln!(
        o,
        "{n} ublk-mirror daemons ({} queue, unmirrored, {} MiB images), one fio job per device \
         (QD32 each) split over CPUs 0-1, against the first device alone (1 job on CPU 0); the \
         two alternate in every rep.\n",
        s.queues,
        s.image_mib,
        n = s.devices
    );
    let _ = writeln!(o, "| run | IOPS median [min–max] |\n|---|---|");
    let mut rows = vec![
        ("1 device alone".to_string(), one),
        (format!("{} devices at once (sum)", s.devices), all),
    ];
    if let Some((lone, lall)) = &s.loop_ref {
        rows.push(("kernel loop, 1 device alone".to_string(), &lone.iops));
        rows.push((
            format!("kernel loop, {} devices at once (sum)", s.devices),
            &lall.iops,
        ));
    }
    for (label, stat) in rows {
        let _ = writeln!(o, "| {label} | {} [{}] |", si(stat.median), range(stat));
    }
    let _ = writeln!(
        o,
        "\nAggregate / 1 device: {:.2} (per rep: {}).",
        all.median / one.median,
        per_rep.join(" ")
    );
    if let Some((lone, lall)) = &s.loop_ref {
        let _ = writeln!(
            o,
            "The same {n} images on kernel loop devices, the same fio runs after the daemons \
             stopped: aggregate / 1 device {:.2}. Daemons / loop devices: 1 alone {:.2}, {n} at \
             once {:.2}.",
            lall.iops.median / lone.iops.median,
            one.median / lone.iops.median,
            all.median / lall.iops.median,
            n = s.devices
        );
    }
    rss_paragraph(o, s);
}

/// The daemons' RSS right after start and after the workload, with its bound.
fn rss_paragraph(o: &mut String, s: &Scale) {
    let (idle, after) = (Stat::of(s.idle_kb.clone()), Stat::of(s.after_kb.clone()));
    let growth = s
        .after_kb
        .iter()
        .zip(&s.idle_kb)
        .map(|(a, i)| a - i)
        .fold(f64::NEG_INFINITY, f64::max);
    let _ = writeln!(
        o,
        "\nRSS (VmRSS) per daemon: right after start median {} MiB [{}–{}]; after the workload \
         median {} MiB, max {} MiB; largest growth {} MiB. Bound: the tag buffers a daemon has \
         touched stay resident, at most queues × depth × max I/O = {} × {} × {} KiB = {:.0} MiB \
         above the idle RSS; 4k requests touch one 4 KiB page of each tag they use, at most \
         {} × 4 KiB = {} MiB here.",
        mib(idle.median),
        mib(idle.min),
        mib(idle.max),
        mib(after.median),
        mib(after.max),
        mib(growth),
        s.queues,
        s.depth,
        s.max_io / 1024,
        s.bound_mib(),
        s.queues * s.depth,
        mib((s.queues * s.depth * 4) as f64)
    );
}

/// loop2 / loop per job, and loop's own spread: how far apart two identical devices land.
fn noise_section(o: &mut String, m: &Matrix) {
    let _ = writeln!(o, "\n## Noise floor: loop2 / loop, and loop's own spread\n");
    let _ = writeln!(o, "| job | loop2 / loop | loop (max-min)/median |");
    let _ = writeln!(o, "|---|---|---|");
    for job in JOBS {
        let l = &m.cell(job, "loop").iops;
        let _ = writeln!(
            o,
            "| {job} | {:.2} | {:.0}% |",
            m.iops_ratio(job, "loop2", "loop"),
            (l.max - l.min) / l.median * 100.0
        );
    }
}

/// The background copy against nbdcopy.
fn copy_section(o: &mut String, m: &Matrix) {
    let _ = writeln!(
        o,
        "\n## Background copy vs nbdcopy (same image, same server)\n\n\
         ublk-mirror {} MB/s [{}], nbdcopy {} MB/s [{}]: ratio {:.2}.",
        si(m.copy_ours.median),
        range(&m.copy_ours),
        si(m.copy_nbdcopy.median),
        range(&m.copy_nbdcopy),
        m.copy_ours.median / m.copy_nbdcopy.median
    );
}

fn bound(t: &Target, b: f64) -> String {
    let op = match t.goal {
        Goal::AtLeast => "≥",
        Goal::AtMost => "≤",
    };
    format!("{op} {b:.2}{}", t.unit)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**not met**"
    }
}

/// The samples of a target: every one while they are few, else their range.
fn samples(t: &Target) -> String {
    if t.samples.len() <= 8 {
        let v: Vec<String> = t.samples.iter().map(|v| format!("{v:.2}")).collect();
        return v.join(" ");
    }
    let s = Stat::of(t.samples.clone());
    format!("{:.2}–{:.2} ({} daemons)", s.min, s.max, t.samples.len())
}

/// One row per target: figure, samples, how many meet, goal and stretch with met / not met.
fn targets_section(o: &mut String, title: &str, list: &[Target]) {
    let _ = writeln!(o, "\n## {title}\n");
    let met = list.iter().filter(|t| t.met()).count();
    let stretch = list
        .iter()
        .filter(|t| t.stretch_met() == Some(true))
        .count();
    let _ = writeln!(
        o,
        "{met} of {} met ({stretch} at the stretch goal). A target is met only when its figure \
         meets it and at least ceil(0.8 × R) of its R per-rep figures do.\n",
        list.len()
    );
    let _ = writeln!(
        o,
        "| figure | measured | per rep | reps meeting (needed) | target | met | stretch | stretch met |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for t in list {
        let (stretch, stretch_met) = match (t.stretch, t.stretch_met()) {
            (Some(s), Some(ok)) => (bound(t, s), if ok { "met" } else { "not met" }),
            _ => ("–".to_string(), "–"),
        };
        let _ = writeln!(
            o,
            "| {} | {:.2}{} | {} | {} of {} ({}) | {} | {} | {stretch} | {stretch_met} |",
            t.what,
            t.figure,
            t.unit,
            samples(t),
            t.meeting(t.bound),
            t.samples.len(),
            targets::needed(t.samples.len()),
            bound(t, t.bound),
            verdict(t.met()),
        );
    }
}

/// A section with one row per job and one column per device.
fn device_table(o: &mut String, title: &str, cell: impl Fn(&str, &str) -> String) {
    let _ = writeln!(o, "\n## {title}\n");
    let _ = writeln!(o, "| job | {} |", DEVICES.join(" | "));
    let _ = writeln!(o, "|---|{}", "---|".repeat(DEVICES.len()));
    for job in JOBS {
        let cells: Vec<String> = DEVICES.iter().map(|d| cell(job, d)).collect();
        let _ = writeln!(o, "| {job} | {} |", cells.join(" | "));
    }
}

const COLORS: &[&str] = &[
    "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#e15759", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// Two rows of panels (IOPS, p99 latency), one column per job, one bar per device with its
/// min–max whisker; each panel has its own linear scale.
pub fn svg(m: &Matrix, stamp: &str) -> String {
    let (pw, ph, left, top) = (230.0, 220.0, 60.0, 60.0);
    let width = left + pw * JOBS.len() as f64 + 20.0;
    let height = top + 2.0 * (ph + 60.0) + 40.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="22" font-size="15">ublk-mirror vs kernel loop, rublk, dm-raid1: {stamp} (median, whiskers min–max)</text>"#
    );
    for (i, d) in DEVICES.iter().enumerate() {
        let x = left + i as f64 * 110.0;
        let _ = writeln!(
            o,
            r#"<rect x="{x}" y="32" width="10" height="10" fill="{}"/><text x="{}" y="41">{d}</text>"#,
            COLORS[i % COLORS.len()],
            x + 14.0
        );
    }
    let rows: [(&str, Pick); 2] = [("IOPS", |c| &c.iops), ("p99 latency µs", |c| &c.p99_us)];
    for (r, (label, pick)) in rows.iter().enumerate() {
        let y0 = top + r as f64 * (ph + 60.0) + 20.0;
        for (j, job) in JOBS.iter().enumerate() {
            let x0 = left + j as f64 * pw;
            panel(&mut o, m, job, label, *pick, (x0, y0), (pw, ph));
        }
    }
    let _ = writeln!(o, "</svg>");
    o
}

type Pick = fn(&crate::matrix::Cell) -> &Stat;

/// One job's panel of the plot: a bar per device (median) with its min–max whisker, on the
/// panel's own linear scale; (x0, y0) is its top left corner, (pw, ph) its size.
fn panel(
    o: &mut String,
    m: &Matrix,
    job: &str,
    label: &str,
    pick: Pick,
    (x0, y0): (f64, f64),
    (pw, ph): (f64, f64),
) {
    let max = DEVICES
        .iter()
        .map(|d| pick(m.cell(job, d)).max)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" font-weight="bold">{job}: {label}</text>"#,
        x0 + 5.0,
        y0 - 4.0
    );
    let _ = writeln!(
        o,
        r##"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
        y0 + ph,
        x0 + pw - 20.0,
        y0 + ph
    );
    let _ = writeln!(
        o,
        r##"<text x="{}" y="{}" fill="#555">{}</text>"##,
        x0 + 2.0,
        y0 + 10.0,
        si(max)
    );
    let bw = (pw - 30.0) / DEVICES.len() as f64;
    for (i, d) in DEVICES.iter().enumerate() {
        let s = pick(m.cell(job, d));
        let h = |v: f64| v / max * (ph - 16.0);
        let x = x0 + 4.0 + i as f64 * bw;
        let _ = writeln!(
            o,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{d} {job}: {} (min {}, max {})</title></rect>"#,
            y0 + ph - h(s.median),
            bw - 3.0,
            h(s.median),
            COLORS[i % COLORS.len()],
            si(s.median),
            si(s.min),
            si(s.max)
        );
        let cx = x + (bw - 3.0) / 2.0;
        let _ = writeln!(
            o,
            r##"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="#000"/>"##,
            y0 + ph - h(s.max),
            y0 + ph - h(s.min)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    #[test]
    fn the_report_has_every_device_and_every_target_row() {
        let dir = testdata::complete("render");
        let m = Matrix::load(&dir).expect("load");
        let md = markdown(&m, "STAMP", "host");
        for dev in DEVICES {
            assert!(md.contains(&format!(" {dev} |")), "no column {dev}");
        }
        assert!(md.contains("## Targets (issue 13)"));
        for t in targets::issue13(&m).iter().chain(&targets::issue7(&m)) {
            let row = md
                .lines()
                .find(|l| l.starts_with(&format!("| {} |", t.what)));
            let row = row.unwrap_or_else(|| panic!("no row for {}", t.what));
            assert!(row.contains("met"), "{row}");
        }
        assert!(md.contains("ceil(0.8 × R)"), "the rule is stated");
        assert!(
            md.contains("--cpus_allowed_policy=split"),
            "the submitter rule is stated"
        );
        assert!(md.contains("## Scale: 16 daemons at once"));
        assert!(md.contains("= 64 MiB"), "the RSS bound is stated");
        assert!(
            md.contains("on kernel loop devices, the same fio runs after the daemons stopped: aggregate / 1 device 0.80."),
            "the loop reference of the scale row (40k / 50k)"
        );
        assert!(md.contains("mirrored-q2 vs dm-raid1-c2"));
        let svg = svg(&m, "STAMP");
        assert!(svg.contains("mirrored-bitmap"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
