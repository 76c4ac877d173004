//! `ssi-vmm snapshot inspect DIR`: a human-readable account of what a snapshot holds.

use std::fmt::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;

use crate::dir::{Layer, Snapshot};
use crate::error::Result;

/// Opens the snapshot in `dir` with its chain of parents (every check of [`Snapshot::open`]
/// applies: a broken snapshot is an error naming the file) and describes it: per layer the
/// format version, creation time, guest configuration, placement, parent, and per file its
/// apparent size, size on disk and pages (data / zero).
pub fn inspect(dir: &Path) -> Result<String> {
    let snap = Snapshot::open(dir)?;
    let mut out = String::new();
    let n = snap.layers().len();
    let chain = if n == 1 {
        "full snapshot".to_string()
    } else {
        format!("incremental, chain of {n} layers")
    };
    let _ = writeln!(out, "snapshot {} ({chain})", dir.display());
    for (i, layer) in snap.layers().iter().enumerate() {
        describe(&mut out, i, layer);
    }
    Ok(out)
}

fn describe(out: &mut String, i: usize, layer: &Layer) {
    let m = layer.manifest();
    let _ = writeln!(out, "layer {i}: {}", layer.dir().display());
    let _ = writeln!(out, "  format     {}.{}", m.format.major, m.format.minor);
    let _ = writeln!(out, "  created    {}", utc(m.created_unix_ms));
    match &m.parent {
        Some(p) => {
            let _ = writeln!(
                out,
                "  parent     {} (manifest sha256 {})",
                p.path,
                &p.manifest_sha256[..16]
            );
        }
        None => {
            let _ = writeln!(out, "  parent     none (full snapshot)");
        }
    }
    let _ = writeln!(out, "  guest      {}", summary(&m.guest));
    let _ = writeln!(out, "  placement  {}", summary(&m.placement));
    let (data, zero) = m
        .memory_files
        .iter()
        .fold((0, 0), |(d, z), f| (d + f.pages_data, z + f.pages_zero));
    let _ = writeln!(
        out,
        "  memory     {} file(s): {data} data pages ({}), {zero} zero pages",
        m.memory_files.len(),
        size(data * crate::PAGE_SIZE as u64)
    );
    for f in layer.memory_files() {
        let e = f.entry();
        let on_disk = std::fs::metadata(f.path())
            .map(|md| size(md.blocks() * 512))
            .unwrap_or_else(|e| format!("? ({e})"));
        let ranges: Vec<String> = e
            .ranges
            .iter()
            .map(|r| format!("{:#x}-{:#x}", r.start, r.end()))
            .collect();
        let _ = writeln!(
            out,
            "    {}  apparent {}, on disk {on_disk}, {} data + {} zero pages, ranges {}",
            e.file,
            size(e.size),
            e.pages_data,
            e.pages_zero,
            ranges.join(" ")
        );
        let _ = writeln!(
            out,
            "    {}  {}, sha256 {}",
            e.index,
            size(e.index_size),
            &e.index_sha256[..16]
        );
    }
    let _ = writeln!(out, "  state      {} file(s)", m.state_files.len());
    for s in &m.state_files {
        let host = s.host.map_or("-".to_string(), |h| format!("host {h}"));
        let _ = writeln!(
            out,
            "    {}  {}, {host}, {}, sha256 {}",
            s.file,
            s.component,
            size(s.size),
            &s.sha256[..16]
        );
    }
}

/// One line: an object's members as `key: value`, each value shortened.
fn summary(v: &Value) -> String {
    fn short(v: &Value) -> String {
        let s = v.to_string();
        if s.chars().count() > 60 {
            format!("{}...", s.chars().take(57).collect::<String>())
        } else {
            s
        }
    }
    match v {
        Value::Object(o) if !o.is_empty() => o
            .iter()
            .map(|(k, v)| format!("{k}: {}", short(v)))
            .collect::<Vec<_>>()
            .join(", "),
        _ => short(v),
    }
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `ms` since the Unix epoch as an ISO 8601 UTC time.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_793_534_096_000), "2026-11-01T11:54:56.000Z");
    }

    #[test]
    fn summaries() {
        assert_eq!(summary(&json!({"vcpus": 2})), "vcpus: 2");
        assert!(summary(&json!({"cmdline": "x".repeat(100)})).ends_with("..."));
        assert_eq!(summary(&Value::Null), "null");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 << 30), "3.0 GiB");
    }
}
