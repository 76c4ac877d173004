//! Tests of the block device: a hand-made split virtqueue in a `GuestMemoryMmap` and a raw
//! image in the temporary directory.

mod hostile;
mod persist;
mod requests;
mod transport;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_mmio::{DeviceError, Interrupt, InterruptLine, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Block, FileBackend};

pub const MEM_SIZE: usize = 0x10_0000;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const HDR: u64 = 0x4000;
pub const STATUS: u64 = 0x5000;
pub const DATA: u64 = 0x1_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Status byte value the device never writes, to detect untouched status buffers.
pub const UNTOUCHED: u8 = 0xee;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A raw image in the temporary directory, deleted on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(contents: &[u8]) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "virtio-blk-dist-test-{}-{n}.img",
            std::process::id()
        ));
        std::fs::write(&path, contents).unwrap();
        TempImage { path }
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `sectors` sectors of recognizable, sector-dependent data.
pub fn pattern(sectors: usize) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| ((i / 512) * 31 + i % 251) as u8)
        .collect()
}

#[derive(Default)]
pub struct Line(AtomicUsize);

impl Line {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A ready split queue of `QSIZE` entries at `DESC`/`AVAIL`/`USED`.
pub fn make_queue(mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
    let mut q = Queue::new(super::QUEUE_SIZE).unwrap();
    q.try_set_size(QSIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_event_idx(event_idx);
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// An activated `Block` plus the driver side of its queue.
pub struct Harness {
    pub mem: GuestMemoryMmap,
    pub block: Block,
    pub line: Arc<Line>,
    pub interrupt: Interrupt,
    pub image: TempImage,
    avail_idx: u16,
}

impl Harness {
    pub fn new(contents: &[u8], read_only: bool) -> Self {
        Self::build(contents, read_only, MEM_SIZE, false)
    }

    pub fn build(contents: &[u8], read_only: bool, mem_size: usize, event_idx: bool) -> Self {
        let image = TempImage::new(contents);
        let block = Block::new(&image.path, read_only).unwrap();
        Self::with_block(block, image, mem_size, event_idx)
    }

    pub fn with_block(
        mut block: Block,
        image: TempImage,
        mem_size: usize,
        event_idx: bool,
    ) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
        let line = Arc::new(Line::default());
        let interrupt = Interrupt::new(line.clone());
        block
            .activate(
                mem.clone(),
                vec![make_queue(&mem, event_idx)],
                interrupt.clone(),
            )
            .unwrap();
        Harness {
            mem,
            block,
            line,
            interrupt,
            image,
            avail_idx: 0,
        }
    }

    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC + 16 * u64::from(index));
        self.mem.write_obj(addr.to_le(), base).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(base.0 + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(base.0 + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(base.0 + 14))
            .unwrap();
    }

    pub fn header(&self, addr: u64, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type.to_le(), GuestAddress(addr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }

    /// Makes the chain at `head` available (without notifying).
    pub fn push(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn notify(&mut self) -> Result<(), DeviceError> {
        self.block.process_queue(0)
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    /// Used ring entry `n`: (descriptor id, length).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(n % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn fill(&self, addr: u64, len: usize, value: u8) {
        self.mem
            .write_slice(&vec![value; len], GuestAddress(addr))
            .unwrap();
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Submits the chain at `head`, notifies, and returns the used length of that chain.
    pub fn run(&mut self, head: u16) -> u32 {
        let before = self.used_idx();
        self.push(head);
        self.notify().unwrap();
        assert_eq!(
            self.used_idx(),
            before.wrapping_add(1),
            "chain was not used"
        );
        let (id, len) = self.used(before);
        assert_eq!(id, u32::from(head));
        len
    }

    /// Sets up the common three-descriptor request `header | data | status` at descriptors
    /// 0, 1, 2 (data is device-writable if `data_writable`), runs it, and returns
    /// (status byte, used length).
    pub fn simple(
        &mut self,
        request_type: u32,
        sector: u64,
        data_len: u32,
        data_writable: bool,
    ) -> (u8, u32) {
        self.header(HDR, request_type, sector);
        self.desc(0, HDR, 16, F_NEXT, 1);
        let flags = if data_writable {
            F_WRITE | F_NEXT
        } else {
            F_NEXT
        };
        self.desc(1, DATA, data_len, flags, 2);
        self.desc(2, STATUS, 1, F_WRITE, 0);
        self.fill(STATUS, 1, UNTOUCHED);
        let len = self.run(0);
        (self.byte(STATUS), len)
    }

    /// `header | status` (no data) at descriptors 0 and 1.
    pub fn no_data(&mut self, request_type: u32, sector: u64) -> (u8, u32) {
        self.header(HDR, request_type, sector);
        self.desc(0, HDR, 16, F_NEXT, 1);
        self.desc(1, STATUS, 1, F_WRITE, 0);
        self.fill(STATUS, 1, UNTOUCHED);
        let len = self.run(0);
        (self.byte(STATUS), len)
    }
}
