//! The block device behind the virtio-mmio transport, driven through registers only.

use std::path::Path;
use std::sync::Arc;

use snapshot::Persist;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_mmio::{
    regs, status, MmioTransport, MmioTransportArgs, MmioTransportState, INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::{BlockRestoreArgs, BlockState, DiskCheck};

struct Driver {
    t: MmioTransport,
    mem: GuestMemoryMmap,
    line: Arc<Line>,
    avail_idx: u16,
}

impl Driver {
    fn new(image: &TempImage) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let line = Arc::new(Line::default());
        let block = Block::new(&image.path, false).unwrap();
        let t = MmioTransport::new(Box::new(block), mem.clone(), line.clone()).unwrap();
        Driver {
            t,
            mem,
            line,
            avail_idx: 0,
        }
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    /// The Linux virtio_mmio probe sequence, accepting VERSION_1 only.
    fn init(&mut self) {
        assert_eq!(self.r(regs::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r(regs::VERSION), 2);
        assert_eq!(self.r(regs::DEVICE_ID), 2);
        self.w(regs::STATUS, 0);
        self.w(regs::STATUS, status::ACKNOWLEDGE);
        self.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(regs::DEVICE_FEATURES_SEL, 1);
        let high = self.r(regs::DEVICE_FEATURES);
        assert_ne!(high & 1 << (VIRTIO_F_VERSION_1 - 32), 0);
        self.w(regs::DRIVER_FEATURES_SEL, 1);
        self.w(regs::DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        self.w(regs::DRIVER_FEATURES_SEL, 0);
        self.w(regs::DRIVER_FEATURES, 0);
        self.w(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(self.r(regs::STATUS) & status::FEATURES_OK, 0);
        let mut capacity = [0u8; 8];
        self.t.read(regs::CONFIG, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 4);

        self.w(regs::QUEUE_SEL, 0);
        assert_eq!(self.r(regs::QUEUE_NUM_MAX), 256);
        self.w(regs::QUEUE_NUM, u32::from(QSIZE));
        self.w(regs::QUEUE_DESC_LOW, DESC as u32);
        self.w(regs::QUEUE_DESC_HIGH, 0);
        self.w(regs::QUEUE_DRIVER_LOW, AVAIL as u32);
        self.w(regs::QUEUE_DRIVER_HIGH, 0);
        self.w(regs::QUEUE_DEVICE_LOW, USED as u32);
        self.w(regs::QUEUE_DEVICE_HIGH, 0);
        self.w(regs::QUEUE_READY, 1);
        let s = self.r(regs::STATUS);
        self.w(regs::STATUS, s | status::DRIVER_OK);
        assert!(self.t.is_activated());
        self.avail_idx = 0;
        // Fresh rings, as a driver would allocate them.
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
            .unwrap();
    }

    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + 16 * u64::from(index);
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    fn submit_read(&mut self, sector: u64) {
        self.queue_read(sector);
        self.w(regs::QUEUE_NOTIFY, 0);
    }

    /// Makes a one-sector read into `DATA` available, without notifying.
    fn queue_read(&mut self, sector: u64) {
        self.mem.write_obj(T_IN, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.desc(0, HDR, 16, F_NEXT, 1);
        self.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
        self.desc(2, STATUS, 1, F_WRITE, 0);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        self.avail_idx += 1;
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Saves transport and device, copies guest RAM as a snapshot would, and restores both
    /// (the block device from `image`, checked as `check`) in a new driver.
    fn snapshot_restore(&self, image: &Path, check: DiskCheck) -> Result<Driver, String> {
        let saved = self.t.save();
        let block_state: BlockState = saved.device_state().map_err(|e| e.to_string())?;
        let block = Block::restore(
            BlockRestoreArgs {
                path: image.to_owned(),
                check,
            },
            &block_state,
        )
        .map_err(|e| e.to_string())?;
        Self::restore_onto(&self.mem, block, &saved, self.avail_idx)
    }

    /// Restores transport state `saved` around `block`, in a copy of `mem`.
    fn restore_onto(
        mem: &GuestMemoryMmap,
        block: Block,
        saved: &MmioTransportState,
        avail_idx: u16,
    ) -> Result<Driver, String> {
        let copy = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut ram = vec![0u8; MEM_SIZE];
        mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
        copy.write_slice(&ram, GuestAddress(0)).unwrap();
        let line = Arc::new(Line::default());
        let args = MmioTransportArgs {
            device: Box::new(block),
            mem: copy.clone(),
            line: line.clone(),
        };
        let t = MmioTransport::restore(args, saved).map_err(|e| e.to_string())?;
        Ok(Driver {
            t,
            mem: copy,
            line,
            avail_idx,
        })
    }
}

#[test]
fn read_through_mmio_registers() {
    let data = pattern(4);
    let image = TempImage::new(&data);
    let mut d = Driver::new(&image);
    d.init();
    d.submit_read(2);
    assert_eq!(d.line.count(), 1);
    assert_eq!(d.r(regs::INTERRUPT_STATUS), INT_USED_BUFFER);
    d.w(regs::INTERRUPT_ACK, INT_USED_BUFFER);
    assert_eq!(d.r(regs::INTERRUPT_STATUS), 0);
    let used_idx: u16 = d.mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 1);
    let used_len: u32 = d.mem.read_obj(GuestAddress(USED + 8)).unwrap();
    assert_eq!(used_len, 513);
    let mut buf = vec![0u8; 512];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, &data[1024..1536]);
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
}

#[test]
fn corrupted_queue_needs_reset_then_recovers() {
    let data = pattern(4);
    let image = TempImage::new(&data);
    let mut d = Driver::new(&image);
    d.init();
    d.mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
    d.w(regs::QUEUE_NOTIFY, 0);
    assert_ne!(d.r(regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.r(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_eq!(d.line.count(), 1);
    // Further kicks do nothing.
    d.w(regs::QUEUE_NOTIFY, 0);
    assert_eq!(d.line.count(), 1);

    // The driver resets and starts over.
    d.init();
    assert_eq!(d.r(regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    d.submit_read(0);
    assert_eq!(d.r(regs::INTERRUPT_STATUS), INT_USED_BUFFER);
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
}

#[test]
fn queue_outside_memory_is_never_activated() {
    let image = TempImage::new(&pattern(4));
    let mut d = Driver::new(&image);
    d.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(regs::DRIVER_FEATURES_SEL, 1);
    d.w(regs::DRIVER_FEATURES, 1);
    d.w(
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    d.w(regs::QUEUE_SEL, 0);
    d.w(regs::QUEUE_DESC_LOW, 0);
    d.w(regs::QUEUE_DESC_HIGH, 0x10);
    d.w(regs::QUEUE_DRIVER_LOW, AVAIL as u32);
    d.w(regs::QUEUE_DEVICE_LOW, USED as u32);
    d.w(regs::QUEUE_READY, 1);
    d.w(
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(!d.t.is_activated());
    assert_ne!(d.r(regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    d.w(regs::QUEUE_NOTIFY, 0);
}

#[test]
fn restored_transport_continues_the_queue() {
    let data = pattern(4);
    let image = TempImage::new(&data);
    let mut d = Driver::new(&image);
    d.init();
    d.submit_read(2);
    assert_eq!(d.used_idx(), 1);
    // A second request is available but the driver has not notified yet.
    d.queue_read(3);
    let saved = d.t.save();
    assert_eq!(saved.queues[0].next_avail, 1);
    assert_eq!(saved.queues[0].next_used, 1);
    assert_eq!(saved.interrupt_status, INT_USED_BUFFER);

    let mut r = d
        .snapshot_restore(&image.path, DiskCheck::SameFile)
        .unwrap();
    assert!(r.t.is_activated());
    assert_eq!(r.t.save(), saved);
    assert_eq!(r.line.count(), 0);
    assert_eq!(r.r(regs::INTERRUPT_STATUS), INT_USED_BUFFER);
    r.w(regs::INTERRUPT_ACK, INT_USED_BUFFER);

    // The kick processes exactly the pending request, then new ones follow.
    r.mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    r.w(regs::QUEUE_NOTIFY, 0);
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.line.count(), 1);
    let mut buf = vec![0u8; 512];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, &data[1536..2048]);
    r.submit_read(1);
    assert_eq!(r.used_idx(), 3);
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, &data[512..1024]);
    let used_len: u32 = r.mem.read_obj(GuestAddress(USED + 4 + 8 * 2 + 4)).unwrap();
    assert_eq!(used_len, 513);
    let again = r.t.save();
    assert_eq!(
        (again.queues[0].next_avail, again.queues[0].next_used),
        (3, 3)
    );

    // The original, left alone, is unaffected (separate guest memory).
    assert_eq!(d.used_idx(), 1);
}

#[test]
fn restore_onto_the_wrong_disk_fails() {
    let image = TempImage::new(&pattern(4));
    let mut d = Driver::new(&image);
    d.init();
    d.submit_read(0);
    let other = TempImage::new(&pattern(4));
    let err = d
        .snapshot_restore(&other.path, DiskCheck::SameFile)
        .err()
        .unwrap();
    assert!(err.contains("inode"), "{err}");
    // A copy the caller vouches for is fine.
    let mut r = d
        .snapshot_restore(&other.path, DiskCheck::SizeOnly)
        .unwrap();
    r.submit_read(1);
    assert_eq!(r.used_idx(), 2);
    let small = TempImage::new(&pattern(3));
    let err = d
        .snapshot_restore(&small.path, DiskCheck::SizeOnly)
        .err()
        .unwrap();
    assert!(err.contains("capacity"), "{err}");
}

#[test]
fn restored_queue_with_requests_in_flight_is_refused() {
    let image = TempImage::new(&pattern(4));
    let mut d = Driver::new(&image);
    d.init();
    d.submit_read(0);
    let mut saved = d.t.save();
    // Transport-valid (one chain popped, not returned), but this device never leaves that.
    saved.queues[0].next_avail = 2;
    saved.queues[0].next_used = 1;
    let block = Block::new(&image.path, false).unwrap();
    let err = Driver::restore_onto(&d.mem, block, &saved, 2)
        .err()
        .unwrap();
    assert!(err.contains("in flight"), "{err}");
}
