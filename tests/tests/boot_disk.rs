//! virtio-blk through the real path: the lean kernel mounts an ext4 image served by the VMM,
//! reads a file put there on the host, writes a token, syncs and powers off; the token is in the
//! image afterwards (nothing lost on clean shutdown).

use std::time::Duration;

use ssi_tests::{debugfs_cat, initramfs, lean_kernel, make_ext4_image, run_vmm};

#[test]
fn lean_kernel_virtio_blk_read_write_survives_poweroff() {
    let image = std::env::temp_dir().join(format!("ssi-disk-{}.img", std::process::id()));
    let probe = format!("probe-{}", std::process::id());
    let token = format!("token-{}", std::process::id());
    make_ext4_image(&image, &probe);
    let kernel = lean_kernel();
    let initrd = initramfs();
    let cl = format!("ssi.test=disk ssi.token={token}");
    let run = run_vmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap_or_default(),
            "--initrd",
            initrd.to_str().unwrap_or_default(),
            "--memory",
            "512M",
            "--disk",
            image.to_str().unwrap_or_default(),
            "--append",
            &cl,
        ],
        &["SSI-VMM-USERSPACE-UP", "SSI-VMM-DISK-OK"],
        Duration::from_secs(900),
    );
    run.assert_clean_exit();
    assert_eq!(
        run.value("SSI-VMM-DISK-READ"),
        Some(probe),
        "{}",
        run.console
    );
    assert_eq!(run.value("SSI-VMM-DISK-WROTE"), Some(token.clone()));
    assert!(run.mark("SSI-VMM-DISK-OK").is_some(), "{}", run.console);
    assert_eq!(debugfs_cat(&image, "ssi-vmm-written").trim(), token);
    let _ = std::fs::remove_file(image);
}
