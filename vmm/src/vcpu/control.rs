//! Controlling a running vCPU thread: pause, resume, stop.
//!
//! Each vCPU thread owns the receiving end of an event channel ([`VcpuEvent`]) and the sending
//! end of a response channel ([`VcpuResponse`]); the VM keeps the other ends in a
//! [`VcpuHandle`]. The `KVM_RUN` loop does not poll the channel: it reads one flag
//! ([`VcpuShared::pending`], a relaxed atomic load) per exit, and only when the flag is set does
//! it drain the channel.
//!
//! A controller sends the event, then sets the flag, then wakes the vCPU the way an interrupt
//! does ([`LocalApic::wake`]: the APIC condvar for a thread parked in HLT or waiting for SIPI,
//! and the [`crate::irq::Kicker`] for one inside or about to enter `KVM_RUN`). The vCPU thread
//! acknowledges a pause only at its checkpoint at the top of the run loop, that is after
//! `KVM_RUN` has returned, and then blocks on the event channel: while paused it never enters
//! `KVM_RUN`, whatever interrupts arrive (they stay pending in the APIC and are delivered after
//! resume). A vCPU that was halted when paused goes back to its HLT wait after resume.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use irqchip::LocalApic;

/// A request to a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Leave guest mode and stay out until [`VcpuEvent::Resume`].
    Pause,
    /// Continue after a pause.
    Resume,
    /// End the thread (the VM is stopping).
    Stop,
    /// While paused: save the vCPU's KVM state ([`PauseHooks::save`]) into
    /// [`VcpuShared::take_saved`] and answer [`VcpuResponse::Saved`]; ignored while running.
    Save,
}

/// A vCPU thread's answer to a [`VcpuEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    /// It is out of `KVM_RUN` and will not enter it until resumed.
    Paused,
    /// It runs again.
    Resumed,
    /// It saved its state (or failed to): see [`VcpuShared::take_saved`].
    Saved,
}

/// What a paused vCPU saves for a snapshot ([`VcpuEvent::Save`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedVcpu {
    /// vCPU index.
    pub index: usize,
    /// Its KVM state.
    pub kvm: super::state::VcpuState,
    /// Whether it was parked on HLT (the VMM, not KVM, keeps that).
    pub halted: bool,
    /// Its guest TSC rate in kHz (the local APIC's timer deadlines are in guest-TSC cycles).
    pub tsc_khz: u64,
}

/// What a vCPU thread does at the control checkpoints that need its `VcpuFd`.
pub trait PauseHooks {
    /// Runs once when the vCPU pauses.
    fn on_pause(&mut self);
    /// Saves the paused vCPU's state.
    fn save(&mut self) -> Result<SavedVcpu, String>;
}

/// What a vCPU thread is doing, as last published by it (for `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    /// Created, its thread not yet in the run loop.
    Starting = 0,
    /// Running guest code (or handling an exit).
    Running = 1,
    /// Parked on HLT.
    Halted = 2,
    /// An application processor waiting for INIT/SIPI.
    WaitingForSipi = 3,
    /// Paused by the VMM.
    Paused = 4,
    /// The thread has ended.
    Stopped = 5,
}

impl Activity {
    fn from_u8(v: u8) -> Activity {
        match v {
            1 => Activity::Running,
            2 => Activity::Halted,
            3 => Activity::WaitingForSipi,
            4 => Activity::Paused,
            5 => Activity::Stopped,
            _ => Activity::Starting,
        }
    }

    /// Lower-case name used on the control socket.
    pub fn name(self) -> &'static str {
        match self {
            Activity::Starting => "starting",
            Activity::Running => "running",
            Activity::Halted => "halted",
            Activity::WaitingForSipi => "waiting-for-sipi",
            Activity::Paused => "paused",
            Activity::Stopped => "stopped",
        }
    }
}

/// State shared between a vCPU thread and its handle.
#[derive(Debug)]
pub struct VcpuShared {
    /// Set after an event was sent; the thread clears it before draining the channel.
    pending: AtomicBool,
    activity: AtomicU8,
    exits: AtomicU64,
    saved: Mutex<Option<Result<SavedVcpu, String>>>,
}

impl Default for VcpuShared {
    fn default() -> Self {
        VcpuShared {
            pending: AtomicBool::new(false),
            activity: AtomicU8::new(Activity::Starting as u8),
            exits: AtomicU64::new(0),
            saved: Mutex::new(None),
        }
    }
}

impl VcpuShared {
    /// Whether an event waits in the channel (one relaxed load: the run loop's only check).
    #[inline]
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Clears the flag before the channel is drained (an event sent after this sets it again).
    pub fn take_pending(&self) -> bool {
        self.pending.swap(false, Ordering::AcqRel)
    }

    /// Publishes what the thread is doing.
    #[inline]
    pub fn set_activity(&self, a: Activity) {
        self.activity.store(a as u8, Ordering::Relaxed);
    }

    /// What the thread last published.
    pub fn activity(&self) -> Activity {
        Activity::from_u8(self.activity.load(Ordering::Relaxed))
    }

    /// Publishes the thread's exit count.
    #[inline]
    pub fn set_exits(&self, n: u64) {
        self.exits.store(n, Ordering::Relaxed);
    }

    /// `KVM_RUN` exits of this vCPU so far.
    pub fn exits(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    fn put_saved(&self, r: Result<SavedVcpu, String>) {
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// The state the thread saved at the last [`VcpuEvent::Save`] (taken: None afterwards).
    pub fn take_saved(&self) -> Option<Result<SavedVcpu, String>> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The vCPU thread's end of the control channels.
pub struct VcpuControl {
    /// Shared flag and published state.
    pub shared: Arc<VcpuShared>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
}

/// What the run loop does after handling pending events.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterEvents {
    /// Go on (resumed, or nothing to do).
    Continue,
    /// End the thread.
    Stop,
}

impl VcpuControl {
    /// Handles every pending event; a pause blocks here until resume or stop. `stopped` is
    /// polled while paused, so a stop requested elsewhere (the guest on another vCPU, a peer
    /// host) also ends the pause. `hooks.on_pause` runs once when the vCPU pauses,
    /// `hooks.save` at each [`VcpuEvent::Save`] while paused.
    pub fn handle_events(
        &self,
        stopped: &dyn Fn() -> bool,
        hooks: &mut dyn PauseHooks,
    ) -> AfterEvents {
        self.shared.take_pending();
        loop {
            match self.events.try_recv() {
                Ok(VcpuEvent::Pause) => {
                    hooks.on_pause();
                    if self.paused(stopped, hooks) == AfterEvents::Stop {
                        return AfterEvents::Stop;
                    }
                }
                // Only a paused vCPU saves (the controller pauses first).
                Ok(VcpuEvent::Save) => {}
                Ok(VcpuEvent::Resume) => {
                    let _ = self.responses.send(VcpuResponse::Resumed);
                }
                Ok(VcpuEvent::Stop) => return AfterEvents::Stop,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {
                    return AfterEvents::Continue
                }
            }
        }
    }

    /// Paused: acknowledges, then waits for resume or stop.
    fn paused(&self, stopped: &dyn Fn() -> bool, hooks: &mut dyn PauseHooks) -> AfterEvents {
        let before = self.shared.activity();
        self.shared.set_activity(Activity::Paused);
        let _ = self.responses.send(VcpuResponse::Paused);
        loop {
            if stopped() {
                return AfterEvents::Stop;
            }
            match self.events.recv_timeout(PAUSED_POLL) {
                Ok(VcpuEvent::Resume) => {
                    self.shared.take_pending();
                    self.shared.set_activity(before);
                    let _ = self.responses.send(VcpuResponse::Resumed);
                    return AfterEvents::Continue;
                }
                Ok(VcpuEvent::Pause) => {
                    let _ = self.responses.send(VcpuResponse::Paused);
                }
                Ok(VcpuEvent::Save) => {
                    self.shared.take_pending();
                    self.shared.put_saved(hooks.save());
                    let _ = self.responses.send(VcpuResponse::Saved);
                }
                Ok(VcpuEvent::Stop) => return AfterEvents::Stop,
                Err(RecvTimeoutError::Timeout) => {}
                // Nobody can resume it any more: the VM is going away.
                Err(RecvTimeoutError::Disconnected) => return AfterEvents::Stop,
            }
        }
    }
}

/// How often a paused vCPU looks at the VM's stop flag.
const PAUSED_POLL: Duration = Duration::from_millis(50);

/// Errors controlling vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thread has ended.
    #[error("vCPU {0} has stopped")]
    Gone(usize),
    /// No acknowledgement in time.
    #[error("vCPU(s) {vcpus:?} did not acknowledge {what} within {timeout:?}")]
    Timeout {
        /// Which request.
        what: &'static str,
        /// The vCPUs that did not answer.
        vcpus: Vec<usize>,
        /// How long they had.
        timeout: Duration,
    },
}

/// The VM's end of one vCPU thread's control channels.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: usize,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    /// Shared flag and published state.
    pub shared: Arc<VcpuShared>,
    lapic: Arc<LocalApic>,
}

/// A connected handle and the thread's end.
pub fn channel(index: usize, lapic: Arc<LocalApic>) -> (VcpuHandle, VcpuControl) {
    let (etx, erx) = std::sync::mpsc::channel();
    let (rtx, rrx) = std::sync::mpsc::channel();
    let shared = Arc::new(VcpuShared::default());
    (
        VcpuHandle {
            index,
            events: etx,
            responses: rrx,
            shared: shared.clone(),
            lapic,
        },
        VcpuControl {
            shared,
            events: erx,
            responses: rtx,
        },
    )
}

impl VcpuHandle {
    /// Sends an event and makes the thread notice it (out of `KVM_RUN`, HLT or the SIPI wait).
    pub fn send(&self, ev: VcpuEvent) -> Result<(), Error> {
        self.events.send(ev).map_err(|_| Error::Gone(self.index))?;
        self.shared.pending.store(true, Ordering::SeqCst);
        // Take the APIC lock so a thread between its wait condition check and its wait cannot
        // miss the flag (the waits check it under this lock).
        drop(self.lapic.lock());
        self.lapic.wake();
        Ok(())
    }

    /// Drops answers left over from an earlier request that timed out.
    pub fn drain(&self) {
        while self.responses.try_recv().is_ok() {}
    }

    /// Waits until `deadline` for `want`; false on timeout or a finished thread.
    pub fn wait_for(&self, want: VcpuResponse, deadline: Instant) -> bool {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok(r) if r == want => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoHooks<'a>(&'a mut u32);
    impl PauseHooks for NoHooks<'_> {
        fn on_pause(&mut self) {
            *self.0 += 1;
        }
        fn save(&mut self) -> Result<SavedVcpu, String> {
            Err(format!("save after {} pause(s)", self.0))
        }
    }

    #[test]
    fn pause_resume_stop_through_the_channel() {
        let lapic = Arc::new(LocalApic::new(0, true));
        let (h, c) = channel(0, lapic);
        let stopped = Arc::new(AtomicBool::new(false));
        let s2 = stopped.clone();
        let t = std::thread::spawn(move || {
            let mut pauses = 0;
            loop {
                if c.shared.pending() {
                    let r =
                        c.handle_events(&|| s2.load(Ordering::SeqCst), &mut NoHooks(&mut pauses));
                    if r == AfterEvents::Stop {
                        return pauses;
                    }
                }
                c.shared.set_activity(Activity::Running);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let deadline = || Instant::now() + Duration::from_secs(5);
        h.send(VcpuEvent::Pause).unwrap();
        assert!(h.wait_for(VcpuResponse::Paused, deadline()));
        assert_eq!(h.shared.activity(), Activity::Paused);
        // Paused twice is still paused.
        h.send(VcpuEvent::Pause).unwrap();
        assert!(h.wait_for(VcpuResponse::Paused, deadline()));
        // A save while paused answers with the hook's result.
        h.send(VcpuEvent::Save).unwrap();
        assert!(h.wait_for(VcpuResponse::Saved, deadline()));
        assert_eq!(
            h.shared.take_saved(),
            Some(Err("save after 1 pause(s)".to_string()))
        );
        assert_eq!(h.shared.take_saved(), None);
        h.send(VcpuEvent::Resume).unwrap();
        assert!(h.wait_for(VcpuResponse::Resumed, deadline()));
        // Stop while paused.
        h.send(VcpuEvent::Pause).unwrap();
        assert!(h.wait_for(VcpuResponse::Paused, deadline()));
        h.send(VcpuEvent::Stop).unwrap();
        assert_eq!(t.join().unwrap(), 2);
        assert!(matches!(h.send(VcpuEvent::Resume), Err(Error::Gone(0))));
        let _ = stopped;
    }

    #[test]
    fn a_vm_stop_ends_a_pause() {
        let lapic = Arc::new(LocalApic::new(0, true));
        let (h, c) = channel(0, lapic);
        let stopped = Arc::new(AtomicBool::new(false));
        let s2 = stopped.clone();
        let t = std::thread::spawn(move || {
            while !c.shared.pending() {
                std::thread::sleep(Duration::from_millis(1));
            }
            c.handle_events(&|| s2.load(Ordering::SeqCst), &mut NoHooks(&mut 0))
        });
        h.send(VcpuEvent::Pause).unwrap();
        assert!(h.wait_for(
            VcpuResponse::Paused,
            Instant::now() + Duration::from_secs(5)
        ));
        stopped.store(true, Ordering::SeqCst);
        assert_eq!(t.join().unwrap(), AfterEvents::Stop);
    }
}
