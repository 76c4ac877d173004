//! The x2APIC interface of the local APIC: `IA32_APIC_BASE` (global enable and the
//! xAPIC -> x2APIC switch) and the register MSRs `0x800..=0x8ff`, with the architecture's #GP
//! cases (read-only and write-only registers, reserved upper halves, registers that only
//! exist in one mode). In x2APIC mode the APIC ID is 32 bits, the logical ID is derived from
//! it (cluster = ID >> 4 in bits 31-16, member bit = ID & 15), the ICR is one 64-bit MSR
//! with a 32-bit destination, and SELF_IPI exists.

use std::time::Instant;

use super::regs::reg;
use super::Apic;
use crate::bus::{DeliveryMode, Effect, GeneralProtection, Message, Shorthand};

/// First x2APIC MSR (`APIC register offset >> 4` is added).
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// Last x2APIC MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8ff;
/// Default `IA32_APIC_BASE` address bits.
pub(super) const APIC_BASE_ADDR: u64 = 0xfee0_0000;
/// `IA32_APIC_BASE` bits.
pub(super) const BASE_BSP: u64 = 1 << 8;
pub(super) const BASE_EXTD: u64 = 1 << 10;
pub(super) const BASE_EN: u64 = 1 << 11;
/// Bits of `IA32_APIC_BASE` a guest may set (address below 2^36, EN, EXTD; BSP is read-only).
const BASE_WRITABLE: u64 = BASE_ADDR_MASK | BASE_EN | BASE_EXTD;
pub(super) const BASE_ADDR_MASK: u64 = 0x0000_000f_ffff_f000;
/// x2APIC-only register offsets (MMIO offsets, MSR = 0x800 + offset / 16).
const X2_SELF_IPI: u64 = 0x3f0;

impl Apic {
    /// `RDMSR IA32_APIC_BASE`.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// `WRMSR IA32_APIC_BASE`: global enable and the xAPIC/x2APIC mode switch, with the
    /// architecture's invalid transitions (x2APIC back to xAPIC, disabled straight to x2APIC,
    /// EXTD without EN, reserved bits) refused.
    pub fn set_apic_base(&mut self, value: u64) -> Result<(), GeneralProtection> {
        if value & !(BASE_WRITABLE | BASE_BSP) != 0
            || (value ^ self.apic_base) & BASE_BSP != 0
            || value & BASE_ADDR_MASK != APIC_BASE_ADDR
        {
            // Relocating the APIC is not supported: the MMIO window is decoded at the default.
            return Err(GeneralProtection);
        }
        let (old_en, old_x2) = (self.apic_base & BASE_EN != 0, self.x2apic());
        let (en, x2) = (value & BASE_EN != 0, value & BASE_EXTD != 0);
        let valid = match (old_en, old_x2, en, x2) {
            (_, _, false, true) => false,       // EXTD without EN
            (true, true, true, false) => false, // x2APIC -> xAPIC
            (false, _, true, true) => false,    // disabled -> x2APIC
            _ => true,
        };
        if !valid {
            return Err(GeneralProtection);
        }
        self.apic_base = value;
        if x2 && !old_x2 {
            // The logical ID is derived from the APIC ID in x2APIC mode (read-only LDR).
            self.ldr = x2apic_ldr(self.id);
        }
        if old_en && !en {
            // Global disable resets the APIC to its power-up state (SDM 11.4.3), except the
            // base MSR itself and what the vCPU loop owns (INIT/SIPI state, pending NMI).
            // The timer's clock (guest TSC <-> host time) is no APIC state either.
            let (run_state, nmi_pending, timer_fires, clock) = (
                self.run_state,
                self.nmi_pending,
                self.timer_fires,
                self.timer.clock,
            );
            *self = Apic::new(self.id, value & BASE_BSP != 0);
            self.apic_base = value;
            self.run_state = run_state;
            self.nmi_pending = nmi_pending;
            self.timer_fires = timer_fires;
            self.timer.clock = clock;
        }
        Ok(())
    }

    /// `RDMSR` of an x2APIC register (`0x800..=0x8ff`).
    pub fn msr_read(&self, index: u32, now: Instant) -> Result<u64, GeneralProtection> {
        let offset = self.x2apic_offset(index)?;
        match offset {
            reg::ID => Ok(u64::from(self.id)),
            reg::EOI | reg::DFR | reg::ICR_HI | X2_SELF_IPI => Err(GeneralProtection),
            reg::ICR_LO => Ok(u64::from(self.icr_lo) | (u64::from(self.icr_hi) << 32)),
            o if readable(o) => Ok(u64::from(self.read(o, now))),
            _ => Err(GeneralProtection),
        }
    }

    /// `WRMSR` of an x2APIC register (`0x800..=0x8ff`).
    pub fn msr_write(
        &mut self,
        index: u32,
        value: u64,
        now: Instant,
    ) -> Result<Option<Effect>, GeneralProtection> {
        let offset = self.x2apic_offset(index)?;
        if offset != reg::ICR_LO && value >> 32 != 0 {
            return Err(GeneralProtection);
        }
        match offset {
            reg::ICR_LO => {
                self.icr_hi = (value >> 32) as u32;
                Ok(self.icr_message(value as u32))
            }
            X2_SELF_IPI | reg::ESR if value > 0xff => Err(GeneralProtection),
            reg::ESR if value != 0 => Err(GeneralProtection),
            X2_SELF_IPI => Ok(Some(Effect::Ipi(Message {
                vector: value as u8,
                mode: DeliveryMode::Fixed,
                level: false,
                dest: 0,
                logical: false,
                shorthand: Shorthand::SelfOnly,
                x2apic: true,
            }))),
            reg::EOI if value != 0 => Err(GeneralProtection),
            reg::TPR | reg::EOI | reg::SVR | reg::ESR | reg::TIMER_INIT | reg::TIMER_DIV => {
                Ok(self.write(offset, value as u32, now))
            }
            o if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&o) => {
                Ok(self.write(o, value as u32, now))
            }
            _ => Err(GeneralProtection),
        }
    }

    /// The APIC register offset of x2APIC MSR `index` (#GP unless in x2APIC mode).
    fn x2apic_offset(&self, index: u32) -> Result<u64, GeneralProtection> {
        if !self.x2apic() || !(X2APIC_MSR_BASE..=X2APIC_MSR_LAST).contains(&index) {
            return Err(GeneralProtection);
        }
        Ok(u64::from(index - X2APIC_MSR_BASE) << 4)
    }
}

/// The logical ID of an x2APIC-mode APIC with ID `id`: cluster `id >> 4` in bits 31-16, member
/// bit `id & 15`.
pub(super) fn x2apic_ldr(id: u8) -> u32 {
    let id = u32::from(id);
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

/// Whether `offset` names a register an x2APIC `RDMSR` may read.
fn readable(offset: u64) -> bool {
    matches!(
        offset,
        reg::VERSION
            | reg::TPR
            | reg::PPR
            | reg::LDR
            | reg::SVR
            | reg::ESR
            | reg::TIMER_INIT
            | reg::TIMER_CUR
            | reg::TIMER_DIV
    ) || (reg::ISR..reg::ISR + 0x80).contains(&offset)
        || (reg::TMR..reg::TMR + 0x80).contains(&offset)
        || (reg::IRR..reg::IRR + 0x80).contains(&offset)
        || (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&offset)
}

#[cfg(test)]
mod tests {
    use super::super::regs::SVR_ENABLED;
    use super::super::tests::{dest, fixed};
    use super::*;
    use crate::bus::X2APIC_BROADCAST;

    const MSR_ID: u32 = 0x802;
    const MSR_TPR: u32 = 0x808;
    const MSR_EOI: u32 = 0x80b;
    const MSR_LDR: u32 = 0x80d;
    const MSR_DFR: u32 = 0x80e;
    const MSR_SVR: u32 = 0x80f;
    const MSR_ICR: u32 = 0x830;
    const MSR_SELF_IPI: u32 = 0x83f;

    fn x2(id: u8) -> Apic {
        let mut s = Apic::new(id, false);
        let base = s.apic_base();
        s.set_apic_base(base | BASE_EXTD).unwrap();
        s.msr_write(MSR_SVR, 0x1ff, Instant::now()).unwrap();
        s
    }

    #[test]
    fn apic_base_mode_switches() {
        let mut s = Apic::new(0, true);
        let base = s.apic_base();
        assert_eq!(base, 0xfee0_0000 | BASE_EN | BASE_BSP);
        assert!(!s.x2apic());
        // x2APIC registers #GP in xAPIC mode.
        assert_eq!(s.msr_read(MSR_ID, Instant::now()), Err(GeneralProtection));
        // Reserved bits, BSP flips and EXTD without EN are refused.
        assert!(s.set_apic_base(base | 1).is_err());
        assert!(s.set_apic_base(base & !BASE_BSP).is_err());
        assert!(s.set_apic_base((base & !BASE_EN) | BASE_EXTD).is_err());
        s.set_apic_base(base | BASE_EXTD).unwrap();
        assert!(s.x2apic());
        // Back to xAPIC directly is invalid; through disabled it is allowed.
        assert!(s.set_apic_base(base).is_err());
        s.set_apic_base(base & !BASE_EN).unwrap();
        // Disabled straight to x2APIC is invalid.
        assert!(s.set_apic_base(base | BASE_EXTD).is_err());
        s.set_apic_base(base).unwrap();
        assert!(!s.x2apic());
        // Relocating the APIC is refused.
        assert!(s.set_apic_base(base + 0x1000).is_err());
    }

    #[test]
    fn global_disable_resets_the_apic() {
        let now = Instant::now();
        let mut s = x2(0x23);
        let clock = super::super::GuestClock::new(77, 2_000_000, now);
        s.set_clock(clock);
        assert!(s.accept(&fixed(0x51)));
        s.ack(0x51);
        let base = s.apic_base();
        s.set_apic_base(base & !(BASE_EN | BASE_EXTD)).unwrap();
        s.set_apic_base(base & !BASE_EXTD).unwrap();
        assert!(!s.x2apic());
        // No stale in-service vector, no x2APIC-derived logical ID, software-disabled.
        assert_eq!(s.read(0x110, now), 0); // ISR bits 0x40..0x5f
        assert_eq!(s.read(reg::LDR, now), 0);
        assert_eq!(s.read(reg::SVR, now) & SVR_ENABLED, 0);
        // The guest-TSC clock is the vCPU's, not APIC state.
        assert_eq!(s.clock(), Some(clock));
    }

    #[test]
    fn x2apic_registers() {
        let now = Instant::now();
        let mut s = x2(0x23);
        assert_eq!(s.msr_read(MSR_ID, now), Ok(0x23));
        // LDR: cluster 2, member bit 3; read-only.
        assert_eq!(s.msr_read(MSR_LDR, now), Ok(0x0002_0008));
        assert!(s.msr_write(MSR_LDR, 0, now).is_err());
        assert!(s.msr_write(MSR_ID, 5, now).is_err());
        // DFR does not exist in x2APIC mode; EOI is write-only and must be 0.
        assert!(s.msr_read(MSR_DFR, now).is_err());
        assert!(s.msr_read(MSR_EOI, now).is_err());
        assert!(s.msr_write(MSR_EOI, 1, now).is_err());
        // Upper halves must be zero except in the ICR.
        assert!(s.msr_write(MSR_TPR, 1 << 32, now).is_err());
        s.msr_write(MSR_TPR, 0x20, now).unwrap();
        assert_eq!(s.msr_read(MSR_TPR, now), Ok(0x20));
        // EOI through the MSR retires the in-service vector.
        assert!(s.accept(&fixed(0x51)));
        s.ack(0x51);
        assert_eq!(s.msr_read(0x812, now), Ok(1 << 17)); // ISR bits 0x40..0x5f
        s.msr_write(MSR_EOI, 0, now).unwrap();
        assert_eq!(s.msr_read(0x812, now), Ok(0));
        // ESR writes must be 0; SELF_IPI has only a vector.
        assert!(s.msr_write(0x828, 1, now).is_err());
        s.msr_write(0x828, 0, now).unwrap();
        assert!(s.msr_write(MSR_SELF_IPI, 0x141, now).is_err());
    }

    #[test]
    fn x2apic_icr_and_self_ipi() {
        let now = Instant::now();
        let mut s = x2(1);
        // Physical destination 300 (beyond xAPIC's 8 bits), fixed vector 0xfd.
        let e = s.msr_write(MSR_ICR, (300u64 << 32) | 0xfd, now).unwrap();
        let Some(Effect::Ipi(m)) = e else {
            panic!("no ipi")
        };
        assert_eq!(
            (m.dest, m.vector, m.logical, m.x2apic),
            (300, 0xfd, false, true)
        );
        assert_eq!(s.msr_read(MSR_ICR, now), Ok((300u64 << 32) | 0xfd));
        // Logical cluster destination.
        let e = s.msr_write(MSR_ICR, (0x0001_0006u64 << 32) | (1 << 11) | 0x30, now);
        let Ok(Some(Effect::Ipi(m))) = e else {
            panic!("no ipi")
        };
        assert_eq!((m.dest, m.logical), (0x0001_0006, true));
        // SELF IPI.
        let e = s.msr_write(MSR_SELF_IPI, 0x41, now).unwrap();
        let Some(Effect::Ipi(m)) = e else {
            panic!("no ipi")
        };
        assert_eq!((m.vector, m.shorthand), (0x41, Shorthand::SelfOnly));
    }

    #[test]
    fn x2apic_destinations() {
        // APIC ID 0x12: cluster 1, member bit 2.
        let s = x2(0x12);
        assert!(s.matches(&dest(0x12, false, true)));
        assert!(!s.matches(&dest(0x13, false, true)));
        assert!(!s.matches(&dest(0x112, false, true)));
        assert!(s.matches(&dest(X2APIC_BROADCAST, false, true)));
        // 0xffffffff is a broadcast in logical mode too.
        assert!(s.matches(&dest(X2APIC_BROADCAST, true, true)));
        assert!(s.matches(&dest(0x0001_0004, true, true)));
        assert!(s.matches(&dest(0x0001_ffff, true, true)));
        assert!(!s.matches(&dest(0x0001_0003, true, true)));
        assert!(!s.matches(&dest(0x0002_0004, true, true)));
        // xAPIC-format messages (IOAPIC): 0xff is a broadcast, other IDs compare as is.
        assert!(s.matches(&dest(0xff, false, false)));
        assert!(s.matches(&dest(0x12, false, false)));
        // An xAPIC-mode APIC does not take x2APIC 0xff as a broadcast (it is ID 255).
        let mut t = Apic::new(3, false);
        t.write(reg::SVR, 0x1ff, Instant::now());
        assert!(!t.matches(&dest(0xff, false, true)));
        assert!(t.matches(&dest(X2APIC_BROADCAST, false, true)));
    }
}
