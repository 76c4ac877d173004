//! Emulated devices and the dispatch of PIO/MMIO exits to them.
//!
//! Port I/O: COM1 (16550, vm-superio), the i8042 reset line, the ACPI sleep registers.
//! MMIO: the local APIC (per vCPU), the IOAPIC and virtio-mmio windows. Unclaimed reads return
//! all-ones like an empty bus; unclaimed writes are dropped.
//!
//! In a cluster every device has a home host, given by the cluster's
//! [`Placement`](crate::cluster::Placement): the serial port and the legacy ports at the console
//! home, the IOAPIC at its home (both host 0 by default), each virtio disk at its disk home (the
//! host its configuration names). An access by a vCPU on
//! another host is forwarded to the home ([`crate::cluster::fabric`]) and served there by the
//! io-server thread through the `local_*` entry points, which never forward again. The local
//! APIC is always the accessing vCPU's own.

pub mod legacy;
pub mod serial;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use irqchip::IrqChip;
use proto::Message;

use crate::cluster::{Fabric, Placement};
use crate::layout::*;
use crate::stop::{StopReason, Stopper};

/// Where a cluster host sends the accesses to devices it is not home of.
struct Routing {
    fabric: Arc<Fabric>,
    me: usize,
    /// Home host of each virtio-mmio slot.
    virtio_home: Vec<usize>,
    /// Home of the IOAPIC's MMIO window.
    ioapic_home: usize,
    /// Home of the serial port, the legacy ports and anything else unclaimed.
    console_home: usize,
}

/// All devices of the machine.
pub struct Devices {
    serial: Mutex<serial::Console>,
    legacy: legacy::Legacy,
    /// One entry per virtio-mmio slot: the device where this host is its home, else None.
    virtio: Vec<Option<Mutex<virtio_mmio::MmioTransport>>>,
    chip: Arc<IrqChip>,
    stop: Arc<Stopper>,
    routing: Option<Routing>,
}

impl Devices {
    /// Assembles the device set; `virtio` has one entry per slot (None: the device lives on
    /// another host).
    pub fn new(
        serial: serial::Console,
        virtio: Vec<Option<virtio_mmio::MmioTransport>>,
        chip: Arc<IrqChip>,
        stop: Arc<Stopper>,
    ) -> Self {
        Devices {
            serial: Mutex::new(serial),
            legacy: legacy::Legacy::new(stop.clone()),
            virtio: virtio.into_iter().map(|d| d.map(Mutex::new)).collect(),
            chip,
            stop,
            routing: None,
        }
    }

    /// The devices of cluster host `me`: accesses to devices homed elsewhere under
    /// `placement` (console, legacy ports and IOAPIC at their homes, virtio slot `i` at
    /// `disk_home[i]`) are forwarded through `fabric`.
    pub fn clustered(mut self, fabric: Arc<Fabric>, me: usize, placement: &Placement) -> Self {
        self.routing = Some(Routing {
            fabric,
            me,
            virtio_home: placement.disk_homes(),
            ioapic_home: usize::from(placement.ioapic_home),
            console_home: usize::from(placement.console_home),
        });
        self
    }

    /// The host that emulates what lives at MMIO address `addr` (local APIC excluded), if it
    /// is not this one.
    fn mmio_home(&self, addr: u64) -> Option<usize> {
        let r = self.routing.as_ref()?;
        let home = match virtio_slot(addr) {
            Some((slot, _)) => r.virtio_home.get(slot).copied().unwrap_or(r.console_home),
            None if window(addr, IOAPIC_ADDR, APIC_WINDOW).is_some() => r.ioapic_home,
            None => r.console_home,
        };
        (home != r.me).then_some(home)
    }

    /// The host that emulates port I/O (the console home), if it is not this one.
    fn pio_home(&self) -> Option<usize> {
        let r = self.routing.as_ref()?;
        (r.console_home != r.me).then_some(r.console_home)
    }

    /// Forwards an access to host `home`; returns the value read (all-ones after a failure,
    /// which also stops the machine).
    fn forward(&self, home: usize, msg: Message) -> u64 {
        let Some(r) = self.routing.as_ref() else {
            return u64::MAX;
        };
        match r.fabric.forward(home, msg) {
            Ok(v) => v,
            Err(e) => {
                if !self.stop.stopped() {
                    self.stop.request(StopReason::Error(e.to_string()));
                }
                u64::MAX
            }
        }
    }

    /// The serial console (for input injection).
    pub fn serial(&self) -> &Mutex<serial::Console> {
        &self.serial
    }

    /// The legacy ports (to save their state).
    pub fn legacy(&self) -> &legacy::Legacy {
        &self.legacy
    }

    /// Replaces the legacy ports (a restored machine, before the devices are shared).
    pub fn set_legacy(&mut self, l: legacy::Legacy) {
        self.legacy = l;
    }

    /// The virtio-mmio slots (None: homed on another host).
    pub fn virtio(&self) -> &[Option<Mutex<virtio_mmio::MmioTransport>>] {
        &self.virtio
    }

    /// `IN` from `port` by a vCPU of this host.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match self.pio_home() {
            Some(home) => {
                let msg = Message::Pio {
                    port,
                    size: data.len() as u8,
                    write: false,
                    data: 0,
                };
                put(data, self.forward(home, msg) as u32);
            }
            None => self.local_pio_read(port, data),
        }
    }

    /// `IN` from `port`, served by this host.
    pub fn local_pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            0x3f8..=0x3ff => {
                let v = lock(&self.serial).read((port - 0x3f8) as u8);
                data.fill(0);
                if let Some(d) = data.first_mut() {
                    *d = v;
                }
            }
            _ => {
                if !self.legacy.read(port, data) {
                    data.fill(0xff);
                }
            }
        }
    }

    /// `OUT` to `port` by a vCPU of this host.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match self.pio_home() {
            Some(home) => {
                let msg = Message::Pio {
                    port,
                    size: data.len() as u8,
                    write: true,
                    data: get(data),
                };
                self.forward(home, msg);
            }
            None => self.local_pio_write(port, data),
        }
    }

    /// `OUT` to `port`, served by this host.
    pub fn local_pio_write(&self, port: u16, data: &[u8]) {
        match port {
            0x3f8..=0x3ff => {
                if let Some(&v) = data.first() {
                    lock(&self.serial).write((port - 0x3f8) as u8, v);
                }
            }
            _ => self.legacy.write(port, data),
        }
    }

    /// MMIO read by vCPU `cpu` of this host.
    pub fn mmio_read(&self, cpu: usize, addr: u64, data: &mut [u8]) {
        if let Some(off) = window(addr, LAPIC_ADDR, APIC_WINDOW) {
            let v = match self.chip.lapics.get(cpu) {
                // In x2APIC mode the MMIO window is gone (registers are MSRs).
                Some(l) => {
                    let st = l.lock();
                    if st.x2apic() {
                        0
                    } else {
                        st.read(off & !0xf, Instant::now())
                    }
                }
                None => 0,
            };
            put(data, v);
        } else if let Some(home) = self.mmio_home(addr) {
            let msg = Message::Mmio {
                addr,
                size: data.len() as u8,
                write: false,
                data: 0,
            };
            put64(data, self.forward(home, msg));
        } else {
            self.local_mmio_read(addr, data);
        }
    }

    /// MMIO read of a device this host is home of.
    pub fn local_mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some(off) = window(addr, IOAPIC_ADDR, APIC_WINDOW) {
            put(data, self.chip.ioapic_read(off));
        } else if let Some((dev, off)) = self.virtio_window(addr) {
            lock(dev).read(off, data);
        } else {
            log::debug!("unclaimed MMIO read at {addr:#x}");
            data.fill(0xff);
        }
    }

    /// MMIO write by vCPU `cpu` of this host.
    pub fn mmio_write(&self, cpu: usize, addr: u64, data: &[u8]) {
        if let Some(off) = window(addr, LAPIC_ADDR, APIC_WINDOW) {
            let effect = match self.chip.lapics.get(cpu) {
                Some(l) => {
                    let mut st = l.lock();
                    if st.x2apic() {
                        None
                    } else {
                        st.write(off & !0xf, get(data), Instant::now())
                    }
                }
                None => None,
            };
            if let Some(e) = effect {
                self.chip.apply(e, cpu);
            }
            // A timer register (LVT timer, initial count, divide) may have moved the deadline:
            // let the timer thread re-evaluate. Other writes (EOI above all) need no wake-up.
            if irqchip::lapic::timer_register(off & !0xf) {
                if let Some(l) = self.chip.lapics.get(cpu) {
                    l.changed.notify_all();
                }
            }
        } else if let Some(home) = self.mmio_home(addr) {
            let msg = Message::Mmio {
                addr,
                size: data.len() as u8,
                write: true,
                data: get64(data),
            };
            self.forward(home, msg);
        } else {
            self.local_mmio_write(addr, data);
        }
    }

    /// MMIO write to a device this host is home of.
    pub fn local_mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(off) = window(addr, IOAPIC_ADDR, APIC_WINDOW) {
            self.chip.ioapic_write(off, get(data));
        } else if let Some((dev, off)) = self.virtio_window(addr) {
            lock(dev).write(off, data);
        } else {
            log::debug!("unclaimed MMIO write at {addr:#x}");
        }
    }

    fn virtio_window(&self, addr: u64) -> Option<(&Mutex<virtio_mmio::MmioTransport>, u64)> {
        let (slot, off) = virtio_slot(addr)?;
        let dev = self.virtio.get(slot)?.as_ref()?;
        Some((dev, off))
    }
}

/// The virtio-mmio slot and offset of `addr`, if it is inside a slot's window.
fn virtio_slot(addr: u64) -> Option<(usize, u64)> {
    let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
    let slot = usize::try_from(off / VIRTIO_MMIO_SIZE).ok()?;
    (slot < VIRTIO_IRQS.len()).then_some((slot, off % VIRTIO_MMIO_SIZE))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn window(addr: u64, base: u64, size: u64) -> Option<u64> {
    addr.checked_sub(base).filter(|o| *o < size)
}

fn put(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}

fn put64(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}

fn get64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (i, d) in data.iter().take(8).enumerate() {
        b[i] = *d;
    }
    u64::from_le_bytes(b)
}

fn get(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (i, d) in data.iter().take(4).enumerate() {
        b[i] = *d;
    }
    u32::from_le_bytes(b)
}
