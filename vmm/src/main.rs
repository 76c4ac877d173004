//! `ssi-vmm`: command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm::config::{self, VmConfig};

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
    /// Run a host daemon: wait for a job from `ssi-vmm up`, then run this host's part of the VM.
    Host(HostArgs),
    /// Boot one VM across hosts: from a cluster TOML file, or on N local host processes.
    Up(UpArgs),
    /// Print the clusters of this machine: running (hosts, vCPUs, page counts), stopped (why,
    /// when) or gone (processes no longer exist).
    Status(StatusArgs),
    /// Pause a running VM (a `run --name NAME` VM, or every host of cluster NAME).
    Pause(ControlArgs),
    /// Resume a paused VM.
    Resume(ControlArgs),
    /// Snapshot a running VM (`run --name NAME`, or every host of cluster NAME) into DIR
    /// (which must not exist), then let it go on (or stop it with --stop). `ssi-vmm snapshot
    /// inspect DIR` describes a snapshot.
    Snapshot(SnapshotArgs),
    /// Start the VM of a snapshot: on this host, on N local host processes (--local N), or
    /// on the hosts of a cluster file (--config), whatever number of hosts it was taken on.
    /// The guest's disks are the snapshot's copies, used in place (the snapshot's disk then
    /// moves on with the guest: copy the directory first to restore it more than once).
    Restore(RestoreArgs),
}

#[derive(clap::Args)]
struct SnapshotArgs {
    /// The VM's name (`run --name` or a cluster's), or `inspect` to describe the snapshot in
    /// DIR, or `merge` to fold the chain DIR into the full snapshot OUT.
    name: String,
    /// The snapshot directory (created; must not exist).
    dir: PathBuf,
    /// `merge` only: the full snapshot to write (must not exist).
    out: Option<PathBuf>,
    /// Stop the VM once the snapshot is written.
    #[arg(long)]
    stop: bool,
    /// Incremental: record only the pages that differ from the snapshot PARENT (an earlier
    /// snapshot of this VM, or a chain ending in one), which DIR then refers to.
    #[arg(long, value_name = "PARENT")]
    incremental: Option<PathBuf>,
    /// State directory root (default $SSI_VMM_STATE_DIR or /run/ssi-vmm).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// The snapshot directory.
    dir: PathBuf,
    /// VM name: its control socket is `<state root>/NAME/control.sock`, or the cluster's
    /// name (default run-<pid> / local-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Restore onto N host processes on this machine (default: as many hosts as it was
    /// taken on; 1 runs it in this process, like `run`).
    #[arg(long, conflicts_with = "config")]
    local: Option<usize>,
    /// Restore onto the hosts of this cluster file (its machine fields are replaced by the
    /// snapshot's; its hosts' vCPUs must add up to the guest's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Key file of the cluster's host daemons (with --config).
    #[arg(long, requires = "config")]
    key_file: Option<PathBuf>,
    /// Start the guest before its memory is loaded: pages come from the snapshot when first
    /// touched, the rest streams in behind (runs as a cluster, also on one host).
    #[arg(long)]
    lazy: bool,
    /// Take a checkpoint this often once restored (see `up --checkpoint-every`; --local).
    #[arg(long, requires = "checkpoint_dir", conflicts_with = "config")]
    checkpoint_every: Option<String>,
    /// Where checkpoints go.
    #[arg(long, requires = "checkpoint_every")]
    checkpoint_dir: Option<PathBuf>,
    /// Write exit statistics as JSON to this file when the VM stops.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

/// `ssi-vmm snapshot NAME DIR [--stop]`: asks the VM's control socket for a snapshot.
fn snapshot_main(a: SnapshotArgs) -> Result<(), String> {
    use vmm::control::{self, Op};
    if a.name == "inspect" {
        let text = snapshot::inspect(&a.dir).map_err(|e| e.to_string())?;
        print!("{text}");
        return Ok(());
    }
    if a.name == "merge" {
        let out = a.out.ok_or("snapshot merge DIR OUT: OUT is missing")?;
        let r = vmm::vm::snap::load(&a.dir, true).map_err(|e| e.to_string())?;
        let disks: Vec<&str> = r.guest.disks.iter().map(|d| d.file.as_str()).collect();
        let done = snapshot::merge_with(&r.snap, &out, &disks).map_err(|e| e.to_string())?;
        eprintln!(
            "ssi-vmm: {} ({} layers) merged into the full snapshot {}",
            a.dir.display(),
            r.snap.layers().len(),
            done.display()
        );
        return Ok(());
    }
    if a.out.is_some() {
        return Err("too many arguments: snapshot NAME DIR [--stop] [--incremental PARENT]".into());
    }
    let parent = match &a.incremental {
        Some(p) => {
            let p = std::path::absolute(p)
                .map_err(|e| format!("parent snapshot {}: {e}", p.display()))?;
            // A clear error now rather than from the VMM: the parent must be a snapshot.
            vmm::vm::snap::load(&p, false)
                .map_err(|e| format!("parent snapshot {}: {e}", p.display()))?;
            Some(p)
        }
        None => None,
    };
    let root = a.state_dir.unwrap_or_else(vmm::cluster::status::state_root);
    // The VMM runs elsewhere: give it an absolute path (its parent must exist here).
    let dir = std::path::absolute(&a.dir)
        .map_err(|e| format!("snapshot directory {}: {e}", a.dir.display()))?;
    let endpoints = control::endpoints(&root, &a.name).map_err(|e| e.to_string())?;
    if endpoints.len() > 1 || endpoints.first().is_some_and(|e| e.label != "vm") {
        let t = vmm::cluster::snapshot::take(&endpoints, &dir, a.stop, parent.as_deref())
            .map_err(|e| format!("{}: {e}", a.name))?;
        let then = if a.stop { "stopped" } else { "resumed" };
        eprintln!(
            "ssi-vmm: {} ({} hosts) snapshotted to {} and {then}; the guest was paused for \
             {:.2} s, {} MiB of data pages written",
            a.name,
            endpoints.len(),
            t.dir.display(),
            t.paused_for.as_secs_f64(),
            t.data_bytes >> 20
        );
        return Ok(());
    }
    let v = control::request(
        &endpoints[0].path,
        Op::Snapshot {
            dir: dir.clone(),
            stop: a.stop,
            parent,
        },
    )
    .map_err(|e| format!("{}: {e}", a.name))?;
    let written = v
        .get("dir")
        .and_then(|d| d.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| dir.display().to_string());
    let then = if a.stop { "stopped" } else { "resumed" };
    eprintln!("ssi-vmm: {} snapshotted to {written} and {then}", a.name);
    Ok(())
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The VM's name (`run --name`, or the cluster name).
    name: String,
    /// State directory root (default $SSI_VMM_STATE_DIR or /run/ssi-vmm).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// Sends `op` to every control socket of VM `a.name`. A pause that fails on some host is
/// undone on the others.
fn control_main(a: ControlArgs, op: vmm::control::Op) -> Result<(), String> {
    use vmm::control::{self, Op};
    let root = a.state_dir.unwrap_or_else(vmm::cluster::status::state_root);
    let endpoints = control::endpoints(&root, &a.name).map_err(|e| e.to_string())?;
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for ep in &endpoints {
        match control::request(&ep.path, op.clone()) {
            Ok(_) => done.push(ep),
            Err(e) => failed.push(format!("{}: {e}", ep.label)),
        }
    }
    if failed.is_empty() {
        let what = if op == Op::Pause { "paused" } else { "resumed" };
        eprintln!("ssi-vmm: {} {what}", a.name);
        return Ok(());
    }
    let mut msg = format!("{} failed: {}", op.name(), failed.join("; "));
    if op == Op::Pause && !done.is_empty() {
        let undone: Vec<&str> = done
            .iter()
            .filter(|ep| control::request(&ep.path, Op::Resume).is_ok())
            .map(|ep| ep.label.as_str())
            .collect();
        msg.push_str(&format!(" (resumed again: {})", undone.join(", ")));
    }
    Err(msg)
}

#[derive(clap::Args)]
struct HostArgs {
    /// Address to listen on (for `up` and for the other hosts).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// File holding the cluster key (at least 16 bytes).
    #[arg(long)]
    key_file: PathBuf,
}

#[derive(clap::Args)]
struct UpArgs {
    /// Cluster TOML file (hosts, vCPUs per host, memory, kernel, disks).
    #[arg(long, conflicts_with = "local")]
    config: Option<PathBuf>,
    /// Key file of the cluster's host daemons (with --config).
    #[arg(long, requires = "config")]
    key_file: Option<PathBuf>,
    /// Start N host processes on this machine (loopback) and boot across them.
    #[arg(long)]
    local: Option<usize>,
    /// vCPUs per host (with --local).
    #[arg(long, default_value_t = 1)]
    cpus_per_host: u32,
    /// vCPUs in all, spread over the --local hosts as evenly as possible (the first hosts
    /// take one more); replaces --cpus-per-host.
    #[arg(long, requires = "local")]
    cpus: Option<u32>,
    /// Cluster name (with --local; default local-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Guest kernel (with --local).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd (with --local).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (with --local).
    #[arg(long)]
    cmdline: Option<String>,
    /// Appended to the command line (with --local).
    #[arg(long, default_value = "")]
    append: String,
    /// Guest RAM (with --local).
    #[arg(long, default_value = "1G")]
    memory: String,
    /// Disk image `PATH[,ro][,host=N]`: read-only, and the host that serves it (default 0)
    /// (with --local). Repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// DSM home interleave in pages (with --local).
    #[arg(long, default_value_t = 512)]
    home_chunk_pages: u64,
    /// Take a checkpoint (a cluster snapshot) this often, e.g. 60s (with --local and
    /// --checkpoint-dir); when a host dies the VM restarts from the last complete one on the
    /// remaining hosts.
    #[arg(long, requires = "checkpoint_dir", requires = "local")]
    checkpoint_every: Option<String>,
    /// Where checkpoints go (the last two complete ones are kept).
    #[arg(long, requires = "checkpoint_every")]
    checkpoint_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// State directory root (default $SSI_VMM_STATE_DIR or /run/ssi-vmm).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print JSON (an array of {dir, liveness, status}) for scripts.
    #[arg(long)]
    json: bool,
    /// Remove the state directories of stopped and gone clusters (after printing them).
    #[arg(long)]
    prune: bool,
}

fn status_main(a: StatusArgs) -> Result<(), String> {
    use vmm::cluster::status;
    let root = a.state_dir.unwrap_or_else(status::state_root);
    let all = status::entries(&root).map_err(|e| e.to_string())?;
    if a.json {
        println!("{}", status::to_json(&all));
    } else {
        let now = vmm::cluster::timesync::now_ns() / 1_000_000_000;
        for e in &all {
            print!("{}", status::render(&e.status, e.liveness, now));
            if let Some(c) = &e.checkpoint {
                print!("{}", status::render_checkpoint(c, now));
            }
        }
    }
    if a.prune {
        let mut failed = false;
        for (dir, r) in status::prune(&all) {
            match r {
                Ok(()) => eprintln!("ssi-vmm: removed {}", dir.display()),
                Err(e) => {
                    eprintln!("ssi-vmm: error: cannot remove {}: {e}", dir.display());
                    failed = true;
                }
            }
        }
        if failed {
            return Err("some state directories could not be removed".into());
        }
    }
    Ok(())
}

fn up_main(a: UpArgs) -> Result<i32, String> {
    use vmm::cluster::launch;
    let ctl = launch::UpControl::new();
    ctl.install().map_err(|e| e.to_string())?;
    let outcomes = up_outcomes(a, &ctl);
    if let Some(sig) = ctl.signal() {
        match &outcomes {
            Ok(outcomes) => {
                report_outcomes(outcomes);
            }
            Err(e) => eprintln!("ssi-vmm: {e}"),
        }
        eprintln!(
            "ssi-vmm: stopped on {} (exit {})",
            launch::signal_name(sig),
            launch::signal_exit_code(sig)
        );
        return Ok(launch::signal_exit_code(sig));
    }
    Ok(report_outcomes(&outcomes?))
}

fn up_outcomes(
    a: UpArgs,
    ctl: &std::sync::Arc<vmm::cluster::launch::UpControl>,
) -> Result<Vec<vmm::cluster::launch::HostOutcome>, String> {
    use vmm::cluster::{launch, spec};
    Ok(match (a.config, a.local) {
        (Some(path), None) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let file = spec::ClusterFile::parse(&text).map_err(|e| e.to_string())?;
            let key_file = a
                .key_file
                .ok_or("--config needs --key-file (the host daemons' key)")?;
            let key = launch::read_key(&key_file).map_err(|e| e.to_string())?;
            let dir = vmm::cluster::status::state_root().join(&file.name);
            launch::up(&file, &key, Some(dir), None, ctl).map_err(|e| e.to_string())?
        }
        (None, Some(n)) => {
            if n == 0 || n > spec::MAX_HOSTS {
                return Err(format!(
                    "--local needs between 1 and {} hosts",
                    spec::MAX_HOSTS
                ));
            }
            let kernel = a.kernel.ok_or("--local needs --kernel")?;
            let cpus = match a.cpus {
                Some(c) => vmm::vm::snap::spread_cpus(c, n)
                    .ok_or(format!("--cpus {c} cannot give each of {n} hosts a vCPU"))?,
                None => vec![a.cpus_per_host; n],
            };
            let file = spec::ClusterFile {
                name: a
                    .name
                    .unwrap_or_else(|| format!("local-{}", std::process::id())),
                memory: a.memory,
                kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                append: a.append,
                home_chunk_pages: a.home_chunk_pages,
                // Placeholder addresses: `up_local` assigns the real ones.
                hosts: cpus
                    .iter()
                    .enumerate()
                    .map(|(i, c)| spec::HostEntry {
                        addr: format!("127.0.0.1:{}", i + 1),
                        cpus: *c,
                    })
                    .collect(),
                disks: a
                    .disk
                    .iter()
                    .map(|d| {
                        config::parse_disk(d).map(|d| spec::DiskEntry {
                            path: d.path,
                            read_only: d.read_only,
                            host: d.host,
                        })
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?,
            };
            // Check the machine here, before any process is started.
            let f = spec::ClusterFile::parse(&file.to_toml().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            let cfg = f.vm_config().map_err(|e| e.to_string())?;
            cfg.validate().map_err(|e| e.to_string())?;
            let plan = checkpoint_plan(a.checkpoint_every.as_deref(), a.checkpoint_dir)?;
            vmm::cluster::checkpoint::run_local(file, &cpus, None, plan, ctl)
                .map_err(|e| e.to_string())?
        }
        _ => return Err("give either --config FILE or --local N".into()),
    })
}

/// Prints every host's outcome; returns `up`'s exit code.
fn report_outcomes(outcomes: &[vmm::cluster::launch::HostOutcome]) -> i32 {
    let mut code = 0;
    for o in outcomes {
        let r = &o.report;
        eprintln!(
            "ssi-vmm: host {}: exit {}: {} (DSM: {} protocol errors, {} send errors)",
            o.host, r.code, r.reason, r.protocol_errors, r.send_errors
        );
        if code == 0 {
            code = r.code;
        }
    }
    if let Some(o) = outcomes.first().filter(|o| o.report.code != 0) {
        code = o.report.code;
    }
    // A guest that powered off cleanly over a page protocol that broke its invariants did not
    // run correctly: the run fails.
    let broken: Vec<usize> = outcomes
        .iter()
        .filter(|o| o.report.protocol_errors > 0)
        .map(|o| o.host)
        .collect();
    if !broken.is_empty() {
        eprintln!("ssi-vmm: error: DSM protocol errors on host(s) {broken:?}: guest memory may be inconsistent");
        if code == 0 {
            code = 1;
        }
    }
    code
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
    /// Raw disk image served by virtio-blk: `PATH[,ro]` (`,ro`: read-only). Repeatable.
    #[arg(long)]
    disk: Vec<String>,
    /// Write exit statistics as JSON to this file when the VM stops.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// VM name: its control socket is `<state root>/NAME/control.sock` (default run-<pid>).
    #[arg(long)]
    name: Option<String>,
}

/// Creates `<state root>/<name>/` and binds its control socket.
fn run_control(name: &str) -> Result<(PathBuf, vmm::control::Listener), String> {
    use std::os::unix::fs::DirBuilderExt;
    vmm::control::validate_name(name).map_err(|e| e.to_string())?;
    let dir = vmm::cluster::status::state_root().join(name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create state directory {}: {e}", dir.display()))?;
    let l = vmm::control::Listener::bind(&dir.join(vmm::control::RUN_SOCKET))
        .map_err(|e| e.to_string())?;
    Ok((dir, l))
}

fn build_config(a: RunArgs) -> Result<VmConfig, config::Error> {
    let memory = config::parse_size(&a.memory)?;
    let cpus = u8::try_from(a.cpus).map_err(|_| config::Error::BadCpuCount(a.cpus))?;
    let disks = a
        .disk
        .iter()
        .map(|d| config::parse_disk(d))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = VmConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: format!("{} {}", a.cmdline, a.append).trim().to_string(),
        memory,
        cpus,
        disks,
        stats_json: a.stats_json,
    };
    cfg.validate_host(0, 1, 0)?;
    Ok(cfg)
}

/// Exit status of a command that succeeds or fails with an error to print.
fn finish<E: std::fmt::Display>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssi-vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    // Fault injection (`FAILPOINTS=...`) in builds with the `failpoints` feature; a no-op otherwise.
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Host(a) => match vmm::cluster::launch::host_daemon(a.listen, &a.key_file) {
            Ok(code) => ExitCode::from(code as u8),
            Err(e) => {
                eprintln!("ssi-vmm: error: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Up(a) => match up_main(a) {
            // A host's exit code comes from its report; anything outside 0..=255 is a failure.
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("ssi-vmm: error: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Status(a) => finish(status_main(a)),
        Cmd::Pause(a) => finish(control_main(a, vmm::control::Op::Pause)),
        Cmd::Resume(a) => finish(control_main(a, vmm::control::Op::Resume)),
        Cmd::Snapshot(a) => finish(snapshot_main(a)),
        Cmd::Restore(a) => {
            let named = a.name.is_some();
            let name = a
                .name
                .clone()
                .unwrap_or_else(|| format!("run-{}", std::process::id()));
            if let Err(e) = vmm::control::validate_name(&name) {
                eprintln!("ssi-vmm: error: {e}");
                return ExitCode::from(1);
            }
            // Everything is read and checked before anything is started; every data page too,
            // except for a lazy restore (which checks each page when it is first read).
            let r = match vmm::vm::snap::load(&a.dir, !a.lazy) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ssi-vmm: error: cannot restore {}: {e}", a.dir.display());
                    return ExitCode::from(1);
                }
            };
            eprintln!(
                "ssi-vmm: restoring {} ({} vCPU(s), {} MiB; disks used in place: {})",
                a.dir.display(),
                r.guest.cpus,
                r.guest.memory >> 20,
                if r.guest.disks.is_empty() {
                    "none".to_string()
                } else {
                    r.guest
                        .disks
                        .iter()
                        .map(|d| a.dir.join(&d.file).display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            let hosts = a.local.unwrap_or(usize::from(r.placement.hosts));
            if a.config.is_some() || hosts != 1 || a.lazy || a.checkpoint_every.is_some() {
                let name = a.name.clone();
                return match restore_cluster(a, r, hosts, name) {
                    Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                    Err(e) => {
                        eprintln!("ssi-vmm: error: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            let mut cfg = r.vm_config();
            cfg.stats_json = a.stats_json;
            serve_vm(&name, named, &cfg, || vmm::vm::Vm::restore(&r))
        }
        Cmd::Run(args) => {
            let named = args.name.is_some();
            let name = args
                .name
                .clone()
                .unwrap_or_else(|| format!("run-{}", std::process::id()));
            if let Err(e) = vmm::control::validate_name(&name) {
                eprintln!("ssi-vmm: error: {e}");
                return ExitCode::from(1);
            }
            let cfg = match build_config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ssi-vmm: error: {e}");
                    return ExitCode::from(1);
                }
            };
            serve_vm(&name, named, &cfg, || vmm::vm::Vm::start(&cfg, None))
        }
    }
}

/// The checkpoint plan of `--checkpoint-every` / `--checkpoint-dir`.
fn checkpoint_plan(
    every: Option<&str>,
    dir: Option<PathBuf>,
) -> Result<Option<vmm::cluster::checkpoint::Plan>, String> {
    match (every, dir) {
        (Some(e), Some(d)) => Ok(Some(vmm::cluster::checkpoint::Plan {
            every: vmm::cluster::checkpoint::parse_every(e)?,
            dir: std::path::absolute(&d)
                .map_err(|e| format!("checkpoint directory {}: {e}", d.display()))?,
        })),
        _ => Ok(None),
    }
}

/// `restore DIR --local N` / `--config FILE`: the snapshot's VM on several hosts, started as
/// `up` starts a cluster (every host reads the snapshot directory). Returns the exit code.
fn restore_cluster(
    a: RestoreArgs,
    r: vmm::vm::snap::Restore,
    hosts: usize,
    name: Option<String>,
) -> Result<i32, String> {
    use vmm::cluster::{launch, spec};
    let dir = std::path::absolute(&a.dir)
        .map_err(|e| format!("snapshot directory {}: {e}", a.dir.display()))?;
    let ctl = launch::UpControl::new();
    ctl.install().map_err(|e| e.to_string())?;
    let outcomes = match a.config {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let given = spec::ClusterFile::parse(&text).map_err(|e| e.to_string())?;
            let cpus: Vec<u32> = given.hosts.iter().map(|h| h.cpus).collect();
            let mut file = r
                .cluster_file(&given.name, &cpus)
                .map_err(|e| e.to_string())?;
            file.hosts = given.hosts;
            let key_file = a
                .key_file
                .ok_or("--config needs --key-file (the host daemons' key)")?;
            let key = launch::read_key(&key_file).map_err(|e| e.to_string())?;
            let state = vmm::cluster::status::state_root().join(&file.name);
            eprintln!(
                "ssi-vmm: restoring {} onto the {} hosts of {}",
                dir.display(),
                cpus.len(),
                path.display()
            );
            let restore = launch::Restore { dir, lazy: a.lazy };
            launch::up(&file, &key, Some(state), Some(restore), &ctl).map_err(|e| e.to_string())?
        }
        None => {
            if hosts == 0 || hosts > spec::MAX_HOSTS {
                return Err(format!(
                    "--local needs between 1 and {} hosts",
                    spec::MAX_HOSTS
                ));
            }
            let cpus =
                vmm::vm::snap::spread_cpus(u32::from(r.guest.cpus), hosts).ok_or(format!(
                    "the guest has {} vCPU(s): it cannot be spread over {hosts} hosts (each \
                     host runs at least one)",
                    r.guest.cpus
                ))?;
            let name = name.unwrap_or_else(|| format!("local-{}", std::process::id()));
            vmm::control::validate_name(&name).map_err(|e| e.to_string())?;
            let file = r.cluster_file(&name, &cpus).map_err(|e| e.to_string())?;
            eprintln!(
                "ssi-vmm: restoring {} ({} vCPU(s), {} MiB, taken on {} host(s)) onto {hosts} \
                 local hosts with {cpus:?} vCPUs",
                dir.display(),
                r.guest.cpus,
                r.guest.memory >> 20,
                r.placement.hosts
            );
            drop(r);
            let restore = launch::Restore { dir, lazy: a.lazy };
            let plan = checkpoint_plan(a.checkpoint_every.as_deref(), a.checkpoint_dir)?;
            vmm::cluster::checkpoint::run_local(file, &cpus, Some(restore), plan, &ctl)
                .map_err(|e| e.to_string())?
        }
    };
    if let Some(sig) = ctl.signal() {
        report_outcomes(&outcomes);
        return Ok(launch::signal_exit_code(sig));
    }
    Ok(report_outcomes(&outcomes))
}

/// Starts a VM on this host (`run`, `restore`) with its control socket, waits until it stops
/// and reports.
fn serve_vm(
    name: &str,
    named: bool,
    cfg: &VmConfig,
    start: impl FnOnce() -> Result<vmm::vm::Vm, vmm::vm::Error>,
) -> ExitCode {
    // A VM named on the command line must be controllable; an unnamed one runs without
    // a control socket when the state root is not writable.
    let control = match run_control(name) {
        Ok(x) => Some(x),
        Err(e) if !named => {
            eprintln!("ssi-vmm: warning: no control socket: {e}");
            None
        }
        Err(e) => {
            eprintln!("ssi-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    let (dir, listener) = control.unzip();
    let result = start().and_then(|vm| {
        let server = match listener {
            Some(l) => Some(
                vmm::control::Server::start(l, vm.controller())
                    .map_err(|e| vmm::vm::Error::Control(Box::new(e)))?,
            ),
            None => None,
        };
        let report = vm.wait();
        drop(server);
        Ok(report)
    });
    // The state directory goes too once empty (the socket is removed with the server).
    if let Some(d) = dir {
        let _ = std::fs::remove_dir(d);
    }
    match result {
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
