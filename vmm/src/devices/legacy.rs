//! Legacy platform ports: the i8042 controller's reset line (`reboot=k`), the ACPI sleep
//! control/status registers of the hardware-reduced FADT (`poweroff`), and an inert pair of
//! 8259 PICs.
//!
//! The PICs only remember their mask registers: Linux decides whether legacy IRQs 0-15 exist
//! by writing the master's mask and reading it back, and only with legacy IRQs does it map ISA
//! IRQs (COM1 is IRQ 4) to IOAPIC pins 0-15. Every interrupt is delivered by the IOAPIC; the
//! PICs never raise one (their LINT0 ExtINT path stays masked by the guest).
//!
//! Saved state ([`LegacyState`], through [`snapshot::Persist`]): the two PICs' masks and
//! initialisation progress. The i8042 and ACPI sleep ports hold none: reads are constant and
//! writes take effect at once (a reset or poweroff request stops the machine).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use crate::boot::acpi::{S5_SLP_TYP, SLP_EN};
use crate::layout::{ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT};
use crate::stop::{StopReason, Stopper};

const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Most initialisation words an ICW1 announces (ICW2, ICW3, ICW4).
const MAX_ICW_LEFT: u8 = 3;

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

/// Saved state of one 8259.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PicState {
    /// Interrupt mask register.
    pub imr: u8,
    /// Initialisation words still expected on the data port (0 to 3).
    pub icw_left: u8,
}

/// Saved state of the legacy ports: the master and slave PICs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LegacyState {
    /// Master (ports 0x20/0x21) and slave (0xa0/0xa1).
    pub pics: [PicState; 2],
}

/// Why a saved legacy state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum LegacyStateError {
    /// A PIC expects more initialisation words than an ICW1 can announce.
    #[error("PIC {pic} expects {icw_left} initialisation words, at most {MAX_ICW_LEFT} exist")]
    IcwLeft {
        /// 0: master, 1: slave.
        pic: usize,
        /// Saved `icw_left`.
        icw_left: u8,
    },
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

/// Restore accepts any mask and at most three pending initialisation words per PIC.
impl Persist for Legacy {
    type State = LegacyState;
    type ConstructorArgs = Arc<Stopper>;
    type Error = LegacyStateError;

    fn save(&self) -> LegacyState {
        let pics = self.pics.lock().unwrap_or_else(|p| p.into_inner());
        LegacyState {
            pics: pics.each_ref().map(|p| PicState {
                imr: p.imr,
                icw_left: p.icw_left,
            }),
        }
    }

    fn restore(stop: Arc<Stopper>, s: &LegacyState) -> Result<Self, LegacyStateError> {
        for (pic, p) in s.pics.iter().enumerate() {
            if p.icw_left > MAX_ICW_LEFT {
                return Err(LegacyStateError::IcwLeft {
                    pic,
                    icw_left: p.icw_left,
                });
            }
        }
        Ok(Legacy {
            stop,
            pics: Mutex::new(s.pics.map(|p| Pic {
                imr: p.imr,
                icw_left: p.icw_left,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let s = Arc::new(Stopper::new(vec![]));
        let l = Legacy::new(s.clone());
        l.write(0x21, &[0xfb]);
        // The slave is in the middle of its initialisation: ICW1 (with ICW4), ICW2 sent.
        l.write(0xa0, &[0x11]);
        l.write(0xa1, &[0x70]);
        let saved = l.save();
        assert_eq!(
            saved.pics,
            [
                PicState {
                    imr: 0xfb,
                    icw_left: 0
                },
                PicState {
                    imr: 0,
                    icw_left: 2
                }
            ]
        );
        let text = serde_json::to_string(&saved).unwrap();
        let back: LegacyState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, saved);
        let r = Legacy::restore(s.clone(), &back).unwrap();
        assert_eq!(r.save(), saved);
        let mut b = [0u8];
        r.read(0x21, &mut b);
        assert_eq!(b[0], 0xfb);
        // The rest of the sequence (ICW3, ICW4) does not touch the mask; the next write does.
        for v in [0x02, 0x01, 0xff] {
            r.write(0xa1, &[v]);
        }
        r.read(0xa1, &mut b);
        assert_eq!(b[0], 0xff);
        // The restored ports still stop the machine.
        r.write(I8042_CMD, &[I8042_RESET]);
        assert_eq!(s.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn forged_icw_counts_are_rejected() {
        for pic in 0..2 {
            for icw_left in 0..=u8::MAX {
                let mut st = LegacyState::default();
                st.pics[pic] = PicState {
                    imr: icw_left,
                    icw_left,
                };
                let r = Legacy::restore(Arc::new(Stopper::new(vec![])), &st);
                if icw_left <= MAX_ICW_LEFT {
                    assert_eq!(r.unwrap().save(), st);
                } else {
                    let e = r.err().unwrap();
                    assert!(
                        matches!(e, LegacyStateError::IcwLeft { pic: p, icw_left: n } if p == pic && n == icw_left)
                    );
                }
            }
        }
    }

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
