//! Save and restore of the transport: round trips, every validation rule, forged input.

use serde::Deserialize;
use snapshot::Persist;

use super::*;
use crate::{MmioQueueState, MmioTransportArgs, MmioTransportState, StateError};

/// The fake device's own saved state, as its `save_state` writes it.
#[derive(Deserialize)]
struct FakeState {
    config: [u8; 8],
}

/// Restores `state` onto a new fake device (rebuilt from the state's device part) in fresh
/// guest memory.
fn restore(state: &MmioTransportState) -> Result<Fixture, StateError> {
    restore_with(state, Record::default())
}

fn restore_with(state: &MmioTransportState, mut record: Record) -> Result<Fixture, StateError> {
    if let Ok(fake) = state.device_state::<FakeState>() {
        record.config = fake.config;
    }
    let rec = Arc::new(Mutex::new(record));
    let line = Arc::new(Line::default());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let args = MmioTransportArgs {
        device: Box::new(FakeDevice(rec.clone())),
        mem,
        line: line.clone(),
    };
    let t = MmioTransport::restore(args, state)?;
    Ok(Fixture { t, rec, line })
}

/// A running device in the middle of its life: EVENT_IDX negotiated, queue 0 running with 5
/// chains popped and 3 returned, a pending used-buffer interrupt, one config change, and
/// selectors away from zero.
fn running() -> Fixture {
    let mut f = Fixture::new();
    assert!(f.negotiate(VERSION_1 | EVENT_IDX));
    f.setup_queue(0, 128, 0x1000, 0x2000, 0x3000);
    f.driver_ok();
    assert!(f.t.is_activated());
    f.t.write(regs::CONFIG + 1, &[0x5a]);
    f.w(regs::QUEUE_NOTIFY, 0);
    {
        let mut rec = f.rec.lock().unwrap();
        rec.live[0].set_next_avail(5);
        rec.live[0].set_next_used(3);
        rec.interrupt.as_ref().unwrap().signal_config_change();
    }
    f.w(regs::INTERRUPT_ACK, INT_CONFIG_CHANGE);
    f.w(regs::QUEUE_SEL, 1);
    f.w(regs::DEVICE_FEATURES_SEL, 1);
    f.w(regs::DRIVER_FEATURES_SEL, 1);
    f
}

/// Every register and the first config bytes, for each queue selection (leaves `QueueSel` at
/// 2, the same for any two transports compared).
fn registers(f: &mut Fixture) -> Vec<u32> {
    let mut values = Vec::new();
    for sel in 0..3 {
        for offset in (0..regs::CONFIG + 8).step_by(4) {
            values.push(f.r(offset));
        }
        f.w(regs::QUEUE_SEL, sel);
    }
    values
}

#[test]
fn running_transport_round_trip() {
    let mut f = running();
    let s = f.t.save();
    assert_eq!(s.device_type, 42);
    assert_eq!(s.device_features, OFFERED);
    assert_eq!(s.driver_features, VERSION_1 | EVENT_IDX);
    assert_eq!(
        s.status,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    assert_eq!(s.interrupt_status, INT_USED_BUFFER);
    assert_eq!(s.config_generation, 1);
    assert_eq!(
        (s.queue_sel, s.device_features_sel, s.driver_features_sel),
        (1, 1, 1)
    );
    assert_eq!(
        s.queues[0],
        MmioQueueState {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
            next_avail: 5,
            next_used: 3,
            event_idx_enabled: true,
        }
    );
    assert_eq!(
        s.queues[1],
        MmioQueueState {
            max_size: 16,
            size: 16,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
        }
    );

    let mut r = restore(&s).unwrap();
    assert_eq!(r.t.save(), s);
    assert!(r.t.is_activated());
    {
        let rec = r.rec.lock().unwrap();
        assert_eq!(rec.acked, Some(VERSION_1 | EVENT_IDX));
        assert_eq!(rec.config, [0, 0x5a, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rec.queues[0], (true, 128, 0x1000, 0x2000, 0x3000, true));
        assert!(!rec.queues[1].0);
        assert_eq!(rec.live[0].next_avail(), 5);
        assert_eq!(rec.live[0].next_used(), 3);
    }
    // No interrupt on restore; the guest sees the same registers.
    assert_eq!(r.line.0.load(Ordering::SeqCst), 0);
    assert_eq!(registers(&mut r), registers(&mut f));

    // The restored device keeps working.
    r.w(regs::QUEUE_NOTIFY, 0);
    assert_eq!(r.rec.lock().unwrap().notified, vec![0]);
    assert_eq!(r.line.0.load(Ordering::SeqCst), 1);
    r.w(regs::INTERRUPT_ACK, INT_USED_BUFFER);
    assert_eq!(r.r(regs::INTERRUPT_STATUS), 0);
    // And resets like the original.
    assert!(r.negotiate(VERSION_1));
    assert!(!r.t.is_activated());
    assert_eq!(r.rec.lock().unwrap().resets, 1);
}

#[test]
fn json_round_trip() {
    let s = running().t.save();
    let text = serde_json::to_string_pretty(&s).unwrap();
    let back: MmioTransportState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
    assert_eq!(restore(&back).unwrap().t.save(), s);
}

#[test]
fn configuring_transport_round_trip() {
    // Fresh.
    let mut f = Fixture::new();
    let s = f.t.save();
    let mut r = restore(&s).unwrap();
    assert_eq!(r.t.save(), s);
    assert_eq!(registers(&mut r), registers(&mut f));
    assert!(r.rec.lock().unwrap().acked.is_none());

    // Half-written queue registers (not enabled yet) are kept as they are, including a size
    // that only looks valid in its low 16 bits; enabling the queue then fails in both.
    let mut f = Fixture::new();
    f.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    f.w(regs::DRIVER_FEATURES, 0xffff_ffff); // not offered, but FEATURES_OK is not set yet
    f.w(regs::QUEUE_SEL, 1);
    f.w(regs::QUEUE_NUM, 0x1_0010);
    f.w(regs::QUEUE_DESC_LOW, 0x1001);
    let s = f.t.save();
    assert_eq!(s.queues[1].size, 0x1_0010);
    let mut r = restore(&s).unwrap();
    assert_eq!(r.t.save(), s);
    assert_eq!(registers(&mut r), registers(&mut f));
    for x in [&mut f, &mut r] {
        x.w(regs::QUEUE_SEL, 1);
        x.w(regs::QUEUE_READY, 1);
        assert!(x.needs_reset());
    }

    // Features accepted, queue enabled, DRIVER_OK not yet: acked again, not activated.
    let mut f = Fixture::new();
    assert!(f.negotiate(VERSION_1 | 1 << 9));
    f.setup_queue(0, 64, 0x1000, 0x2000, 0x3000);
    let s = f.t.save();
    let mut r = restore(&s).unwrap();
    assert_eq!(r.rec.lock().unwrap().acked, Some(VERSION_1 | 1 << 9));
    assert!(!r.t.is_activated());
    r.driver_ok();
    assert!(r.t.is_activated());
    assert_eq!(
        r.rec.lock().unwrap().queues[0],
        (true, 64, 0x1000, 0x2000, 0x3000, false)
    );
}

#[test]
fn failed_transport_round_trip() {
    // DRIVER_OK without FEATURES_OK: the transport fails the device; that state restores.
    let mut f = Fixture::new();
    f.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    f.driver_ok();
    assert!(f.needs_reset());
    let s = f.t.save();
    let mut r = restore(&s).unwrap();
    assert_eq!(r.t.save(), s);
    assert!(r.needs_reset());
    assert!(!r.t.is_activated());
    assert_eq!(r.r(regs::INTERRUPT_STATUS), INT_CONFIG_CHANGE);

    // A device that failed while running: saved without ring positions, restored inert.
    let mut f = running();
    f.rec.lock().unwrap().fail_notify = true;
    f.w(regs::QUEUE_NOTIFY, 0);
    assert!(f.needs_reset());
    let s = f.t.save();
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (0, 0));
    let mut r = restore(&s).unwrap();
    assert_eq!(r.t.save(), s);
    assert!(!r.t.is_activated());
    assert!(r.rec.lock().unwrap().live.is_empty());
    r.w(regs::QUEUE_NOTIFY, 0);
    assert!(r.rec.lock().unwrap().notified.is_empty());
    // The driver's reset recovers it.
    assert!(r.negotiate(VERSION_1));
    r.setup_queue(0, 256, 0x1000, 0x2000, 0x3000);
    r.driver_ok();
    r.w(regs::QUEUE_NOTIFY, 0);
    assert_eq!(r.rec.lock().unwrap().notified, vec![0]);
}

#[test]
fn reachable_odd_states_are_accepted() {
    let base = running().t.save();
    let mut s = base.clone();
    s.queue_sel = u32::MAX;
    s.device_features_sel = 7;
    s.driver_features_sel = u32::MAX;
    s.config_generation = u32::MAX;
    s.interrupt_status = INT_USED_BUFFER | INT_CONFIG_CHANGE;
    s.status |= status::FAILED;
    assert_eq!(restore(&s).unwrap().t.save(), s);
    // Popped chains not returned yet, up to the queue size, and wrapped indices.
    for (avail, used) in [(128, 0), (3, 65535 - 124), (0, 0), (65535, 65535)] {
        let mut s = base.clone();
        s.queues[0].next_avail = avail;
        s.queues[0].next_used = used;
        assert_eq!(restore(&s).unwrap().t.save(), s, "{avail} {used}");
    }
}

type Check = fn(&StateError) -> bool;
/// A field, how to spoil it, and the error that must follow.
type Case = (&'static str, Box<dyn Fn(&mut MmioTransportState)>, Check);

#[test]
fn forged_states_are_rejected() {
    use virtio_queue::Error as Q;
    use StateError as E;
    let base = running().t.save();
    let running_status = base.status;
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("size 0", Box::new(|s| s.queues[0].size = 0), |e| matches!(e, E::QueueSize { index: 0, size: 0, .. })),
        ("size 3", Box::new(|s| s.queues[0].size = 3), |e| matches!(e, E::QueueSize { size: 3, .. })),
        ("size > max", Box::new(|s| s.queues[0].size = 512), |e| matches!(e, E::QueueSize { size: 512, max_size: 256, .. })),
        ("size > u16", Box::new(|s| s.queues[0].size = 0x1_0000 + 16), |e| matches!(e, E::QueueSize { .. })),
        ("desc misaligned", Box::new(|s| s.queues[0].desc_table = 0x1008), |e| matches!(e, E::QueueAddress { index: 0, source: Q::InvalidDescTableAlign })),
        ("avail misaligned", Box::new(|s| s.queues[0].avail_ring = 0x2001), |e| matches!(e, E::QueueAddress { source: Q::InvalidAvailRingAlign, .. })),
        ("used misaligned", Box::new(|s| s.queues[0].used_ring = 0x3002), |e| matches!(e, E::QueueAddress { source: Q::InvalidUsedRingAlign, .. })),
        ("avail at 0", Box::new(|s| s.queues[0].avail_ring = 0), |e| matches!(e, E::NullAvailRing { index: 0 })),
        ("desc past RAM", Box::new(|s| s.queues[0].desc_table = 0x10_0000), |e| matches!(e, E::QueueOutsideMemory { index: 0 })),
        ("used straddles RAM end", Box::new(|s| s.queues[0].used_ring = 0xf_fff0), |e| matches!(e, E::QueueOutsideMemory { .. })),
        ("desc wraps", Box::new(|s| s.queues[0].desc_table = 0xffff_ffff_ffff_fff0), |e| matches!(e, E::QueueOutsideMemory { .. })),
        ("avail wraps", Box::new(|s| s.queues[0].avail_ring = 0xffff_ffff_ffff_fffe), |e| matches!(e, E::QueueOutsideMemory { .. })),
        ("idle queue enabled out of RAM", Box::new(|s| { s.queues[1].ready = true; s.queues[1].avail_ring = 0x2000; s.queues[1].desc_table = 0x20_0000; }), |e| matches!(e, E::QueueOutsideMemory { index: 1 })),
        ("DRIVER_OK without FEATURES_OK", Box::new(move |s| s.status = running_status & !status::FEATURES_OK), |e| matches!(e, E::DriverOkWithoutFeaturesOk(_))),
        ("unknown status bit 4", Box::new(|s| s.status |= 0x10), |e| matches!(e, E::UnknownStatusBits(_))),
        ("unknown status bit 5", Box::new(|s| s.status |= 0x20), |e| matches!(e, E::UnknownStatusBits(_))),
        ("unknown status bit 31", Box::new(|s| s.status |= 1 << 31), |e| matches!(e, E::UnknownStatusBits(_))),
        ("feature not offered", Box::new(|s| s.driver_features |= 1 << 3), |e| matches!(e, E::FeaturesNotOffered { .. })),
        ("high feature not offered", Box::new(|s| s.driver_features |= 1 << 63), |e| matches!(e, E::FeaturesNotOffered { .. })),
        ("legacy driver", Box::new(|s| s.driver_features &= !VERSION_1), |e| matches!(e, E::LegacyFeatures(_))),
        ("interrupt status", Box::new(|s| s.interrupt_status = 4), |e| matches!(e, E::InterruptStatus(4))),
        ("device type", Box::new(|s| s.device_type = 2), |e| matches!(e, E::DeviceType { saved: 2, device: 42 })),
        ("offered features", Box::new(|s| s.device_features &= !(1 << 9)), |e| matches!(e, E::DeviceFeatures { .. })),
        ("queue missing", Box::new(|s| { s.queues.pop(); }), |e| matches!(e, E::QueueCount { saved: 1, device: 2 })),
        ("queue added", Box::new(|s| s.queues.push(s.queues[1])), |e| matches!(e, E::QueueCount { saved: 3, .. })),
        ("max size", Box::new(|s| s.queues[1].max_size = 32), |e| matches!(e, E::QueueMaxSize { index: 1, saved: 32, device: 16 })),
        ("max size not a power of two", Box::new(|s| s.queues[0].max_size = 100), |e| matches!(e, E::QueueMaxSize { index: 0, .. })),
        ("more in flight than the queue holds", Box::new(|s| { s.queues[0].next_used = 10; s.queues[0].next_avail = 10 + 129; }), |e| matches!(e, E::QueuePositions { index: 0, size: 128, .. })),
        ("used ahead of avail", Box::new(|s| s.queues[0].next_used = 6), |e| matches!(e, E::QueuePositions { next_avail: 5, next_used: 6, .. })),
        ("event idx not negotiated", Box::new(|s| s.queues[0].event_idx_enabled = false), |e| matches!(e, E::EventIdx { index: 0, saved: false })),
        ("positions on a disabled queue", Box::new(|s| s.queues[1].next_avail = 1), |e| matches!(e, E::IdleQueueProgress { index: 1 })),
        ("event idx on a disabled queue", Box::new(|s| s.queues[1].event_idx_enabled = true), |e| matches!(e, E::IdleQueueProgress { index: 1 })),
        ("positions on a failed device", Box::new(|s| s.status |= status::DEVICE_NEEDS_RESET), |e| matches!(e, E::IdleQueueProgress { index: 0 })),
    ];
    for (name, spoil, check) in cases {
        let mut s = base.clone();
        spoil(&mut s);
        match restore(&s) {
            Ok(_) => panic!("{name}: forged state accepted"),
            Err(e) => assert!(check(&e), "{name}: wrong error {e:?}"),
        }
        // Every error names what is wrong.
        assert!(!restore(&s).err().unwrap().to_string().is_empty());
    }
    // The base itself is fine.
    restore(&base).unwrap();
}

#[test]
fn device_refusing_activation_fails_the_restore() {
    let s = running().t.save();
    let record = Record {
        fail_activate: true,
        ..Record::default()
    };
    let err = restore_with(&s, record).err().unwrap();
    assert!(matches!(err, StateError::Activate(_)), "{err:?}");
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

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A value of `bits` bits: often an edge case or a one-bit change of `current`.
    fn value(&mut self, current: u64, bits: u32) -> u64 {
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        let v = match self.below(6) {
            0 => 0,
            1 => mask,
            2 => current ^ (1 << self.below(u64::from(bits))),
            3 => current.wrapping_add(self.below(3)).wrapping_sub(1),
            4 => 1 << self.below(u64::from(bits)),
            _ => self.next(),
        };
        v & mask
    }
}

fn corrupt(rng: &mut Rng, s: &mut MmioTransportState) {
    let q = rng.below(s.queues.len() as u64 + 1) as usize;
    match rng.below(18) {
        0 => s.device_type = rng.value(u64::from(s.device_type), 32) as u32,
        1 => s.device_features = rng.value(s.device_features, 64),
        2 => s.device_features_sel = rng.value(u64::from(s.device_features_sel), 32) as u32,
        3 => s.driver_features = rng.value(s.driver_features, 64),
        4 => s.driver_features_sel = rng.value(u64::from(s.driver_features_sel), 32) as u32,
        5 => s.queue_sel = rng.value(u64::from(s.queue_sel), 32) as u32,
        6 => s.status = rng.value(u64::from(s.status), 32) as u32,
        7 => s.interrupt_status = rng.value(u64::from(s.interrupt_status), 32) as u32,
        8 => s.config_generation = rng.value(u64::from(s.config_generation), 32) as u32,
        f => {
            let Some(q) = s.queues.get_mut(q) else {
                s.queues.truncate(rng.below(3) as usize);
                return;
            };
            match f {
                9 => q.max_size = rng.value(u64::from(q.max_size), 16) as u16,
                10 => q.size = rng.value(u64::from(q.size), 32) as u32,
                11 => q.ready = !q.ready,
                12 => q.desc_table = rng.value(q.desc_table, 64),
                13 => q.avail_ring = rng.value(q.avail_ring, 64),
                14 => q.used_ring = rng.value(q.used_ring, 64),
                15 => q.next_avail = rng.value(u64::from(q.next_avail), 16) as u16,
                16 => q.next_used = rng.value(u64::from(q.next_used), 16) as u16,
                _ => q.event_idx_enabled = !q.event_idx_enabled,
            }
        }
    }
}

/// Drives a restored transport a little: reads, kicks, resets. Nothing may panic.
fn exercise(f: &mut Fixture) {
    registers(f);
    for q in 0..3 {
        f.w(regs::QUEUE_NOTIFY, q);
    }
    f.w(regs::INTERRUPT_ACK, 3);
    f.driver_ok();
    f.w(regs::QUEUE_SEL, 1);
    f.w(regs::QUEUE_READY, 1);
    f.w(regs::STATUS, 0);
    assert_eq!(f.r(regs::STATUS), 0);
}

#[test]
fn corrupted_states_never_panic() {
    let mut configuring = Fixture::new();
    configuring.w(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    configuring.setup_queue(1, 8, 0x8000, 0x9000, 0xa000);
    let mut failed = running();
    failed.rec.lock().unwrap().fail_notify = true;
    failed.w(regs::QUEUE_NOTIFY, 0);
    let bases = [
        running().t.save(),
        Fixture::new().t.save(),
        configuring.t.save(),
        failed.t.save(),
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut accepted = 0;
    for round in 0..3000 {
        let mut s = bases[round % bases.len()].clone();
        for _ in 0..=rng.below(3) {
            corrupt(&mut rng, &mut s);
        }
        if let Ok(mut r) = restore(&s) {
            accepted += 1;
            // Whatever restore accepts, it reproduces exactly.
            assert_eq!(r.t.save(), s, "round {round}");
            exercise(&mut r);
        }
    }
    // The loop must exercise both outcomes.
    assert!(accepted > 100 && accepted < 2900, "{accepted} accepted");

    // Byte-level damage to the JSON: a parse error or a state restore judges.
    let text = serde_json::to_vec(&bases[0]).unwrap();
    for _ in 0..2000 {
        let mut bytes = text.clone();
        for _ in 0..=rng.below(2) {
            let i = rng.below(bytes.len() as u64) as usize;
            bytes[i] = match rng.below(3) {
                0 => b"0123456789"[rng.below(10) as usize],
                1 => bytes[i] ^ 1 << rng.below(8),
                _ => rng.next() as u8,
            };
        }
        if let Ok(s) = serde_json::from_slice::<MmioTransportState>(&bytes) {
            if let Ok(mut r) = restore(&s) {
                exercise(&mut r);
            }
        }
    }
}
