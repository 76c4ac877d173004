//! virtio-blk through the real path: the lean kernel mounts an ext4 image served by the VMM,
//! reads a file put there on the host, writes a token, syncs and powers off; the token is in the
//! image afterwards (nothing lost on clean shutdown).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ssi_tests::{initramfs, lean_kernel, run_vmm};

fn make_image(path: &Path, probe: &str) {
    let dir = path.with_extension("d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("ssi-vmm-probe"), format!("{probe}\n")).expect("probe");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&dir)
        .arg(path)
        .arg("64M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(st.success(), "mkfs.ext4 failed");
    let _ = std::fs::remove_dir_all(&dir);
}

fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{file}")])
        .arg(image)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lean_kernel_virtio_blk_read_write_survives_poweroff() {
    let image = std::env::temp_dir().join(format!("ssi-disk-{}.img", std::process::id()));
    let probe = format!("probe-{}", std::process::id());
    let token = format!("token-{}", std::process::id());
    make_image(&image, &probe);
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
