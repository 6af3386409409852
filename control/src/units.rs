//! Sizes on the command lines of ublk-mirror, ublk-mirror-ctl and nbd-proxy.
//!
//! A size is a whole number of bytes with an optional unit, case-insensitive: `K`/`KB`,
//! `M`/`MB`, `G`/`GB`, `T`/`TB` are decimal (10^3, 10^6, 10^9, 10^12), `KiB`, `MiB`, `GiB`,
//! `TiB` binary (2^10, 2^20, 2^30, 2^40). So `20M` is 20 000 000 bytes and `20MiB`
//! 20 971 520. [`SIZE_UNITS`] says so in `--help`.

/// The rule above in one line, for the commands' `--help`.
pub const SIZE_UNITS: &str = "Sizes are bytes, or a number with a unit: K, M, G, T (also KB, \
                              MB, GB, TB) are powers of 1000; KiB, MiB, GiB, TiB powers of 1024 \
                              (20M = 20000000, 20MiB = 20971520).";

/// Parses a size (see the module docs).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a whole number of bytes with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u64.pow(2),
        "g" | "gb" => 1000_u64.pow(3),
        "t" | "tb" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (K, M, G, T are powers of 1000; KiB, MiB, GiB, \
                 TiB powers of 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// [`parse_size`] for a 32-bit quantity.
pub fn parse_size_u32(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?}: at most {} bytes", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_and_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("20M"), Ok(20_000_000));
        assert_eq!(parse_size("20MB"), Ok(20_000_000));
        assert_eq!(parse_size("20mb"), Ok(20_000_000));
        assert_eq!(parse_size("20MiB"), Ok(20 << 20));
        assert_eq!(parse_size("20mib"), Ok(20 << 20));
        assert_eq!(parse_size("20 MiB"), Ok(20 << 20));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1k"), Ok(1000));
        assert_eq!(parse_size("3G"), Ok(3_000_000_000));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2_000_000_000_000));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes_say_why() {
        for bad in ["", "M", "1.5M", "-1", "10X", "10 M B"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("10X")
            .expect_err("unit")
            .contains("powers of 1024"));
        assert!(parse_size("99999999999TiB")
            .expect_err("overflow")
            .contains("too large"));
        assert_eq!(parse_size_u32("512KiB"), Ok(512 * 1024));
        assert!(parse_size_u32("8GiB").is_err());
    }
}
