//! The home role: directory entries and per-page transactions.

use super::{bits, Engine, Net, PageOps};
use crate::stats::Stats;
use proto::{Access, Content, FetchMode, HostId, Message, NackReason, PageBuf, Pfn};
use std::collections::VecDeque;

#[derive(Debug)]
pub(super) struct Txn {
    pub(super) id: u64,
    pub(super) requester: HostId,
    pub(super) access: Access,
    /// Hosts (bits by index) whose `PageData`/`InvalidateAck` is awaited.
    pub(super) waiting: u64,
    pub(super) data: Option<PageBuf>,
    /// What to grant when no data was fetched (`Zero` or `Keep`).
    pub(super) content: Content,
    pub(super) granted: bool,
}

#[derive(Debug, Default)]
pub(super) struct DirEntry {
    /// Index of the exclusive owner.
    pub(super) owner: Option<usize>,
    /// Bits (by host index) of hosts holding read-only copies.
    pub(super) sharers: u64,
    pub(super) busy: Option<Txn>,
    pub(super) queue: VecDeque<(HostId, Access)>,
}

impl<P: PageOps, N: Net> Engine<P, N> {
    pub(super) fn home_request(&mut self, from: HostId, pfn: Pfn, access: Access) {
        let reason = if self.layout.index(pfn).is_none() {
            Some(NackReason::OutOfRange)
        } else if self.home(pfn) != self.me {
            Some(NackReason::NotHome)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.fail(format_args!(
                "bad request for pfn {pfn:#x} from {from}: {reason:?}"
            ));
            self.deliver(
                from,
                Message::Nack {
                    pfn,
                    txn: 0,
                    reason,
                },
            );
            return;
        }
        if self.loading {
            if self
                .deferred
                .iter()
                .any(|(h, p, _)| *h == from && *p == pfn)
            {
                self.fail(format_args!(
                    "second request for pfn {pfn:#x} from {from} while loading: refused"
                ));
                let reason = NackReason::Unavailable;
                self.deliver(
                    from,
                    Message::Nack {
                        pfn,
                        txn: 0,
                        reason,
                    },
                );
                return;
            }
            self.deferred.push((from, pfn, access));
            return;
        }
        let stats = self.stats.clone();
        let e = self.dir.entry(pfn).or_insert_with(|| {
            Stats::add(&stats.directory_entries, 1);
            DirEntry::default()
        });
        if e.busy.is_some() {
            // A host has at most one request per page outstanding (its later faults on the page
            // merge into it), so the queue holds at most one entry per host: a second one is a
            // peer breaking the protocol, or flooding, and is refused instead of queued.
            if e.queue.iter().any(|(h, _)| *h == from) {
                self.fail(format_args!(
                    "second request for pfn {pfn:#x} from {from} while one is queued: refused"
                ));
                self.deliver(
                    from,
                    Message::Nack {
                        pfn,
                        txn: 0,
                        reason: NackReason::Unavailable,
                    },
                );
                return;
            }
            Stats::add(&stats.home_queued, 1);
            e.queue.push_back((from, access));
            return;
        }
        self.start(pfn, from, access);
    }

    fn start(&mut self, pfn: Pfn, r: HostId, access: Access) {
        let rbit = self.bit(r);
        let me_bit = self.bit(self.me);
        let hosts = self.hosts.clone();
        let id = self.next_txn;
        self.next_txn += 1;
        Stats::add(&self.stats.home_transactions, 1);
        // A page nobody has held since a lazy restore: its saved contents, not zeros.
        let untouched = self
            .dir
            .get(&pfn)
            .is_some_and(|e| e.owner.is_none() && e.sharers == 0);
        let backed = if untouched { self.backed(pfn) } else { None };
        let Some(e) = self.dir.get_mut(&pfn) else {
            return;
        };
        let pick = |set: u64| {
            if set & me_bit != 0 {
                me_bit
            } else {
                set & set.wrapping_neg()
            }
        };
        let mut sends = Vec::new();
        let mut waiting = 0u64;
        let mut content = backed.map_or(Content::Zero, Content::Data);
        let mut anomaly = None;
        match (access, e.owner) {
            (_, Some(o)) if 1 << o == rbit => {
                anomaly = Some("request from the current owner");
                content = Content::Keep;
            }
            (Access::Read, Some(o)) => {
                sends.push((hosts[o], FetchMode::Downgrade));
                waiting = 1 << o;
            }
            (Access::Write, Some(o)) => {
                sends.push((hosts[o], FetchMode::Invalidate));
                waiting = 1 << o;
            }
            (Access::Read, None) if e.sharers & rbit != 0 => {
                anomaly = Some("read request from a sharer");
                content = Content::Keep;
            }
            (Access::Read, None) if e.sharers != 0 => {
                let s = pick(e.sharers);
                sends.push((hosts[s.trailing_zeros() as usize], FetchMode::Copy));
                waiting = s;
            }
            (Access::Read, None) => {}
            (Access::Write, None) => {
                waiting = e.sharers & !rbit;
                if e.sharers & rbit != 0 {
                    content = Content::Keep;
                } else if waiting != 0 {
                    let s = pick(waiting);
                    sends.push((hosts[s.trailing_zeros() as usize], FetchMode::Invalidate));
                }
            }
        }
        let fetched = sends
            .iter()
            .fold(0u64, |a, (h, _)| a | self_bit(&hosts, *h));
        e.busy = Some(Txn {
            id,
            requester: r,
            access,
            waiting,
            data: None,
            content,
            granted: false,
        });
        if let Some(a) = anomaly {
            self.fail(format_args!("pfn {pfn:#x}: {a} {r}"));
        }
        for (to, mode) in sends {
            self.deliver(to, Message::Fetch { pfn, txn: id, mode });
        }
        for i in bits(waiting & !fetched) {
            self.deliver(hosts[i], Message::Invalidate { pfn, txn: id });
        }
        if waiting == 0 {
            self.grant(pfn);
        }
    }

    pub(super) fn home_reply(&mut self, from: HostId, pfn: Pfn, txn: u64, data: Option<PageBuf>) {
        let fbit = self.bit(from);
        let t = self
            .dir
            .get_mut(&pfn)
            .and_then(|e| e.busy.as_mut())
            .filter(|t| t.id == txn && !t.granted && t.waiting & fbit != 0);
        let Some(t) = t else {
            self.fail(format_args!(
                "unexpected reply for pfn {pfn:#x} txn {txn} from {from}"
            ));
            return;
        };
        t.waiting &= !fbit;
        if data.is_some() {
            t.data = data;
        }
        if t.waiting == 0 {
            self.grant(pfn);
        }
    }

    fn grant(&mut self, pfn: Pfn) {
        let hosts = &self.hosts;
        let Some(e) = self.dir.get_mut(&pfn) else {
            return;
        };
        let Some(t) = e.busy.as_mut() else {
            return;
        };
        let ri = hosts.binary_search(&t.requester).unwrap_or(0);
        let content = match t.data.take() {
            Some(d) => Content::Data(d),
            None => t.content.clone(),
        };
        match t.access {
            Access::Read => {
                if let Some(o) = e.owner.take() {
                    e.sharers = 1 << o;
                }
                e.sharers |= 1 << ri;
            }
            Access::Write => {
                e.owner = Some(ri);
                e.sharers = 0;
            }
        }
        t.granted = true;
        let (to, msg) = (
            t.requester,
            Message::Grant {
                pfn,
                txn: t.id,
                access: t.access,
                content,
            },
        );
        self.deliver(to, msg);
    }

    pub(super) fn home_ack(&mut self, from: HostId, pfn: Pfn, txn: u64) {
        let e = self.dir.get_mut(&pfn);
        let ok = e
            .as_ref()
            .and_then(|e| e.busy.as_ref())
            .is_some_and(|t| t.id == txn && t.granted && t.requester == from);
        let Some(e) = e.filter(|_| ok) else {
            self.fail(format_args!(
                "unexpected GrantAck pfn {pfn:#x} txn {txn} from {from}"
            ));
            return;
        };
        e.busy = None;
        if let Some((r, a)) = e.queue.pop_front() {
            self.start(pfn, r, a);
        }
    }
}

fn self_bit(hosts: &[HostId], h: HostId) -> u64 {
    hosts.binary_search(&h).map_or(0, |i| 1 << i)
}
