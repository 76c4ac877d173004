//! COM1: a 16550A from vm-superio, output to the VMM's stdout, input from its stdin.
//!
//! Its saved state is [`ConsoleState`], a serde mirror of vm-superio's `SerialState` (the
//! registers and the receive FIFO), through [`snapshot::Persist`].

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapshot::Persist;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::irq::IrqLine;

/// Console output sink: stdout, flushed on newline and when the FIFO drains.
pub struct Out {
    buf: Vec<u8>,
}

impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if b.contains(&b'\n') || self.buf.len() > 256 {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let mut so = std::io::stdout().lock();
        // Console output failing (closed stdout) must not stop the guest.
        let _ = so.write_all(&self.buf);
        let _ = so.flush();
        self.buf.clear();
        Ok(())
    }
}

/// The serial device.
pub struct Console {
    serial: Serial<IrqLine, NoEvents, Out>,
}

impl Console {
    /// COM1 raising `irq`.
    pub fn new(irq: IrqLine) -> Self {
        Console {
            serial: Serial::new(irq, Out { buf: Vec::new() }),
        }
    }

    /// Register read.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// Register write.
    pub fn write(&mut self, offset: u8, v: u8) {
        if let Err(e) = self.serial.write(offset, v) {
            log::debug!("serial write failed: {e:?}");
        }
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }

    /// Queues input bytes; returns how many fit in the FIFO.
    pub fn enqueue(&mut self, b: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let n = room.min(b.len());
        if n > 0 {
            if let Err(e) = self.serial.enqueue_raw_bytes(&b[..n]) {
                log::debug!("serial input dropped: {e:?}");
                return 0;
            }
        }
        n
    }
}

/// Size of vm-superio's receive FIFO.
const FIFO_SIZE: usize = 64;
/// Line status: data ready (the FIFO is not empty).
const LSR_DATA_READY: u8 = 0x01;
/// Interrupt enable bits of a 16550A (the only ones vm-superio keeps).
const IER_VALID: u8 = 0x0f;
/// Interrupt identification values vm-superio produces: none pending, THR empty, received
/// data available, or both.
const IIR_VALUES: [u8; 4] = [0x01, 0x02, 0x04, 0x06];

/// Saved state of COM1: vm-superio's `SerialState` with serde (the crate has none).
///
/// Console output already written by the guest is not part of it: the VMM flushes it
/// ([`Console::flush`]) when it pauses the machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ConsoleState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register (without the FIFO bits a read adds).
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for ConsoleState {
    fn from(s: SerialState) -> Self {
        ConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&ConsoleState> for SerialState {
    fn from(s: &ConsoleState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Why a saved serial state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleStateError {
    /// More received bytes than the FIFO holds.
    #[error("receive FIFO holds {0} bytes, more than {FIFO_SIZE}")]
    Fifo(usize),
    /// Interrupt enable bits a 16550A does not have.
    #[error("interrupt enable register {0:#x} has bits above {IER_VALID:#x}")]
    InterruptEnable(u8),
    /// An interrupt identification the device never produces.
    #[error("interrupt identification {0:#x} is not one of {IIR_VALUES:x?}")]
    InterruptIdentification(u8),
    /// Received-data interrupt pending with nothing received.
    #[error("received-data interrupt pending with an empty FIFO")]
    DataInterruptWithoutData,
    /// Line status bits the device never changes differ from their fixed value, or the
    /// data-ready bit disagrees with the FIFO.
    #[error("line status {status:#x} does not match a FIFO of {fifo} bytes")]
    LineStatus {
        /// Saved line status.
        status: u8,
        /// Saved FIFO length.
        fifo: usize,
    },
    /// The modem status the device never changes differs from its fixed value.
    #[error("modem status {saved:#x}, the device's is always {fixed:#x}")]
    ModemStatus {
        /// Saved modem status.
        saved: u8,
        /// Its fixed value.
        fixed: u8,
    },
}

/// Restore accepts the states vm-superio's 16550A can reach: at most 64 received bytes,
/// interrupt enable bits 0-3 only, an interrupt identification of none / THR empty / data
/// available / both (data available only with received bytes), the line and modem status
/// registers at their fixed values except data ready, which must match a non-empty FIFO.
/// Divisor latch, line and modem control and scratch registers hold any byte the guest can
/// write. vm-superio raises the interrupt again on restore if one is pending and enabled:
/// one spurious edge, which the 8250 driver handles by reading the identification register.
impl Persist for Console {
    type State = ConsoleState;
    type ConstructorArgs = IrqLine;
    type Error = ConsoleStateError;

    fn save(&self) -> ConsoleState {
        self.serial.state().into()
    }

    fn restore(irq: IrqLine, s: &ConsoleState) -> Result<Self, ConsoleStateError> {
        use ConsoleStateError as E;
        let fixed = SerialState::default();
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(E::Fifo(s.in_buffer.len()));
        }
        if s.interrupt_enable & !IER_VALID != 0 {
            return Err(E::InterruptEnable(s.interrupt_enable));
        }
        if !IIR_VALUES.contains(&s.interrupt_identification) {
            return Err(E::InterruptIdentification(s.interrupt_identification));
        }
        if s.interrupt_identification & 0x04 != 0 && s.in_buffer.is_empty() {
            return Err(E::DataInterruptWithoutData);
        }
        let data_ready = s.line_status & LSR_DATA_READY != 0;
        if s.line_status & !LSR_DATA_READY != fixed.line_status
            || data_ready == s.in_buffer.is_empty()
        {
            return Err(E::LineStatus {
                status: s.line_status,
                fifo: s.in_buffer.len(),
            });
        }
        if s.modem_status != fixed.modem_status {
            return Err(E::ModemStatus {
                saved: s.modem_status,
                fixed: fixed.modem_status,
            });
        }
        let out = Out { buf: Vec::new() };
        let serial = Serial::from_state(&SerialState::from(s), irq, NoEvents, out)
            .map_err(|_| E::Fifo(s.in_buffer.len()))?;
        Ok(Console { serial })
    }
}

/// Feeds stdin to the console until EOF. Runs on its own thread.
pub fn stdin_pump(dev: Arc<crate::devices::Devices>) {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            let k = dev
                .serial()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue(&buf[off..n]);
            off += k;
            if k == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use irqchip::IrqChip;

    const DATA: u8 = 0;
    const IER: u8 = 1;
    const IIR: u8 = 2;
    const LCR: u8 = 3;
    const MCR: u8 = 4;
    const LSR: u8 = 5;
    const MSR: u8 = 6;
    const SCR: u8 = 7;

    fn line() -> IrqLine {
        IrqLine::new(Arc::new(IrqChip::new(1)), 4)
    }

    /// A console with every register away from its default and input pending.
    fn busy() -> Console {
        let mut c = Console::new(line());
        c.write(LCR, 0x83); // DLAB
        c.write(DATA, 0x01); // divisor 115200 baud
        c.write(IER, 0x00);
        c.write(LCR, 0x1b);
        c.write(MCR, 0x0b);
        c.write(SCR, 0x42);
        c.write(IER, 0x0f); // THR empty interrupt pending
        assert_eq!(c.enqueue(b"abc"), 3);
        c
    }

    /// Reads every register (DATA last: it consumes input).
    fn registers(c: &mut Console) -> Vec<u8> {
        let mut v: Vec<u8> = [IER, LCR, MCR, LSR, MSR, SCR, IIR]
            .iter()
            .map(|&r| c.read(r))
            .collect();
        v.extend((0..4).map(|_| c.read(DATA)));
        v.push(c.read(LSR));
        v
    }

    #[test]
    fn round_trip() {
        let mut c = busy();
        let s = c.save();
        assert_eq!(s.in_buffer, b"abc");
        assert_eq!(s.interrupt_identification, 0x06);
        assert_eq!(s.line_status, 0x61);
        assert_eq!((s.baud_divisor_low, s.scratch), (0x01, 0x42));
        let mut r = Console::restore(line(), &s).unwrap();
        assert_eq!(r.save(), s);
        assert_eq!(registers(&mut r), registers(&mut c));
        // More input after the restore.
        assert_eq!(r.enqueue(b"d"), 1);
        assert_eq!(r.read(DATA), b'd');

        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ConsoleState>(&text).unwrap(), s);

        // A full FIFO, loopback mode, a fresh console.
        let mut full = Console::new(line());
        assert_eq!(full.enqueue(&[7; 100]), FIFO_SIZE);
        full.write(MCR, 0x10);
        let s = full.save();
        assert_eq!(Console::restore(line(), &s).unwrap().save(), s);
        let s = Console::new(line()).save();
        assert_eq!(Console::restore(line(), &s).unwrap().save(), s);
    }

    #[test]
    fn forged_states_are_rejected() {
        use ConsoleStateError as E;
        let base = busy().save();
        type Check = fn(&ConsoleStateError) -> bool;
        type Case = (&'static str, Box<dyn Fn(&mut ConsoleState)>, Check);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("fifo overflow", Box::new(|s| s.in_buffer = vec![0; 65]), |e| matches!(e, E::Fifo(65))),
            ("IER bit 4", Box::new(|s| s.interrupt_enable = 0x1f), |e| matches!(e, E::InterruptEnable(0x1f))),
            ("IIR 0", Box::new(|s| s.interrupt_identification = 0), |e| matches!(e, E::InterruptIdentification(0))),
            ("IIR none + THR", Box::new(|s| s.interrupt_identification = 3), |e| matches!(e, E::InterruptIdentification(3))),
            ("IIR FIFO bits", Box::new(|s| s.interrupt_identification = 0xc1), |e| matches!(e, E::InterruptIdentification(_))),
            ("RDA without data", Box::new(|s| { s.in_buffer.clear(); s.line_status = 0x60; }), |e| matches!(e, E::DataInterruptWithoutData)),
            ("data ready, empty", Box::new(|s| { s.in_buffer.clear(); s.interrupt_identification = 1; }), |e| matches!(e, E::LineStatus { status: 0x61, fifo: 0 })),
            ("data, not ready", Box::new(|s| s.line_status = 0x60), |e| matches!(e, E::LineStatus { .. })),
            ("line status bits", Box::new(|s| s.line_status = 0xe1), |e| matches!(e, E::LineStatus { .. })),
            ("THR not empty", Box::new(|s| s.line_status = 0x41), |e| matches!(e, E::LineStatus { .. })),
            ("modem status", Box::new(|s| s.modem_status = 0), |e| matches!(e, E::ModemStatus { saved: 0, .. })),
        ];
        for (name, spoil, check) in cases {
            let mut s = base.clone();
            spoil(&mut s);
            match Console::restore(line(), &s) {
                Ok(_) => panic!("{name}: forged state accepted"),
                Err(e) => assert!(check(&e), "{name}: wrong error {e:?}"),
            }
        }
    }

    #[test]
    fn corrupted_states_never_panic() {
        let bases = [busy().save(), Console::new(line()).save()];
        let mut x: u64 = 0x5e71_a1c0_ffee_0001;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for round in 0..4000 {
            let mut s = bases[round % 2].clone();
            let v = rng() as u8;
            let bit = 1u8 << (rng() % 8);
            match rng() % 11 {
                0 => s.baud_divisor_low = v,
                1 => s.interrupt_enable ^= bit,
                2 => s.interrupt_identification ^= bit,
                3 => s.line_control = v,
                4 => s.line_status ^= bit,
                5 => s.modem_control = v,
                6 => s.modem_status ^= bit,
                7 => s.scratch = v,
                8 => s.in_buffer.clear(),
                9 => s.in_buffer.resize((rng() % 70) as usize, v),
                _ => s.baud_divisor_high = v,
            }
            if let Ok(mut r) = Console::restore(line(), &s) {
                accepted += 1;
                assert_eq!(r.save(), s);
                for offset in 0..8 {
                    r.read(offset);
                }
                // Loopback: data writes go to the FIFO, not to the test's stdout.
                r.write(MCR, v | 0x10);
                for offset in [DATA, IER, IIR, LCR, LSR, MSR, SCR] {
                    r.write(offset, v);
                }
                r.enqueue(&[v; 80]);
            }
        }
        assert!(accepted > 200 && accepted < 3800, "{accepted} accepted");
    }
}
