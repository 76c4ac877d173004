//! Register-level tests of the transport with a recording fake device.

mod persist;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::{Interrupt, InterruptLine, VirtioDevice, INT_CONFIG_CHANGE, INT_USED_BUFFER};

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const OFFERED: u64 = VERSION_1 | EVENT_IDX | 1 << 9;

#[derive(Default)]
struct Record {
    acked: Option<u64>,
    queues: Vec<(bool, u16, u64, u64, u64, bool)>,
    /// The queues given at activation.
    live: Vec<Queue>,
    notified: Vec<u16>,
    resets: usize,
    config: [u8; 8],
    interrupt: Option<Interrupt>,
    fail_notify: bool,
    fail_activate: bool,
}

struct FakeDevice(Arc<Mutex<Record>>);

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 16]
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn ack_features(&mut self, features: u64) {
        self.0.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let rec = self.0.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = rec.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut rec = self.0.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = rec.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), DeviceError> {
        let mut rec = self.0.lock().unwrap();
        if rec.fail_activate {
            return Err(DeviceError::QueueNotReady(0));
        }
        rec.queues = queues
            .iter()
            .map(|q| {
                (
                    q.ready(),
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    q.event_idx_enabled(),
                )
            })
            .collect();
        rec.live = queues;
        rec.interrupt = Some(interrupt);
        Ok(())
    }
    fn process_queue(&mut self, queue_index: u16) -> Result<(), DeviceError> {
        let mut rec = self.0.lock().unwrap();
        if rec.fail_notify {
            return Err(DeviceError::NotActivated);
        }
        rec.notified.push(queue_index);
        if let Some(irq) = &rec.interrupt {
            irq.signal_used_queue();
        }
        Ok(())
    }
    fn reset(&mut self) {
        let mut rec = self.0.lock().unwrap();
        rec.resets += 1;
        rec.interrupt = None;
        rec.queues.clear();
        rec.live.clear();
    }
    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "config": self.0.lock().unwrap().config })
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.0
            .lock()
            .unwrap()
            .live
            .iter()
            .map(Queue::state)
            .collect()
    }
}

#[derive(Default)]
struct Line(AtomicUsize);

impl InterruptLine for Line {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fixture {
    t: MmioTransport,
    rec: Arc<Mutex<Record>>,
    line: Arc<Line>,
}

impl Fixture {
    fn new() -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rec = Arc::new(Mutex::new(Record::default()));
        let line = Arc::new(Line::default());
        let t = MmioTransport::new(Box::new(FakeDevice(rec.clone())), mem, line.clone()).unwrap();
        Fixture { t, rec, line }
    }

    fn r(&mut self, offset: u64) -> u32 {
        let mut b = [0xffu8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(&mut self, features: u64) -> bool {
        self.w(regs::STATUS, 0);
        self.w(regs::STATUS, status::ACKNOWLEDGE);
        self.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(regs::DRIVER_FEATURES_SEL, 0);
        self.w(regs::DRIVER_FEATURES, features as u32);
        self.w(regs::DRIVER_FEATURES_SEL, 1);
        self.w(regs::DRIVER_FEATURES, (features >> 32) as u32);
        let s = self.r(regs::STATUS);
        self.w(regs::STATUS, s | status::FEATURES_OK);
        self.r(regs::STATUS) & status::FEATURES_OK != 0
    }

    fn setup_queue(&mut self, sel: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.w(regs::QUEUE_SEL, sel);
        self.w(regs::QUEUE_NUM, size);
        self.w(regs::QUEUE_DESC_LOW, desc as u32);
        self.w(regs::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(regs::QUEUE_DRIVER_LOW, avail as u32);
        self.w(regs::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(regs::QUEUE_DEVICE_LOW, used as u32);
        self.w(regs::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w(regs::QUEUE_READY, 1);
    }

    fn driver_ok(&mut self) {
        let s = self.r(regs::STATUS);
        self.w(regs::STATUS, s | status::DRIVER_OK);
    }

    fn needs_reset(&mut self) -> bool {
        self.r(regs::STATUS) & status::DEVICE_NEEDS_RESET != 0
    }
}

#[test]
fn identification_registers() {
    let mut f = Fixture::new();
    assert_eq!(f.r(regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(f.r(regs::VERSION), 2);
    assert_eq!(f.r(regs::DEVICE_ID), 42);
    assert_eq!(f.r(regs::VENDOR_ID), VENDOR_ID);
    assert_eq!(f.r(regs::STATUS), 0);
    assert_eq!(f.r(regs::CONFIG_GENERATION), 0);
    assert_eq!(f.r(regs::SHM_LEN_LOW), u32::MAX);
    assert_eq!(f.r(regs::SHM_LEN_HIGH), u32::MAX);
    // Unknown register reads as zero.
    assert_eq!(f.r(0x0fc - 0x10), 0);
}

#[test]
fn invalid_accesses_are_ignored() {
    let mut f = Fixture::new();
    // Wrong sizes and misaligned register accesses read zeros.
    let mut two = [0xffu8; 2];
    f.t.read(regs::MAGIC_VALUE, &mut two);
    assert_eq!(two, [0, 0]);
    let mut four = [0xffu8; 4];
    f.t.read(regs::MAGIC_VALUE + 1, &mut four);
    assert_eq!(four, [0; 4]);
    let mut eight = [0xffu8; 8];
    f.t.read(regs::MAGIC_VALUE, &mut eight);
    assert_eq!(eight, [0; 8]);
    let mut empty: [u8; 0] = [];
    f.t.read(0, &mut empty);
    // Outside the window, including offsets that overflow.
    for offset in [0xffe, 0x1000, u64::MAX - 1, u64::MAX] {
        let mut b = [0xffu8; 4];
        f.t.read(offset, &mut b);
        assert_eq!(b, [0; 4]);
        f.t.write(offset, &[1, 0, 0, 0]);
    }
    // Odd-sized writes have no effect.
    f.t.write(regs::STATUS, &[1]);
    f.t.write(regs::STATUS, &[1, 0]);
    f.t.write(regs::STATUS + 2, &[1, 0, 0, 0]);
    f.t.write(regs::STATUS, &[]);
    assert_eq!(f.r(regs::STATUS), 0);
    // Config space accepts 1/2/4/8-byte accesses only.
    f.t.write(regs::CONFIG, &[1, 2, 3]);
    assert_eq!(f.rec.lock().unwrap().config, [0; 8]);
    // Writes to read-only registers are ignored.
    f.w(regs::MAGIC_VALUE, 0);
    f.w(regs::INTERRUPT_STATUS, 3);
    assert_eq!(f.r(regs::MAGIC_VALUE), MAGIC_VALUE);
}

#[test]
fn config_space_is_forwarded() {
    let mut f = Fixture::new();
    f.t.write(regs::CONFIG + 2, &[0xaa, 0xbb]);
    assert_eq!(f.rec.lock().unwrap().config, [0, 0, 0xaa, 0xbb, 0, 0, 0, 0]);
    let mut b = [0u8; 4];
    f.t.read(regs::CONFIG, &mut b);
    assert_eq!(b, [0, 0, 0xaa, 0xbb]);
    let mut one = [0u8; 1];
    f.t.read(regs::CONFIG + 3, &mut one);
    assert_eq!(one, [0xbb]);
    // Last bytes of the window: in range for the transport, zero from the device.
    let mut last = [0xffu8; 4];
    f.t.read(MMIO_WINDOW_SIZE - 4, &mut last);
    assert_eq!(last, [0; 4]);
}

#[test]
fn device_features_are_selected_by_word() {
    let mut f = Fixture::new();
    f.w(regs::DEVICE_FEATURES_SEL, 0);
    assert_eq!(f.r(regs::DEVICE_FEATURES), OFFERED as u32);
    f.w(regs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(f.r(regs::DEVICE_FEATURES), (OFFERED >> 32) as u32);
    f.w(regs::DEVICE_FEATURES_SEL, 2);
    assert_eq!(f.r(regs::DEVICE_FEATURES), 0);
}

#[test]
fn feature_negotiation() {
    let mut f = Fixture::new();
    // A subset including VERSION_1 is accepted and passed to the device.
    assert!(f.negotiate(VERSION_1 | EVENT_IDX));
    assert_eq!(f.rec.lock().unwrap().acked, Some(VERSION_1 | EVENT_IDX));
    // Driver features can no longer change.
    f.w(regs::DRIVER_FEATURES_SEL, 0);
    f.w(regs::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(f.t.driver_features, VERSION_1 | EVENT_IDX);

    // Features the device does not offer are refused.
    f.rec.lock().unwrap().acked = None;
    assert!(!f.negotiate(VERSION_1 | 1 << 3));
    assert_eq!(f.rec.lock().unwrap().acked, None);
    // A legacy driver (no VERSION_1) is refused.
    assert!(!f.negotiate(1 << 9));
    // Words beyond 1 are ignored.
    f.w(regs::STATUS, 0);
    f.w(regs::DRIVER_FEATURES_SEL, 2);
    f.w(regs::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(f.t.driver_features, 0);
}

#[test]
fn full_driver_init_and_notify() {
    let mut f = Fixture::new();
    assert!(f.negotiate(VERSION_1 | EVENT_IDX));
    f.w(regs::QUEUE_SEL, 0);
    assert_eq!(f.r(regs::QUEUE_NUM_MAX), 256);
    assert_eq!(f.r(regs::QUEUE_READY), 0);
    f.w(regs::QUEUE_SEL, 1);
    assert_eq!(f.r(regs::QUEUE_NUM_MAX), 16);
    f.w(regs::QUEUE_SEL, 2);
    assert_eq!(f.r(regs::QUEUE_NUM_MAX), 0);

    f.setup_queue(0, 128, 0x1000, 0x2000, 0x3000);
    assert_eq!(f.r(regs::QUEUE_READY), 1);
    assert_eq!(f.r(regs::QUEUE_DESC_LOW), 0x1000);
    // Configuration of an enabled queue is frozen.
    f.w(regs::QUEUE_NUM, 64);
    f.w(regs::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(f.r(regs::QUEUE_DESC_LOW), 0x1000);
    assert!(!f.needs_reset());

    f.driver_ok();
    assert!(f.t.is_activated());
    assert_eq!(
        f.r(regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    {
        let rec = f.rec.lock().unwrap();
        assert_eq!(rec.queues.len(), 2);
        assert_eq!(rec.queues[0], (true, 128, 0x1000, 0x2000, 0x3000, true));
        assert!(!rec.queues[1].0);
    }

    f.w(regs::QUEUE_NOTIFY, 0);
    f.w(regs::QUEUE_NOTIFY, 7); // no such queue
    f.w(regs::QUEUE_NOTIFY, 0x1_0000);
    assert_eq!(f.rec.lock().unwrap().notified, vec![0]);
    assert_eq!(f.r(regs::INTERRUPT_STATUS), INT_USED_BUFFER);
    assert_eq!(f.line.0.load(Ordering::SeqCst), 1);
    f.w(regs::INTERRUPT_ACK, INT_USED_BUFFER);
    assert_eq!(f.r(regs::INTERRUPT_STATUS), 0);

    // Reset returns everything to the initial state.
    f.w(regs::STATUS, 0);
    assert_eq!(f.r(regs::STATUS), 0);
    assert!(!f.t.is_activated());
    assert!(f.rec.lock().unwrap().resets >= 1);
    f.w(regs::QUEUE_SEL, 0);
    assert_eq!(f.r(regs::QUEUE_READY), 0);
    assert_eq!(f.r(regs::QUEUE_DESC_LOW), 0);
    // Notifications after reset are ignored.
    f.w(regs::QUEUE_NOTIFY, 0);
    assert_eq!(f.rec.lock().unwrap().notified, vec![0]);
}

#[test]
fn event_idx_follows_negotiation() {
    let mut f = Fixture::new();
    assert!(f.negotiate(VERSION_1));
    f.setup_queue(0, 256, 0x1000, 0x2000, 0x3000);
    f.driver_ok();
    assert!(!f.rec.lock().unwrap().queues[0].5);
}

#[test]
fn invalid_queue_sizes_need_reset() {
    for size in [0, 3, 512, 0x1_0000 + 16] {
        let mut f = Fixture::new();
        assert!(f.negotiate(VERSION_1));
        f.setup_queue(0, size, 0x1000, 0x2000, 0x3000);
        assert_eq!(f.r(regs::QUEUE_READY), 0, "size {size}");
        assert!(f.needs_reset(), "size {size}");
        f.driver_ok();
        assert!(!f.t.is_activated());
        assert!(f.rec.lock().unwrap().queues.is_empty());
        // No interrupt before DRIVER_OK; the driver reset recovers the device.
        f.w(regs::STATUS, 0);
        assert!(!f.needs_reset());
    }
}

#[test]
fn invalid_queue_addresses_need_reset() {
    let cases = [
        (0x1001, 0x2000, 0x3000),                // misaligned descriptor table
        (0x1000, 0x2001, 0x3000),                // misaligned available ring
        (0x1000, 0x2000, 0x3002),                // misaligned used ring
        (0x1000, 0, 0x3000),                     // available ring at 0
        (0x10_0000, 0x2000, 0x3000),             // descriptor table past the end of RAM
        (0x1000, 0x2000, 0xf_fff0),              // used ring straddles the end of RAM
        (0xffff_ffff_ffff_fff0, 0x2000, 0x3000), // overflowing descriptor table
        (0x1000, 0xffff_ffff_ffff_fffe, 0x3000), // overflowing available ring
    ];
    for (desc, avail, used) in cases {
        let mut f = Fixture::new();
        assert!(f.negotiate(VERSION_1));
        f.setup_queue(0, 256, desc, avail, used);
        assert!(f.needs_reset(), "{desc:#x} {avail:#x} {used:#x}");
        f.driver_ok();
        assert!(!f.t.is_activated());
        f.w(regs::QUEUE_NOTIFY, 0);
        assert!(f.rec.lock().unwrap().notified.is_empty());
    }
}

#[test]
fn driver_ok_without_features_ok_needs_reset() {
    let mut f = Fixture::new();
    f.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    f.setup_queue(0, 256, 0x1000, 0x2000, 0x3000);
    f.driver_ok();
    assert!(f.needs_reset());
    assert!(!f.t.is_activated());
    // DRIVER_OK is set, so the driver got a configuration-change interrupt.
    assert_eq!(f.r(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_eq!(f.line.0.load(Ordering::SeqCst), 1);
}

#[test]
fn activation_failure_needs_reset() {
    let mut f = Fixture::new();
    f.rec.lock().unwrap().fail_activate = true;
    assert!(f.negotiate(VERSION_1));
    f.setup_queue(0, 256, 0x1000, 0x2000, 0x3000);
    f.driver_ok();
    assert!(f.needs_reset());
    assert!(!f.t.is_activated());
}

#[test]
fn device_failure_needs_reset() {
    let mut f = Fixture::new();
    assert!(f.negotiate(VERSION_1));
    f.setup_queue(0, 256, 0x1000, 0x2000, 0x3000);
    f.driver_ok();
    f.rec.lock().unwrap().fail_notify = true;
    f.w(regs::QUEUE_NOTIFY, 0);
    assert!(f.needs_reset());
    assert_eq!(f.r(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    // The driver writing the status back (with NEEDS_RESET) changes nothing.
    let s = f.r(regs::STATUS);
    f.w(regs::STATUS, s);
    assert!(f.needs_reset());
    // Further notifications are not delivered to the failed device.
    f.rec.lock().unwrap().fail_notify = false;
    f.w(regs::QUEUE_NOTIFY, 0);
    assert!(f.rec.lock().unwrap().notified.is_empty());
    // Reset and re-initialization recover.
    assert!(f.negotiate(VERSION_1));
    assert!(!f.needs_reset());
    assert_eq!(f.r(regs::INTERRUPT_STATUS), 0);
    f.setup_queue(0, 256, 0x1000, 0x2000, 0x3000);
    f.driver_ok();
    f.w(regs::QUEUE_NOTIFY, 0);
    assert_eq!(f.rec.lock().unwrap().notified, vec![0]);
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let mut f = Fixture::new();
    assert!(f.negotiate(VERSION_1));
    f.w(regs::STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        f.r(regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    // The driver may still add FAILED.
    let s = f.r(regs::STATUS);
    f.w(regs::STATUS, s | status::FAILED);
    assert_eq!(f.r(regs::STATUS) & status::FAILED, status::FAILED);
}

#[test]
fn unknown_status_bits_are_dropped() {
    let mut f = Fixture::new();
    f.w(regs::STATUS, status::ACKNOWLEDGE | 0x10 | 0x20 | 0x100);
    assert_eq!(f.r(regs::STATUS), status::ACKNOWLEDGE);
    assert!(f.negotiate(VERSION_1));
    let s = f.r(regs::STATUS);
    f.w(regs::STATUS, s | 0x8000_0000);
    assert_eq!(f.r(regs::STATUS), s);
}

#[test]
fn invalid_max_size_is_rejected() {
    struct Bad;
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[100]
        }
        fn avail_features(&self) -> u64 {
            VERSION_1
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Vec<Queue>,
            _: Interrupt,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn process_queue(&mut self, _: u16) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn save_state(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let err = MmioTransport::new(Box::new(Bad), mem, Arc::new(Line::default()))
        .err()
        .unwrap();
    assert!(matches!(
        err,
        Error::InvalidQueueMaxSize {
            index: 0,
            max_size: 100
        }
    ));
}
