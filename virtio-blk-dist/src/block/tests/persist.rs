//! Save and restore of the device's own state: round trips, disk identity, forged states.

use std::fs::OpenOptions;
use std::io;
use std::time::{Duration, SystemTime};

use snapshot::Persist;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;

use super::*;
use crate::block::{BlockBackend, DiskIdentity, SERIAL_LEN};
use crate::{BlockRestoreArgs, BlockState, DiskCheck, StateError};

fn args(image: &TempImage, check: DiskCheck) -> BlockRestoreArgs {
    BlockRestoreArgs {
        path: image.path.clone(),
        check,
    }
}

/// The serial number `GET_ID` returns from `block`.
fn get_id(block: Block) -> [u8; SERIAL_LEN] {
    let mut h = Harness::with_block(block, TempImage::new(&[]), MEM_SIZE, false);
    h.fill(DATA, SERIAL_LEN, 0xaa);
    assert_eq!(h.simple(T_GET_ID, 0, SERIAL_LEN as u32, true).0, S_OK);
    h.read_mem(DATA, SERIAL_LEN).try_into().unwrap()
}

#[test]
fn block_state_round_trip() {
    let image = TempImage::new(&pattern(4));
    let block = Block::new(&image.path, false).unwrap();
    let s = block.save();
    assert_eq!(s.capacity, 4);
    assert!(!s.read_only);
    assert_eq!(s.avail_features, block.avail_features());
    let disk = s.disk.clone().unwrap();
    assert_eq!(disk.size, 2048);
    assert!(disk
        .path
        .ends_with(image.path.file_name().unwrap().to_str().unwrap()));
    assert!(s.serial.starts_with(b"ssi-"));

    let r = Block::restore(args(&image, DiskCheck::SameFile), &s).unwrap();
    assert_eq!(r.save(), s);
    assert_eq!(r.capacity(), 4);
    assert_eq!(get_id(r), s.serial);

    // Through JSON, and through the transport's untyped device state.
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<BlockState>(&text).unwrap(), s);
    let value = block.save_state();
    assert_eq!(serde_json::from_value::<BlockState>(value).unwrap(), s);

    // Read-only disks stay read-only.
    let ro = Block::new(&image.path, true).unwrap();
    let s = ro.save();
    assert!(s.read_only);
    let r = Block::restore(args(&image, DiskCheck::SameFile), &s).unwrap();
    assert!(r.read_only());
    assert_ne!(r.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(r.save(), s);
}

#[test]
fn another_or_modified_disk_is_detected() {
    let image = TempImage::new(&pattern(4));
    let s = Block::new(&image.path, false).unwrap().save();
    let err = |r: Result<Block, StateError>| r.err().expect("restore must fail");

    // Another file of the same size: refused in place, accepted as a vouched-for copy, which
    // keeps reporting the snapshot's serial number.
    let copy = TempImage::new(&image.contents());
    let e = err(Block::restore(args(&copy, DiskCheck::SameFile), &s));
    assert!(
        matches!(e, StateError::DiskChanged { what: "inode", .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("written since the snapshot"));
    let r = Block::restore(args(&copy, DiskCheck::SizeOnly), &s).unwrap();
    assert_ne!(
        Block::new(&copy.path, false).unwrap().save().serial,
        s.serial
    );
    assert_eq!(get_id(r), s.serial);

    // The same file, written since (its modification time moved).
    let file = OpenOptions::new().write(true).open(&image.path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(10))
        .unwrap();
    let e = err(Block::restore(args(&image, DiskCheck::SameFile), &s));
    assert!(
        matches!(
            e,
            StateError::DiskChanged {
                what: "modification time",
                ..
            }
        ),
        "{e:?}"
    );
    Block::restore(args(&image, DiskCheck::SizeOnly), &s).unwrap();

    // Grown by a partial sector: same capacity, another size.
    let s = Block::new(&image.path, false).unwrap().save();
    let mut bytes = image.contents();
    bytes.extend_from_slice(&[0; 100]);
    std::fs::write(&image.path, &bytes).unwrap();
    let e = err(Block::restore(args(&image, DiskCheck::SameFile), &s));
    assert!(matches!(e, StateError::DiskChanged { .. }), "{e:?}");
    // Grown by a sector: another capacity, whatever the check.
    bytes.extend_from_slice(&[0; 512]);
    std::fs::write(&image.path, &bytes).unwrap();
    let e = err(Block::restore(args(&image, DiskCheck::SizeOnly), &s));
    assert!(
        matches!(e, StateError::Capacity { saved: 4, disk: 5 }),
        "{e:?}"
    );

    // A missing image.
    let gone = TempImage::new(&[]);
    let e = err(Block::restore(
        BlockRestoreArgs {
            path: gone.path.with_extension("missing"),
            check: DiskCheck::SizeOnly,
        },
        &s,
    ));
    assert!(matches!(e, StateError::Open(_)), "{e:?}");
}

/// A backend in memory, without identity.
struct Anonymous(bool);

impl BlockBackend for Anonymous {
    fn size(&self) -> u64 {
        4096
    }
    fn read_only(&self) -> bool {
        self.0
    }
    fn read_at(&mut self, buf: &mut [u8], _: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn serial(&self) -> [u8; SERIAL_LEN] {
        *b"anonymous-disk\0\0\0\0\0\0"
    }
}

type Check = fn(&StateError) -> bool;
/// A field, how to spoil it, and the error that must follow.
type Case = (&'static str, Box<dyn Fn(&mut BlockState)>, Check);

#[test]
fn forged_block_states_are_rejected() {
    use StateError as E;
    let image = TempImage::new(&pattern(4));
    let base = Block::new(&image.path, false).unwrap().save();
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("capacity", Box::new(|s| s.capacity += 1), |e| matches!(e, E::Capacity { saved: 5, disk: 4 })),
        ("capacity max", Box::new(|s| s.capacity = u64::MAX), |e| matches!(e, E::Capacity { .. })),
        ("feature added", Box::new(|s| s.avail_features |= 1 << 12), |e| matches!(e, E::Features { .. })),
        ("feature removed", Box::new(|s| s.avail_features &= !(1 << 9)), |e| matches!(e, E::Features { .. })),
        ("no identity", Box::new(|s| s.disk = None), |e| matches!(e, E::NoSavedIdentity)),
        ("device", Box::new(|s| s.disk.as_mut().unwrap().dev ^= 1), |e| matches!(e, E::DiskChanged { what: "device", .. })),
        ("inode", Box::new(|s| s.disk.as_mut().unwrap().ino ^= 1), |e| matches!(e, E::DiskChanged { what: "inode", .. })),
        ("size", Box::new(|s| s.disk.as_mut().unwrap().size += 1), |e| matches!(e, E::DiskChanged { what: "size", .. })),
        ("mtime", Box::new(|s| s.disk.as_mut().unwrap().mtime_nsec ^= 1), |e| matches!(e, E::DiskChanged { what: "modification time", .. })),
        ("mtime sec", Box::new(|s| s.disk.as_mut().unwrap().mtime_sec = i64::MIN), |e| matches!(e, E::DiskChanged { .. })),
    ];
    for (name, spoil, check) in cases {
        let mut s = base.clone();
        spoil(&mut s);
        match Block::restore(args(&image, DiskCheck::SameFile), &s) {
            Ok(_) => panic!("{name}: forged state accepted"),
            Err(e) => assert!(check(&e), "{name}: wrong error {e:?}"),
        }
    }
    // Neither the path nor the serial number is checked: another path to the same file is
    // fine, and any serial is one the device can report.
    let mut s = base.clone();
    s.disk.as_mut().unwrap().path = "/elsewhere/disk.img".into();
    s.serial = [0xff; SERIAL_LEN];
    let r = Block::restore(args(&image, DiskCheck::SameFile), &s).unwrap();
    assert_eq!(get_id(r), [0xff; SERIAL_LEN]);

    // A read-only state on a writable backend, and a backend without identity.
    let mut ro = base.clone();
    ro.read_only = true;
    let writable = FileBackend::open(&image.path, false).unwrap();
    let e = Block::restore_backend(Box::new(writable), &ro, DiskCheck::SizeOnly)
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            E::ReadOnly {
                saved: true,
                backend: false
            }
        ),
        "{e:?}"
    );
    let anon = Block::with_backend(Box::new(Anonymous(false))).save();
    assert!(anon.disk.is_none());
    let e = Block::restore_backend(
        Box::new(Anonymous(false)),
        &BlockState {
            disk: base.disk.clone(),
            ..anon.clone()
        },
        DiskCheck::SameFile,
    )
    .err()
    .unwrap();
    assert!(matches!(e, E::NoDiskIdentity), "{e:?}");
    let r = Block::restore_backend(Box::new(Anonymous(false)), &anon, DiskCheck::SizeOnly).unwrap();
    assert_eq!(r.save(), anon);
}

#[test]
fn queue_with_requests_in_flight_is_refused() {
    let image = TempImage::new(&pattern(4));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let interrupt = Interrupt::new(Arc::new(Line::default()));
    let mut block = Block::new(&image.path, false).unwrap();
    let mut q = make_queue(&mem, false);
    q.set_next_avail(7);
    q.set_next_used(6);
    let e = block
        .activate(mem.clone(), vec![q], interrupt.clone())
        .unwrap_err();
    assert!(e.to_string().contains("in flight"), "{e}");
    assert!(block.queue_states().is_empty());
    // Equal positions (everything returned) resume, wrapped or not.
    for pos in [0, 7, u16::MAX] {
        let mut q = make_queue(&mem, false);
        q.set_next_avail(pos);
        q.set_next_used(pos);
        block
            .activate(mem.clone(), vec![q], interrupt.clone())
            .unwrap();
        let states = block.queue_states();
        assert_eq!(states.len(), 1);
        assert_eq!((states[0].next_avail, states[0].next_used), (pos, pos));
        block.reset();
        assert!(block.queue_states().is_empty());
    }
}

/// xorshift64*: a deterministic pseudo-random sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn corrupted_block_states_never_panic() {
    let image = TempImage::new(&pattern(4));
    let base = Block::new(&image.path, false).unwrap().save();
    let mut rng = Rng(0x0b10_c0de_2024_0001);
    let flip = |rng: &mut Rng, v: u64| match rng.next() % 4 {
        0 => 0,
        1 => u64::MAX,
        2 => v ^ 1 << (rng.next() % 64),
        _ => rng.next(),
    };
    for _ in 0..300 {
        let mut s = base.clone();
        let disk = s.disk.get_or_insert_with(|| DiskIdentity {
            path: String::new(),
            size: 0,
            dev: 0,
            ino: 0,
            mtime_sec: 0,
            mtime_nsec: 0,
        });
        match rng.next() % 9 {
            0 => s.capacity = flip(&mut rng, s.capacity),
            1 => s.read_only = !s.read_only,
            2 => s.avail_features = flip(&mut rng, s.avail_features),
            3 => s.serial[(rng.next() % 20) as usize] = rng.next() as u8,
            4 => disk.size = flip(&mut rng, disk.size),
            5 => disk.ino = flip(&mut rng, disk.ino),
            6 => disk.mtime_nsec = flip(&mut rng, disk.mtime_nsec as u64) as i64,
            7 => s.disk = None,
            _ => disk.path = format!("{:x}", rng.next()),
        }
        for check in [DiskCheck::SameFile, DiskCheck::SizeOnly] {
            if let Ok(r) = Block::restore(args(&image, check), &s) {
                assert_eq!(r.capacity(), 4);
                assert_eq!(r.save().serial, s.serial);
            }
        }
    }
    // Damaged JSON is a parse error or a state the checks above judge.
    let text = serde_json::to_vec(&base).unwrap();
    for _ in 0..1000 {
        let mut bytes = text.clone();
        let i = (rng.next() % bytes.len() as u64) as usize;
        bytes[i] = rng.next() as u8;
        if let Ok(s) = serde_json::from_slice::<BlockState>(&bytes) {
            let _ = Block::restore(args(&image, DiskCheck::SameFile), &s);
        }
    }
}
