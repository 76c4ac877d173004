//! A real KVM guest on host 0 whose memory is a DsmMemory: its accesses (made by KVM inside
//! the kernel, or by KVM's instruction emulator on this machine) fault through userfaultfd and
//! fetch pages owned by host 1; host 1's later writes invalidate pages KVM has mapped.

mod common;

use common::*;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// Real-mode guest at 0x1000: `mov ax,[0x3000]; inc ax; mov [0x4000],ax; hlt`.
const CODE: [u8; 8] = [0xa1, 0x00, 0x30, 0x40, 0xa3, 0x00, 0x40, 0xf4];

#[test]
fn kvm_guest_memory_is_coherent_across_hosts() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        // A machine without KVM must not pass this test silently; opt out explicitly.
        Err(e) if std::env::var_os("SSI_SKIP_KVM_TESTS").is_some() => {
            eprintln!("no /dev/kvm ({e}): skipped because SSI_SKIP_KVM_TESTS is set");
            return;
        }
        Err(e) => panic!("cannot open /dev/kvm: {e} (set SSI_SKIP_KVM_TESTS=1 to skip)"),
    };
    let c = cluster(2);
    // Host 1 writes the code and the input: host 0 owns nothing yet.
    for (i, b) in CODE.iter().enumerate() {
        let p = c[1].mem.ptr(0x1000 + i as u64).unwrap();
        // SAFETY: a byte of host 1's guest RAM mapping.
        unsafe { p.write_volatile(*b) };
    }
    c[1].write(0x3000, 41);

    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    for (slot, r) in c[0].mem.regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            userspace_addr: r.host_addr,
        };
        // SAFETY: the mapping belongs to c[0].mem, which outlives the VM (dropped first).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();

    for (input, round) in [(41u64, 0), (99, 1)] {
        if round == 1 {
            // Host 1 takes page 3 back (invalidating the copy KVM has mapped on host 0).
            c[1].write(0x3000, input);
        }
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        match vcpu.run().unwrap() {
            VcpuExit::Hlt => {}
            e => panic!("unexpected exit {e:?}"),
        }
        // Host 1 reads what the guest on host 0 wrote.
        assert_eq!(c[1].read(0x4000) & 0xffff, input + 1, "round {round}");
    }
    settle(&c);
    let s0 = c[0].mem.stats();
    assert!(s0.pages_in >= 3, "code, input twice: {s0:?}");
    assert!(s0.invalidated >= 1 || s0.downgraded >= 1, "{s0:?}");
    assert_eq!(s0.protocol_errors, 0);
    drop(vcpu);
    drop(vm);
}
