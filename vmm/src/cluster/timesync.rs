//! Guest time across hosts.
//!
//! Every host process creates its own KVM VM, and KVM starts each VM's kvmclock and each
//! vCPU's TSC at zero when they are created, so without care vCPUs on different hosts would
//! disagree about the time by however far apart the processes started. Every host therefore
//! derives both from one cluster epoch (`epoch_ns`, a CLOCK_REALTIME instant chosen by `up`):
//!
//! - kvmclock: `KVM_SET_CLOCK` to "now − epoch" nanoseconds;
//! - TSC: each vCPU's `IA32_TSC` is written to "(now − epoch) × TSC frequency", so all vCPUs
//!   share one guest TSC timeline (the TSC then advances with the host TSC).
//!
//! On one machine (the test clusters) CLOCK_REALTIME and the TSC are shared, so this is exact
//! up to the microseconds between the reads. Real hosts need their CLOCK_REALTIME synchronized
//! (PTP, or NTP at worst) and invariant TSCs of one frequency (same CPU model, `constant_tsc
//! nonstop_tsc`); the residual skew is then the clock synchronization error. Without `KVM_CAP_TSC_CONTROL` (absent
//! here) the guest TSC runs at the host's frequency, which is another reason hosts must match.

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{kvm_clock_data, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};

const IA32_TSC: u32 = 0x10;

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The current CLOCK_REALTIME in nanoseconds (the epoch `up` hands out).
pub fn now_ns() -> u64 {
    realtime_ns()
}

/// Sets the VM's kvmclock to the time elapsed since the cluster epoch.
pub fn set_clock(vm: &VmFd, epoch_ns: u64) {
    let data = kvm_clock_data {
        clock: realtime_ns().saturating_sub(epoch_ns),
        ..Default::default()
    };
    if let Err(e) = vm.set_clock(&data) {
        log::warn!("KVM_SET_CLOCK failed ({e}); guest time may differ between hosts");
    }
}

/// Sets this vCPU's TSC to the ticks (at the TSC frequency KVM reports) elapsed since the
/// epoch, so that every vCPU of every host reads one TSC timeline.
pub fn set_tsc(fd: &VcpuFd, epoch_ns: u64) {
    let khz = match fd.get_tsc_khz() {
        Ok(k) if k > 0 => u128::from(k),
        _ => {
            log::warn!("TSC frequency unknown; guest TSCs may differ between hosts");
            return;
        }
    };
    let since = u128::from(realtime_ns().saturating_sub(epoch_ns));
    let value = (since * khz / 1_000_000) as u64;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        data: value,
        ..Default::default()
    }]);
    match msrs.map(|m| fd.set_msrs(&m)) {
        Ok(Ok(1)) => {}
        other => log::warn!("setting IA32_TSC failed ({other:?}); guest TSCs may differ"),
    }
}
