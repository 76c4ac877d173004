//! An IOAPIC: 24 redirection entries turning device lines into APIC messages. It never touches
//! a local APIC itself; it returns the [`Message`]s to deliver so the caller can route them
//! (possibly to another host).

use snapshot::Persist;

use crate::bus::{DeliveryMode, Message, Shorthand};
use crate::state::IoapicState;

/// Number of input pins.
pub const NUM_PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOEOI: u64 = 0x40;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
/// Delivery status (read-only, always idle here).
const BUSY: u64 = 1 << 12;

/// Why an [`IoapicState`] cannot be restored; each names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoapicStateError {
    /// IOREGSEL bits 8-31 set.
    #[error("ioregsel {0:#x}: bits 8-31 are reserved")]
    Ioregsel(u32),
    /// Not one redirection entry per pin.
    #[error("redirection: {0} entries, the IOAPIC has {NUM_PINS}")]
    Entries(usize),
    /// A redirection entry with delivery status busy (the model delivers at once).
    #[error("redirection[{pin}] {value:#x}: delivery status busy")]
    DeliveryStatus {
        /// The pin.
        pin: usize,
        /// The saved entry.
        value: u64,
    },
    /// Remote IRR on an edge-triggered entry (only level-triggered deliveries set it).
    #[error("redirection[{pin}] {value:#x}: remote IRR set on an edge-triggered entry")]
    RemoteIrrEdge {
        /// The pin.
        pin: usize,
        /// The saved entry.
        value: u64,
    },
    /// Levels of pins that do not exist.
    #[error("pin_levels {0:#x}: pins above {max}", max = NUM_PINS - 1)]
    PinLevels(u32),
}

/// The IOAPIC's registers and line levels.
#[derive(Debug)]
pub struct Ioapic {
    id: u32,
    regsel: u32,
    redir: [u64; NUM_PINS],
    line: [bool; NUM_PINS],
}

impl Ioapic {
    /// A reset IOAPIC with every entry masked.
    pub fn new(id: u8) -> Self {
        Ioapic {
            id: u32::from(id) << 24,
            regsel: 0,
            redir: [MASKED; NUM_PINS],
            line: [false; NUM_PINS],
        }
    }

    fn message(&self, pin: usize) -> Option<Message> {
        let e = self.redir[pin];
        if e & MASKED != 0 {
            return None;
        }
        Some(Message {
            vector: e as u8,
            mode: DeliveryMode::from_bits((e >> 8) as u32),
            level: e & LEVEL != 0,
            dest: u32::from((e >> 56) as u8),
            logical: e & (1 << 11) != 0,
            shorthand: Shorthand::None,
            x2apic: false,
        })
    }

    /// Sets the level of input `pin`; returns the message to deliver, if any.
    pub fn set_line(&mut self, pin: usize, high: bool) -> Option<Message> {
        let was = std::mem::replace(self.line.get_mut(pin)?, high);
        let e = self.redir[pin];
        if e & LEVEL != 0 {
            if high && e & REMOTE_IRR == 0 {
                let m = self.message(pin)?;
                self.redir[pin] |= REMOTE_IRR;
                return Some(m);
            }
            None
        } else if high && !was {
            self.message(pin)
        } else {
            None
        }
    }

    /// A pulse on an edge-triggered line.
    pub fn pulse(&mut self, pin: usize) -> Option<Message> {
        let m = self.set_line(pin, true);
        self.set_line(pin, false);
        m
    }

    /// EOI of `vector` from a local APIC: clears remote IRR and re-delivers still-asserted lines.
    pub fn eoi(&mut self, vector: u8) -> Vec<Message> {
        let mut out = Vec::new();
        for pin in 0..NUM_PINS {
            let e = self.redir[pin];
            if e & LEVEL != 0 && e & REMOTE_IRR != 0 && e as u8 == vector {
                self.redir[pin] &= !REMOTE_IRR;
                if self.line[pin] {
                    if let Some(m) = self.message(pin) {
                        self.redir[pin] |= REMOTE_IRR;
                        out.push(m);
                    }
                }
            }
        }
        out
    }

    /// MMIO read (32-bit registers).
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => self.regsel,
            IOWIN => match self.regsel {
                0 => self.id,
                1 => ((NUM_PINS as u32 - 1) << 16) | 0x20,
                2 => self.id,
                r @ 0x10..=0x3f => {
                    let e = self.redir[((r - 0x10) / 2) as usize];
                    if r % 2 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// MMIO write; returns messages to deliver (unmasking an asserted level line).
    pub fn write(&mut self, offset: u64, value: u32) -> Vec<Message> {
        match offset {
            IOREGSEL => self.regsel = value & 0xff,
            IOWIN => match self.regsel {
                0 => self.id = value & 0x0f00_0000,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let e = &mut self.redir[pin];
                    // Remote IRR and delivery status are read-only.
                    let ro = *e & (REMOTE_IRR | BUSY);
                    *e = if r % 2 == 0 {
                        (*e & !0xffff_ffff) | u64::from(value)
                    } else {
                        (*e & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                    *e = (*e & !(REMOTE_IRR | BUSY)) | ro;
                    if *e & LEVEL == 0 {
                        *e &= !REMOTE_IRR;
                    } else if self.line[pin] && *e & (REMOTE_IRR | MASKED) == 0 {
                        self.redir[pin] |= REMOTE_IRR;
                        return self.message(pin).into_iter().collect();
                    }
                }
                _ => {}
            },
            IOEOI => return self.eoi(value as u8),
            _ => {}
        }
        Vec::new()
    }
}

/// Restore accepts the states the model can reach: IOREGSEL within its 8 bits, one entry per
/// pin, delivery status idle, remote IRR only on level-triggered entries, no level for a pin
/// that does not exist. Entry bits the guest may write (vector, mode, destination, the bits
/// the 82093AA reserves) are taken as they are, as the register write takes them.
impl Persist for Ioapic {
    type State = IoapicState;
    type ConstructorArgs = ();
    type Error = IoapicStateError;

    fn save(&self) -> IoapicState {
        IoapicState {
            id: (self.id >> 24) as u8,
            ioregsel: self.regsel,
            redirection: self.redir.to_vec(),
            pin_levels: (0..NUM_PINS)
                .filter(|&p| self.line[p])
                .fold(0, |m, p| m | 1 << p),
        }
    }

    fn restore(_: (), s: &IoapicState) -> Result<Self, IoapicStateError> {
        use IoapicStateError as E;
        if s.ioregsel > 0xff {
            return Err(E::Ioregsel(s.ioregsel));
        }
        let redir: [u64; NUM_PINS] = s
            .redirection
            .as_slice()
            .try_into()
            .map_err(|_| E::Entries(s.redirection.len()))?;
        for (pin, &value) in redir.iter().enumerate() {
            if value & BUSY != 0 {
                return Err(E::DeliveryStatus { pin, value });
            }
            if value & REMOTE_IRR != 0 && value & LEVEL == 0 {
                return Err(E::RemoteIrrEdge { pin, value });
            }
        }
        if s.pin_levels >> NUM_PINS != 0 {
            return Err(E::PinLevels(s.pin_levels));
        }
        Ok(Ioapic {
            id: u32::from(s.id) << 24,
            regsel: s.ioregsel,
            redir,
            line: std::array::from_fn(|p| s.pin_levels & (1 << p) != 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field, how to spoil it, and the error that must name it.
    type Case = (
        &'static str,
        Box<dyn Fn(&mut IoapicState)>,
        IoapicStateError,
    );

    fn program(io: &mut Ioapic, pin: u32, lo: u32, hi: u32) {
        io.write(IOREGSEL, 0x10 + 2 * pin);
        io.write(IOWIN, lo);
        io.write(IOREGSEL, 0x11 + 2 * pin);
        io.write(IOWIN, hi);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_only() {
        let mut io = Ioapic::new(2);
        assert_eq!(io.pulse(4), None, "masked at reset");
        program(&mut io, 4, 0x24, 1 << 24);
        let m = io.pulse(4).unwrap();
        assert_eq!((m.vector, m.dest, m.level), (0x24, 1, false));
        assert!(io.set_line(4, true).is_some());
        assert!(io.set_line(4, true).is_none());
        assert!(io.set_line(99, true).is_none(), "bad pin ignored");
    }

    #[test]
    fn level_pin_waits_for_eoi() {
        let mut io = Ioapic::new(2);
        program(&mut io, 9, 0x39 | (1 << 15), 0);
        assert!(io.set_line(9, true).is_some());
        assert!(io.set_line(9, true).is_none(), "remote IRR set");
        assert_eq!(io.eoi(0x39).len(), 1, "still asserted: re-delivered");
        io.set_line(9, false);
        assert!(io.eoi(0x39).is_empty());
        io.write(IOREGSEL, 1);
        assert_eq!(io.read(IOWIN) >> 16, 23);
    }

    /// Pin 4 edge to APIC 1, pin 9 level (delivered, not yet EOIed, still asserted), pin 10
    /// level and masked, IOREGSEL left at pin 9's high half.
    fn busy() -> Ioapic {
        let mut io = Ioapic::new(2);
        program(&mut io, 4, 0x24, 1 << 24);
        program(&mut io, 9, 0x39 | (1 << 15), 3 << 24);
        program(&mut io, 10, 0x3a | (1 << 15) | (1 << 16), 0);
        assert!(io.set_line(9, true).is_some());
        io.set_line(10, true);
        io.write(IOREGSEL, 0x23);
        io
    }

    #[test]
    fn round_trip_routes_alike() {
        let mut live = busy();
        let saved = live.save();
        assert_eq!(saved.pin_levels, (1 << 9) | (1 << 10));
        assert_eq!(saved.redirection[9], 0x39 | LEVEL | REMOTE_IRR | (3 << 56));
        let mut restored = Ioapic::restore((), &saved).unwrap();
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.read(IOWIN), live.read(IOWIN));
        for io in [&mut live, &mut restored] {
            let m = io.pulse(4).unwrap();
            assert_eq!(
                (m.vector, m.dest, m.level, m.logical),
                (0x24, 1, false, false)
            );
            // Remote IRR still set: no second delivery until the EOI, which re-delivers.
            assert!(io.set_line(9, true).is_none());
            let m = io.eoi(0x39);
            assert_eq!(m.len(), 1);
            assert_eq!((m[0].vector, m[0].dest, m[0].level), (0x39, 3, true));
            // Unmasking the asserted level pin 10 delivers it.
            io.write(IOREGSEL, 0x10 + 20);
            let m = io.write(IOWIN, 0x3a | (1 << 15));
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].vector, 0x3a);
        }
        assert_eq!(live.save(), restored.save());
    }

    #[test]
    fn json_round_trip() {
        let saved = busy().save();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<IoapicState>(&json).unwrap(), saved);
    }

    #[test]
    fn every_invalid_field_is_refused() {
        use IoapicStateError as E;
        let good = busy().save();
        let restore = |f: &dyn Fn(&mut IoapicState)| {
            let mut s = good.clone();
            f(&mut s);
            Ioapic::restore((), &s).err()
        };
        let e9 = good.redirection[9];
        let cases: Vec<Case> = vec![
            (
                "ioregsel",
                Box::new(|s| s.ioregsel = 0x100),
                E::Ioregsel(0x100),
            ),
            (
                "redirection",
                Box::new(|s| {
                    s.redirection.pop();
                }),
                E::Entries(23),
            ),
            (
                "redirection",
                Box::new(|s| s.redirection.push(MASKED)),
                E::Entries(25),
            ),
            (
                "redirection[9]",
                Box::new(|s| s.redirection[9] |= BUSY),
                E::DeliveryStatus {
                    pin: 9,
                    value: e9 | BUSY,
                },
            ),
            (
                "redirection[9]",
                Box::new(|s| s.redirection[9] &= !LEVEL),
                E::RemoteIrrEdge {
                    pin: 9,
                    value: e9 & !LEVEL,
                },
            ),
            (
                "pin_levels",
                Box::new(|s| s.pin_levels |= 1 << 24),
                E::PinLevels((1 << 24) | (1 << 9) | (1 << 10)),
            ),
        ];
        for (field, mutate, want) in cases {
            assert_eq!(restore(&*mutate).as_ref(), Some(&want), "{field}");
            assert!(want.to_string().starts_with(field), "{want}");
        }
        // Any ID and guest-writable entry bits are the guest's business.
        let mut s = good.clone();
        s.id = 0xff;
        s.redirection[0] = 0x00ff_ffff_fffe_efff & !REMOTE_IRR;
        assert!(Ioapic::restore((), &s).is_ok());
    }
}
