//! The lean guest kernel + busybox initramfs boots to userspace through the real path (userspace
//! LAPIC/IOAPIC, ACPI, serial) and powers off cleanly. With 2 vCPUs the guest must see both:
//! the application processor was started by INIT/SIPI through the VMM's local APIC.

use std::time::Duration;

use ssi_tests::{initramfs, lean_kernel, run_vmm};

const DEADLINE: Duration = Duration::from_secs(900);

/// Boots with `cpus` vCPUs, checks what must hold, and returns the console.
fn boot(cpus: u32) -> String {
    let kernel = lean_kernel();
    let initrd = initramfs();
    let cpus_s = cpus.to_string();
    let stats =
        std::env::temp_dir().join(format!("ssi-boot-lean-{cpus}-{}.json", std::process::id()));
    let cl = String::from("ssi.test=boot");
    let run = run_vmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--memory",
            "512M",
            "--cpus",
            &cpus_s,
            "--append",
            &cl,
            "--stats-json",
            stats.to_str().unwrap_or_default(),
        ],
        &["SSI-VMM-USERSPACE-UP", "SSI-VMM-TEST-EXIT"],
        DEADLINE,
    );
    run.assert_clean_exit();
    let up = run
        .mark("SSI-VMM-USERSPACE-UP")
        .expect("guest reached userspace");
    eprintln!(
        "lean kernel, {cpus} vCPU(s): userspace after {up:?}, total {:?}",
        run.elapsed
    );
    assert_eq!(
        run.value("SSI-VMM-NPROC").as_deref(),
        Some(cpus_s.as_str()),
        "{}",
        run.console
    );
    // No user process may crash (this caught the AVX-512 state leak of `noxsave`, see
    // docs/ARCHITECTURE.md "Host quirks"), and vector registers survive context switches.
    assert!(
        !run.console.contains("segfault at"),
        "a guest process crashed:\n{}",
        run.console
    );
    assert!(
        run.console
            .lines()
            .any(|l| l.starts_with("SSI-CHECK-VECTOR:") && l.ends_with("mismatches=0")),
        "vector registers must survive context switches:\n{}",
        run.console
    );
    assert!(run.console.contains("SSI-VMM-BOOT-OK"), "{}", run.console);
    assert_eq!(run.value("SSI-VMM-TEST-EXIT").as_deref(), Some("0"));
    assert!(
        run.stderr.contains("PowerOff"),
        "stopped by ACPI poweroff: {}",
        run.stderr
    );
    let json = std::fs::read_to_string(&stats).expect("stats json written");
    assert!(json.contains("\"exits\""), "{json}");
    let _ = std::fs::remove_file(stats);
    run.console
}

#[test]
fn lean_kernel_one_vcpu() {
    let _ = boot(1);
}

#[test]
fn lean_kernel_two_vcpus() {
    let _ = boot(2);
}
