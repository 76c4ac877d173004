//! Interrupt controllers emulated in the VMM: one [`lapic::LocalApic`] per vCPU and one
//! [`ioapic::Ioapic`], joined by [`IrqChip`], which routes APIC messages to their destinations.
//! Keeping this out of KVM is what lets IPIs and device interrupts cross hosts.

pub mod ioapic;
pub mod lapic;

use std::sync::{Arc, Mutex};

use lapic::{Effect, LocalApic, Message, Shorthand};

/// The machine's interrupt fabric.
pub struct IrqChip {
    /// Local APICs, indexed by vCPU index.
    pub lapics: Vec<Arc<LocalApic>>,
    ioapic: Mutex<ioapic::Ioapic>,
}

impl IrqChip {
    /// APIC IDs are the vCPU indexes; the IOAPIC takes the next ID.
    pub fn new(ncpus: u8) -> Self {
        IrqChip {
            lapics: (0..ncpus)
                .map(|i| Arc::new(LocalApic::new(i, i == 0)))
                .collect(),
            ioapic: Mutex::new(ioapic::Ioapic::new(ncpus)),
        }
    }

    fn ioapic(&self) -> std::sync::MutexGuard<'_, ioapic::Ioapic> {
        self.ioapic.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers a message sent by vCPU `from` (None for devices).
    pub fn deliver(&self, msg: &Message, from: Option<usize>) {
        let targets: Vec<&Arc<LocalApic>> = match msg.shorthand {
            Shorthand::SelfOnly => from.and_then(|i| self.lapics.get(i)).into_iter().collect(),
            Shorthand::AllIncludingSelf => self.lapics.iter().collect(),
            Shorthand::AllExcludingSelf => self
                .lapics
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != from)
                .map(|(_, l)| l)
                .collect(),
            Shorthand::None => {
                let mut t: Vec<&Arc<LocalApic>> = self
                    .lapics
                    .iter()
                    .filter(|l| l.lock().matches(msg.dest, msg.logical))
                    .collect();
                if msg.mode == lapic::DeliveryMode::LowestPriority {
                    t.truncate(1);
                }
                t
            }
        };
        if targets.is_empty() {
            log::debug!("interrupt message {msg:?} matched no local APIC");
        }
        for l in targets {
            l.deliver(msg);
        }
    }

    /// Carries out what a local APIC register write asked for.
    pub fn apply(&self, effect: Effect, from: usize) {
        match effect {
            Effect::Ipi(m) => self.deliver(&m, Some(from)),
            Effect::LevelEoi(v) => {
                let msgs = self.ioapic().eoi(v);
                for m in msgs {
                    self.deliver(&m, None);
                }
            }
        }
    }

    /// An edge on IOAPIC input `pin`.
    pub fn pulse(&self, pin: u32) {
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

/// One IOAPIC input line, handed to a device.
#[derive(Clone)]
pub struct IrqLine {
    chip: Arc<IrqChip>,
    pin: u32,
}

impl IrqLine {
    /// Line `pin` of `chip`.
    pub fn new(chip: Arc<IrqChip>, pin: u32) -> Self {
        IrqLine { chip, pin }
    }

    /// Raises an edge.
    pub fn pulse(&self) {
        self.chip.pulse(self.pin);
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.pulse();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::lapic::DeliveryMode;
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
        };
        chip.deliver(&m, Some(1));
        let got: Vec<_> = chip.lapics.iter().map(|l| l.lock().deliverable()).collect();
        assert_eq!(got, vec![Some(0xfb), None, Some(0xfb)]);
    }
}
