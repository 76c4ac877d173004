//! Saving and restoring a local APIC ([`LapicState`]).
//!
//! Restore accepts exactly the states the live model can reach (as far as they can be told
//! apart from the state alone), so a restored APIC never holds a combination its register
//! handlers assume impossible: the APIC base at the one supported address with only EN, EXTD and
//! the BSP flag (matching the vCPU), no x2APIC mode without EN, register bits that do not
//! exist clear, the logical ID derived from the APIC ID in x2APIC mode, at most one in-service
//! vector per priority class (and none below 16), every LVT masked while the APIC is
//! software-disabled, a timer whose deadline, period and mode agree, and a bootstrap processor
//! that runs. Values the model accepts from the guest as they are (IRR, TMR, LVT vectors and
//! modes, the SIPI vector, ...) are taken as they are.

use snapshot::Persist;

use super::regs::{
    DFR_ONES, ICR_BUSY, LDR_XAPIC, LVT_MASKED, SVR_ENABLED, SVR_WRITABLE, TIMER_DIV_WRITABLE,
};
use super::timer::{
    GuestClock, Timer, MAX_INTERVAL_NS, MIN_INTERVAL_NS, MODE_PERIODIC, MODE_TSC_DEADLINE,
};
use super::x2apic::{x2apic_ldr, APIC_BASE_ADDR, BASE_ADDR_MASK, BASE_BSP, BASE_EN, BASE_EXTD};
use super::{highest, Apic, LocalApic, RunState};
use crate::state::{LapicState, SavedRunState, TimerState};

/// Why a [`LapicState`] cannot be restored; each names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LapicStateError {
    /// The state belongs to another APIC.
    #[error("id: APIC ID {found} restored into the APIC of vCPU {expected}")]
    Id {
        /// The APIC being restored.
        expected: u8,
        /// The ID in the state.
        found: u8,
    },
    /// The APIC is not at the one address the MMIO window is decoded at.
    #[error("apic_base {0:#x}: base address is not {APIC_BASE_ADDR:#x}")]
    ApicBaseAddress(u64),
    /// Bits other than the address, BSP, EXTD and EN.
    #[error("apic_base {0:#x}: reserved bits set")]
    ApicBaseReserved(u64),
    /// The BSP flag disagrees with the vCPU being restored.
    #[error("apic_base {value:#x}: BSP flag does not match the vCPU (bootstrap processor: {bsp})")]
    ApicBaseBsp {
        /// The saved value.
        value: u64,
        /// Whether the restored vCPU is the bootstrap processor.
        bsp: bool,
    },
    /// x2APIC mode (EXTD) without the global enable (EN).
    #[error("apic_base {0:#x}: x2APIC mode without the APIC enabled")]
    X2apicWithoutEnable(u64),
    /// A vector below 16 in service (never deliverable).
    #[error("isr: vector {0:#x} in service (vectors below 16 are never delivered)")]
    IsrReservedVector(u8),
    /// Two in-service vectors of one priority class (a vector is only delivered above the
    /// class of every in-service one).
    #[error("isr: vectors {0:#x} and {1:#x} in service in one priority class")]
    IsrNesting(u8, u8),
    /// TPR bits 8-31 set.
    #[error("tpr {0:#x}: bits 8-31 are reserved")]
    Tpr(u32),
    /// LDR not the ID-derived value (x2APIC) or with bits below 24 (xAPIC).
    #[error("ldr {ldr:#x}: not a logical ID of this APIC in {mode} mode")]
    Ldr {
        /// The saved value.
        ldr: u32,
        /// "x2APIC" or "xAPIC".
        mode: &'static str,
    },
    /// DFR bits 0-27 not all ones.
    #[error("dfr {0:#x}: bits 0-27 must read as ones")]
    Dfr(u32),
    /// SVR bits that do not exist.
    #[error("svr {0:#x}: reserved bits set")]
    Svr(u32),
    /// ESR bits 8-31 set.
    #[error("esr {0:#x}: bits 8-31 are reserved")]
    Esr(u32),
    /// ICR delivery status busy, or an xAPIC destination with bits below 56.
    #[error("icr {0:#x}: delivery status busy or a destination this APIC mode cannot hold")]
    Icr(u64),
    /// An unmasked LVT entry while the APIC is software-disabled.
    #[error("lvt[{index}] {value:#x}: unmasked while the APIC is software-disabled")]
    LvtUnmasked {
        /// Which entry (0 timer, 1 thermal, 2 performance, 3 LINT0, 4 LINT1, 5 error).
        index: usize,
        /// The saved value.
        value: u32,
    },
    /// Divide configuration bits that do not exist.
    #[error("timer.divide_config {0:#x}: reserved bits set")]
    TimerDivide(u32),
    /// An `IA32_TSC_DEADLINE` value outside TSC-deadline mode.
    #[error("timer.tsc_deadline {0:#x}: armed outside TSC-deadline mode")]
    TscDeadlineOutsideMode(u64),
    /// The next expiry disagrees with the mode: not the MSR value in TSC-deadline mode, or
    /// further ahead of the guest TSC than twice the longest count in a counting mode.
    #[error(
        "timer.next_fire_tsc {next:?}: not a deadline of this timer mode (guest TSC {guest_tsc})"
    )]
    TimerNext {
        /// The saved value.
        next: Option<u64>,
        /// The restored vCPU's guest TSC.
        guest_tsc: u64,
    },
    /// A period outside periodic mode, without an armed timer, or of a length no count gives.
    #[error("timer.period_tsc {period:?}: not a period of this timer (mode {mode}, {min}..={max} cycles)")]
    TimerPeriod {
        /// The saved value.
        period: Option<u64>,
        /// The LVT timer mode.
        mode: u32,
        /// Shortest period at the restored TSC rate.
        min: u64,
        /// Longest period at the restored TSC rate.
        max: u64,
    },
    /// The bootstrap processor waiting for a SIPI (it never leaves `Running`).
    #[error("run_state {0:?}: the bootstrap processor always runs")]
    BspNotRunning(SavedRunState),
}

/// What a restored local APIC needs from its new environment.
#[derive(Clone, Copy, Debug)]
pub struct LapicArgs {
    /// APIC ID of the APIC being restored (the vCPU index); the state must carry it.
    pub id: u8,
    /// Whether the vCPU is the bootstrap processor; the state's BSP flag must agree.
    pub bsp: bool,
    /// The restored vCPU's guest TSC (read after its TSC was restored) and rate: maps the
    /// saved guest-TSC timer deadline to host time. The rate must be the one the state was
    /// saved at (the guest TSC rate is part of the vCPU).
    pub clock: GuestClock,
}

impl From<RunState> for SavedRunState {
    fn from(r: RunState) -> Self {
        match r {
            RunState::WaitForSipi => SavedRunState::WaitForSipi,
            RunState::Starting(vector) => SavedRunState::Starting { vector },
            RunState::Running => SavedRunState::Running,
        }
    }
}

impl From<SavedRunState> for RunState {
    fn from(r: SavedRunState) -> Self {
        match r {
            SavedRunState::WaitForSipi => RunState::WaitForSipi,
            SavedRunState::Starting { vector } => RunState::Starting(vector),
            SavedRunState::Running => RunState::Running,
        }
    }
}

impl Apic {
    /// A copy of the state (statistics and the host-time clock left out).
    pub fn save(&self) -> LapicState {
        LapicState {
            id: self.id,
            apic_base: self.apic_base,
            irr: self.irr,
            isr: self.isr,
            tmr: self.tmr,
            tpr: self.tpr,
            ldr: self.ldr,
            dfr: self.dfr,
            svr: self.svr,
            esr: self.esr,
            icr: u64::from(self.icr_lo) | (u64::from(self.icr_hi) << 32),
            lvt: self.lvt,
            timer: TimerState {
                initial_count: self.timer.init,
                divide_config: self.timer.div,
                tsc_deadline: self.timer.tsc_deadline,
                next_fire_tsc: self.timer.next,
                period_tsc: self.timer.period,
            },
            nmi_pending: self.nmi_pending,
            run_state: self.run_state.into(),
        }
    }

    /// The APIC `state` describes, validated, with the timer on `args.clock`.
    pub fn restore(args: LapicArgs, state: &LapicState) -> Result<Self, LapicStateError> {
        validate(&args, state)?;
        let s = state;
        Ok(Apic {
            id: s.id,
            apic_base: s.apic_base,
            irr: s.irr,
            isr: s.isr,
            tmr: s.tmr,
            tpr: s.tpr,
            ldr: s.ldr,
            dfr: s.dfr,
            svr: s.svr,
            esr: s.esr,
            icr_lo: s.icr as u32,
            icr_hi: (s.icr >> 32) as u32,
            lvt: s.lvt,
            timer: Timer {
                init: s.timer.initial_count,
                div: s.timer.divide_config,
                tsc_deadline: s.timer.tsc_deadline,
                next: s.timer.next_fire_tsc,
                period: s.timer.period_tsc,
                clock: Some(args.clock),
            },
            nmi_pending: s.nmi_pending,
            run_state: s.run_state.into(),
            timer_fires: 0,
        })
    }
}

fn validate(args: &LapicArgs, s: &LapicState) -> Result<(), LapicStateError> {
    use LapicStateError as E;
    if s.id != args.id {
        return Err(E::Id {
            expected: args.id,
            found: s.id,
        });
    }
    let base = s.apic_base;
    if base & !(BASE_ADDR_MASK | BASE_BSP | BASE_EXTD | BASE_EN) != 0 {
        return Err(E::ApicBaseReserved(base));
    }
    if base & BASE_ADDR_MASK != APIC_BASE_ADDR {
        return Err(E::ApicBaseAddress(base));
    }
    if (base & BASE_BSP != 0) != args.bsp {
        return Err(E::ApicBaseBsp {
            value: base,
            bsp: args.bsp,
        });
    }
    let x2apic = base & BASE_EXTD != 0;
    if x2apic && base & BASE_EN == 0 {
        return Err(E::X2apicWithoutEnable(base));
    }
    validate_isr(&s.isr)?;
    if s.tpr > 0xff {
        return Err(E::Tpr(s.tpr));
    }
    let ldr_ok = if x2apic {
        s.ldr == x2apic_ldr(s.id)
    } else {
        s.ldr & !LDR_XAPIC == 0
    };
    if !ldr_ok {
        let mode = if x2apic { "x2APIC" } else { "xAPIC" };
        return Err(E::Ldr { ldr: s.ldr, mode });
    }
    if s.dfr & DFR_ONES != DFR_ONES {
        return Err(E::Dfr(s.dfr));
    }
    if s.svr & !SVR_WRITABLE != 0 {
        return Err(E::Svr(s.svr));
    }
    if s.esr > 0xff {
        return Err(E::Esr(s.esr));
    }
    if s.icr as u32 & ICR_BUSY != 0 || (!x2apic && (s.icr >> 32) as u32 & !0xff00_0000 != 0) {
        return Err(E::Icr(s.icr));
    }
    if s.svr & SVR_ENABLED == 0 {
        if let Some(index) = s.lvt.iter().position(|l| l & LVT_MASKED == 0) {
            return Err(E::LvtUnmasked {
                index,
                value: s.lvt[index],
            });
        }
    }
    validate_timer(args, s)?;
    if args.bsp && s.run_state != SavedRunState::Running {
        return Err(E::BspNotRunning(s.run_state));
    }
    Ok(())
}

/// At most one in-service vector per priority class, none below 16.
fn validate_isr(isr: &[u32; 8]) -> Result<(), LapicStateError> {
    let mut isr = *isr;
    while let Some(v) = highest(&isr) {
        let (i, m) = super::bit(v);
        isr[i] &= !m;
        if v < 16 {
            return Err(LapicStateError::IsrReservedVector(v));
        }
        if let Some(w) = highest(&isr).filter(|w| w >> 4 == v >> 4) {
            return Err(LapicStateError::IsrNesting(w, v));
        }
    }
    Ok(())
}

fn validate_timer(args: &LapicArgs, s: &LapicState) -> Result<(), LapicStateError> {
    use LapicStateError as E;
    let t = &s.timer;
    if t.divide_config & !TIMER_DIV_WRITABLE != 0 {
        return Err(E::TimerDivide(t.divide_config));
    }
    let mode = (s.lvt[0] >> 17) & 3;
    // The restored vCPU's guest TSC: no earlier than the one the state was saved at.
    let now = args.clock.tsc();
    let (min, max) = (
        args.clock.cycles(MIN_INTERVAL_NS).max(1),
        args.clock.cycles(MAX_INTERVAL_NS).max(1),
    );
    if mode == MODE_TSC_DEADLINE {
        if t.next_fire_tsc != (t.tsc_deadline != 0).then_some(t.tsc_deadline) {
            return Err(E::TimerNext {
                next: t.next_fire_tsc,
                guest_tsc: now,
            });
        }
    } else {
        if t.tsc_deadline != 0 {
            return Err(E::TscDeadlineOutsideMode(t.tsc_deadline));
        }
        // A count placed its expiry at most `max` cycles after it was written, before the save.
        // Twice that: the live clock that placed it may have run a little ahead of the guest TSC.
        if t.next_fire_tsc
            .is_some_and(|n| n > now.saturating_add(max.saturating_mul(2)))
        {
            return Err(E::TimerNext {
                next: t.next_fire_tsc,
                guest_tsc: now,
            });
        }
    }
    let period_ok = match t.period_tsc {
        None => true,
        Some(p) => mode == MODE_PERIODIC && t.next_fire_tsc.is_some() && (min..=max).contains(&p),
    };
    if !period_ok {
        return Err(E::TimerPeriod {
            period: t.period_tsc,
            mode,
            min,
            max,
        });
    }
    Ok(())
}

impl Persist for LocalApic {
    type State = LapicState;
    type ConstructorArgs = LapicArgs;
    type Error = LapicStateError;

    fn save(&self) -> LapicState {
        self.lock().save()
    }

    fn restore(args: LapicArgs, state: &LapicState) -> Result<Self, LapicStateError> {
        Apic::restore(args, state).map(LocalApic::from_apic)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::regs::reg;
    use super::super::tests::fixed;
    use super::*;
    use crate::bus::{DeliveryMode, Message};

    const KHZ: u64 = 2_500_000;

    /// A field, how to spoil it, and the error that must name it.
    type Case = (&'static str, Box<dyn Fn(&mut LapicState)>, LapicStateError);

    fn args(id: u8, bsp: bool, tsc: u64, at: Instant) -> LapicArgs {
        LapicArgs {
            id,
            bsp,
            clock: GuestClock::new(tsc, KHZ, at),
        }
    }

    /// An application processor with something in every register: two vectors pending, one in
    /// service (level-triggered), a periodic timer armed, an NMI pending, started by a SIPI.
    fn busy_ap(now: Instant) -> LocalApic {
        let l = LocalApic::new(3, false);
        {
            let mut s = l.lock();
            s.set_clock(GuestClock::new(7_000_000, KHZ, now));
            s.write(reg::SVR, 0x1ff, now);
            s.write(reg::TPR, 0x20, now);
            s.write(reg::LDR, 0x0800_0000, now);
            s.write(reg::DFR, 0x0fff_ffff, now);
            s.write(reg::ICR_HI, 5 << 24, now);
            s.write(reg::ICR_LO, 0x4000 | 0x31, now);
            s.write(0x350, 0x0700, now); // LINT0: ExtINT
            s.write(0x360, 0x0400, now); // LINT1: NMI
            s.write(reg::TIMER_DIV, 0x3, now); // divide by 16
            s.write(reg::LVT_TIMER, 0xef | (1 << 17), now);
            s.write(reg::TIMER_INIT, 62_500, now); // 1 ms
            let level = Message {
                level: true,
                ..fixed(0x61)
            };
            assert!(s.accept(&level));
            s.ack(0x61);
            assert!(s.accept(&fixed(0x45)));
            assert!(s.accept(&fixed(0x92)));
            s.nmi_pending = true;
            s.run_state = RunState::Starting(0x9a);
        }
        l
    }

    #[test]
    fn round_trip_keeps_state_and_behaviour() {
        let now = Instant::now();
        let live = busy_ap(now);
        let saved = live.save();
        assert_eq!(saved.timer.next_fire_tsc, Some(7_000_000 + 2_500_000));
        assert_eq!(saved.timer.period_tsc, Some(2_500_000));
        assert_eq!(saved.run_state, SavedRunState::Starting { vector: 0x9a });
        assert_eq!(saved.icr, (5 << 56) | 0x4031);

        // Restored elsewhere: another host instant, the guest TSC a little later.
        let later = now + Duration::from_secs(5);
        let restored = LocalApic::restore(args(3, false, 7_100_000, later), &saved).unwrap();
        assert_eq!(restored.id, 3);
        assert_eq!(restored.save(), saved);

        let (mut a, mut b) = (live.lock(), restored.lock());
        // The same pending vector, the same level EOI, the same IPI from the same ICR.
        assert_eq!(a.deliverable(), Some(0x92));
        assert_eq!(b.deliverable(), Some(0x92));
        assert_eq!(b.read(reg::PPR, later), a.read(reg::PPR, now));
        assert_eq!(
            b.write(reg::EOI, 0, later),
            Some(crate::Effect::LevelEoi(0x61))
        );
        assert_eq!(
            a.write(reg::EOI, 0, now),
            Some(crate::Effect::LevelEoi(0x61))
        );
        assert_eq!(
            a.write(reg::ICR_LO, 0x31, now),
            b.write(reg::ICR_LO, 0x31, later)
        );
        assert!(b.matches(&Message {
            logical: true,
            dest: 0x08,
            ..fixed(0x40)
        }));
        assert!(b.nmi_pending);
        assert_eq!(b.run_state, RunState::Starting(0x9a));

        // The timer fires at the same guest TSC on both clocks, then re-arms one period on.
        let due = a.deadline_tsc().unwrap();
        assert_eq!(b.deadline_tsc(), Some(due));
        let (ca, cb) = (a.clock().unwrap(), b.clock().unwrap());
        let (ta, tb) = (a.deadline().unwrap(), b.deadline().unwrap());
        assert_eq!((ca.tsc_at(ta), cb.tsc_at(tb)), (due, due));
        assert_eq!(
            tb,
            later + Duration::from_nanos((due - 7_100_000) * 1_000_000 / KHZ)
        );
        assert!(!b.poll_timer(tb - Duration::from_nanos(1)));
        assert!(a.poll_timer(ta) && b.poll_timer(tb));
        assert_eq!(a.deadline_tsc(), Some(due + 2_500_000));
        assert_eq!(b.deadline_tsc(), a.deadline_tsc());
        assert_eq!((a.deliverable(), b.deliverable()), (Some(0xef), Some(0xef)));
        // Statistics are not state.
        assert_eq!((a.timer_fires, b.timer_fires), (1, 1));
    }

    #[test]
    fn round_trip_of_other_modes() {
        let now = Instant::now();
        // The BSP in x2APIC mode with a TSC deadline armed.
        let bsp = LocalApic::new(0x12, true);
        {
            let mut s = bsp.lock();
            let base = s.apic_base();
            s.set_apic_base(base | BASE_EXTD).unwrap();
            s.msr_write(0x80f, 0x1ff, now).unwrap();
            s.msr_write(0x832, 0xec | (2 << 17), now).unwrap();
            s.set_tsc_deadline(9_000_000, 5_000_000, KHZ, now);
            s.msr_write(0x830, (300u64 << 32) | 0xfd, now).unwrap();
        }
        let saved = bsp.save();
        assert_eq!(saved.timer.next_fire_tsc, Some(9_000_000));
        let restored = LocalApic::restore(args(0x12, true, 5_000_000, now), &saved).unwrap();
        assert_eq!(restored.save(), saved);
        let mut r = restored.lock();
        assert_eq!(r.msr_read(0x80d, now), Ok(0x0001_0004)); // LDR
        assert_eq!(r.tsc_deadline(), 9_000_000);
        assert_eq!(r.deadline(), Some(now + Duration::from_micros(1600)));
        assert!(r.poll_timer(now + Duration::from_micros(1600)));
        assert_eq!(r.tsc_deadline(), 0);
        drop(r);
        // A globally disabled AP still waiting for its SIPI, and a fresh one.
        let ap = LocalApic::new(1, false);
        let base = ap.lock().apic_base();
        ap.lock().set_apic_base(base & !BASE_EN).unwrap();
        for l in [ap, LocalApic::new(2, false)] {
            let saved = l.save();
            let r = LocalApic::restore(args(l.id, false, 0, now), &saved).unwrap();
            assert_eq!(r.save(), saved);
            assert_eq!(r.lock().run_state, RunState::WaitForSipi);
        }
    }

    #[test]
    fn json_round_trip() {
        let saved = busy_ap(Instant::now()).save();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<LapicState>(&json).unwrap(), saved);
        assert!(json.contains("\"next_fire_tsc\":9500000"), "{json}");
    }

    #[test]
    fn every_invalid_field_is_refused() {
        use LapicStateError as E;
        let now = Instant::now();
        let good = busy_ap(now).save();
        let restore = |f: &dyn Fn(&mut LapicState)| {
            let mut s = good.clone();
            f(&mut s);
            LocalApic::restore(args(3, false, 7_000_000, now), &s).err()
        };
        assert_eq!(restore(&|_| ()), None);
        let x2 = BASE_EN | BASE_EXTD | APIC_BASE_ADDR;
        let cases: Vec<Case> = vec![
            (
                "id",
                Box::new(|s| s.id = 4),
                E::Id {
                    expected: 3,
                    found: 4,
                },
            ),
            (
                "apic_base",
                Box::new(|s| s.apic_base |= 1),
                E::ApicBaseReserved(APIC_BASE_ADDR | BASE_EN | 1),
            ),
            (
                "apic_base",
                Box::new(|s| s.apic_base += 0x1000),
                E::ApicBaseAddress((APIC_BASE_ADDR + 0x1000) | BASE_EN),
            ),
            (
                "apic_base",
                Box::new(|s| s.apic_base |= BASE_BSP),
                E::ApicBaseBsp {
                    value: APIC_BASE_ADDR | BASE_EN | BASE_BSP,
                    bsp: false,
                },
            ),
            (
                "apic_base",
                Box::new(|s| s.apic_base = APIC_BASE_ADDR | BASE_EXTD),
                E::X2apicWithoutEnable(APIC_BASE_ADDR | BASE_EXTD),
            ),
            (
                "isr",
                Box::new(|s| s.isr[0] = 1 << 3),
                E::IsrReservedVector(3),
            ),
            (
                "isr",
                Box::new(|s| s.isr[3] |= 1 << 2),
                E::IsrNesting(0x61, 0x62),
            ),
            ("tpr", Box::new(|s| s.tpr = 0x100), E::Tpr(0x100)),
            (
                "ldr",
                Box::new(|s| s.ldr = 0x0800_0001),
                E::Ldr {
                    ldr: 0x0800_0001,
                    mode: "xAPIC",
                },
            ),
            (
                "ldr",
                Box::new(move |s| {
                    s.apic_base = x2;
                    s.icr &= 0xffff_ffff;
                }),
                E::Ldr {
                    ldr: 0x0800_0000,
                    mode: "x2APIC",
                },
            ),
            (
                "dfr",
                Box::new(|s| s.dfr = 0xf000_0000),
                E::Dfr(0xf000_0000),
            ),
            ("svr", Box::new(|s| s.svr |= 0x400), E::Svr(0x5ff)),
            ("esr", Box::new(|s| s.esr = 0x100), E::Esr(0x100)),
            (
                "icr",
                Box::new(|s| s.icr |= 1 << 12),
                E::Icr((5 << 56) | 0x5031),
            ),
            (
                "icr",
                Box::new(|s| s.icr |= 1 << 32),
                E::Icr((5 << 56) | (1 << 32) | 0x4031),
            ),
            (
                "lvt",
                Box::new(|s| s.svr &= !0x100),
                E::LvtUnmasked {
                    index: 0,
                    value: 0xef | (1 << 17),
                },
            ),
            (
                "timer.divide_config",
                Box::new(|s| s.timer.divide_config = 4),
                E::TimerDivide(4),
            ),
            (
                "timer.tsc_deadline",
                Box::new(|s| s.timer.tsc_deadline = 5),
                E::TscDeadlineOutsideMode(5),
            ),
            (
                "timer.next_fire_tsc",
                Box::new(|s| s.lvt[0] = 0xef | (2 << 17)),
                E::TimerNext {
                    next: Some(9_500_000),
                    guest_tsc: 7_000_000,
                },
            ),
            (
                "timer.next_fire_tsc",
                Box::new(|s| s.timer.next_fire_tsc = Some(u64::MAX)),
                E::TimerNext {
                    next: Some(u64::MAX),
                    guest_tsc: 7_000_000,
                },
            ),
            (
                "timer.period_tsc",
                Box::new(|s| s.timer.period_tsc = Some(2499)),
                E::TimerPeriod {
                    period: Some(2499),
                    mode: 1,
                    min: 2500,
                    max: 549_755_813_760 * 5 / 2,
                },
            ),
            (
                "timer.period_tsc",
                Box::new(|s| s.timer.next_fire_tsc = None),
                E::TimerPeriod {
                    period: Some(2_500_000),
                    mode: 1,
                    min: 2500,
                    max: 549_755_813_760 * 5 / 2,
                },
            ),
            (
                "timer.period_tsc",
                Box::new(|s| s.lvt[0] &= !(1 << 17)),
                E::TimerPeriod {
                    period: Some(2_500_000),
                    mode: 0,
                    min: 2500,
                    max: 549_755_813_760 * 5 / 2,
                },
            ),
        ];
        for (field, mutate, want) in cases {
            let got = restore(&*mutate);
            assert_eq!(got.as_ref(), Some(&want), "{field}");
            assert!(want.to_string().starts_with(field), "{want}");
        }
        // The bootstrap processor never waits for a SIPI.
        let mut s = LocalApic::new(0, true).save();
        s.run_state = SavedRunState::WaitForSipi;
        let e = LocalApic::restore(args(0, true, 0, now), &s).err().unwrap();
        assert_eq!(e, E::BspNotRunning(SavedRunState::WaitForSipi));
        assert!(e.to_string().starts_with("run_state"));
    }

    #[test]
    fn start_up_vector_survives() {
        let now = Instant::now();
        let l = LocalApic::new(1, false);
        let sipi = Message {
            mode: DeliveryMode::StartUp,
            ..fixed(0x9f)
        };
        let saved = l.save();
        let r = LocalApic::restore(args(1, false, 0, now), &saved).unwrap();
        r.deliver(&sipi);
        assert_eq!(r.lock().run_state, RunState::Starting(0x9f));
    }

    #[test]
    fn random_states_never_panic_and_accepted_ones_round_trip() {
        let now = Instant::now();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = busy_ap(now).save();
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut s = good.clone();
            // Spoil one to three fields with random bits (sparse, so some stay valid).
            for _ in 0..1 + round % 3 {
                let r = next();
                let sparse = (r & next() & next()) as u32;
                match r % 13 {
                    0 => s.apic_base ^= u64::from(sparse) << (r % 24),
                    1 => s.isr[(r % 8) as usize] ^= sparse,
                    2 => s.irr[(r % 8) as usize] = sparse,
                    3 => s.tpr ^= sparse,
                    4 => s.ldr ^= sparse,
                    5 => s.dfr ^= sparse,
                    6 => s.svr ^= sparse,
                    7 => s.icr ^= u64::from(sparse) << (r % 33),
                    8 => s.lvt[(r % 6) as usize] ^= sparse,
                    9 => s.timer.divide_config ^= sparse,
                    10 => s.timer.tsc_deadline = u64::from(sparse),
                    11 => s.timer.next_fire_tsc = (r & 1 == 0).then(|| next() >> (r % 64)),
                    _ => s.timer.period_tsc = (r & 1 == 0).then(|| next() >> (r % 64)),
                }
            }
            if let Ok(l) = LocalApic::restore(args(3, false, 7_000_000, now), &s) {
                accepted += 1;
                assert_eq!(l.save(), s);
                let mut a = l.lock();
                let _ = (a.deliverable(), a.deadline(), a.read(reg::TIMER_CUR, now));
                a.poll_timer(now + Duration::from_secs(1));
            }
        }
        assert!(accepted > 1000, "{accepted}");
    }
}
