//! COM1: a 16550A from vm-superio, output to the VMM's stdout, input from its stdin.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
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
