//! Legacy platform ports: the i8042 controller's reset line (`reboot=k`), the ACPI sleep
//! control/status registers of the hardware-reduced FADT (`poweroff`), and an inert pair of
//! 8259 PICs.
//!
//! The PICs only remember their mask registers: Linux decides whether legacy IRQs 0-15 exist
//! by writing the master's mask and reading it back, and only with legacy IRQs does it map ISA
//! IRQs (COM1 is IRQ 4) to IOAPIC pins 0-15. Every interrupt is delivered by the IOAPIC; the
//! PICs never raise one (their LINT0 ExtINT path stays masked by the guest).

use std::sync::{Arc, Mutex};

use crate::boot::acpi::{S5_SLP_TYP, SLP_EN};
use crate::layout::{ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT};
use crate::stop::{StopReason, Stopper};

const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// One 8259: the initialisation-word sequence and the interrupt mask.
#[derive(Debug, Default)]
struct Pic {
    imr: u8,
    /// Initialisation words still expected on the data port (ICW2..ICW4).
    icw_left: u8,
}

impl Pic {
    fn command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1: ICW2 and ICW3 follow, and ICW4 if bit 0 is set.
            self.icw_left = 2 + (v & 1);
            self.imr = 0;
        }
    }

    fn data(&mut self, v: u8) {
        if self.icw_left > 0 {
            self.icw_left -= 1;
        } else {
            self.imr = v;
        }
    }
}

/// The legacy ports.
pub struct Legacy {
    stop: Arc<Stopper>,
    pics: Mutex<[Pic; 2]>,
}

impl Legacy {
    /// Ports that stop the VM through `stop`.
    pub fn new(stop: Arc<Stopper>) -> Self {
        Legacy {
            stop,
            pics: Mutex::new([Pic::default(), Pic::default()]),
        }
    }

    fn pic(&self, port: u16) -> Option<usize> {
        match port {
            0x20 | 0x21 => Some(0),
            0xa0 | 0xa1 => Some(1),
            _ => None,
        }
    }

    /// Returns false if the port is not ours.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        if let Some(i) = self.pic(port) {
            let pics = self.pics.lock().unwrap_or_else(|p| p.into_inner());
            // Data port: the mask; command port: IRR/ISR, always empty.
            let v = if port & 1 == 1 { pics[i].imr } else { 0 };
            data.fill(0);
            if let Some(d) = data.first_mut() {
                *d = v;
            }
            return true;
        }
        match port {
            // Status: output buffer empty, input buffer empty.
            I8042_CMD | I8042_DATA | ACPI_SLEEP_STATUS_PORT | ACPI_SLEEP_CONTROL_PORT => {
                data.fill(0);
                true
            }
            _ => false,
        }
    }

    /// Handles an `OUT`; unknown ports are ignored.
    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if let Some(i) = self.pic(port) {
            let mut pics = self.pics.lock().unwrap_or_else(|p| p.into_inner());
            if port & 1 == 1 {
                pics[i].data(v);
            } else {
                pics[i].command(v);
            }
            return;
        }
        match port {
            I8042_CMD if v == I8042_RESET => {
                log::info!("guest reset through the i8042 controller");
                self.stop.request(StopReason::Reset);
            }
            ACPI_SLEEP_CONTROL_PORT if v & SLP_EN != 0 => {
                let typ = (v >> 2) & 7;
                if typ == S5_SLP_TYP {
                    log::info!("guest ACPI poweroff (S5)");
                    self.stop.request(StopReason::PowerOff);
                } else {
                    log::warn!("guest asked for unsupported sleep type {typ}");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pic_mask_reads_back() {
        let l = Legacy::new(Arc::new(Stopper::new(vec![])));
        let mut b = [0u8];
        // Linux's probe: write the mask, read it back.
        l.write(0x21, &[0xfb]);
        assert!(l.read(0x21, &mut b));
        assert_eq!(b[0], 0xfb);
        // ICW1..ICW4 do not touch the mask until the sequence is over.
        l.write(0x20, &[0x11]);
        for icw in [0x30, 0x04, 0x01] {
            l.write(0x21, &[icw]);
        }
        l.read(0x21, &mut b);
        assert_eq!(b[0], 0);
        l.write(0x21, &[0xff]);
        l.read(0x21, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn poweroff_and_reset() {
        let s = Arc::new(Stopper::new(vec![]));
        let l = Legacy::new(s.clone());
        l.write(ACPI_SLEEP_CONTROL_PORT, &[(S5_SLP_TYP << 2)]);
        assert!(s.reason().is_none(), "SLP_EN not set");
        l.write(ACPI_SLEEP_CONTROL_PORT, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(s.reason(), Some(StopReason::PowerOff));
        let s = Arc::new(Stopper::new(vec![]));
        let l = Legacy::new(s.clone());
        l.write(I8042_CMD, &[I8042_RESET]);
        assert_eq!(s.reason(), Some(StopReason::Reset));
    }
}
