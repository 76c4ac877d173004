//! Well-formed requests.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestAddress;

use super::*;
use crate::block::{BlockBackend, SERIAL_LEN};

#[test]
fn config_space_and_features() {
    let image = TempImage::new(&pattern(9));
    let mut block = Block::new(&image.path, false).unwrap();
    assert_eq!(block.device_type(), 2);
    assert_eq!(block.queue_max_sizes(), &[256]);
    assert_eq!(block.capacity(), 9);
    let features = block.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);

    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 9);
    let mut word = [0u8; 4];
    block.read_config(8, &mut word);
    assert_eq!(u32::from_le_bytes(word), crate::SIZE_MAX);
    block.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), crate::SEG_MAX);
    block.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    // Past the end of the config space, and at absurd offsets: zeros, no panic.
    let mut tail = [0xffu8; 8];
    block.read_config(20, &mut tail);
    assert_eq!(tail, [0, 2, 0, 0, 0, 0, 0, 0]);
    block.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 8]);
    // The config space is read-only.
    block.write_config(0, &[0xff; 8]);
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 9);

    block.ack_features(features | 1 << 63);
    assert_eq!(block.acked_features(), features);

    // A trailing partial sector is not exposed.
    let odd = TempImage::new(&[0u8; 1000]);
    assert_eq!(Block::new(&odd.path, false).unwrap().capacity(), 1);

    let ro = Block::new(&image.path, true).unwrap();
    assert!(ro.read_only());
    assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn read_sectors() {
    let data = pattern(8);
    let mut h = Harness::new(&data, false);
    h.fill(DATA, 1024, 0);
    assert_eq!(h.simple(T_IN, 2, 1024, true), (S_OK, 1025));
    assert_eq!(h.read_mem(DATA, 1024), &data[1024..2048]);
    // The interrupt status bit is set before the line is raised.
    assert_eq!(h.interrupt.status(), virtio_mmio::INT_USED_BUFFER);
    assert_eq!(h.line.count(), 1);
}

#[test]
fn write_then_read_back() {
    let data = pattern(8);
    let mut h = Harness::new(&data, false);
    let new: Vec<u8> = (0..1024).map(|i| (i % 7) as u8 + 100).collect();
    h.mem.write_slice(&new, GuestAddress(DATA)).unwrap();
    assert_eq!(h.simple(T_OUT, 5, 1024, false), (S_OK, 1));
    let mut expected = data.clone();
    expected[5 * 512..7 * 512].copy_from_slice(&new);
    assert_eq!(h.image.contents(), expected);

    h.fill(DATA, 2048, 0);
    assert_eq!(h.simple(T_IN, 4, 2048, true), (S_OK, 2049));
    assert_eq!(h.read_mem(DATA, 2048), &expected[4 * 512..8 * 512]);
    assert_eq!(h.line.count(), 2);
}

#[test]
fn zero_length_transfer_is_ok() {
    let mut h = Harness::new(&pattern(2), false);
    assert_eq!(h.no_data(T_IN, 0), (S_OK, 1));
    assert_eq!(h.no_data(T_OUT, 2), (S_OK, 1));
}

#[test]
fn descriptor_layout_is_free() {
    // Header split in two, data over three buffers (the last one also holding the status
    // byte), as allowed by the spec.
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    h.header(HDR, T_IN, 1);
    h.desc(0, HDR, 8, F_NEXT, 1);
    h.desc(1, HDR + 8, 8, F_NEXT, 2);
    h.desc(2, DATA, 100, F_WRITE | F_NEXT, 3);
    h.desc(3, DATA + 0x1000, 0, F_WRITE | F_NEXT, 4);
    h.desc(4, DATA + 0x2000, 1024 - 100 + 1, F_WRITE, 0);
    assert_eq!(h.run(0), 1025);
    assert_eq!(h.read_mem(DATA, 100), &data[512..612]);
    assert_eq!(h.read_mem(DATA + 0x2000, 924), &data[612..1536]);
    assert_eq!(h.byte(DATA + 0x2000 + 924), S_OK);

    // A write whose header and data share one descriptor.
    let new = vec![0x5au8; 512];
    h.header(HDR, T_OUT, 3);
    h.mem.write_slice(&new, GuestAddress(HDR + 16)).unwrap();
    h.desc(5, HDR, 16 + 512, F_NEXT, 6);
    h.desc(6, STATUS, 1, F_WRITE, 0);
    assert_eq!(h.run(5), 1);
    assert_eq!(h.byte(STATUS), S_OK);
    assert_eq!(&h.image.contents()[3 * 512..], &new[..]);
}

#[test]
fn flush() {
    let mut h = Harness::new(&pattern(2), false);
    assert_eq!(h.no_data(T_FLUSH, 0), (S_OK, 1));
    let mut ro = Harness::new(&pattern(2), true);
    assert_eq!(ro.no_data(T_FLUSH, 0), (S_OK, 1));
}

#[test]
fn get_id() {
    let mut h = Harness::new(&pattern(2), false);
    h.fill(DATA, 32, 0xaa);
    assert_eq!(h.simple(T_GET_ID, 0, 20, true), (S_OK, 21));
    let id = h.read_mem(DATA, 20);
    assert!(id.starts_with(b"ssi-"));
    assert!(id[4..].iter().all(u8::is_ascii_hexdigit));
    assert_eq!(h.read_mem(DATA + 20, 12), vec![0xaa; 12]);
    // Stable for the same image, different for another one.
    let again = Block::new(&h.image.path, true).unwrap();
    assert_eq!(&again.executor.backend().serial()[..], &id[..]);
    let other = TempImage::new(&pattern(2));
    let other = Block::new(&other.path, true).unwrap();
    assert_ne!(&other.executor.backend().serial()[..], &id[..]);

    // A short buffer gets a truncated id.
    h.fill(DATA, 32, 0xaa);
    assert_eq!(h.simple(T_GET_ID, 0, 8, true), (S_OK, 9));
    assert_eq!(h.read_mem(DATA, 8), &id[..8]);
    assert_eq!(h.byte(DATA + 8), 0xaa);
}

#[test]
fn unsupported_requests() {
    let data = pattern(4);
    let mut h = Harness::new(&data, false);
    for request_type in [2, 11, 13, 14, 0x8000_0000, u32::MAX] {
        assert_eq!(h.simple(request_type, 0, 512, false), (S_UNSUPP, 1));
    }
    assert_eq!(h.image.contents(), data);
}

#[test]
fn write_to_read_only_disk_fails() {
    let data = pattern(4);
    let mut h = Harness::new(&data, true);
    h.fill(DATA, 512, 0x11);
    assert_eq!(h.simple(T_OUT, 0, 512, false), (S_IOERR, 1));
    assert_eq!(h.image.contents(), data);
    // Reads still work.
    assert_eq!(h.simple(T_IN, 1, 512, true), (S_OK, 513));
    assert_eq!(h.read_mem(DATA, 512), &data[512..1024]);
}

#[test]
fn batch_gets_one_interrupt() {
    let data = pattern(8);
    let mut h = Harness::new(&data, false);
    for i in 0..4u16 {
        let hdr = HDR + 16 * u64::from(i);
        h.header(hdr, T_IN, u64::from(i));
        h.desc(3 * i, hdr, 16, F_NEXT, 3 * i + 1);
        h.desc(
            3 * i + 1,
            DATA + 512 * u64::from(i),
            512,
            F_WRITE | F_NEXT,
            3 * i + 2,
        );
        h.desc(3 * i + 2, STATUS + u64::from(i), 1, F_WRITE, 0);
        h.push(3 * i);
    }
    h.notify().unwrap();
    assert_eq!(h.used_idx(), 4);
    for i in 0..4u16 {
        assert_eq!(h.used(i), (u32::from(3 * i), 513));
        assert_eq!(h.byte(STATUS + u64::from(i)), S_OK);
    }
    assert_eq!(h.read_mem(DATA, 2048), &data[..2048]);
    assert_eq!(h.line.count(), 1);
    // A spurious notification uses nothing and raises nothing.
    h.notify().unwrap();
    assert_eq!(h.used_idx(), 4);
    assert_eq!(h.line.count(), 1);
}

#[test]
fn used_ring_wraps() {
    let mut h = Harness::new(&pattern(2), false);
    for _ in 0..(3 * QSIZE + 3) {
        assert_eq!(h.no_data(T_FLUSH, 0), (S_OK, 1));
    }
    assert_eq!(h.used_idx(), 3 * QSIZE + 3);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = Harness::build(&pattern(4), false, MEM_SIZE, true);
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    // The driver wants an interrupt only once used idx passes 2.
    h.mem.write_obj(2u16.to_le(), used_event).unwrap();
    assert_eq!(h.no_data(T_FLUSH, 0), (S_OK, 1));
    assert_eq!(h.line.count(), 0);
    // The device publishes where it wants the next kick.
    assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 1);
    assert_eq!(h.no_data(T_FLUSH, 0), (S_OK, 1));
    assert_eq!(h.line.count(), 0);
    assert_eq!(h.no_data(T_FLUSH, 0), (S_OK, 1));
    assert_eq!(h.line.count(), 1);
    assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 3);
}

/// A backend whose every operation fails.
struct Broken(Arc<Mutex<usize>>);

impl BlockBackend for Broken {
    fn size(&self) -> u64 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, _: &mut [u8], _: u64) -> io::Result<()> {
        *self.0.lock().unwrap() += 1;
        Err(io::Error::other("disk on fire"))
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> io::Result<()> {
        *self.0.lock().unwrap() += 1;
        Err(io::Error::other("disk on fire"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
    fn serial(&self) -> [u8; SERIAL_LEN] {
        [0; SERIAL_LEN]
    }
}

#[test]
fn backend_errors_are_reported() {
    let calls = Arc::new(Mutex::new(0));
    let block = Block::with_backend(Box::new(Broken(calls.clone())));
    let mut h = Harness::with_block(block, TempImage::new(&[]), MEM_SIZE, false);
    assert_eq!(h.simple(T_IN, 0, 512, true), (S_IOERR, 1));
    assert_eq!(h.simple(T_OUT, 0, 512, false), (S_IOERR, 1));
    assert_eq!(h.no_data(T_FLUSH, 0), (S_IOERR, 1));
    assert_eq!(*calls.lock().unwrap(), 2);
}

#[test]
fn notify_rules() {
    let image = TempImage::new(&pattern(2));
    let mut block = Block::new(&image.path, false).unwrap();
    assert!(matches!(
        block.process_queue(0),
        Err(DeviceError::NotActivated)
    ));

    let mut h = Harness::with_block(block, image, MEM_SIZE, false);
    assert!(matches!(
        h.block.process_queue(1),
        Err(DeviceError::InvalidQueueIndex(1))
    ));
    h.block.reset();
    assert!(matches!(h.notify(), Err(DeviceError::NotActivated)));
}

#[test]
fn activation_checks_queues() {
    let image = TempImage::new(&pattern(2));
    let mut block = Block::new(&image.path, false).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq = Interrupt::new(Arc::new(Line::default()));
    assert!(matches!(
        block.activate(mem.clone(), vec![], irq.clone()),
        Err(DeviceError::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    let unready = Queue::new(256).unwrap();
    assert!(matches!(
        block.activate(mem.clone(), vec![unready], irq.clone()),
        Err(DeviceError::QueueNotReady(0))
    ));
    let two = vec![make_queue(&mem, false), make_queue(&mem, false)];
    assert!(block.activate(mem, two, irq).is_err());
}
