//! `blkcmp A B [--granule BYTES] [--allowed JSON]`: compares two images granule by granule and
//! prints the differing extents. With `--allowed` (the daemon's `dirty-map` reply, or any JSON
//! with an "extents" list of [offset, length]), exits 1 if a difference lies outside them.
//! Exit 0: identical (or all differences allowed); 1: they differ (outside allowed); 2: error.

use std::fs::File;
use std::io::Read;

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("blkcmp: {e}");
            std::process::exit(2);
        }
    }
}

fn run() -> Result<i32, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut files = Vec::new();
    let mut granule: u64 = 64 << 10;
    let mut allowed: Option<Vec<(u64, u64)>> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--granule" => {
                i += 1;
                granule = args
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or("--granule BYTES")?;
            }
            "--allowed" => {
                i += 1;
                let v: serde_json::Value =
                    serde_json::from_str(args.get(i).ok_or("--allowed JSON")?)
                        .map_err(|e| format!("--allowed: {e}"))?;
                let list = v
                    .get("extents")
                    .or_else(|| v.get("result").and_then(|r| r.get("extents")))
                    .and_then(|e| e.as_array())
                    .ok_or("--allowed: no \"extents\" list")?;
                allowed = Some(
                    list.iter()
                        .filter_map(|e| Some((e.get(0)?.as_u64()?, e.get(1)?.as_u64()?)))
                        .collect(),
                );
            }
            f => files.push(f.to_owned()),
        }
        i += 1;
    }
    let [a, b] = files.as_slice() else {
        return Err("usage: blkcmp A B [--granule BYTES] [--allowed JSON]".into());
    };
    let diffs = differing_extents(a, b, granule)?;
    let total: u64 = diffs.iter().map(|d| d.1).sum();
    println!("{} differing extents, {total} bytes", diffs.len());
    for (o, l) in diffs.iter().take(20) {
        println!("  {o}+{l}");
    }
    let Some(allowed) = allowed else {
        return Ok(i32::from(!diffs.is_empty()));
    };
    let outside: Vec<_> = diffs
        .iter()
        .flat_map(|&(o, l)| (o / granule..(o + l).div_ceil(granule)).map(move |g| g * granule))
        .filter(|&g| !allowed.iter().any(|&(s, l)| s <= g && g < s + l))
        .collect();
    if outside.is_empty() {
        println!("every difference lies inside the allowed extents");
        Ok(0)
    } else {
        println!(
            "{} differing granules OUTSIDE the allowed extents, first at {}",
            outside.len(),
            outside[0]
        );
        Ok(1)
    }
}

/// The extents (offset, length) where A and B differ, compared granule by granule; adjacent
/// differing granules merge into one extent.
fn differing_extents(a: &str, b: &str, granule: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut fa = File::open(a).map_err(|e| format!("{a}: {e}"))?;
    let mut fb = File::open(b).map_err(|e| format!("{b}: {e}"))?;
    let (mut ba, mut bb) = (vec![0u8; granule as usize], vec![0u8; granule as usize]);
    let mut diffs: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| format!("{a}: {e}"))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| format!("{b}: {e}"))?;
        if na == 0 && nb == 0 {
            return Ok(diffs);
        }
        if na != nb || ba[..na] != bb[..nb] {
            let len = na.max(nb) as u64;
            match diffs.last_mut() {
                Some((s, l)) if *s + *l == off => *l += len,
                _ => diffs.push((off, len)),
            }
        }
        off += na.max(nb) as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
