//! `ssi-vmm`: command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{self, DiskConfig, VmConfig};

#[derive(Parser)]
#[command(
    name = "ssi-vmm",
    version,
    about = "A distributed single-system-image hypervisor"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest on this host.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux (preferred) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initrd / initramfs image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (ssi-vmm appends its device parameters).
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Appended to the command line (e.g. `root=/dev/vda` or `ssi.test=boot`).
    #[arg(long, default_value = "")]
    append: String,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Raw disk image served by virtio-blk; append `,ro` for read-only. Repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// Write exit statistics as JSON to this file when the VM stops.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

fn build_config(a: RunArgs) -> Result<VmConfig, config::Error> {
    let memory = config::parse_size(&a.memory)?;
    let cpus = u8::try_from(a.cpus).map_err(|_| config::Error::BadCpuCount(a.cpus))?;
    let disks = a
        .disk
        .iter()
        .map(|d| match d.strip_suffix(",ro") {
            Some(p) => DiskConfig {
                path: p.into(),
                read_only: true,
            },
            None => DiskConfig {
                path: d.into(),
                read_only: false,
            },
        })
        .collect();
    let cfg = VmConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: format!("{} {}", a.cmdline, a.append).trim().to_string(),
        memory,
        cpus,
        disks,
        stats_json: a.stats_json,
    };
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            let cfg = match build_config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ssi-vmm: error: {e}");
                    return ExitCode::from(1);
                }
            };
            match vmm::vm::run(&cfg) {
                Ok(report) => {
                    eprintln!(
                        "ssi-vmm: guest stopped: {} after {:.1} s",
                        report.stop, report.wall_seconds
                    );
                    if let Some(p) = &cfg.stats_json {
                        match serde_json::to_string_pretty(&report) {
                            Ok(s) => {
                                if let Err(e) = std::fs::write(p, s) {
                                    eprintln!("ssi-vmm: cannot write {}: {e}", p.display());
                                }
                            }
                            Err(e) => eprintln!("ssi-vmm: cannot encode stats: {e}"),
                        }
                    }
                    ExitCode::from(report.exit_code as u8)
                }
                Err(e) => {
                    eprintln!("ssi-vmm: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
