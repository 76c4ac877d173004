//! Stopping the machine: the first stop request wins and wakes every vCPU and timer thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::irq::lapic::LocalApic;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// ACPI S5 from the guest.
    PowerOff,
    /// Reset through the i8042 controller or a KVM system event.
    Reset,
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The VMM could not continue.
    Error(String),
}

impl StopReason {
    /// Process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::PowerOff | StopReason::Reset => 0,
            StopReason::TripleFault => 2,
            StopReason::Error(_) => 1,
        }
    }
}

/// Shared stop flag.
pub struct Stopper {
    flag: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    lapics: Vec<Arc<LocalApic>>,
}

impl Stopper {
    /// A stopper that wakes these APICs' vCPUs and timers.
    pub fn new(lapics: Vec<Arc<LocalApic>>) -> Self {
        Stopper {
            flag: AtomicBool::new(false),
            reason: Mutex::new(None),
            lapics,
        }
    }

    /// Requests a stop; later requests keep the first reason.
    pub fn request(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.flag.store(true, Ordering::SeqCst);
        for l in &self.lapics {
            // Take the APIC lock so a thread between its check and its wait cannot miss this.
            drop(l.lock());
            l.wake();
        }
    }

    /// Whether a stop was requested.
    pub fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The stop reason, once stopped.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
