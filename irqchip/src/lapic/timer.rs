//! The local APIC timer, kept in guest-TSC time.
//!
//! Every mode keeps its next expiry as a guest-TSC value: the TSC-deadline mode has it from the
//! guest (`IA32_TSC_DEADLINE`), and the one-shot and periodic counting modes convert their count
//! when it is written (the nominal bus clock [`BUS_HZ`] gives the interval, the TSC rate turns it
//! into cycles), so a periodic timer re-arms in whole cycles. Nothing of the timer is a host
//! instant; host time enters only through a [`GuestClock`], the reading of the guest TSC at a
//! known host instant that maps guest-TSC deadlines to the host instants the timer thread
//! sleeps until. The vCPU thread refreshes the clock whenever it reads the guest TSC (at its
//! start and on every `IA32_TSC_DEADLINE` write); a restored APIC gets one in its constructor
//! arguments. The saved state is therefore the live timer itself.

use std::time::{Duration, Instant};

use super::regs::LVT_MASKED;
use super::{bit, Apic};

/// Nominal APIC bus clock for the counting timer modes (Linux uses TSC-deadline mode here).
const BUS_HZ: u64 = 1_000_000_000;
/// Shortest counting-mode interval: a tiny guest-chosen count must not become an interrupt
/// storm.
pub(crate) const MIN_INTERVAL_NS: u64 = 1000;
/// Longest counting-mode interval: the largest count at the largest divisor (128).
pub(crate) const MAX_INTERVAL_NS: u64 =
    (u32::MAX as u128 * 128 * 1_000_000_000 / BUS_HZ as u128) as u64;
/// The TSC rate a clock gets when nobody supplied one (the VMM's own fallback too).
const DEFAULT_TSC_KHZ: u64 = 1_000_000;

/// LVT timer mode field values.
pub(crate) const MODE_PERIODIC: u32 = 1;
pub(crate) const MODE_TSC_DEADLINE: u32 = 2;

/// The guest TSC read at a known host instant, and its rate: the mapping between guest-TSC time
/// and host time that the live timer uses (the guest TSC advances with the host's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestClock {
    tsc: u64,
    tsc_khz: u64,
    at: Instant,
}

impl GuestClock {
    /// The guest TSC read `tsc` at host instant `at` and runs at `tsc_khz` kHz (0 counts as 1).
    pub fn new(tsc: u64, tsc_khz: u64, at: Instant) -> Self {
        GuestClock {
            tsc,
            tsc_khz: tsc_khz.max(1),
            at,
        }
    }

    /// The guest TSC reading.
    pub fn tsc(&self) -> u64 {
        self.tsc
    }

    /// The guest TSC rate in kHz.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// Guest TSC cycles in `ns` nanoseconds (rounded down, saturating).
    pub fn cycles(&self, ns: u64) -> u64 {
        (u128::from(ns) * u128::from(self.tsc_khz) / 1_000_000).min(u128::from(u64::MAX)) as u64
    }

    /// Nanoseconds in `cycles` guest TSC cycles, rounded down (`up`: rounded up), saturating.
    fn ns(&self, cycles: u64, up: bool) -> u64 {
        let k = u128::from(self.tsc_khz);
        let scaled = u128::from(cycles) * 1_000_000;
        let ns = if up { scaled.div_ceil(k) } else { scaled / k };
        ns.min(u128::from(u64::MAX)) as u64
    }

    /// The guest TSC at host instant `t` (extrapolated either way from the reading).
    pub fn tsc_at(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.at) {
            Some(d) => self.tsc.saturating_add(self.cycles(duration_ns(d))),
            None => self
                .tsc
                .saturating_sub(self.cycles(duration_ns(self.at - t))),
        }
    }

    /// The first host instant at which the guest TSC has reached `tsc` (the reading's instant
    /// if it already had then; None if beyond what an `Instant` can hold).
    pub fn instant_of(&self, tsc: u64) -> Option<Instant> {
        let ns = self.ns(tsc.saturating_sub(self.tsc), true);
        self.at.checked_add(Duration::from_nanos(ns))
    }
}

fn duration_ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

/// The timer registers and the armed expiry.
#[derive(Debug, Default)]
pub(super) struct Timer {
    /// Initial count register.
    pub(super) init: u32,
    /// Divide configuration register.
    pub(super) div: u32,
    /// `IA32_TSC_DEADLINE` as written (0: disarmed), kept in TSC-deadline mode only.
    pub(super) tsc_deadline: u64,
    /// Guest TSC at which the timer fires next.
    pub(super) next: Option<u64>,
    /// Guest TSC cycles between fires (periodic mode).
    pub(super) period: Option<u64>,
    /// Guest TSC <-> host time; set on first use if nobody supplied one.
    pub(super) clock: Option<GuestClock>,
}

impl Timer {
    /// Disarms the timer and clears its count and deadline (a timer mode change).
    pub(super) fn stop(&mut self) {
        self.next = None;
        self.period = None;
        self.init = 0;
        self.tsc_deadline = 0;
    }
}

impl Apic {
    /// The LVT timer mode (0 one-shot, 1 periodic, 2 TSC-deadline, 3 reserved: as one-shot).
    pub(super) fn timer_mode(&self) -> u32 {
        (self.lvt[0] >> 17) & 3
    }

    fn divisor(&self) -> u64 {
        let v = (self.timer.div & 3) | ((self.timer.div & 8) >> 1);
        if v == 7 {
            1
        } else {
            2 << v
        }
    }

    /// The clock, created at `now` with guest TSC 0 and the default rate if nobody set one
    /// (a clock that is wrong only misplaces the saved counting-mode deadline, never the live
    /// one: the count is converted to cycles and back with the same clock).
    fn clock_at(&mut self, now: Instant) -> GuestClock {
        *self
            .timer
            .clock
            .get_or_insert_with(|| GuestClock::new(0, DEFAULT_TSC_KHZ, now))
    }

    /// Sets the mapping between this vCPU's guest TSC and host time (from a fresh reading of the
    /// guest TSC). Armed deadlines keep their guest-TSC value.
    pub fn set_clock(&mut self, clock: GuestClock) {
        self.timer.clock = Some(clock);
    }

    /// The clock the timer maps guest TSC to host time with, if one was set or used.
    pub fn clock(&self) -> Option<GuestClock> {
        self.timer.clock
    }

    /// Starts the counting timer from the initial count written at host instant `now`.
    pub(super) fn arm_counter(&mut self, now: Instant) {
        if self.timer.init == 0 {
            self.timer.next = None;
            self.timer.period = None;
            return;
        }
        // u128: a guest-chosen count x divisor must not overflow (at most ~2^39 ns anyway).
        let ns = (u128::from(self.timer.init) * u128::from(self.divisor()) * 1_000_000_000
            / u128::from(BUS_HZ)) as u64;
        let clock = self.clock_at(now);
        let cycles = clock.cycles(ns.max(MIN_INTERVAL_NS)).max(1);
        self.timer.next = Some(clock.tsc_at(now).saturating_add(cycles));
        self.timer.period = (self.timer_mode() == MODE_PERIODIC).then_some(cycles);
    }

    /// Fires the timer if due at host instant `now`. Returns true if an interrupt was raised.
    pub fn poll_timer(&mut self, now: Instant) -> bool {
        let (Some(due), Some(clock)) = (self.timer.next, self.timer.clock) else {
            return false;
        };
        let now_tsc = clock.tsc_at(now);
        if due > now_tsc {
            return false;
        }
        // Periodic: the next period after this one, or one period from now if the timer thread
        // fell behind by more than a period.
        self.timer.next = self.timer.period.map(|p| {
            let next = due.saturating_add(p);
            if next > now_tsc {
                next
            } else {
                now_tsc.saturating_add(p)
            }
        });
        if self.timer_mode() == MODE_TSC_DEADLINE {
            self.timer.tsc_deadline = 0;
        }
        let lvt = self.lvt[0];
        if lvt & LVT_MASKED != 0 || !self.software_enabled() {
            return false;
        }
        let (i, m) = bit(lvt as u8);
        self.irr[i] |= m;
        self.tmr[i] &= !m;
        self.timer_fires += 1;
        true
    }

    /// The host instant of the next timer expiry.
    pub fn deadline(&self) -> Option<Instant> {
        self.timer.clock?.instant_of(self.timer.next?)
    }

    /// The guest TSC of the next timer expiry.
    pub fn deadline_tsc(&self) -> Option<u64> {
        self.timer.next
    }

    /// The current-count register at host instant `now` (counting modes).
    pub(super) fn current_count(&self, now: Instant) -> u32 {
        match (self.timer.next, self.timer.clock, self.timer_mode()) {
            (Some(due), Some(clock), 0 | 1) => {
                let left_ns = clock.ns(due.saturating_sub(clock.tsc_at(now)), false);
                (u128::from(left_ns) * u128::from(BUS_HZ)
                    / 1_000_000_000
                    / u128::from(self.divisor()))
                .min(u128::from(u32::MAX)) as u32
            }
            _ => 0,
        }
    }

    /// `RDMSR IA32_TSC_DEADLINE`.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == MODE_TSC_DEADLINE {
            self.timer.tsc_deadline
        } else {
            0
        }
    }

    /// `WRMSR IA32_TSC_DEADLINE`: `guest_tsc` is the guest's TSC read at host instant `now`,
    /// `tsc_khz` its rate (that reading also becomes the timer's clock).
    pub fn set_tsc_deadline(&mut self, value: u64, guest_tsc: u64, tsc_khz: u64, now: Instant) {
        if self.timer_mode() != MODE_TSC_DEADLINE {
            return;
        }
        self.timer.clock = Some(GuestClock::new(guest_tsc, tsc_khz, now));
        self.timer.tsc_deadline = value;
        self.timer.period = None;
        self.timer.next = (value != 0).then_some(value);
    }
}

#[cfg(test)]
mod tests {
    use super::super::regs::reg;
    use super::super::tests::enabled;
    use super::*;

    #[test]
    fn huge_timer_count_does_not_overflow() {
        let mut s = enabled();
        let now = Instant::now();
        s.write(reg::TIMER_DIV, 0xa, now); // divide by 128
        s.write(reg::LVT_TIMER, 0xec | (1 << 17), now);
        s.write(reg::TIMER_INIT, u32::MAX, now);
        let d = s.deadline().unwrap() - now;
        assert_eq!(d, Duration::from_nanos(u64::from(u32::MAX) * 128));
        assert_eq!(s.read(reg::TIMER_CUR, now), u32::MAX);
    }

    #[test]
    fn timers() {
        let mut s = enabled();
        let now = Instant::now();
        // One-shot: 1000 ticks at divide-by-1.
        s.write(reg::TIMER_DIV, 0xb, now);
        s.write(reg::LVT_TIMER, 0xec, now);
        s.write(reg::TIMER_INIT, 1000, now);
        assert!(!s.poll_timer(now));
        assert!(s.poll_timer(now + Duration::from_millis(1)));
        assert_eq!(s.deliverable(), Some(0xec));
        assert!(s.deadline().is_none());
        // TSC deadline: 1 MHz TSC, deadline 1000 cycles ahead = 1 ms.
        s.write(reg::LVT_TIMER, 0xec | (2 << 17), now);
        s.set_tsc_deadline(6000, 5000, 1000, now);
        assert_eq!(s.tsc_deadline(), 6000);
        let d = s.deadline().unwrap() - now;
        assert_eq!(d, Duration::from_millis(1));
        assert!(s.poll_timer(now + d));
        assert_eq!(s.tsc_deadline(), 0);
        // Periodic re-arms.
        s.write(reg::LVT_TIMER, 0xec | (1 << 17), now);
        s.write(reg::TIMER_INIT, 1_000_000, now);
        assert!(s.poll_timer(now + Duration::from_millis(1)));
        assert!(s.deadline().is_some());
    }

    #[test]
    fn counting_timer_in_guest_tsc() {
        // A 2.5 GHz guest TSC that read 10^9 at `now`.
        let now = Instant::now();
        let mut s = enabled();
        s.set_clock(GuestClock::new(1_000_000_000, 2_500_000, now));
        s.write(reg::TIMER_DIV, 0xb, now);
        s.write(reg::LVT_TIMER, 0xec | (1 << 17), now);
        s.write(reg::TIMER_INIT, 4000, now); // 4 us = 10_000 cycles
        assert_eq!(s.deadline_tsc(), Some(1_000_010_000));
        assert_eq!(s.deadline(), Some(now + Duration::from_micros(4)));
        assert_eq!(s.read(reg::TIMER_CUR, now), 4000);
        assert_eq!(s.read(reg::TIMER_CUR, now + Duration::from_micros(1)), 3000);
        assert!(!s.poll_timer(now + Duration::from_nanos(3999)));
        assert!(s.poll_timer(now + Duration::from_micros(4)));
        // Re-armed one period on, in whole cycles.
        assert_eq!(s.deadline_tsc(), Some(1_000_020_000));
        // A timer thread that fell behind by several periods fires once and re-arms from now.
        assert!(s.poll_timer(now + Duration::from_micros(30)));
        assert_eq!(s.deadline_tsc(), Some(1_000_085_000));
        // A mode change disarms it.
        s.write(reg::LVT_TIMER, 0xec, now);
        assert_eq!((s.deadline_tsc(), s.deadline()), (None, None));
    }

    #[test]
    fn tsc_deadline_in_the_past_fires_at_once() {
        let now = Instant::now();
        let mut s = enabled();
        s.write(reg::LVT_TIMER, 0xec | (2 << 17), now);
        s.set_tsc_deadline(100, 5000, 2_000_000, now);
        assert_eq!(s.deadline(), Some(now));
        assert!(s.poll_timer(now));
        // Ignored outside TSC-deadline mode.
        s.write(reg::LVT_TIMER, 0xec, now);
        s.set_tsc_deadline(9000, 5000, 2_000_000, now);
        assert_eq!((s.tsc_deadline(), s.deadline_tsc()), (0, None));
    }

    #[test]
    fn guest_clock_conversions() {
        let at = Instant::now();
        let c = GuestClock::new(1000, 3_000_000, at); // 3 cycles per ns
        assert_eq!(c.tsc_at(at + Duration::from_nanos(10)), 1030);
        assert_eq!(c.tsc_at(at - Duration::from_nanos(10)), 970);
        assert_eq!(
            GuestClock::new(5, 3_000_000, at).tsc_at(at - Duration::from_secs(1)),
            0
        );
        // The first instant at which the TSC has reached a value: rounded up.
        assert_eq!(c.instant_of(1031), Some(at + Duration::from_nanos(11)));
        assert_eq!(c.instant_of(1030), Some(at + Duration::from_nanos(10)));
        assert_eq!(c.instant_of(5), Some(at), "already reached");
        for tsc in [1000, 1001, 1002, 1003, 123_456_789] {
            let t = c.instant_of(tsc).unwrap();
            assert!(c.tsc_at(t) >= tsc);
            if t > at {
                assert!(c.tsc_at(t - Duration::from_nanos(1)) < tsc);
            }
        }
        // A deadline beyond what an Instant can hold is never (no panic).
        let _ = GuestClock::new(0, 1, at).instant_of(u64::MAX);
        assert_eq!(GuestClock::new(0, 0, at).tsc_khz(), 1);
    }
}
