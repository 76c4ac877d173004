//! An IOAPIC emulated in the VMM: 24 redirection entries turning device lines into APIC
//! messages. It never touches a local APIC itself; it returns the [`Message`]s to deliver so the
//! caller can route them (later: to another host).

use super::lapic::{DeliveryMode, Message, Shorthand};

/// Number of input pins.
pub const NUM_PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOEOI: u64 = 0x40;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;

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
                    let ro = *e & (REMOTE_IRR | (1 << 12));
                    *e = if r % 2 == 0 {
                        (*e & !0xffff_ffff) | u64::from(value)
                    } else {
                        (*e & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                    *e = (*e & !(REMOTE_IRR | (1 << 12))) | ro;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
