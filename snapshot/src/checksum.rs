//! Checksums: SHA-256 for whole (small) files, XXH3-64 for single guest pages.
//!
//! Whole files (manifest, page indexes, state files) are small and use SHA-256 (hex), which
//! `sha256sum` can check by hand. Guest pages use XXH3-64: about 10 GB/s per core here against
//! about 1.6 GB/s for SHA-256 with SHA-NI (see the `checksum_throughput` test), so checksumming
//! never limits a snapshot or restore that runs at disk or network speed; the checksums guard
//! against corruption, not forgery (a forger rewrites the manifest as well).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{IoContext, Result};

/// Bytes in a guest page: the unit of memory files.
pub const PAGE_SIZE: usize = 4096;

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of the file at `path` (read whole) as lowercase hex, and its size.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).at(path, "open")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).at(path, "read")?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

/// The checksum of one guest page as stored in a page index.
pub fn page_hash(page: &[u8; PAGE_SIZE]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// Whether every byte of `page` is zero.
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    // OR-folding 64-byte chunks vectorizes; `all` on bytes would stop it from doing so.
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&p));
        p[PAGE_SIZE - 1] = 0;
        p[0] = 0x80;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn sha256_known_value() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// Prints the per-page throughput of the checksums (run with `--nocapture`); asserts only
    /// a floor far below the measured speed, so a loaded machine does not fail it.
    #[test]
    fn checksum_throughput() {
        let pages = 16 * 1024; // 64 MiB
        let mut buf = vec![0u8; pages * PAGE_SIZE];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let gb = buf.len() as f64 / 1e9;
        let as_page = |c: &[u8]| -> [u8; PAGE_SIZE] { c.try_into().unwrap() };
        let pages_v: Vec<[u8; PAGE_SIZE]> = buf.chunks_exact(PAGE_SIZE).map(as_page).collect();

        let t = Instant::now();
        let mut acc = 0u64;
        for p in &pages_v {
            acc ^= page_hash(p);
        }
        let xxh = gb / t.elapsed().as_secs_f64();

        let t = Instant::now();
        for p in &pages_v {
            acc ^= Sha256::digest(p)[0] as u64;
        }
        let sha = gb / t.elapsed().as_secs_f64();

        let zeros = vec![[0u8; PAGE_SIZE]; pages];
        let t = Instant::now();
        let mut nz = 0;
        for p in &zeros {
            nz += is_zero_page(p) as usize;
        }
        let zero = gb / t.elapsed().as_secs_f64();
        assert_eq!(nz, pages);
        println!(
            "checksum throughput per core (4 KiB pages): xxh3-64 {xxh:.2} GB/s, \
             sha256 {sha:.2} GB/s, zero check {zero:.2} GB/s (acc {acc:x})"
        );
        // Debug builds are far slower; the floor only guards a release build from a
        // pathological regression (e.g. a byte-at-a-time fallback).
        if !cfg!(debug_assertions) {
            assert!(xxh > 1.0, "xxh3 page checksums at {xxh:.2} GB/s");
            assert!(zero > 1.0, "zero-page check at {zero:.2} GB/s");
        }
    }
}
