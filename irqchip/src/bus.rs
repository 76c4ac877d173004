//! The (virtual) APIC bus: the interrupt messages local APICs and the IOAPIC exchange, and what
//! a local APIC register access asks of the rest of the machine.

/// The x2APIC broadcast destination (physical or logical).
pub const X2APIC_BROADCAST: u32 = 0xffff_ffff;

/// How an interrupt message is delivered (ICR / redirection entry bits 8-10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Fixed vector.
    Fixed,
    /// Lowest priority among the destinations (we pick the first).
    LowestPriority,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT: park the processor until a SIPI.
    Init,
    /// Start-up IPI: start a parked processor at vector << 12.
    StartUp,
    /// SMI, ExtINT and reserved modes: logged and dropped.
    Other(u8),
}

impl DeliveryMode {
    /// The 3-bit delivery-mode field.
    pub fn to_bits(self) -> u8 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::Other(x) => x & 7,
        }
    }

    /// Decodes the 3-bit delivery-mode field (higher bits of `b` are ignored).
    pub fn from_bits(b: u32) -> Self {
        match b & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            x => Self::Other(x as u8),
        }
    }
}

/// ICR destination shorthand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// Only the sender.
    SelfOnly,
    /// Every APIC including the sender.
    AllIncludingSelf,
    /// Every APIC but the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// The 2-bit shorthand field (ICR bits 18-19).
    pub fn to_bits(self) -> u8 {
        match self {
            Self::None => 0,
            Self::SelfOnly => 1,
            Self::AllIncludingSelf => 2,
            Self::AllExcludingSelf => 3,
        }
    }

    /// Decodes the 2-bit shorthand field (higher bits of `b` are ignored).
    pub fn from_bits(b: u32) -> Self {
        match b & 3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }
}

/// An interrupt message on the (virtual) APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// Vector (meaningful for fixed, lowest-priority and start-up).
    pub vector: u8,
    /// Delivery mode.
    pub mode: DeliveryMode,
    /// Level-triggered (sets TMR; EOI is then broadcast to the IOAPIC).
    pub level: bool,
    /// Destination APIC ID or logical destination (8 bits in xAPIC format, 32 in x2APIC).
    pub dest: u32,
    /// Logical destination mode.
    pub logical: bool,
    /// Shorthand (IPIs only).
    pub shorthand: Shorthand,
    /// The destination is in x2APIC format (sent by an APIC in x2APIC mode): 32-bit IDs,
    /// `0xffff_ffff` is the broadcast, logical = cluster (bits 31-16) + 16-bit member mask.
    pub x2apic: bool,
}

impl Message {
    /// Broadcast: `0xff` physical in xAPIC format; `0xffff_ffff` in x2APIC format, physical
    /// or logical (SDM 11.12.9).
    pub fn is_broadcast(&self) -> bool {
        (self.x2apic && self.dest == X2APIC_BROADCAST)
            || (!self.x2apic && !self.logical && self.dest == 0xff)
    }
}

/// An APIC register access the architecture answers with #GP (the vCPU loop injects it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("general protection fault")]
pub struct GeneralProtection;

/// What a register write asks of the rest of the machine, done after the APIC lock is dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send an IPI.
    Ipi(Message),
    /// EOI of a level-triggered vector: tell the IOAPIC.
    LevelEoi(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_codes_round_trip() {
        for b in 0..8 {
            assert_eq!(u32::from(DeliveryMode::from_bits(b).to_bits()), b);
        }
        for b in 0..4 {
            assert_eq!(u32::from(Shorthand::from_bits(b).to_bits()), b);
        }
        assert_eq!(Shorthand::from_bits(7), Shorthand::AllExcludingSelf);
    }
}
