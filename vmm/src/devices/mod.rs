//! Emulated devices and the dispatch of PIO/MMIO exits to them.
//!
//! Port I/O: COM1 (16550, vm-superio), the i8042 reset line, the ACPI sleep registers.
//! MMIO: the local APIC (per vCPU), the IOAPIC and virtio-mmio windows. Unclaimed reads return
//! all-ones like an empty bus; unclaimed writes are dropped. Every device lives on host 0;
//! on the other hosts of a cluster every access but the local APIC's is forwarded there
//! ([`crate::cluster::fabric`]).

pub mod legacy;
pub mod serial;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::Message;

use crate::cluster::Fabric;
use crate::irq::IrqChip;
use crate::layout::*;
use crate::stop::{StopReason, Stopper};

/// All devices of the machine.
pub struct Devices {
    serial: Mutex<serial::Console>,
    legacy: legacy::Legacy,
    virtio: Vec<Mutex<virtio_mmio::MmioTransport>>,
    chip: Arc<IrqChip>,
    stop: Arc<Stopper>,
    forward: Option<Arc<Fabric>>,
}

impl Devices {
    /// Assembles the device set.
    pub fn new(
        serial: serial::Console,
        virtio: Vec<virtio_mmio::MmioTransport>,
        chip: Arc<IrqChip>,
        stop: Arc<Stopper>,
    ) -> Self {
        Devices {
            serial: Mutex::new(serial),
            legacy: legacy::Legacy::new(stop.clone()),
            virtio: virtio.into_iter().map(Mutex::new).collect(),
            chip,
            stop,
            forward: None,
        }
    }

    /// Devices of a host that has none: every access but the local APIC's goes to host 0.
    pub fn forwarding(mut self, fabric: Arc<Fabric>) -> Self {
        self.forward = Some(fabric);
        self
    }

    /// Forwards an access if the devices live elsewhere; returns the value read.
    fn forwarded(&self, msg: Message) -> Option<u64> {
        let f = self.forward.as_ref()?;
        match f.forward(msg) {
            Ok(v) => Some(v),
            Err(e) => {
                if !self.stop.stopped() {
                    self.stop.request(StopReason::Error(e.to_string()));
                }
                Some(u64::MAX)
            }
        }
    }

    /// The serial console (for input injection).
    pub fn serial(&self) -> &Mutex<serial::Console> {
        &self.serial
    }

    /// `IN` from `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let size = data.len() as u8;
        if let Some(v) = self.forwarded(Message::Pio {
            port,
            size,
            write: false,
            data: 0,
        }) {
            put(data, v as u32);
            return;
        }
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

    /// `OUT` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.forward.is_some() {
            let msg = Message::Pio {
                port,
                size: data.len() as u8,
                write: true,
                data: get(data),
            };
            self.forwarded(msg);
            return;
        }
        match port {
            0x3f8..=0x3ff => {
                if let Some(&v) = data.first() {
                    lock(&self.serial).write((port - 0x3f8) as u8, v);
                }
            }
            _ => self.legacy.write(port, data),
        }
    }

    /// MMIO read by vCPU `cpu`.
    pub fn mmio_read(&self, cpu: usize, addr: u64, data: &mut [u8]) {
        if let Some(off) = window(addr, LAPIC_ADDR, APIC_WINDOW) {
            let v = match self.chip.lapics.get(cpu) {
                Some(l) => l.lock().read(off & !0xf, Instant::now()),
                None => 0,
            };
            put(data, v);
        } else if let Some(v) = self.forwarded(Message::Mmio {
            addr,
            size: data.len() as u8,
            write: false,
            data: 0,
        }) {
            put64(data, v);
        } else if let Some(off) = window(addr, IOAPIC_ADDR, APIC_WINDOW) {
            put(data, self.chip.ioapic_read(off));
        } else if let Some((dev, off)) = self.virtio_window(addr) {
            lock(dev).read(off, data);
        } else {
            log::debug!("unclaimed MMIO read at {addr:#x}");
            data.fill(0xff);
        }
    }

    /// MMIO write by vCPU `cpu`.
    pub fn mmio_write(&self, cpu: usize, addr: u64, data: &[u8]) {
        if let Some(off) = window(addr, LAPIC_ADDR, APIC_WINDOW) {
            let effect = match self.chip.lapics.get(cpu) {
                Some(l) => l.lock().write(off & !0xf, get(data), Instant::now()),
                None => None,
            };
            if let Some(e) = effect {
                self.chip.apply(e, cpu);
            }
            // A timer register (LVT timer, initial count, divide) may have moved the deadline:
            // let the timer thread re-evaluate. Other writes (EOI above all) need no wake-up.
            if matches!(off & !0xf, 0x320 | 0x380 | 0x3e0) {
                if let Some(l) = self.chip.lapics.get(cpu) {
                    l.changed.notify_all();
                }
            }
        } else if self.forward.is_some() {
            let msg = Message::Mmio {
                addr,
                size: data.len() as u8,
                write: true,
                data: get64(data),
            };
            self.forwarded(msg);
        } else if let Some(off) = window(addr, IOAPIC_ADDR, APIC_WINDOW) {
            self.chip.ioapic_write(off, get(data));
        } else if let Some((dev, off)) = self.virtio_window(addr) {
            lock(dev).write(off, data);
        } else {
            log::debug!("unclaimed MMIO write at {addr:#x}");
        }
    }

    fn virtio_window(&self, addr: u64) -> Option<(&Mutex<virtio_mmio::MmioTransport>, u64)> {
        let off = addr.checked_sub(VIRTIO_MMIO_BASE)?;
        let dev = self.virtio.get((off / VIRTIO_MMIO_SIZE) as usize)?;
        Some((dev, off % VIRTIO_MMIO_SIZE))
    }
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
