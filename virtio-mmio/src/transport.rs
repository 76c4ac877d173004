//! The virtio-mmio register file (virtio 1.x, section 4.2.2, "modern" version 2 layout).

use std::sync::Arc;

use log::{debug, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{regs, status, MAGIC_VALUE, MMIO_VERSION, MMIO_WINDOW_SIZE, VENDOR_ID};
use crate::{DeviceError, Interrupt, InterruptLine, VirtioDevice};

mod persist;

pub use persist::{MmioQueueState, MmioTransportArgs, MmioTransportState, StateError};

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device declared an impossible queue size.
    #[error("queue {index} has invalid maximum size {max_size}")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        max_size: u16,
    },
    /// The driver configured a queue size that is zero, too big or not a power of two.
    #[error("queue {index} has invalid size {size}")]
    InvalidQueueSize {
        /// Queue index.
        index: usize,
        /// Size written to `QueueNum`.
        size: u32,
    },
    /// A ring address is misaligned (or the available ring is at address 0).
    #[error("queue {index} has a misaligned or null ring address")]
    InvalidQueueAddress {
        /// Queue index.
        index: usize,
    },
    /// A ring does not lie inside guest memory.
    #[error("queue {index} has rings outside guest memory")]
    QueueOutsideMemory {
        /// Queue index.
        index: usize,
    },
    /// The driver set `DRIVER_OK` without a successful `FEATURES_OK`.
    #[error("driver set DRIVER_OK before features were accepted")]
    FeaturesNotOk,
    /// The device refused activation.
    #[error("device activation failed: {0}")]
    Activate(#[source] DeviceError),
}

/// Driver-written configuration of one queue; turned into a `virtio_queue::Queue` once the
/// driver enables it.
#[derive(Debug, Clone, Copy)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds and validates the queue against guest memory.
    fn to_queue(
        self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, Error> {
        let max_size = self.max_size;
        let mut queue =
            Queue::new(max_size).map_err(|_| Error::InvalidQueueMaxSize { index, max_size })?;
        let size = u16::try_from(self.size).map_err(|_| Error::InvalidQueueSize {
            index,
            size: self.size,
        })?;
        queue
            .try_set_size(size)
            .map_err(|_| Error::InvalidQueueSize {
                index,
                size: self.size,
            })?;
        // virtio-queue refuses to iterate an available ring at address 0.
        if self.driver == 0 {
            return Err(Error::InvalidQueueAddress { index });
        }
        let bad_addr = |_| Error::InvalidQueueAddress { index };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(bad_addr)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(bad_addr)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(bad_addr)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(Error::QueueOutsideMemory { index });
        }
        Ok(queue)
    }
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

fn half(value: u64, sel: u32) -> u32 {
    match sel {
        0 => value as u32,
        1 => (value >> 32) as u32,
        _ => 0,
    }
}

/// A virtio-mmio transport: the 4 KiB register window of one device.
///
/// The VMM forwards every guest access inside the window to [`read`](Self::read) and
/// [`write`](Self::write) (offsets relative to the window base). Accesses are handled
/// synchronously: a `QueueNotify` write processes the queue before `write` returns.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// Status bits written by the driver (only [`status::KNOWN`] bits, never
    /// `DEVICE_NEEDS_RESET`).
    status: u32,
    needs_reset: bool,
    activated: bool,
}

impl MmioTransport {
    /// Creates the transport of `device`, whose queues live in `mem`; interrupts are delivered
    /// through `line`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
    ) -> Result<Self, Error> {
        let mut queues = Vec::new();
        for (index, &max_size) in device.queue_max_sizes().iter().enumerate() {
            Queue::new(max_size).map_err(|_| Error::InvalidQueueMaxSize { index, max_size })?;
            queues.push(QueueConfig::new(max_size));
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new(line),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            needs_reset: false,
            activated: false,
        })
    }

    /// Value of the `Status` register.
    pub fn status(&self) -> u32 {
        if self.needs_reset {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device is running (`DRIVER_OK` accepted, no failure since).
    pub fn is_activated(&self) -> bool {
        self.activated && !self.needs_reset
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Handles a guest read of `data.len()` bytes at `offset` inside the window. Invalid
    /// accesses read as zeros.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !in_window(offset, data.len()) {
            warn!(
                "virtio-mmio: read of {} bytes at {offset:#x} outside the window",
                data.len()
            );
            return;
        }
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - regs::CONFIG, data);
            } else {
                warn!("virtio-mmio: config read of {} bytes ignored", data.len());
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            warn!(
                "virtio-mmio: register read of {} bytes at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` inside the window. Invalid accesses are
    /// ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if !in_window(offset, data.len()) {
            warn!(
                "virtio-mmio: write of {} bytes at {offset:#x} outside the window",
                data.len()
            );
            return;
        }
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - regs::CONFIG, data);
            } else {
                warn!("virtio-mmio: config write of {} bytes ignored", data.len());
            }
            return;
        }
        let value = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => u32::from_le_bytes(bytes),
            _ => {
                warn!(
                    "virtio-mmio: register write of {} bytes at {offset:#x} ignored",
                    data.len()
                );
                return;
            }
        };
        self.write_register(offset, value);
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.selected_queue();
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => half(self.device.avail_features(), self.device_features_sel),
            regs::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            regs::QUEUE_DESC_LOW => queue.map_or(0, |q| half(q.desc, 0)),
            regs::QUEUE_DESC_HIGH => queue.map_or(0, |q| half(q.desc, 1)),
            regs::QUEUE_DRIVER_LOW => queue.map_or(0, |q| half(q.driver, 0)),
            regs::QUEUE_DRIVER_HIGH => queue.map_or(0, |q| half(q.driver, 1)),
            regs::QUEUE_DEVICE_LOW => queue.map_or(0, |q| half(q.device, 0)),
            regs::QUEUE_DEVICE_HIGH => queue.map_or(0, |q| half(q.device, 1)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status(),
            // No shared memory regions: a length of all ones means "does not exist".
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM => self.with_unready_queue(|q| q.size = value),
            regs::QUEUE_DESC_LOW => self.with_unready_queue(|q| set_low(&mut q.desc, value)),
            regs::QUEUE_DESC_HIGH => self.with_unready_queue(|q| set_high(&mut q.desc, value)),
            regs::QUEUE_DRIVER_LOW => self.with_unready_queue(|q| set_low(&mut q.driver, value)),
            regs::QUEUE_DRIVER_HIGH => self.with_unready_queue(|q| set_high(&mut q.driver, value)),
            regs::QUEUE_DEVICE_LOW => self.with_unready_queue(|q| set_low(&mut q.device, value)),
            regs::QUEUE_DEVICE_HIGH => self.with_unready_queue(|q| set_high(&mut q.device, value)),
            regs::QUEUE_READY => self.write_queue_ready(value),
            regs::QUEUE_NOTIFY => self.notify(value),
            regs::INTERRUPT_ACK => self.interrupt.ack(value),
            regs::STATUS => self.write_status(value),
            regs::SHM_SEL => {}
            _ => warn!(
                "virtio-mmio: write of {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            warn!("virtio-mmio: driver features written after FEATURES_OK, ignored");
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            sel => warn!("virtio-mmio: driver features word {sel} ignored"),
        }
    }

    /// Applies `f` to the selected queue's configuration if it exists and is not enabled yet.
    fn with_unready_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        let sel = self.queue_sel;
        match self.queues.get_mut(sel as usize) {
            Some(q) if !q.ready => f(q),
            Some(_) => warn!("virtio-mmio: configuration of enabled queue {sel} ignored"),
            None => warn!("virtio-mmio: configuration of missing queue {sel} ignored"),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let index = self.queue_sel as usize;
        let event_idx = self.event_idx();
        let Some(config) = self.queues.get(index).copied() else {
            warn!("virtio-mmio: QueueReady of missing queue {index} ignored");
            return;
        };
        if value == 0 {
            if let Some(q) = self.queues.get_mut(index) {
                q.ready = false;
            }
            return;
        }
        match config.to_queue(index, &self.mem, event_idx) {
            Ok(_) => {
                if let Some(q) = self.queues.get_mut(index) {
                    q.ready = true;
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    fn event_idx(&self) -> bool {
        self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn notify(&mut self, value: u32) {
        if !self.is_activated() {
            debug!("virtio-mmio: notify of queue {value} while not running, ignored");
            return;
        }
        let Ok(index) = u16::try_from(value) else {
            warn!("virtio-mmio: notify of invalid queue {value}");
            return;
        };
        if usize::from(index) >= self.queues.len() {
            warn!("virtio-mmio: notify of invalid queue {value}");
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.fail(&e);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value & !status::DEVICE_NEEDS_RESET;
        if value & !status::KNOWN != 0 {
            warn!(
                "virtio-mmio: unknown status bits {:#x} ignored",
                value & !status::KNOWN
            );
            value &= status::KNOWN;
        }
        if value & self.status != self.status {
            warn!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}, ignored",
                self.status
            );
            return;
        }
        let new_bits = value & !self.status;
        if new_bits & status::FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device.ack_features(self.driver_features);
            } else {
                warn!(
                    "virtio-mmio: driver features {:#x} not acceptable (offered {:#x})",
                    self.driver_features,
                    self.device.avail_features()
                );
                value &= !status::FEATURES_OK;
            }
        }
        self.status = value;
        if new_bits & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                self.fail(&e);
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), Error> {
        if self.status & status::FEATURES_OK == 0 {
            return Err(Error::FeaturesNotOk);
        }
        if self.needs_reset {
            // A queue failed validation earlier.
            return Ok(());
        }
        let event_idx = self.event_idx();
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, config) in self.queues.iter().enumerate() {
            if config.ready {
                queues.push(config.to_queue(index, &self.mem, event_idx)?);
            } else {
                let max_size = config.max_size;
                queues.push(
                    Queue::new(max_size)
                        .map_err(|_| Error::InvalidQueueMaxSize { index, max_size })?,
                );
            }
        }
        self.device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .map_err(Error::Activate)?;
        self.activated = true;
        Ok(())
    }

    /// Marks the device as needing a reset and tells a live driver about it.
    fn fail(&mut self, error: &dyn std::error::Error) {
        warn!("virtio-mmio: device needs reset: {error}");
        if self.needs_reset {
            return;
        }
        self.needs_reset = true;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal_status_change();
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.needs_reset = false;
        self.activated = false;
        self.interrupt.clear();
    }
}

fn in_window(offset: u64, len: usize) -> bool {
    len != 0
        && u64::try_from(len)
            .ok()
            .and_then(|len| offset.checked_add(len))
            .is_some_and(|end| end <= MMIO_WINDOW_SIZE)
}

#[cfg(test)]
mod tests;
