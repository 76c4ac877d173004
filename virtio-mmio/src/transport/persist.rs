//! Saved state of a virtio-mmio transport: [`MmioTransportState`] through
//! [`snapshot::Persist`].
//!
//! The state is the register file (status, feature words and their selectors, queue selector,
//! interrupt status, configuration generation), one [`MmioQueueState`] per queue (the
//! registers the driver wrote and, while the device runs, how far the device got in the rings)
//! and the device's own state as JSON ([`VirtioDevice::save_state`]).
//!
//! # Restoring
//!
//! The caller rebuilds the device model first, through the device's own `Persist` from
//! [`MmioTransportState::device_state`], and passes it with the guest memory and the interrupt
//! line in [`MmioTransportArgs`]. [`MmioTransport::restore`] then checks the saved state against
//! that device and the guest memory (see the rules on the `Persist` impl), replays
//! `ack_features` if features were accepted and, if the device was running, `activate` with
//! queues that continue from the saved ring positions. It raises no interrupt: one the saved
//! state shows pending was delivered before the snapshot (the interrupt controller's own state
//! holds it).

use log::warn;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use snapshot::Persist;
use std::sync::Arc;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Error, MmioTransport, QueueConfig};
use crate::layout::status;
use crate::{DeviceError, InterruptLine, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_BUFFER};

/// Saved state of one queue: a serde mirror of `virtio_queue::QueueState`, except that `size`
/// keeps the full 32 bits of the `QueueNum` register (a queue the driver has not enabled yet
/// may hold any value there; it is checked when the driver sets `QueueReady`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioQueueState {
    /// Maximum size the device offers (`QueueNumMax`).
    pub max_size: u16,
    /// Size the driver selected (`QueueNum`).
    pub size: u32,
    /// Whether the driver enabled the queue (`QueueReady`).
    pub ready: bool,
    /// Guest physical address of the descriptor table (`QueueDesc`).
    pub desc_table: u64,
    /// Guest physical address of the available ring (`QueueDriver`).
    pub avail_ring: u64,
    /// Guest physical address of the used ring (`QueueDevice`).
    pub used_ring: u64,
    /// Next available-ring entry the device will pop (0 unless the device runs).
    pub next_avail: u16,
    /// Next used-ring entry the device will fill (0 unless the device runs).
    pub next_used: u16,
    /// Whether the running queue uses `VIRTIO_RING_F_EVENT_IDX` (false unless the device runs).
    pub event_idx_enabled: bool,
}

impl MmioQueueState {
    /// The state of queue `config`; `live` is the device's queue when the device runs.
    fn save(config: &QueueConfig, live: Option<&QueueState>) -> Self {
        MmioQueueState {
            max_size: config.max_size,
            size: config.size,
            ready: config.ready,
            desc_table: config.desc,
            avail_ring: config.driver,
            used_ring: config.device,
            next_avail: live.map_or(0, |q| q.next_avail),
            next_used: live.map_or(0, |q| q.next_used),
            event_idx_enabled: live.is_some_and(|q| q.event_idx_enabled),
        }
    }

    fn config(&self) -> QueueConfig {
        QueueConfig {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc: self.desc_table,
            driver: self.avail_ring,
            device: self.used_ring,
        }
    }

    /// Validates an enabled queue the way `virtio_queue` does (`Queue::try_from` for sizes and
    /// alignment, `is_valid` for guest memory), plus the transport's non-null available ring.
    fn to_queue(self, index: usize, mem: &GuestMemoryMmap) -> Result<Queue, StateError> {
        let bad_size = StateError::QueueSize {
            index,
            size: self.size,
            max_size: self.max_size,
        };
        let size = u16::try_from(self.size).map_err(|_| bad_size)?;
        let queue = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size,
            ready: true,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|source| match source {
            virtio_queue::Error::InvalidSize => StateError::QueueSize {
                index,
                size: self.size,
                max_size: self.max_size,
            },
            source => StateError::QueueAddress { index, source },
        })?;
        // virtio-queue refuses to iterate an available ring at address 0.
        if self.avail_ring == 0 {
            return Err(StateError::NullAvailRing { index });
        }
        if !queue.is_valid(mem) {
            return Err(StateError::QueueOutsideMemory { index });
        }
        Ok(queue)
    }
}

/// Saved state of a virtio-mmio transport and the device behind it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MmioTransportState {
    /// Virtio device ID (`DeviceID`); the restored device must have the same.
    pub device_type: u32,
    /// Features the device offered (`DeviceFeatures`); the restored device must offer the same.
    pub device_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// Features the driver wrote (`DriverFeatures`); the accepted ones once `FEATURES_OK` is set.
    pub driver_features: u64,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The `Status` register as the driver reads it, `DEVICE_NEEDS_RESET` included.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// One entry per queue of the device, in order.
    pub queues: Vec<MmioQueueState>,
    /// The device's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

impl MmioTransportState {
    /// The device's own state as its typed `Persist::State`, e.g. a virtio-blk `BlockState`.
    pub fn device_state<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.device)
    }
}

/// What [`MmioTransport::restore`] needs from the new environment.
pub struct MmioTransportArgs {
    /// The device model, already restored from [`MmioTransportState::device_state`] (and not
    /// activated).
    pub device: Box<dyn VirtioDevice>,
    /// Guest memory, holding the restored guest RAM (the rings are checked against it).
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line.
    pub line: Arc<dyn InterruptLine>,
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The device cannot be put behind a transport at all.
    #[error("cannot build the transport: {0}")]
    Transport(#[source] Error),
    /// The restored device is of another type.
    #[error("saved device type {saved}, the restored device has type {device}")]
    DeviceType {
        /// Saved `device_type`.
        saved: u32,
        /// The device's type.
        device: u32,
    },
    /// The restored device offers other features.
    #[error("saved device features {saved:#x}, the restored device offers {device:#x}")]
    DeviceFeatures {
        /// Saved `device_features`.
        saved: u64,
        /// What the device offers.
        device: u64,
    },
    /// The number of queues differs from the device's.
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount {
        /// Saved queue count.
        saved: usize,
        /// The device's queue count.
        device: usize,
    },
    /// A queue's maximum size differs from the device's.
    #[error("queue {index}: saved maximum size {saved}, the device's is {device}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Saved `max_size`.
        saved: u16,
        /// The device's maximum size.
        device: u16,
    },
    /// The status has bits virtio does not define.
    #[error("status {0:#x} has bits virtio does not define")]
    UnknownStatusBits(u32),
    /// `DRIVER_OK` without `FEATURES_OK` on a device that does not need a reset (the transport
    /// never leaves a device in that state).
    #[error("status {0:#x}: DRIVER_OK without FEATURES_OK on a device not needing a reset")]
    DriverOkWithoutFeaturesOk(u32),
    /// Accepted features the device does not offer.
    #[error("accepted driver features {driver:#x} are not a subset of the offered {offered:#x}")]
    FeaturesNotOffered {
        /// Saved `driver_features`.
        driver: u64,
        /// Offered features.
        offered: u64,
    },
    /// Accepted features without `VIRTIO_F_VERSION_1` (a legacy driver is never accepted).
    #[error("accepted driver features {0:#x} lack VIRTIO_F_VERSION_1")]
    LegacyFeatures(u64),
    /// Interrupt status bits other than used-buffer and configuration-change.
    #[error("interrupt status {0:#x} has undefined bits")]
    InterruptStatus(u32),
    /// An enabled queue's size is zero, not a power of two or above its maximum.
    #[error("queue {index}: size {size} is zero, not a power of two or above {max_size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// Saved `size`.
        size: u32,
        /// Saved `max_size`.
        max_size: u16,
    },
    /// An enabled queue's ring address is misaligned (or its maximum size invalid).
    #[error("queue {index}: {source}")]
    QueueAddress {
        /// Queue index.
        index: usize,
        /// What `virtio_queue` refused.
        source: virtio_queue::Error,
    },
    /// An enabled queue's available ring is at address 0.
    #[error("queue {index}: available ring at address 0")]
    NullAvailRing {
        /// Queue index.
        index: usize,
    },
    /// An enabled queue's rings are not inside guest memory.
    #[error("queue {index}: rings outside guest memory")]
    QueueOutsideMemory {
        /// Queue index.
        index: usize,
    },
    /// The device popped more chains than the queue holds beyond those it returned.
    #[error(
        "queue {index}: next_avail {next_avail} is more than {size} entries ahead of \
         next_used {next_used}"
    )]
    QueuePositions {
        /// Queue index.
        index: usize,
        /// Saved `next_avail`.
        next_avail: u16,
        /// Saved `next_used`.
        next_used: u16,
        /// Queue size.
        size: u16,
    },
    /// A running queue's event-index flag differs from the negotiated `VIRTIO_RING_F_EVENT_IDX`.
    #[error("queue {index}: event_idx_enabled = {saved} contradicts the accepted features")]
    EventIdx {
        /// Queue index.
        index: usize,
        /// Saved `event_idx_enabled`.
        saved: bool,
    },
    /// Ring positions or event index on a queue the device does not run.
    #[error("queue {index}: ring positions on a queue the device does not run")]
    IdleQueueProgress {
        /// Queue index.
        index: usize,
    },
    /// The device refused the restored queues.
    #[error("the device refused the restored queues: {0}")]
    Activate(#[source] DeviceError),
}

/// Restore accepts exactly the states the transport can reach (so every snapshot of a live
/// transport restores, whatever the guest did):
///
/// - the device: same type, same offered features, same number of queues and maximum sizes;
/// - `status`: only bits virtio defines; `DRIVER_OK` without `FEATURES_OK` only together with
///   `DEVICE_NEEDS_RESET` (the transport fails the device when a driver does that);
/// - with `FEATURES_OK`: the driver features are a subset of the offered ones and include
///   `VIRTIO_F_VERSION_1` (before it, the `DriverFeatures` words may hold anything);
/// - `interrupt_status`: only the used-buffer and configuration-change bits;
/// - an enabled queue: size a power of two, not zero, at most the maximum; rings aligned
///   (16/2/4 bytes), the available ring not at 0, all three inside guest memory (the checks
///   of `virtio_queue`'s `Queue::try_from` and `is_valid`);
/// - a queue the device runs (enabled, `DRIVER_OK` and `FEATURES_OK`, no reset pending): at
///   most `size` chains popped and not yet returned (`next_avail - next_used`, wrapping) and
///   `event_idx_enabled` as negotiated; any other queue has zero positions and no event index.
///   Register values of a queue the driver has not enabled are taken as they are.
///
/// Selector registers and the configuration generation hold any value the driver can write.
impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = StateError;

    /// Saves a paused transport. The ring positions come from the device's live queues
    /// ([`VirtioDevice::queue_states`]) while it runs.
    fn save(&self) -> MmioTransportState {
        let running = self.is_activated();
        let live = if running {
            self.device.queue_states()
        } else {
            Vec::new()
        };
        if running && live.len() != self.queues.len() {
            warn!(
                "virtio-mmio: device reports {} queue states for {} queues",
                live.len(),
                self.queues.len()
            );
        }
        MmioTransportState {
            device_type: self.device.device_type(),
            device_features: self.device.avail_features(),
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| MmioQueueState::save(q, live.get(i).filter(|_| q.ready)))
                .collect(),
            device: self.device.save_state(),
        }
    }

    fn restore(args: MmioTransportArgs, s: &MmioTransportState) -> Result<Self, StateError> {
        use StateError as E;
        let MmioTransportArgs { device, mem, line } = args;
        let mut t = MmioTransport::new(device, mem, line).map_err(E::Transport)?;

        let device_type = t.device.device_type();
        if s.device_type != device_type {
            return Err(E::DeviceType {
                saved: s.device_type,
                device: device_type,
            });
        }
        let offered = t.device.avail_features();
        if s.device_features != offered {
            return Err(E::DeviceFeatures {
                saved: s.device_features,
                device: offered,
            });
        }
        if s.queues.len() != t.queues.len() {
            return Err(E::QueueCount {
                saved: s.queues.len(),
                device: t.queues.len(),
            });
        }
        for (index, (saved, config)) in s.queues.iter().zip(&t.queues).enumerate() {
            if saved.max_size != config.max_size {
                return Err(E::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device: config.max_size,
                });
            }
        }

        if s.status & !status::KNOWN != 0 {
            return Err(E::UnknownStatusBits(s.status));
        }
        let needs_reset = s.status & status::DEVICE_NEEDS_RESET != 0;
        let driver_status = s.status & !status::DEVICE_NEEDS_RESET;
        let features_ok = driver_status & status::FEATURES_OK != 0;
        let driver_ok = driver_status & status::DRIVER_OK != 0;
        if driver_ok && !features_ok && !needs_reset {
            return Err(E::DriverOkWithoutFeaturesOk(s.status));
        }
        if features_ok {
            if s.driver_features & !offered != 0 {
                return Err(E::FeaturesNotOffered {
                    driver: s.driver_features,
                    offered,
                });
            }
            if s.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err(E::LegacyFeatures(s.driver_features));
            }
        }
        if s.interrupt_status & !(INT_USED_BUFFER | INT_CONFIG_CHANGE) != 0 {
            return Err(E::InterruptStatus(s.interrupt_status));
        }

        t.driver_features = s.driver_features;
        let running = driver_ok && features_ok && !needs_reset;
        let event_idx = t.event_idx();
        let mut queues = Vec::with_capacity(s.queues.len());
        for (index, q) in s.queues.iter().enumerate() {
            let queue = if q.ready {
                Some(q.to_queue(index, &t.mem)?)
            } else {
                None
            };
            if running && q.ready {
                if q.event_idx_enabled != event_idx {
                    return Err(E::EventIdx {
                        index,
                        saved: q.event_idx_enabled,
                    });
                }
                // `to_queue` checked that the size fits in 16 bits.
                let size = q.size as u16;
                if q.next_avail.wrapping_sub(q.next_used) > size {
                    return Err(E::QueuePositions {
                        index,
                        next_avail: q.next_avail,
                        next_used: q.next_used,
                        size,
                    });
                }
            } else if q.next_avail != 0 || q.next_used != 0 || q.event_idx_enabled {
                return Err(E::IdleQueueProgress { index });
            }
            queues.push(queue);
        }

        for (config, q) in t.queues.iter_mut().zip(&s.queues) {
            *config = q.config();
        }
        t.queue_sel = s.queue_sel;
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.status = driver_status;
        t.needs_reset = needs_reset;
        t.interrupt.restore(s.interrupt_status, s.config_generation);
        if features_ok {
            t.device.ack_features(s.driver_features);
        }
        if running {
            let mut active = Vec::with_capacity(queues.len());
            for (q, config) in queues.into_iter().zip(&t.queues) {
                match q {
                    Some(q) => active.push(q),
                    None => active.push(Queue::new(config.max_size).map_err(|_| {
                        E::Transport(Error::InvalidQueueMaxSize {
                            index: active.len(),
                            max_size: config.max_size,
                        })
                    })?),
                }
            }
            t.device
                .activate(t.mem.clone(), active, t.interrupt.clone())
                .map_err(E::Activate)?;
            t.activated = true;
        }
        Ok(t)
    }
}
