//! The xAPIC register window: 4 KiB of 16-byte-aligned 32-bit registers, read and written
//! through MMIO (the x2APIC MSRs in [`super::x2apic`] reach the same handlers).

use std::time::Instant;

use super::Apic;
use crate::bus::Effect;

/// Register offsets inside the 4 KiB APIC window.
pub(crate) mod reg {
    pub const ID: u64 = 0x20;
    pub const VERSION: u64 = 0x30;
    pub const TPR: u64 = 0x80;
    pub const APR: u64 = 0x90;
    pub const PPR: u64 = 0xa0;
    pub const EOI: u64 = 0xb0;
    pub const LDR: u64 = 0xd0;
    pub const DFR: u64 = 0xe0;
    pub const SVR: u64 = 0xf0;
    pub const ISR: u64 = 0x100;
    pub const TMR: u64 = 0x180;
    pub const IRR: u64 = 0x200;
    pub const ESR: u64 = 0x280;
    pub const ICR_LO: u64 = 0x300;
    pub const ICR_HI: u64 = 0x310;
    pub const LVT_TIMER: u64 = 0x320;
    pub const LVT_ERROR: u64 = 0x370;
    pub const TIMER_INIT: u64 = 0x380;
    pub const TIMER_CUR: u64 = 0x390;
    pub const TIMER_DIV: u64 = 0x3e0;
}

/// LVT mask bit.
pub(crate) const LVT_MASKED: u32 = 1 << 16;
/// SVR APIC software enable.
pub(crate) const SVR_ENABLED: u32 = 1 << 8;
/// SVR bits that exist (vector, software enable, EOI-broadcast suppression).
pub(crate) const SVR_WRITABLE: u32 = 0x13ff;
/// Bits of the divide configuration register that exist.
pub(crate) const TIMER_DIV_WRITABLE: u32 = 0xb;
/// The bits of DFR that always read as 1 (only the model, bits 28-31, is writable).
pub(crate) const DFR_ONES: u32 = 0x0fff_ffff;
/// The bits of the xAPIC LDR that exist (the logical ID, bits 24-31).
pub(crate) const LDR_XAPIC: u32 = 0xff00_0000;
/// ICR delivery status (always idle here).
pub(crate) const ICR_BUSY: u32 = 1 << 12;

/// Whether a write to the register at window offset `offset` may move the timer deadline (LVT
/// timer, initial count, divide configuration), so that the timer thread must re-evaluate. For
/// an x2APIC MSR pass `(msr - 0x800) << 4`.
pub fn timer_register(offset: u64) -> bool {
    matches!(offset, reg::LVT_TIMER | reg::TIMER_INIT | reg::TIMER_DIV)
}

impl Apic {
    /// Handles a read of the APIC window.
    pub fn read(&self, offset: u64, now: Instant) -> u32 {
        let arr = |a: &[u32; 8]| a[((offset - (offset & !0x7f)) >> 4) as usize & 7];
        match offset {
            reg::ID => u32::from(self.id) << 24,
            reg::VERSION => 0x0005_0014, // version 0x14, 6 LVT entries
            reg::TPR => self.tpr,
            reg::APR => 0,
            reg::PPR => self.ppr(),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            o if (reg::ISR..reg::ISR + 0x80).contains(&o) => arr(&self.isr),
            o if (reg::TMR..reg::TMR + 0x80).contains(&o) => arr(&self.tmr),
            o if (reg::IRR..reg::IRR + 0x80).contains(&o) => arr(&self.irr),
            reg::ESR => self.esr,
            reg::ICR_LO => self.icr_lo, // delivery status: always idle
            reg::ICR_HI => self.icr_hi,
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) && o % 16 == 0 => {
                self.lvt[((o - reg::LVT_TIMER) >> 4) as usize]
            }
            reg::TIMER_INIT => self.timer.init,
            reg::TIMER_CUR => self.current_count(now),
            reg::TIMER_DIV => self.timer.div,
            _ => 0,
        }
    }

    /// Handles a write to the APIC window.
    pub fn write(&mut self, offset: u64, value: u32, now: Instant) -> Option<Effect> {
        match offset {
            reg::TPR => self.tpr = value & 0xff,
            reg::EOI => {
                if let Some(v) = super::highest(&self.isr) {
                    let (i, m) = super::bit(v);
                    self.isr[i] &= !m;
                    if self.tmr[i] & m != 0 {
                        return Some(Effect::LevelEoi(v));
                    }
                }
            }
            reg::LDR => self.ldr = value & LDR_XAPIC,
            reg::DFR => self.dfr = value | DFR_ONES,
            reg::SVR => {
                self.svr = value & SVR_WRITABLE;
                if !self.software_enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => self.esr = 0,
            reg::ICR_HI => self.icr_hi = value & 0xff00_0000,
            reg::ICR_LO => return self.icr_message(value),
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) && o % 16 == 0 => {
                let i = ((o - reg::LVT_TIMER) >> 4) as usize;
                let old_mode = self.timer_mode();
                self.lvt[i] = if self.software_enabled() {
                    value
                } else {
                    value | LVT_MASKED
                };
                if i == 0 && self.timer_mode() != old_mode {
                    self.timer.stop();
                }
            }
            reg::TIMER_INIT if self.timer_mode() != super::timer::MODE_TSC_DEADLINE => {
                self.timer.init = value;
                self.arm_counter(now);
            }
            reg::TIMER_DIV => self.timer.div = value & TIMER_DIV_WRITABLE,
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_registers() {
        assert!(timer_register(0x320) && timer_register(0x380) && timer_register(0x3e0));
        assert!(!timer_register(reg::EOI) && !timer_register(reg::TIMER_CUR));
        // x2APIC MSRs 0x832 (LVT timer), 0x838 (initial count), 0x83e (divide).
        for msr in [0x832u64, 0x838, 0x83e] {
            assert!(timer_register((msr - 0x800) << 4));
        }
    }
}
