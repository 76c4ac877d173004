//! The virtio-blk device model.

pub mod backend;
mod io;
mod persist;
mod request;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::atomic::Ordering;

use log::warn;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_S_IOERR,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_mmio::{DeviceError, Interrupt, VirtioDevice};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

pub use backend::{BlockBackend, DiskIdentity, FileBackend, SERIAL_LEN};
pub use io::{MAX_REQUEST_BYTES, SECTOR_SIZE, SEG_MAX, SIZE_MAX};
pub use persist::{BlockRestoreArgs, BlockState, DiskCheck, StateError};

use io::Executor;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Logical block size reported in the configuration space.
pub const BLOCK_SIZE: u32 = 512;
/// Bytes of `struct virtio_blk_config` the device fills in (up to and including `blk_size`).
const CONFIG_SIZE: usize = 24;

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk backend could not be opened.
    #[error("disk backend: {0}")]
    Backend(#[from] backend::Error),
    /// The queue rings could not be read or written.
    #[error("virtio queue is corrupted: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The available index announces buffers that cannot be popped.
    #[error("available ring announces buffers that cannot be popped")]
    StalledQueue,
    /// A (restored) queue shows requests popped and never completed: this device completes
    /// every request before `process_queue` returns, so it never leaves such a queue.
    #[error("queue has requests in flight (next_avail {next_avail}, next_used {next_used})")]
    InFlight {
        /// Next available entry.
        next_avail: u16,
        /// Next used entry.
        next_used: u16,
    },
}

impl From<Error> for DeviceError {
    fn from(e: Error) -> Self {
        DeviceError::Failed(Box::new(e))
    }
}

/// State while the driver has the device running.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
    failed: bool,
}

/// A virtio-blk device with one request queue, backed by a raw image.
pub struct Block {
    executor: Executor,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_SIZE],
    active: Option<Active>,
}

impl Block {
    /// Opens the raw image at `path` (read-write unless `read_only`) as a block device.
    pub fn new(path: impl AsRef<Path>, read_only: bool) -> Result<Self, Error> {
        let backend = FileBackend::open(path.as_ref(), read_only)?;
        Ok(Self::with_backend(Box::new(backend)))
    }

    /// Creates a block device on top of any backend.
    pub fn with_backend(backend: Box<dyn BlockBackend>) -> Self {
        let executor = Executor::new(backend);
        let mut avail_features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if executor.backend().read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[0..8].copy_from_slice(&executor.capacity().to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // 16..20: geometry, not offered.
        config[20..24].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        Block {
            executor,
            avail_features,
            acked_features: 0,
            config,
            active: None,
        }
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.executor.capacity()
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.executor.backend().read_only()
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-blk: write of {} bytes to read-only config offset {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), DeviceError> {
        if queues.len() != 1 {
            return Err(DeviceError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        if !queue.ready() {
            return Err(DeviceError::QueueNotReady(0));
        }
        if queue.next_avail() != queue.next_used() {
            return Err(Error::InFlight {
                next_avail: queue.next_avail(),
                next_used: queue.next_used(),
            }
            .into());
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            failed: false,
        });
        Ok(())
    }

    fn process_queue(&mut self, queue_index: u16) -> Result<(), DeviceError> {
        if queue_index != 0 {
            return Err(DeviceError::InvalidQueueIndex(queue_index));
        }
        let active = match self.active.as_mut() {
            Some(active) if !active.failed => active,
            _ => return Err(DeviceError::NotActivated),
        };
        active.process(&mut self.executor).map_err(|e| {
            active.failed = true;
            DeviceError::from(e)
        })
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn save_state(&self) -> serde_json::Value {
        use snapshot::Persist;
        serde_json::to_value(self.save()).unwrap_or_else(|e| {
            // Unreachable: the state is plain numbers and strings.
            warn!("virtio-blk: cannot encode the device state: {e}");
            serde_json::Value::Null
        })
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

impl Active {
    /// Handles everything available, then interrupts the driver if it wants to be.
    fn process(&mut self, executor: &mut Executor) -> Result<(), Error> {
        let mut used = false;
        let result = self.drain(executor, &mut used);
        let notify = match &result {
            // With EVENT_IDX the driver may not want an interrupt yet.
            Ok(()) => used && self.queue.needs_notification(&self.mem)?,
            // Failing: hand over what was completed anyway.
            Err(_) => used,
        };
        if notify {
            self.interrupt.signal_used_queue();
        }
        result
    }

    /// Pops and completes chains until the available ring is empty with notifications
    /// re-enabled.
    fn drain(&mut self, executor: &mut Executor, used: &mut bool) -> Result<(), Error> {
        let mut expect_more = false;
        loop {
            self.queue.disable_notification(&self.mem)?;
            let mut popped = 0usize;
            loop {
                // A bad available index is an error here, not a silent "nothing to do".
                let next = self.queue.iter(&self.mem)?.next();
                let Some(chain) = next else { break };
                let head = chain.head_index();
                let len = handle_chain(executor, &self.mem, chain);
                self.queue.add_used(&self.mem, head, len)?;
                *used = true;
                popped += 1;
            }
            // The previous round saw buffers that this round could not pop: the ring is
            // unreadable, so stop instead of spinning.
            if expect_more && popped == 0 {
                return Err(Error::StalledQueue);
            }
            expect_more = self.queue.enable_notification(&self.mem)?;
            if !expect_more {
                return Ok(());
            }
        }
    }
}

/// Parses and executes one chain; returns the used length (bytes written to the guest).
fn handle_chain(
    executor: &mut Executor,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let head = chain.head_index();
    let parsed = request::parse(chain, mem);
    let Some(status_addr) = parsed.status else {
        if let Err(e) = parsed.request {
            warn!("virtio-blk: dropping request {head} without status byte: {e}");
        }
        return 0;
    };
    let (status, written) = match parsed.request {
        Ok(request) => executor.execute(mem, &request),
        Err(e) => {
            warn!("virtio-blk: malformed request {head}: {e}");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    match mem.store(status, status_addr, Ordering::Release) {
        Ok(()) => written + 1,
        Err(e) => {
            warn!("virtio-blk: cannot write status of request {head}: {e}");
            0
        }
    }
}
