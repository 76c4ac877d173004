//! Stopping the machine: the first stop request wins and wakes every vCPU and timer thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use irqchip::LocalApic;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// ACPI S5 from the guest.
    PowerOff,
    /// Reset through the i8042 controller or a KVM system event.
    Reset,
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// Stopped after a snapshot (`ssi-vmm snapshot --stop`): the guest goes on from it.
    Snapshotted(String),
    /// The VMM could not continue.
    Error(String),
}

impl StopReason {
    /// Process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::PowerOff | StopReason::Reset | StopReason::Snapshotted(_) => 0,
            StopReason::TripleFault => 2,
            StopReason::Error(_) => 1,
        }
    }
}

/// Called once with the first stop reason of this host (the cluster tells the other hosts).
pub type StopHook = Box<dyn Fn(&StopReason) + Send + Sync>;

/// Shared stop flag.
pub struct Stopper {
    flag: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    lapics: Vec<Arc<LocalApic>>,
    hook: Mutex<Option<StopHook>>,
}

impl Stopper {
    /// A stopper that wakes these APICs' vCPUs and timers.
    pub fn new(lapics: Vec<Arc<LocalApic>>) -> Self {
        Stopper {
            flag: AtomicBool::new(false),
            reason: Mutex::new(None),
            lapics,
            hook: Mutex::new(None),
        }
    }

    /// Installs the hook run by the first [`Stopper::request`].
    pub fn set_hook(&self, hook: StopHook) {
        *self.hook.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Requests a stop; later requests keep the first reason. The first one also runs the hook.
    pub fn request(&self, reason: StopReason) {
        if self.record(reason.clone()) {
            if let Some(h) = &*self.hook.lock().unwrap_or_else(|p| p.into_inner()) {
                h(&reason);
            }
        }
        self.wake_all();
    }

    /// Requests a stop without running the hook (a stop that came from another host).
    pub fn request_quiet(&self, reason: StopReason) {
        self.record(reason);
        self.wake_all();
    }

    fn record(&self, reason: StopReason) -> bool {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        let first = r.is_none();
        if first {
            *r = Some(reason);
        }
        first
    }

    fn wake_all(&self) {
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
