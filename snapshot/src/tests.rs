//! Whole-format tests in temporary directories: round trips, sparseness, incremental chains
//! and merge, and every kind of damage (each an error naming the file, never a panic).

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checksum::sha256_hex;
use crate::*;

const P: u64 = PAGE_SIZE as u64;
const GIB: u64 = 1 << 30;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ssi-snapshot-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A page whose bytes depend on `seed` (never all zero).
fn page(seed: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in p.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    p
}

const ZERO: [u8; PAGE_SIZE] = [0u8; PAGE_SIZE];

/// Guest RAM split around a hole, as the VMM lays it out (small).
fn ranges() -> Vec<GpaRange> {
    vec![
        GpaRange {
            start: 0,
            len: 2 << 20,
        },
        GpaRange {
            start: 4 * GIB,
            len: 1 << 20,
        },
    ]
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct VcpuState {
    rip: u64,
    regs: Vec<u64>,
}

/// What a snapshot should hold: gpa -> Some(data seed) / None (zero).
type Pages = Vec<(u64, Option<u64>)>;

/// Writes a snapshot at `dir` with `pages` split over two hosts' files, a state file per
/// host, and `parent`.
fn write_snapshot(dir: &Path, pages: &Pages, parent: Option<&Path>) -> PathBuf {
    let b = SnapshotBuilder::create(dir).unwrap();
    let w0 = b.memory_writer("memory-h0", &ranges()).unwrap();
    let w1 = b.memory_writer("memory-h1", &ranges()).unwrap();
    // Host 0 holds even pages, host 1 odd ones; each host writes from two threads, pages in
    // reverse order.
    std::thread::scope(|s| {
        for (host, w) in [(0, &w0), (1, &w1)] {
            for t in 0..2u64 {
                s.spawn(move || {
                    for &(gpa, seed) in pages.iter().rev() {
                        if (gpa / P) % 2 == host && (gpa / P / 2) % 2 == t {
                            let p = seed.map_or(ZERO, page);
                            w.write_page(gpa, &p).unwrap();
                        }
                    }
                });
            }
        }
    });
    let mut m = Manifest::new(
        json!({"memory_mib": 3, "vcpus": 2, "cmdline": "console=ttyS0"}),
        json!({"vcpus": [0, 1]}),
    );
    m.memory_files.push(w0.finish().unwrap());
    m.memory_files.push(w1.finish().unwrap());
    for h in 0..2u32 {
        let st = VcpuState {
            rip: 0xffff_8000_0000_0000 + u64::from(h),
            regs: vec![u64::from(h); 16],
        };
        m.state_files.push(
            b.write_state(&format!("state-h{h}-vcpus"), Some(h), "vcpus", &st)
                .unwrap(),
        );
    }
    if let Some(p) = parent {
        m.parent = Some(ParentRef::new(dir, p).unwrap());
    }
    b.commit(&m).unwrap()
}

fn base_pages() -> Pages {
    vec![
        (0, Some(1)),
        (P, Some(2)),
        (2 * P, None),
        (3 * P, Some(3)),
        (100 * P, Some(4)),
        (101 * P, Some(5)),
        (102 * P, Some(6)),
        (4 * GIB, Some(7)),
        (4 * GIB + 5 * P, None),
    ]
}

/// Every page of `ranges()` as read through `snap`: Some(bytes) for data, None for zero or
/// unrecorded, plus the source.
fn read_all(snap: &Snapshot) -> Vec<(u64, PageSource, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut buf = [0u8; PAGE_SIZE];
    for r in ranges() {
        for gpa in (r.start..r.end()).step_by(PAGE_SIZE) {
            let src = snap.read_page(gpa, &mut buf).unwrap();
            let data = (src == PageSource::Data).then(|| buf.to_vec());
            out.push((gpa, src, data));
        }
    }
    out
}

#[test]
fn round_trip_data_zero_and_absent_pages() {
    let t = TempDir::new();
    let dir = write_snapshot(&t.0.join("snap"), &base_pages(), None);
    let snap = open(&dir).unwrap();
    assert_eq!(snap.layers().len(), 1);
    snap.verify().unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    for (gpa, seed) in base_pages() {
        match seed {
            Some(s) => {
                assert_eq!(snap.read_page(gpa, &mut buf).unwrap(), PageSource::Data);
                assert_eq!(buf, page(s), "page {gpa:#x}");
            }
            None => assert_eq!(snap.read_page(gpa, &mut buf).unwrap(), PageSource::Zero),
        }
    }
    for gpa in [4 * P, 99 * P, 4 * GIB + P, 3 * GIB] {
        assert_eq!(
            snap.read_page(gpa, &mut buf).unwrap(),
            PageSource::NotInLayer
        );
    }
    let top = snap.top();
    let m = top.manifest();
    assert_eq!(m.format, FormatVersion::CURRENT);
    assert_eq!(m.guest["vcpus"], 2);
    let data: u64 = m.memory_files.iter().map(|f| f.pages_data).sum();
    let zero: u64 = m.memory_files.iter().map(|f| f.pages_zero).sum();
    assert_eq!((data, zero), (7, 2));
    let st: VcpuState = top
        .read_state(m.state_file("vcpus", Some(1)).unwrap())
        .unwrap();
    assert_eq!(st.rip, 0xffff_8000_0000_0001);
    // The data of page 1 is at offset 4096 of host 1's file: a restore can pread or map it.
    let f1 = fs::File::open(dir.join("memory-h1.mem")).unwrap();
    f1.read_exact_at(&mut buf, P).unwrap();
    assert_eq!(buf, page(2));
    // No temporary left behind.
    let names: Vec<_> = fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
}

#[test]
fn memory_file_is_sparse() {
    let t = TempDir::new();
    let b = SnapshotBuilder::create(&t.0.join("snap")).unwrap();
    let range = [GpaRange {
        start: 0,
        len: 64 << 20,
    }];
    let w = b.memory_writer("memory-h0", &range).unwrap();
    // 16 MiB written in one call: 3 data pages, the rest zero.
    let mut chunk = vec![0u8; 16 << 20];
    for (i, at) in [0usize, 1000, 4095].into_iter().enumerate() {
        chunk[at * PAGE_SIZE..(at + 1) * PAGE_SIZE].copy_from_slice(&page(i as u64));
    }
    w.write_pages(8 << 20, &chunk).unwrap();
    let e = w.finish().unwrap();
    assert_eq!((e.pages_data, e.pages_zero), (3, 4093));
    let mut m = Manifest::new(json!({}), json!(null));
    m.memory_files.push(e);
    let dir = b.commit(&m).unwrap();
    let md = fs::metadata(dir.join("memory-h0.mem")).unwrap();
    assert_eq!(md.len(), 64 << 20);
    let on_disk = md.blocks() * 512;
    assert!(
        on_disk <= 64 * 1024,
        "{on_disk} bytes on disk for 3 data pages"
    );
    // The index is tiny too: 3 runs of one data page, 2 of zero pages between, 3 checksums.
    let idx = fs::metadata(dir.join("memory-h0.idx")).unwrap().len();
    assert_eq!(idx, 32 + 5 * 16 + 3 * 8);
    let snap = open(&dir).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(
        snap.read_page((8 << 20) + 1000 * P, &mut buf).unwrap(),
        PageSource::Data
    );
    assert_eq!(buf, page(1));
    assert_eq!(
        snap.read_page((8 << 20) + P, &mut buf).unwrap(),
        PageSource::Zero
    );
    assert_eq!(snap.read_page(0, &mut buf).unwrap(), PageSource::NotInLayer);
}

/// base <- inc1 <- inc2; the chain reads through, and its merge reads the same.
#[test]
fn incremental_chain_and_merge() {
    let t = TempDir::new();
    let base = write_snapshot(&t.0.join("base"), &base_pages(), None);
    let inc1_pages = vec![
        (P, Some(20)),       // rewritten
        (3 * P, None),       // zeroed
        (2 * P, Some(21)),   // was zero
        (50 * P, Some(22)),  // new
        (4 * GIB + P, None), // new zero
    ];
    let inc1 = write_snapshot(&t.0.join("inc1"), &inc1_pages, Some(&base));
    let inc2_pages = vec![(0, Some(30)), (P, Some(31)), (101 * P, None)];
    let inc2 = write_snapshot(&t.0.join("inc2"), &inc2_pages, Some(&inc1));

    let snap = open(&inc2).unwrap();
    assert_eq!(snap.layers().len(), 3);
    assert_eq!(snap.layers()[2].dir(), inc2.join("../inc1/../base"));
    assert_eq!(
        snap.top().manifest().parent.as_ref().unwrap().path,
        "../inc1"
    );
    snap.verify().unwrap();
    let expect: &[(u64, Option<u64>)] = &[
        (0, Some(30)),
        (P, Some(31)),
        (2 * P, Some(21)),
        (3 * P, None),
        (50 * P, Some(22)),
        (100 * P, Some(4)),
        (101 * P, None),
        (102 * P, Some(6)),
        (4 * GIB, Some(7)),
        (4 * GIB + P, None),
        (4 * GIB + 5 * P, None),
    ];
    let mut buf = [0u8; PAGE_SIZE];
    for &(gpa, seed) in expect {
        let src = snap.read_page(gpa, &mut buf).unwrap();
        match seed {
            Some(s) => {
                assert_eq!(src, PageSource::Data, "{gpa:#x}");
                assert_eq!(buf, page(s), "{gpa:#x}");
            }
            None => assert_eq!(src, PageSource::Zero, "{gpa:#x}"),
        }
    }
    assert_eq!(
        snap.read_page(7 * P, &mut buf).unwrap(),
        PageSource::NotInLayer
    );
    // inc2 alone records only its own pages.
    assert_eq!(
        snap.top().read_page(100 * P, &mut buf).unwrap(),
        PageSource::NotInLayer
    );

    let merged = merge(&snap, &t.0.join("merged")).unwrap();
    let msnap = open(&merged).unwrap();
    assert_eq!(msnap.layers().len(), 1);
    msnap.verify().unwrap();
    let mm = msnap.top().manifest();
    assert_eq!(mm.parent, None);
    assert_eq!(mm.memory_files.len(), 1);
    assert_eq!(mm.state_files, snap.top().manifest().state_files);
    assert_eq!(mm.guest, snap.top().manifest().guest);
    assert_eq!(read_all(&msnap), read_all(&snap));
    // Merging keeps sparseness: only data pages take blocks.
    let md = fs::metadata(merged.join("memory.mem")).unwrap();
    assert_eq!(md.len(), 4 * GIB + (1 << 20));
    assert!(md.blocks() * 512 <= 256 * 1024);
    // The chain is untouched and still opens.
    open(&inc2).unwrap();

    // What the chain records, without reading pages: the hash a writer compares with.
    assert_eq!(
        snap.recorded(P),
        Some(Some(crate::checksum::page_hash(&page(31))))
    );
    assert_eq!(snap.recorded(3 * P), Some(None));
    assert_eq!(snap.recorded(7 * P), None);

    // A merge may take files the manifest does not list (the VMM's disks) along.
    fs::write(inc2.join("disk-0.img"), b"disk").unwrap();
    let with = merge_with(&snap, &t.0.join("merged-disk"), &["disk-0.img"]).unwrap();
    assert_eq!(fs::read(with.join("disk-0.img")).unwrap(), b"disk");
    assert!(merge_with(&snap, &t.0.join("merged-bad"), &["../x"]).is_err());
    assert!(merge_with(&snap, &t.0.join("merged-missing"), &["nope.img"]).is_err());
    assert!(!t.0.join("merged-missing").exists());
}

#[test]
fn missing_or_changed_parent_is_refused() {
    let t = TempDir::new();
    let base = write_snapshot(&t.0.join("base"), &base_pages(), None);
    let inc = write_snapshot(&t.0.join("inc"), &vec![(0, Some(9))], Some(&base));
    open(&inc).unwrap();

    // Changed: the parent's manifest is rewritten (same content, later time).
    let (mut m, _) = read_manifest(&base).unwrap();
    m.created_unix_ms += 1;
    write_manifest(&base, &m).unwrap();
    let e = open(&inc).unwrap_err();
    assert!(matches!(e, Error::ParentMismatch { .. }), "{e}");
    assert_eq!(e.path(), inc.join(MANIFEST_FILE));
    // The child alone still opens (inspecting a layer needs no parent).
    Layer::open(&inc).unwrap();

    // Missing.
    fs::rename(&base, t.0.join("elsewhere")).unwrap();
    let e = open(&inc).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Parent { .. }), "{msg}");
    assert!(
        msg.contains("inc/manifest.json") && msg.contains("../base"),
        "{msg}"
    );
    // A child cannot be committed on top of a missing parent either.
    let b = SnapshotBuilder::create(&t.0.join("inc2")).unwrap();
    let mut m = Manifest::new(json!({}), json!({}));
    m.parent = Some(ParentRef {
        path: "../base".into(),
        manifest_sha256: "0".repeat(64),
    });
    assert!(matches!(b.commit(&m), Err(Error::Parent { .. })));
    assert!(!t.0.join("inc2").exists());
}

/// Writes `bytes` into the file at `path` at `offset`.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn flip(path: &Path, offset: u64) {
    let mut b = [0u8];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    poke(path, offset, &[b[0] ^ 0x20]);
}

#[test]
fn truncated_files_are_refused_naming_them() {
    for name in [
        "memory-h0.mem",
        "memory-h1.idx",
        "state-h0-vcpus.json",
        "manifest.json",
    ] {
        let t = TempDir::new();
        let dir = write_snapshot(&t.0.join("snap"), &base_pages(), None);
        let path = dir.join(name);
        let len = fs::metadata(&path).unwrap().len();
        // The manifest's last byte is a newline, which JSON ignores: cut into the JSON.
        let cut = if name == MANIFEST_FILE { 2 } else { 1 };
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - cut)
            .unwrap();
        let e = open(&dir).unwrap_err();
        assert_eq!(e.path(), path, "{e}");
        if name != "manifest.json" {
            assert!(matches!(e, Error::Size { .. }), "{e}");
        }
    }
}

#[test]
fn flipped_bytes_are_caught_naming_the_file() {
    let t = TempDir::new();
    let dir = write_snapshot(&t.0.join("snap"), &base_pages(), None);
    let reset = |t: &TempDir| {
        let _ = fs::remove_dir_all(t.0.join("snap"));
        write_snapshot(&t.0.join("snap"), &base_pages(), None)
    };

    // Memory data: open succeeds (only sizes are checked), the page read fails, verify fails.
    flip(&dir.join("memory-h1.mem"), 101 * P + 17);
    let snap = open(&dir).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    let e = snap.read_page(101 * P, &mut buf).unwrap_err();
    assert!(
        matches!(e, Error::PageChecksum { gpa, .. } if gpa == 101 * P),
        "{e}"
    );
    assert_eq!(e.path(), dir.join("memory-h1.mem"));
    assert!(e.to_string().contains("0x65000"), "{e}");
    // Other pages are still served (lazy restore fails only the damaged page).
    assert_eq!(snap.read_page(100 * P, &mut buf).unwrap(), PageSource::Data);
    let e = snap.verify().unwrap_err();
    assert_eq!(e.path(), dir.join("memory-h1.mem"));
    drop(snap);

    for name in ["memory-h0.idx", "state-h1-vcpus.json"] {
        let dir = reset(&t);
        flip(&dir.join(name), 40);
        let e = open(&dir).unwrap_err();
        assert!(matches!(e, Error::Checksum { .. }), "{e}");
        assert_eq!(e.path(), dir.join(name));
    }

    let dir = reset(&t);
    let mpath = dir.join(MANIFEST_FILE);
    let len = fs::metadata(&mpath).unwrap().len();
    for off in (0..len).step_by(7) {
        let orig = fs::read(&mpath).unwrap();
        flip(&mpath, off);
        match open(&dir) {
            Err(e) => assert_eq!(e.path(), mpath, "byte {off}: {e}"),
            Ok(s) => assert_eq!(s.top().manifest().format.major, FORMAT_MAJOR),
        }
        fs::write(&mpath, orig).unwrap();
    }
}

/// Every byte of every small file flipped, and every file cut at many lengths: open, verify
/// and reading every page give a result or an error naming a file of the snapshot; nothing
/// panics.
#[test]
fn no_panic_on_damage() {
    let t = TempDir::new();
    let dir = write_snapshot(&t.0.join("snap"), &base_pages(), None);
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let exercise = |what: &str| match open(&dir) {
        Ok(snap) => {
            let _ = snap.verify();
            let mut buf = [0u8; PAGE_SIZE];
            for r in ranges() {
                for gpa in (r.start..r.end()).step_by(PAGE_SIZE) {
                    if let Err(e) = snap.read_page(gpa, &mut buf) {
                        assert!(e.path().starts_with(&dir), "{what}: {e}");
                    }
                }
            }
            let _ = inspect(&dir);
        }
        Err(e) => assert!(e.path().starts_with(&dir), "{what}: {e}"),
    };
    for name in &names {
        let path = dir.join(name);
        if name.ends_with(".mem") {
            // Memory files are large and sparse: damage them in place (a few bytes of data
            // pages and of holes), and cut or extend them by a little.
            for pos in [
                0,
                1,
                P - 1,
                P + 9,
                100 * P,
                101 * P + 4095,
                50 * P,
                4 * GIB + 7,
            ] {
                flip(&path, pos);
                exercise(&format!("{name} byte {pos} flipped"));
                flip(&path, pos);
            }
            let len = fs::metadata(&path).unwrap().len();
            let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            for cut in [len - 1, len + P] {
                f.set_len(cut).unwrap();
                exercise(&format!("{name} cut at {cut}"));
            }
            f.set_len(len).unwrap();
            continue;
        }
        let orig = fs::read(&path).unwrap();
        // Small files: every byte, three ways.
        for pos in 0..orig.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = orig.clone();
                b[pos] ^= x;
                fs::write(&path, &b).unwrap();
                exercise(&format!("{name} byte {pos} ^ {x:#x}"));
            }
        }
        for cut in [0, 1, 8, 31, 32, 33, 48, orig.len() / 2, orig.len() - 8] {
            fs::write(&path, &orig[..cut]).unwrap();
            exercise(&format!("{name} cut at {cut}"));
        }
        fs::write(&path, &orig).unwrap();
    }
    open(&dir).unwrap().verify().unwrap();
}

/// Writes a manifest.json with the given `format` JSON and body (checksummed correctly).
fn write_raw_manifest(dir: &Path, format: &str, body: &serde_json::Value) {
    let body = serde_json::to_string_pretty(body).unwrap();
    let text = format!(
        "{{\"format\": {format}, \"manifest_sha256\": \"{}\", \"manifest\": {body}}}",
        sha256_hex(body.as_bytes())
    );
    fs::write(dir.join(MANIFEST_FILE), text).unwrap();
}

#[test]
fn versions_unknown_major_refused_newer_minor_accepted() {
    let t = TempDir::new();
    let dir = write_snapshot(&t.0.join("snap"), &base_pages(), None);
    let (m, _) = read_manifest(&dir).unwrap();
    let mut body = serde_json::to_value(&m).unwrap();

    // Newer minor with a field this build does not know: accepted, field ignored.
    body["future_field"] = json!({"anything": [1, 2]});
    write_raw_manifest(&dir, r#"{"major": 1, "minor": 7}"#, &body);
    let snap = open(&dir).unwrap();
    assert_eq!(
        snap.top().manifest().format,
        FormatVersion { major: 1, minor: 7 }
    );
    snap.verify().unwrap();

    // Unknown major: refused, whatever the rest (here a body of another shape entirely).
    for (format, rest) in [
        (r#"{"major": 2, "minor": 0}"#, body.clone()),
        (r#"{"major": 0, "minor": 9}"#, json!({"pages": "elsewhere"})),
    ] {
        write_raw_manifest(&dir, format, &rest);
        let e = open(&dir).unwrap_err();
        assert!(matches!(e, Error::UnsupportedVersion { .. }), "{e}");
        assert_eq!(e.path(), dir.join(MANIFEST_FILE));
        assert!(e.to_string().contains("not supported"), "{e}");
    }
    // No format at all: not a manifest.
    fs::write(dir.join(MANIFEST_FILE), "{}").unwrap();
    assert!(matches!(open(&dir), Err(Error::Json { .. })));
}

#[test]
fn values_out_of_range_are_refused() {
    let t = TempDir::new();
    let dir = write_snapshot(&t.0.join("snap"), &base_pages(), None);
    let (m, _) = read_manifest(&dir).unwrap();
    type Change = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "path escape",
            Box::new(|m| m.state_files[0].file = "../x.json".into()),
        ),
        (
            "page counts",
            Box::new(|m| m.memory_files[0].pages_data += 1),
        ),
        ("range", Box::new(|m| m.memory_files[0].ranges[1].start = 3)),
        ("size", Box::new(|m| m.memory_files[0].size += P)),
        (
            "sha",
            Box::new(|m| m.memory_files[0].index_sha256 = "xyz".into()),
        ),
        (
            "duplicate file",
            Box::new(|m| m.memory_files[1].file = m.memory_files[0].file.clone()),
        ),
    ];
    for (what, change) in cases {
        let mut bad = m.clone();
        change(&mut bad);
        write_raw_manifest(
            &dir,
            r#"{"major": 1, "minor": 0}"#,
            &serde_json::to_value(&bad).unwrap(),
        );
        let e = open(&dir).unwrap_err();
        // A page count the index contradicts is reported at the index; the rest at the
        // manifest.
        let file = if what == "page counts" {
            "memory-h0.idx"
        } else {
            MANIFEST_FILE
        };
        assert_eq!(e.path(), dir.join(file), "{what}: {e}");
    }
}

#[test]
fn overlapping_memory_files_in_one_layer_are_refused() {
    let t = TempDir::new();
    let b = SnapshotBuilder::create(&t.0.join("snap")).unwrap();
    let w0 = b.memory_writer("a", &ranges()).unwrap();
    let w1 = b.memory_writer("b", &ranges()).unwrap();
    w0.write_page(5 * P, &page(1)).unwrap();
    w1.write_pages(4 * P, &[ZERO, page(2)].concat()).unwrap();
    let mut m = Manifest::new(json!({}), json!({}));
    m.memory_files = vec![w0.finish().unwrap(), w1.finish().unwrap()];
    let dir = b.commit(&m).unwrap();
    let e = open(&dir).unwrap_err();
    assert!(
        e.to_string().contains("both record the page at 0x5000"),
        "{e}"
    );
}

#[test]
fn writer_refuses_bad_pages() {
    let t = TempDir::new();
    let w = MemoryFileWriter::create(&t.0, "m", &ranges()).unwrap();
    let e = w.write_page(P + 1, &page(1)).unwrap_err();
    assert!(matches!(e, Error::BadPage { .. }), "{e}");
    assert!(w.write_page(3 * GIB, &page(1)).is_err(), "in the hole");
    assert!(
        w.write_pages((2 << 20) - P, &[page(1), page(2)].concat())
            .is_err(),
        "past the end"
    );
    assert!(w.write_page(u64::MAX - P + 1, &page(1)).is_err());
    w.write_page(P, &page(1)).unwrap();
    w.write_page(P, &ZERO).unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("written twice"), "{e}");
    assert!(
        MemoryFileWriter::create(&t.0, "m", &ranges()).is_err(),
        "exists"
    );
    let overlapping = [
        GpaRange {
            start: 0,
            len: 2 * P,
        },
        GpaRange { start: P, len: P },
    ];
    assert!(MemoryFileWriter::create(&t.0, "n", &overlapping).is_err());
}

#[test]
fn incomplete_snapshots_are_never_used() {
    let t = TempDir::new();
    let final_dir = t.0.join("ckpt-1");
    let b = SnapshotBuilder::create(&final_dir).unwrap();
    let partial = b.partial_dir().to_path_buf();
    assert_eq!(
        partial.file_name().unwrap().to_string_lossy(),
        format!("ckpt-1.tmp-{}", std::process::id())
    );
    let w = b.memory_writer("memory-h0", &ranges()).unwrap();
    w.write_page(0, &page(1)).unwrap();
    let mut m = Manifest::new(json!({}), json!({}));
    m.memory_files.push(w.finish().unwrap());
    // Not yet committed: the final directory does not exist, the partial one is refused even
    // once it holds a valid manifest (a crash between manifest and rename).
    let e = open(&final_dir).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert_eq!(e.path(), final_dir);
    write_manifest(&partial, &m).unwrap();
    let e = open(&partial).unwrap_err();
    assert!(matches!(e, Error::Incomplete { .. }), "{e}");
    // Dropped without commit: removed.
    drop(b);
    assert!(!partial.exists() && !final_dir.exists());

    // A directory without manifest is not a snapshot.
    fs::create_dir(&final_dir).unwrap();
    let e = open(&final_dir).unwrap_err();
    assert!(matches!(e, Error::NoManifest { .. }), "{e}");
    // And a snapshot never overwrites anything.
    assert!(matches!(
        SnapshotBuilder::create(&final_dir),
        Err(Error::AlreadyExists { .. })
    ));
    assert!(SnapshotBuilder::create(&t.0.join("x.tmp-12")).is_err());

    // A commit whose manifest lists a file that is not there, or not at its size, fails and
    // publishes nothing.
    let dir2 = t.0.join("ckpt-2");
    let b = SnapshotBuilder::create(&dir2).unwrap();
    let st = b
        .write_state("state", None, "ioapic", &[1u8, 2, 3])
        .unwrap();
    let mut m = Manifest::new(json!({}), json!({}));
    let mut wrong = st.clone();
    wrong.size += 1;
    m.state_files.push(wrong);
    assert!(matches!(b.commit(&m), Err(Error::Size { .. })));
    assert!(!dir2.exists());
}

/// A component whose restore checks a value's range.
#[derive(Debug)]
struct Lapic {
    timer_divide: u8,
}

#[derive(Serialize, Deserialize)]
struct LapicState {
    timer_divide: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("timer_divide {0} out of range 0..=7")]
struct LapicError(u8);

impl Persist for Lapic {
    type State = LapicState;
    type ConstructorArgs = ();
    type Error = LapicError;
    fn save(&self) -> LapicState {
        LapicState {
            timer_divide: self.timer_divide,
        }
    }
    fn restore(_: (), s: &LapicState) -> Result<Self, LapicError> {
        if s.timer_divide > 7 {
            return Err(LapicError(s.timer_divide));
        }
        Ok(Lapic {
            timer_divide: s.timer_divide,
        })
    }
}

#[test]
fn state_out_of_range_is_an_error_naming_the_file() {
    let t = TempDir::new();
    let b = SnapshotBuilder::create(&t.0.join("snap")).unwrap();
    let mut m = Manifest::new(json!({}), json!({}));
    m.state_files.push(
        b.write_state(
            "lapic-ok",
            Some(0),
            "lapic",
            &Lapic { timer_divide: 3 }.save(),
        )
        .unwrap(),
    );
    m.state_files.push(
        b.write_state(
            "lapic-bad",
            Some(1),
            "lapic",
            &LapicState { timer_divide: 9 },
        )
        .unwrap(),
    );
    m.state_files.push(
        b.write_state(
            "wrong-type",
            Some(2),
            "lapic",
            &json!({"timer_divide": "x"}),
        )
        .unwrap(),
    );
    let dir = b.commit(&m).unwrap();
    let layer = Layer::open(&dir).unwrap();
    let ok: Lapic = layer.restore_state(&m.state_files[0], ()).unwrap();
    assert_eq!(ok.timer_divide, 3);
    let e = layer
        .restore_state::<Lapic>(&m.state_files[1], ())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: invalid saved state: timer_divide 9 out of range 0..=7",
            dir.join("lapic-bad.json").display()
        )
    );
    let e = layer
        .restore_state::<Lapic>(&m.state_files[2], ())
        .unwrap_err();
    assert!(matches!(e, Error::Json { .. }), "{e}");
    assert_eq!(e.path(), dir.join("wrong-type.json"));
}

#[test]
fn inspect_describes_the_chain() {
    let t = TempDir::new();
    let base = write_snapshot(&t.0.join("base"), &base_pages(), None);
    let inc = write_snapshot(
        &t.0.join("inc"),
        &vec![(0, Some(9)), (P, None)],
        Some(&base),
    );
    let text = inspect(&inc).unwrap();
    println!("{text}");
    for want in [
        "incremental, chain of 2 layers",
        "format     1.0",
        "parent     ../base",
        "parent     none (full snapshot)",
        "cmdline: \"console=ttyS0\"",
        "memory-h0.mem  apparent 4.0 GiB",
        "1 data pages (4.0 KiB), 1 zero pages",
        "state-h1-vcpus.json  vcpus, host 1",
        "7 data pages (28.0 KiB), 2 zero pages",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let e = inspect(&t.0.join("nope")).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

/// End-to-end speed of writing (to the page cache) and verifying a full memory file of random
/// pages; printed with `--nocapture`.
#[test]
fn write_and_verify_throughput() {
    let t = TempDir::new();
    let mib = 128u64;
    let b = SnapshotBuilder::create(&t.0.join("snap")).unwrap();
    let w = b
        .memory_writer(
            "memory-h0",
            &[GpaRange {
                start: 0,
                len: mib << 20,
            }],
        )
        .unwrap();
    let chunk: Vec<u8> = (0..256).flat_map(page).collect(); // 1 MiB
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for th in 0..2u64 {
            let (w, chunk) = (&w, &chunk);
            s.spawn(move || {
                for i in (th..mib).step_by(2) {
                    w.write_pages(i << 20, chunk).unwrap();
                }
            });
        }
    });
    let mut m = Manifest::new(json!({}), json!({}));
    m.memory_files.push(w.finish().unwrap());
    let dir = b.commit(&m).unwrap();
    let write = (mib << 20) as f64 / 1e9 / start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let snap = open(&dir).unwrap();
    snap.verify().unwrap();
    let verify = (mib << 20) as f64 / 1e9 / start.elapsed().as_secs_f64();
    println!(
        "memory file of {mib} MiB: write+fsync+commit {write:.2} GB/s (2 threads), \
         open+verify {verify:.2} GB/s (1 thread, page cache)"
    );
}

/// A lazy restore serves page faults from several threads over one opened snapshot.
#[test]
fn opened_snapshots_are_shareable_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Snapshot>();
    shareable::<MemoryFileWriter>();
    shareable::<Error>();
}
