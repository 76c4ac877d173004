//! The router: [`IrqChip`] holds every local APIC of the machine and the IOAPIC, and is the
//! one place where an APIC message meets its destinations: the matching local APICs of this
//! host's vCPUs, and through [`RemoteIrq`] the other hosts.

use std::sync::{Arc, Mutex, OnceLock};

use crate::bus::{DeliveryMode, Effect, Message, Shorthand};
use crate::ioapic::Ioapic;
use crate::lapic::LocalApic;

/// Where interrupt messages go when they leave this host (implemented by the cluster fabric).
pub trait RemoteIrq: Send + Sync {
    /// Sends `msg` (from vCPU `from`, or a device) to every other host whose vCPUs it may
    /// target; each receiver matches it against its own local APICs.
    fn send(&self, msg: &Message, from: Option<usize>);
    /// A level-triggered EOI for the IOAPIC, which lives on another host.
    fn eoi(&self, vector: u8);
    /// An edge on IOAPIC input `pin` from a device of this host; the IOAPIC lives on another.
    fn pulse(&self, pin: u32);
    /// Passes a lowest-priority message that matched no APIC of this host on to the next host
    /// of the ring (host order, wrapping), unless that host is where the message started.
    fn pass_on(&self, msg: &Message, from: Option<usize>);
}

/// Whether `msg` is a lowest-priority message that may match APICs on several hosts: such a
/// message must reach exactly one APIC, so it travels host by host until one matches
/// (physical unicast destinations already name one vCPU and go straight to its host).
fn lowest_priority_multicast(msg: &Message) -> bool {
    msg.mode == DeliveryMode::LowestPriority
        && msg.shorthand == Shorthand::None
        && (msg.logical || msg.is_broadcast())
}

/// The machine's interrupt fabric.
pub struct IrqChip {
    /// Local APICs, indexed by vCPU index (every vCPU of the machine has one; only those of
    /// this host's vCPUs are driven here).
    pub lapics: Vec<Arc<LocalApic>>,
    local: Vec<bool>,
    /// Whether the IOAPIC's home (in the cluster's placement) is this host; if not, level
    /// EOIs and device pulses go through [`RemoteIrq`].
    ioapic_local: bool,
    ioapic: Mutex<Ioapic>,
    remote: OnceLock<Arc<dyn RemoteIrq>>,
}

impl IrqChip {
    /// APIC IDs are the vCPU indexes; the IOAPIC takes the next ID. Every vCPU and the IOAPIC
    /// are local.
    pub fn new(ncpus: u8) -> Self {
        Self::with_local(ncpus, vec![true; usize::from(ncpus)], true)
    }

    /// A chip of which only the vCPUs with `local[i]` run on this host, and the IOAPIC too if
    /// `ioapic_local` (this host is the IOAPIC's home).
    pub fn with_local(ncpus: u8, local: Vec<bool>, ioapic_local: bool) -> Self {
        IrqChip {
            lapics: (0..ncpus)
                .map(|i| Arc::new(LocalApic::new(i, i == 0)))
                .collect(),
            local,
            ioapic_local,
            ioapic: Mutex::new(Ioapic::new(ncpus)),
            remote: OnceLock::new(),
        }
    }

    /// Connects the chip to the other hosts (once, before any vCPU runs).
    pub fn set_remote(&self, remote: Arc<dyn RemoteIrq>) {
        let _ = self.remote.set(remote);
    }

    /// Whether vCPU `i` runs on this host.
    pub fn is_local(&self, i: usize) -> bool {
        self.local.get(i).copied().unwrap_or(false)
    }

    /// Whether the IOAPIC is emulated on this host.
    pub fn ioapic_is_local(&self) -> bool {
        self.ioapic_local
    }

    /// The local APICs of this host's vCPUs.
    pub fn local_lapics(&self) -> Vec<Arc<LocalApic>> {
        self.lapics
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_local(*i))
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The IOAPIC, locked (to save or replace its state while the machine is paused).
    pub fn ioapic(&self) -> std::sync::MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers a message sent by vCPU `from` (None for devices), here and on other hosts.
    pub fn deliver(&self, msg: &Message, from: Option<usize>) {
        if lowest_priority_multicast(msg) {
            // One APIC in the whole machine: a local one if any matches, else the next host's.
            if !self.deliver_local(msg, from) {
                if let Some(r) = self.remote.get() {
                    r.pass_on(msg, from);
                }
            }
            return;
        }
        if msg.shorthand != Shorthand::SelfOnly {
            if let Some(r) = self.remote.get() {
                r.send(msg, from);
            }
        }
        self.deliver_local(msg, from);
    }

    /// A message that arrived from another host: delivered to the matching APICs of this
    /// host's vCPUs; a lowest-priority message that matches none here goes on to the next host.
    pub fn deliver_from_remote(&self, msg: &Message, from: Option<usize>) {
        if !self.deliver_local(msg, from) && lowest_priority_multicast(msg) {
            if let Some(r) = self.remote.get() {
                r.pass_on(msg, from);
            }
        }
    }

    /// Delivers a message to the matching APICs of this host's vCPUs only; false if none
    /// matched.
    pub fn deliver_local(&self, msg: &Message, from: Option<usize>) -> bool {
        let local = self
            .lapics
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_local(*i));
        let targets: Vec<&Arc<LocalApic>> = match msg.shorthand {
            Shorthand::SelfOnly => from
                .filter(|i| self.is_local(*i))
                .and_then(|i| self.lapics.get(i))
                .into_iter()
                .collect(),
            Shorthand::AllIncludingSelf => local.map(|(_, l)| l).collect(),
            Shorthand::AllExcludingSelf => local
                .filter(|(i, _)| Some(*i) != from)
                .map(|(_, l)| l)
                .collect(),
            Shorthand::None => {
                let mut t: Vec<&Arc<LocalApic>> = local
                    .map(|(_, l)| l)
                    .filter(|l| l.lock().matches(msg))
                    .collect();
                if msg.mode == DeliveryMode::LowestPriority {
                    t.truncate(1);
                }
                t
            }
        };
        if targets.is_empty() {
            log::debug!("interrupt message {msg:?} matched no local APIC");
            return false;
        }
        for l in targets {
            l.deliver(msg);
        }
        true
    }

    /// Carries out what a local APIC register write asked for.
    pub fn apply(&self, effect: Effect, from: usize) {
        match effect {
            Effect::Ipi(m) => self.deliver(&m, Some(from)),
            Effect::LevelEoi(v) => match (self.remote.get(), self.ioapic_local) {
                // The IOAPIC lives on its home host (host 0 by default).
                (Some(r), false) => r.eoi(v),
                _ => self.eoi(v),
            },
        }
    }

    /// A level-triggered EOI reaching this host's IOAPIC.
    pub fn eoi(&self, vector: u8) {
        let msgs = self.ioapic().eoi(vector);
        for m in msgs {
            self.deliver(&m, None);
        }
    }

    /// An edge on IOAPIC input `pin` (sent to the IOAPIC's host if that is another one).
    pub fn pulse(&self, pin: u32) {
        if let (Some(r), false) = (self.remote.get(), self.ioapic_local) {
            r.pulse(pin);
            return;
        }
        let m = self.ioapic().pulse(pin as usize);
        log::trace!("IOAPIC pin {pin} pulse -> {m:?}");
        if let Some(m) = m {
            self.deliver(&m, None);
        }
    }

    /// IOAPIC MMIO read.
    pub fn ioapic_read(&self, offset: u64) -> u32 {
        self.ioapic().read(offset)
    }

    /// IOAPIC MMIO write.
    pub fn ioapic_write(&self, offset: u64, value: u32) {
        log::trace!("IOAPIC write {offset:#x} = {value:#x}");
        let msgs = self.ioapic().write(offset, value);
        for m in msgs {
            self.deliver(&m, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorthand_all_but_self() {
        let chip = IrqChip::new(3);
        for l in &chip.lapics {
            l.lock().write(0xf0, 0x1ff, std::time::Instant::now());
        }
        let m = Message {
            vector: 0xfb,
            mode: DeliveryMode::Fixed,
            level: false,
            dest: 0,
            logical: false,
            shorthand: Shorthand::AllExcludingSelf,
            x2apic: false,
        };
        chip.deliver(&m, Some(1));
        let got: Vec<_> = chip.lapics.iter().map(|l| l.lock().deliverable()).collect();
        assert_eq!(got, vec![Some(0xfb), None, Some(0xfb)]);
    }

    #[test]
    fn restored_ioapic_routes_through_the_chip() {
        use snapshot::Persist;
        let chip = IrqChip::new(2);
        // Pin 5: edge, vector 0x35, to APIC 1.
        chip.ioapic_write(0x00, 0x10 + 2 * 5);
        chip.ioapic_write(0x10, 0x35);
        chip.ioapic_write(0x00, 0x11 + 2 * 5);
        chip.ioapic_write(0x10, 1 << 24);
        let saved = chip.ioapic().save();
        let other = IrqChip::new(2);
        *other.ioapic() = Ioapic::restore((), &saved).unwrap();
        for c in [&chip, &other] {
            c.lapics[1]
                .lock()
                .write(0xf0, 0x1ff, std::time::Instant::now());
            c.pulse(5);
            assert_eq!(c.lapics[1].lock().deliverable(), Some(0x35));
            assert_eq!(c.lapics[0].lock().deliverable(), None);
        }
    }
}
