//! The markdown table and the SVG plot of a matrix.

use std::fmt::Write as _;

use crate::matrix::{Matrix, Stat};
use crate::{DEVICES, DIRECT, JOBS};

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
    format!(
        "Guest: Linux {}, {} vCPUs ({}), {mem_gib:.1} GiB; host: {host}. {} reps of {} s \
         (after 1 s ramp) per device and job, devices interleaved; {} MiB images on the guest's \
         tmpfs; {}, {}, {}.",
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
    device_table(
        &mut o,
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
    device_table(&mut o, "Throughput, MB/s (median)", |job, d| {
        si(m.cell(job, d).mb_s.median)
    });
    device_table(
        &mut o,
        "Latency, µs: mean / p99 (median over reps)",
        |job, d| {
            let c = m.cell(job, d);
            format!("{} / {}", si(c.lat_mean_us.median), si(c.p99_us.median))
        },
    );
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
    mirrored_section(&mut o, m);
    noise_section(&mut o, m);
    copy_and_targets(&mut o, m);
    let _ = writeln!(
        o,
        "\n![IOPS and p99 latency per device and job]({stamp}.svg)"
    );
    o
}

/// ublk-mirror mirrored vs dm-raid1 over the same target, per job.
fn mirrored_section(o: &mut String, m: &Matrix) {
    let _ = writeln!(
        o,
        "\n## Mirrored: ublk-mirror vs dm-raid1 over the same target\n"
    );
    let _ = writeln!(
        o,
        "| job | mirrored IOPS | dm-raid1 IOPS | ratio | mirrored p99 µs | dm-raid1 p99 µs |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for job in JOBS {
        let (a, b) = (m.cell(job, "mirrored"), m.cell(job, "dm-raid1"));
        let _ = writeln!(
            o,
            "| {job} | {} | {} | {:.2}x | {} | {} |",
            si(a.iops.median),
            si(b.iops.median),
            m.iops_ratio(job, "mirrored", "dm-raid1"),
            si(a.p99_us.median),
            si(b.p99_us.median)
        );
    }
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

/// The background copy against nbdcopy, then the issue's targets, met or not.
fn copy_and_targets(o: &mut String, m: &Matrix) {
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
    let _ = writeln!(o, "\n## Targets (issue 7)\n");
    let _ = writeln!(o, "| target | measured | goal | met |");
    let _ = writeln!(o, "|---|---|---|---|");
    for t in m.targets() {
        let _ = writeln!(
            o,
            "| {} | {:.2} | {} {:.2} | {} |",
            t.what,
            t.measured,
            if t.at_least { "≥" } else { "≤" },
            t.goal,
            if t.met() { "yes" } else { "**no**" }
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
    "#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#e15759", "#b07aa1",
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
