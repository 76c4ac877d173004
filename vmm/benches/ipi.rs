//! Cross-host IPI latency: the real delivery path of ssi-vmm between two host instances over
//! TCP loopback (IrqChip::deliver -> Fabric -> TcpTransport -> VcpuService ->
//! IrqChip::deliver_local -> LocalApic IRR), next to a same-host delivery measured in the same
//! run. Injection into KVM is not included (it is the same for local and remote IPIs).
//!
//! `cargo bench -p vmm --bench ipi` (add `-- --quick` for a short run).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use irqchip::{DeliveryMode, IrqChip, Message, Shorthand};
use proto::{HostId, Service};
use transport::{TcpConfig, TcpTransport, Transport};
use vmm::cluster::fabric::{Fabric, VcpuService};
use vmm::cluster::Placement;

const KEY: &[u8] = b"ipi bench cluster key 0123456789";

fn enable(chip: &IrqChip) {
    for l in chip.local_lapics() {
        l.lock().write(0xf0, 0x1ff, Instant::now());
    }
}

fn ipi(dest: u8) -> Message {
    Message {
        vector: 0xfb,
        mode: DeliveryMode::Fixed,
        level: false,
        dest: u32::from(dest),
        logical: false,
        shorthand: Shorthand::None,
        x2apic: false,
    }
}

/// Waits until vCPU `cpu`'s APIC on `chip` has the vector pending, then acks and EOIs it.
fn receive(chip: &IrqChip, cpu: usize) {
    let l = &chip.lapics[cpu];
    loop {
        let mut st = l.lock();
        if let Some(v) = st.deliverable() {
            st.ack(v);
            st.write(0xb0, 0, Instant::now());
            return;
        }
        drop(st);
        std::hint::spin_loop();
    }
}

fn pct(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 99 / 100]))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let iters = if quick { 2_000 } else { 20_000 };
    let l0 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (a0, a1) = (
        l0.local_addr().expect("addr"),
        l1.local_addr().expect("addr"),
    );
    let t0 = TcpTransport::start(TcpConfig::new(HostId(0), vec![(HostId(1), a1)], 7, KEY), l0)
        .expect("transport 0");
    let t1 = TcpTransport::start(TcpConfig::new(HostId(1), vec![(HostId(0), a0)], 7, KEY), l1)
        .expect("transport 1");
    t0.wait_connected(Duration::from_secs(5))
        .expect("connected");
    t1.wait_connected(Duration::from_secs(5))
        .expect("connected");
    let placement = Placement::initial(&[1, 1], &[], 0, 1);
    let cpu_host = placement.cpu_hosts();
    let chips: Vec<Arc<IrqChip>> = (0..2)
        .map(|h| {
            Arc::new(IrqChip::with_local(
                2,
                cpu_host.iter().map(|c| *c == h).collect(),
                h == usize::from(placement.ioapic_home),
            ))
        })
        .collect();
    let ts: [Arc<dyn Transport>; 2] = [t0.clone(), t1.clone()];
    for h in 0..2 {
        let f = Arc::new(Fabric::new(ts[h].clone(), h, &placement));
        chips[h].set_remote(f);
        ts[h].register(
            Service::Vcpu,
            Arc::new(VcpuService {
                chip: chips[h].clone(),
            }),
        );
        enable(&chips[h]);
    }
    // Same-host baseline: a 2-vCPU chip on one host.
    let local = IrqChip::new(2);
    enable(&local);
    let mut same = Vec::new();
    let mut one_way = Vec::new();
    let mut rtt = Vec::new();
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        local.deliver(&ipi(1), Some(0));
        receive(&local, 1);
        let d_same = t.elapsed();
        let t = Instant::now();
        chips[0].deliver(&ipi(1), Some(0));
        receive(&chips[1], 1);
        let d_one = t.elapsed();
        chips[1].deliver(&ipi(0), Some(1));
        receive(&chips[0], 0);
        let d_rtt = t.elapsed();
        if i >= iters / 10 {
            same.push(d_same);
            one_way.push(d_one);
            rtt.push(d_rtt);
        }
    }
    println!("| path | samples | p50 µs | p99 µs |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("IPI to a vCPU on the same host (IRR set)", same),
        (
            "IPI to a vCPU on another host, one way (IRR set there)",
            one_way,
        ),
        ("IPI ping-pong between hosts (round trip)", rtt),
    ] {
        let n = v.len();
        let (p50, p99) = pct(v);
        println!("| {name} | {n} | {p50:.1} | {p99:.1} |");
    }
    t0.shutdown();
    t1.shutdown();
}
