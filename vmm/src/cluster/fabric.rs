//! The runtime links between the hosts of one machine.
//!
//! - Interrupt messages ([`irqchip::RemoteIrq`]): an IPI or IOAPIC message that may target a
//!   vCPU of another host is sent there as `Ipi` and matched against that host's own local
//!   APICs (physical destinations go to the one host that has the vCPU; logical, broadcast and
//!   shorthand destinations go to every other host). A lowest-priority message with a logical or
//!   broadcast destination must reach one APIC only: it is delivered on the sending host if one
//!   of its APICs matches, else passed host by host around the ring (host order) until one
//!   matches or it is back at its origin. Level-triggered EOIs go to the IOAPIC's home (the
//!   placement's `ioapic_home`, host 0 by default) as `Eoi`.
//! - Forwarded I/O: every device has a home host in the [`Placement`] (serial and PIO at the
//!   console home, the IOAPIC at its home, both host 0 by default; each virtio-blk disk where
//!   its config says); a PIO or MMIO exit (other than the local APIC) on
//!   another host becomes an `Mmio`/`Pio` request to the home, answered with `IoReply`. Each
//!   host serves them on its own `io-server` thread (queue bounded by [`IO_QUEUE`]), never on a
//!   transport thread, because device emulation touches guest RAM and may fault on a page that
//!   the transport must bring in. A device whose home lacks the IOAPIC raises `IrqPulse` to
//!   the IOAPIC's home.
//! - Stop: the first stop on any host is sent to every other host as `Stop`; a host that dies
//!   (transport `Down`) stops the others with an error naming it.
//!
//! ```text
//!  host 1: vCPU 1 writes ICR          host 0: vCPU 0                host 0: io-server
//!   |-- Ipi{dest 0, vec 0xfb} -------->| LAPIC 0 IRR, kick            |
//!   |-- Mmio{0xd0000050, write} (request) ------------------------------>| virtio notify
//!   |<------------------------------------------------------ IoReply ----|
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use irqchip::{DeliveryMode, IrqChip, RemoteIrq, Shorthand};
use proto::{HostId, Message, Service, IPI_FROM_DEVICE, IPI_LOGICAL, IPI_X2APIC};
use transport::{Handler, PeerEvent, Responder, Transport};

use super::Placement;
use crate::devices::Devices;
use crate::stop::{StopReason, Stopper};

/// How long a forwarded I/O access may wait for its device host.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the fabric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A forwarded access failed.
    #[error("forwarded I/O to the device's home host failed: {0}")]
    Forward(String),
}

/// Forwarded device accesses of one host (for `status` and the tests that prove forwarding).
#[derive(Debug, Default)]
pub struct IoCounters {
    /// MMIO/PIO accesses this host forwarded to a device's home host.
    pub forwarded: AtomicU64,
    /// Accesses forwarded by other hosts that this host accepted to serve.
    pub served: AtomicU64,
}

/// Links of one host to the others.
pub struct Fabric {
    transport: Arc<dyn Transport>,
    me: usize,
    hosts: usize,
    cpu_host: Vec<usize>,
    /// Where level EOIs and device pulses go (the placement's `ioapic_home`).
    ioapic_home: usize,
    io: Arc<IoCounters>,
}

impl Fabric {
    /// The fabric of host `me` under `placement` (its hosts, vCPU hosts and IOAPIC home).
    pub fn new(transport: Arc<dyn Transport>, me: usize, placement: &Placement) -> Self {
        Fabric {
            transport,
            me,
            hosts: usize::from(placement.hosts),
            cpu_host: placement.cpu_hosts(),
            ioapic_home: usize::from(placement.ioapic_home),
            io: Arc::default(),
        }
    }

    /// This host's forwarded-I/O counters.
    pub fn io_counters(&self) -> Arc<IoCounters> {
        self.io.clone()
    }

    /// This host's index.
    pub fn me(&self) -> usize {
        self.me
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.hosts).filter(move |h| *h != self.me)
    }

    fn send_to(&self, host: usize, msg: Message) {
        if let Err(e) = self.transport.send(HostId(host as u16), msg) {
            log::warn!("send to host {host}: {e}");
        }
    }

    /// Sends a message to every other host (best effort).
    pub fn broadcast(&self, msg: &Message) {
        for h in self.others() {
            self.send_to(h, msg.clone());
        }
    }

    /// Performs an I/O access on the device's home host `home` and returns the value read (0
    /// for writes).
    pub fn forward(&self, home: usize, msg: Message) -> Result<u64, Error> {
        self.io.forwarded.fetch_add(1, Ordering::Relaxed);
        match self.transport.request(HostId(home as u16), msg, IO_TIMEOUT) {
            Ok(Message::IoReply { data }) => Ok(data),
            Ok(other) => Err(Error::Forward(format!("unexpected reply {}", other.name()))),
            Err(e) => Err(Error::Forward(e.to_string())),
        }
    }
}

/// Encodes an APIC bus message for the wire.
pub fn ipi_to_wire(msg: &irqchip::Message, from: Option<usize>) -> Message {
    let sh = msg.shorthand.to_bits();
    Message::Ipi {
        dest_apic: msg.dest,
        vector: msg.vector,
        delivery: msg.mode.to_bits(),
        level: msg.level,
        flags: (u8::from(msg.logical) * IPI_LOGICAL)
            | (sh << 1)
            | (u8::from(msg.x2apic) * IPI_X2APIC),
        source: from.map(|f| f as u32).unwrap_or(IPI_FROM_DEVICE),
    }
}

/// Decodes a wire `Ipi` (None if it is not one or is out of range).
pub fn ipi_from_wire(m: &Message) -> Option<(irqchip::Message, Option<usize>)> {
    let Message::Ipi {
        dest_apic,
        vector,
        delivery,
        level,
        flags,
        source,
    } = m
    else {
        return None;
    };
    let shorthand = Shorthand::from_bits(u32::from(flags >> 1));
    let msg = irqchip::Message {
        vector: *vector,
        mode: DeliveryMode::from_bits(u32::from(*delivery)),
        level: *level,
        dest: if flags & IPI_X2APIC != 0 {
            *dest_apic
        } else {
            u32::from(u8::try_from(*dest_apic).ok()?)
        },
        logical: flags & IPI_LOGICAL != 0,
        shorthand,
        x2apic: flags & IPI_X2APIC != 0,
    };
    let from = (*source != IPI_FROM_DEVICE).then_some(*source as usize);
    Some((msg, from))
}

impl RemoteIrq for Fabric {
    fn send(&self, msg: &irqchip::Message, from: Option<usize>) {
        let wire = ipi_to_wire(msg, from);
        match msg.shorthand {
            Shorthand::SelfOnly => {}
            Shorthand::None if !msg.logical && !msg.is_broadcast() => {
                if let Some(&h) = usize::try_from(msg.dest)
                    .ok()
                    .and_then(|d| self.cpu_host.get(d))
                {
                    if h != self.me {
                        self.send_to(h, wire);
                    }
                }
            }
            _ => self.broadcast(&wire),
        }
    }

    fn eoi(&self, vector: u8) {
        self.send_to(self.ioapic_home, Message::Eoi { vector });
    }

    fn pulse(&self, pin: u32) {
        match u8::try_from(pin) {
            Ok(pin) => self.send_to(self.ioapic_home, Message::IrqPulse { pin }),
            Err(_) => log::warn!("IOAPIC pin {pin} out of range; interrupt dropped"),
        }
    }

    fn pass_on(&self, msg: &irqchip::Message, from: Option<usize>) {
        match self.next_in_ring(from) {
            Some(h) => self.send_to(h, ipi_to_wire(msg, from)),
            None => log::debug!("lowest-priority message {msg:?} matched no APIC on any host"),
        }
    }
}

impl Fabric {
    /// The host after this one in host order (wrapping) unless that is the host where a
    /// message from `from` started: the sending vCPU's host, or the IOAPIC's home for devices.
    /// None also for a sender that is no vCPU of the machine.
    fn next_in_ring(&self, from: Option<usize>) -> Option<usize> {
        let origin = match from {
            Some(cpu) => *self.cpu_host.get(cpu)?,
            None => self.ioapic_home,
        };
        let next = (self.me + 1) % self.hosts.max(1);
        (next != origin && next != self.me).then_some(next)
    }
}

/// The stop reason as carried by a `Stop` message.
pub fn stop_to_wire(r: &StopReason) -> String {
    match r {
        StopReason::PowerOff => "poweroff".into(),
        StopReason::Reset => "reset".into(),
        StopReason::TripleFault => "triple-fault".into(),
        StopReason::Snapshotted(dir) => format!("snapshotted: {dir}"),
        StopReason::Error(e) => format!("error: {e}"),
    }
}

/// The stop reason of a `Stop` message from host `from`.
pub fn stop_from_wire(s: &str, from: usize) -> StopReason {
    match s {
        "poweroff" => StopReason::PowerOff,
        "reset" => StopReason::Reset,
        "triple-fault" => StopReason::TripleFault,
        e if e.starts_with("snapshotted: ") => {
            StopReason::Snapshotted(e["snapshotted: ".len()..].to_string())
        }
        e => StopReason::Error(format!(
            "host {from} stopped the machine: {}",
            e.strip_prefix("error: ").unwrap_or(e)
        )),
    }
}

/// Receives `Ipi` messages.
pub struct VcpuService {
    /// The interrupt fabric of this host.
    pub chip: Arc<IrqChip>,
}

impl Handler for VcpuService {
    fn on_message(&self, from: HostId, msg: Message, _r: Option<Responder>) {
        match ipi_from_wire(&msg) {
            Some((m, source)) => self.chip.deliver_from_remote(&m, source),
            None => log::warn!("host {}: bad vCPU message {}", from.0, msg.name()),
        }
    }
}

/// Work for a host's io-server thread.
pub type IoWork = (Message, Option<Responder>);

/// Forwarded accesses waiting for the io-server at most. Each remote vCPU has at most one
/// outstanding (its thread waits for the answer), so only a broken or hostile peer fills it;
/// beyond it requests are answered `ERR_BUSY` instead of queued without bound.
pub const IO_QUEUE: usize = 1024;

/// Receives `Eoi` and forwarded I/O.
pub struct IoService {
    /// The interrupt fabric of this host.
    pub chip: Arc<IrqChip>,
    /// Queue of the io-server thread, [`IO_QUEUE`] long.
    pub queue: mpsc::SyncSender<IoWork>,
    /// Counts the accesses accepted.
    pub io: Arc<IoCounters>,
}

impl Handler for IoService {
    fn on_message(&self, from: HostId, msg: Message, r: Option<Responder>) {
        match msg {
            Message::Eoi { vector } => self.chip.eoi(vector),
            Message::IrqPulse { pin } => {
                if usize::from(pin) < irqchip::ioapic::NUM_PINS {
                    self.chip.pulse(u32::from(pin));
                } else {
                    log::warn!("host {}: IrqPulse for pin {pin} ignored", from.0);
                }
            }
            Message::Mmio { .. } | Message::Pio { .. } => match self.queue.try_send((msg, r)) {
                Ok(()) => {
                    self.io.served.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::TrySendError::Full((msg, r))) => {
                    log::warn!(
                        "host {}: io-server queue full, refusing {}",
                        from.0,
                        msg.name()
                    );
                    if let Some(r) = r {
                        let _ = r.reply(Message::Error {
                            code: Message::ERR_BUSY,
                            message: "io-server queue full".into(),
                        });
                    }
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    log::debug!("io-server gone; dropping I/O from host {}", from.0);
                }
            },
            other => log::warn!("host {}: unexpected I/O message {}", from.0, other.name()),
        }
    }
}

/// Serves the I/O forwarded to this host's devices until the VM stops.
pub fn io_server(rx: mpsc::Receiver<IoWork>, devices: Arc<Devices>, stop: Arc<Stopper>) {
    while !stop.stopped() {
        let (msg, r) = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(w) => w,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let data = match msg {
            Message::Pio {
                port,
                size,
                write,
                data,
            } => {
                let n = usize::from(size.clamp(1, 4));
                let bytes = data.to_le_bytes();
                if write {
                    devices.local_pio_write(port, &bytes[..n]);
                    0
                } else {
                    let mut b = [0u8; 4];
                    devices.local_pio_read(port, &mut b[..n]);
                    u64::from(u32::from_le_bytes(b))
                }
            }
            Message::Mmio {
                addr,
                size,
                write,
                data,
            } => {
                let n = usize::from(size.clamp(1, 8));
                let bytes = data.to_le_bytes();
                if write {
                    devices.local_mmio_write(addr, &bytes[..n]);
                    0
                } else {
                    let mut b = [0u8; 8];
                    devices.local_mmio_read(addr, &mut b[..n]);
                    u64::from_le_bytes(b)
                }
            }
            _ => continue,
        };
        if let Some(r) = r {
            if let Err(e) = r.reply(Message::IoReply { data }) {
                log::debug!("I/O reply: {e}");
            }
        }
    }
}

/// Receives `Stop` and `Status`, and watches peers.
pub struct ControlService {
    /// This host's stop flag.
    pub stop: Arc<Stopper>,
    /// Latest status JSON per host (kept on the status home).
    pub status: Arc<Mutex<BTreeMap<u32, String>>>,
}

impl Handler for ControlService {
    fn on_message(&self, from: HostId, msg: Message, r: Option<Responder>) {
        match msg {
            Message::Stop { reason } => {
                let why = stop_from_wire(&reason, from.0 as usize);
                log::info!("host {} stopped the machine ({reason})", from.0);
                self.stop.request_quiet(why);
            }
            Message::Status { json } => {
                self.status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(u32::from(from.0), json);
            }
            Message::Ping { nonce } => {
                if let Some(r) = r {
                    let _ = r.reply(Message::Pong { nonce });
                }
            }
            other => log::debug!("host {}: control message {}", from.0, other.name()),
        }
    }

    fn on_peer_event(&self, event: &PeerEvent) {
        if let PeerEvent::Down { peer, reason } = event {
            if !self.stop.stopped() {
                log::error!("host {} is gone ({reason}); stopping the machine", peer.0);
                self.stop.request(StopReason::Error(format!(
                    "host {} died or became unreachable: {reason}",
                    peer.0
                )));
            }
        }
    }
}

/// Registers the fabric's services on `transport`.
pub fn register(
    transport: &Arc<dyn Transport>,
    chip: Arc<IrqChip>,
    stop: Arc<Stopper>,
    io_queue: mpsc::SyncSender<IoWork>,
    io: Arc<IoCounters>,
    status: Arc<Mutex<BTreeMap<u32, String>>>,
) {
    transport.register(Service::Vcpu, Arc::new(VcpuService { chip: chip.clone() }));
    transport.register(
        Service::Io,
        Arc::new(IoService {
            chip,
            queue: io_queue,
            io,
        }),
    );
    transport.register(Service::Control, Arc::new(ControlService { stop, status }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipi_wire_round_trip() {
        for (sh, logical, from, x2apic, dest) in [
            (Shorthand::None, false, Some(1), false, 3),
            (Shorthand::AllExcludingSelf, false, Some(0), false, 3),
            (Shorthand::None, true, None, false, 3),
            (Shorthand::AllIncludingSelf, true, Some(7), false, 3),
            (Shorthand::None, false, Some(1), true, 300),
            (Shorthand::None, true, Some(1), true, 0x0002_0001),
            (Shorthand::None, false, None, true, 0xffff_ffff),
        ] {
            let m = irqchip::Message {
                vector: 0xfb,
                mode: DeliveryMode::Init,
                level: true,
                dest,
                logical,
                shorthand: sh,
                x2apic,
            };
            let w = ipi_to_wire(&m, from);
            let b = Message::decode(&w.to_bytes()).unwrap();
            assert_eq!(ipi_from_wire(&b), Some((m, from)));
        }
        let bad = Message::Ipi {
            dest_apic: 300,
            vector: 1,
            delivery: 0,
            level: false,
            flags: 0,
            source: 0,
        };
        assert_eq!(ipi_from_wire(&bad), None);
    }

    #[derive(Default)]
    struct Replies(Mutex<Vec<(u64, Message)>>);
    impl transport::ResponseSink for Replies {
        fn send_response(
            &self,
            _to: HostId,
            id: u64,
            msg: Message,
        ) -> Result<(), transport::Error> {
            self.0.lock().unwrap().push((id, msg));
            Ok(())
        }
    }

    #[test]
    fn a_full_io_queue_refuses_requests_instead_of_growing() {
        let (tx, rx) = mpsc::sync_channel(2);
        let io = IoService {
            chip: Arc::new(IrqChip::new(1)),
            queue: tx,
            io: Arc::default(),
        };
        let sink = Arc::new(Replies::default());
        let weak: std::sync::Weak<dyn transport::ResponseSink> =
            Arc::downgrade(&(sink.clone() as Arc<dyn transport::ResponseSink>));
        for id in 1..=3 {
            let pio = Message::Pio {
                port: 0x3f8,
                size: 1,
                write: false,
                data: 0,
            };
            let r = transport::Responder::new(weak.clone(), HostId(1), id);
            io.on_message(HostId(1), pio, Some(r));
        }
        {
            let replies = sink.0.lock().unwrap();
            assert!(
                matches!(replies.as_slice(), [(3, Message::Error { code, .. })] if *code == Message::ERR_BUSY),
                "{replies:?}"
            );
        }
        let queued: Vec<_> = rx.try_iter().collect();
        assert_eq!(queued.len(), 2);
        assert_eq!(
            io.io.served.load(Ordering::Relaxed),
            2,
            "refused ones are not counted"
        );
    }

    /// Messages in flight between test hosts: (from, to, message).
    type Wire = Arc<Mutex<Vec<(u16, u16, Message)>>>;

    /// In-process transport between test hosts: sends are queued and delivered by `pump`.
    struct Mesh {
        me: u16,
        queue: Wire,
    }
    impl Transport for Mesh {
        fn local(&self) -> HostId {
            HostId(self.me)
        }
        fn peers(&self) -> Vec<HostId> {
            Vec::new()
        }
        fn send(&self, to: HostId, msg: Message) -> Result<(), transport::Error> {
            self.queue.lock().unwrap().push((self.me, to.0, msg));
            Ok(())
        }
        fn request(
            &self,
            to: HostId,
            _: Message,
            _: Duration,
        ) -> Result<Message, transport::Error> {
            Err(transport::Error::PeerDown(to))
        }
        fn register(&self, _: Service, _: Arc<dyn Handler>) {}
        fn unregister(&self, _: Service) {}
        fn is_up(&self, _: HostId) -> bool {
            true
        }
    }

    /// `n` hosts with one vCPU each; vCPU i has the flat logical ID 1 << i.
    fn ring(n: u8) -> (Vec<Arc<IrqChip>>, Wire) {
        ring_with_ioapic(n, 0)
    }

    /// `n` hosts with one vCPU each, the IOAPIC on host `ioapic_home`.
    fn ring_with_ioapic(n: u8, ioapic_home: u16) -> (Vec<Arc<IrqChip>>, Wire) {
        let queue = Arc::new(Mutex::new(Vec::new()));
        let mut placement = Placement::initial(&vec![1; usize::from(n)], &[], 0, 1);
        placement.ioapic_home = ioapic_home;
        let chips: Vec<Arc<IrqChip>> = (0..n)
            .map(|h| {
                let local = (0..n).map(|i| i == h).collect();
                let ioapic_local = u16::from(h) == ioapic_home;
                let chip = Arc::new(IrqChip::with_local(n, local, ioapic_local));
                let l = &chip.lapics[usize::from(h)];
                let now = std::time::Instant::now();
                l.lock().write(0xf0, 0x1ff, now);
                l.lock().write(0xd0, 1 << (24 + h), now);
                let mesh = Arc::new(Mesh {
                    me: u16::from(h),
                    queue: queue.clone(),
                });
                let fabric = Fabric::new(mesh, usize::from(h), &placement);
                chip.set_remote(Arc::new(fabric));
                chip
            })
            .collect();
        (chips, queue)
    }

    /// Delivers queued messages until none is left; returns how many hops there were.
    fn pump(chips: &[Arc<IrqChip>], queue: &Mutex<Vec<(u16, u16, Message)>>) -> usize {
        let mut hops = 0;
        loop {
            let batch: Vec<_> = std::mem::take(&mut *queue.lock().unwrap());
            if batch.is_empty() {
                return hops;
            }
            for (from, to, msg) in batch {
                hops += 1;
                assert!(hops < 100, "message loops between hosts");
                let chip = chips[usize::from(to)].clone();
                if matches!(msg, Message::Eoi { .. } | Message::IrqPulse { .. }) {
                    let (queue, _) = mpsc::sync_channel(1);
                    let io = Arc::default();
                    IoService { chip, queue, io }.on_message(HostId(from), msg, None);
                } else {
                    VcpuService { chip }.on_message(HostId(from), msg, None);
                }
            }
        }
    }

    fn pending(chips: &[Arc<IrqChip>]) -> Vec<Option<u8>> {
        chips
            .iter()
            .enumerate()
            .map(|(h, c)| c.lapics[h].lock().deliverable())
            .collect()
    }

    #[test]
    fn a_lowest_priority_message_reaches_exactly_one_apic_across_hosts() {
        let lowest = |dest: u32| irqchip::Message {
            vector: 0x40,
            mode: DeliveryMode::LowestPriority,
            level: false,
            dest,
            logical: true,
            shorthand: Shorthand::None,
            x2apic: false,
        };
        // From the IOAPIC (host 0) to vCPUs 1 and 2: host 0 has no match, host 1 takes it and
        // host 2 never sees it.
        let (chips, q) = ring(3);
        chips[0].deliver(&lowest(0b110), None);
        assert_eq!(pump(&chips, &q), 1);
        assert_eq!(pending(&chips), vec![None, Some(0x40), None]);
        // From vCPU 1 to vCPU 0 only: host 1 -> host 2 -> host 0.
        let (chips, q) = ring(3);
        chips[1].deliver(&lowest(0b001), Some(1));
        assert_eq!(pump(&chips, &q), 2);
        assert_eq!(pending(&chips), vec![Some(0x40), None, None]);
        // A local match never leaves the host.
        let (chips, q) = ring(3);
        chips[2].deliver(&lowest(0b111), Some(2));
        assert_eq!(pump(&chips, &q), 0);
        assert_eq!(pending(&chips), vec![None, None, Some(0x40)]);
        // Nobody matches: the message visits every host once and stops at its origin.
        let (chips, q) = ring(3);
        chips[0].deliver(&lowest(0b1000), None);
        assert_eq!(pump(&chips, &q), 2);
        assert_eq!(pending(&chips), vec![None, None, None]);
        // Fixed logical delivery still reaches every match.
        let (chips, q) = ring(3);
        let fixed = irqchip::Message {
            mode: DeliveryMode::Fixed,
            ..lowest(0b111)
        };
        chips[0].deliver(&fixed, None);
        pump(&chips, &q);
        assert_eq!(pending(&chips), vec![Some(0x40); 3]);
        // A peer naming a sender that is no vCPU cannot start a ring walk.
        let (chips, q) = ring(2);
        let bad = ipi_to_wire(&lowest(0b1000), Some(7));
        VcpuService {
            chip: chips[1].clone(),
        }
        .on_message(HostId(0), bad, None);
        assert_eq!(pump(&chips, &q), 0);
    }

    #[test]
    fn the_ioapic_can_live_on_another_host_than_vcpu_0() {
        // IOAPIC on host 1; pin 5 (edge, vector 0x35) goes to APIC 0 on host 0.
        let (chips, q) = ring_with_ioapic(3, 1);
        chips[1].ioapic_write(0x00, 0x10 + 2 * 5);
        chips[1].ioapic_write(0x10, 0x35);
        chips[1].ioapic_write(0x00, 0x11 + 2 * 5);
        chips[1].ioapic_write(0x10, 0);
        // A device on host 2 pulses the pin: IrqPulse to host 1, whose IOAPIC sends the
        // message to host 0.
        chips[2].pulse(5);
        assert!(matches!(
            q.lock().unwrap().as_slice(),
            [(2, 1, Message::IrqPulse { pin: 5 })]
        ));
        assert_eq!(pump(&chips, &q), 2);
        assert_eq!(pending(&chips), vec![Some(0x35), None, None]);
        // A level-triggered EOI on host 0 goes to the IOAPIC's home, not to host 0's copy.
        chips[0].apply(irqchip::Effect::LevelEoi(0x35), 0);
        assert!(matches!(
            q.lock().unwrap().as_slice(),
            [(0, 1, Message::Eoi { vector: 0x35 })]
        ));
        pump(&chips, &q);
        // Device-originated lowest-priority messages start their ring walk at the IOAPIC's
        // home: from host 1, nobody matching, the message visits hosts 2 and 0 and stops.
        let lowest = irqchip::Message {
            vector: 0x41,
            mode: DeliveryMode::LowestPriority,
            level: false,
            dest: 0b1000,
            logical: true,
            shorthand: Shorthand::None,
            x2apic: false,
        };
        chips[1].deliver(&lowest, None);
        assert_eq!(pump(&chips, &q), 2);
    }

    #[test]
    fn stop_reasons_cross_hosts() {
        for r in [
            StopReason::PowerOff,
            StopReason::Reset,
            StopReason::TripleFault,
        ] {
            assert_eq!(stop_from_wire(&stop_to_wire(&r), 1), r);
        }
        let e = stop_from_wire(&stop_to_wire(&StopReason::Error("x".into())), 2);
        assert_eq!(e.exit_code(), 1);
        assert!(format!("{e:?}").contains("host 2"));
    }
}
