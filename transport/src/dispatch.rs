//! Delivery of incoming messages to per-service handlers, and request/response bookkeeping.
//!
//! Shared by every [`crate::Transport`] implementation: the network part only decodes frames
//! and calls [`Dispatcher::dispatch`] / [`Dispatcher::complete`].

use crate::{Error, Handler, PeerEvent};
use log::{debug, warn};
use proto::{HostId, Message, Service};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Messages kept per service while it has no handler; more are dropped (and counted).
pub const MAX_BUFFERED: usize = 65536;

/// Sends the response frame of a request; implemented by each transport.
pub trait ResponseSink: Send + Sync {
    /// Sends `msg` as the response to request `id` from `to`.
    fn send_response(&self, to: HostId, id: u64, msg: Message) -> Result<(), Error>;
}

/// The right (and duty) to answer one request. Dropping it unanswered sends an `Error`.
pub struct Responder {
    sink: Weak<dyn ResponseSink>,
    peer: HostId,
    id: u64,
    done: bool,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Responder({}, #{})", self.peer, self.id)
    }
}

impl Responder {
    /// A responder for request `id` from `peer`, answering through `sink`.
    pub fn new(sink: Weak<dyn ResponseSink>, peer: HostId, id: u64) -> Self {
        Responder {
            sink,
            peer,
            id,
            done: false,
        }
    }

    /// The host that asked.
    pub fn peer(&self) -> HostId {
        self.peer
    }

    /// Sends the response.
    pub fn reply(mut self, msg: Message) -> Result<(), Error> {
        self.done = true;
        match self.sink.upgrade() {
            Some(s) => s.send_response(self.peer, self.id, msg),
            None => Err(Error::Shutdown),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.done {
            if let Some(s) = self.sink.upgrade() {
                let _ = s.send_response(
                    self.peer,
                    self.id,
                    Message::Error {
                        code: Message::ERR_NO_REPLY,
                        message: "request dropped without a reply".into(),
                    },
                );
            }
        }
    }
}

type Buffered = (HostId, Message, Option<Responder>);
type Waiter = (HostId, mpsc::SyncSender<Result<Message, Error>>);

#[derive(Default)]
struct Routes {
    handlers: HashMap<Service, Arc<dyn Handler>>,
    buffered: HashMap<Service, VecDeque<Buffered>>,
}

/// Routes incoming messages to handlers and matches responses to waiting requests.
#[derive(Default)]
pub struct Dispatcher {
    routes: Mutex<Routes>,
    pending: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A handler that panicked must not take the whole transport down with a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dispatcher {
    /// Installs `handler` for `service` and delivers what was buffered for it, in order.
    pub fn register(&self, service: Service, handler: Arc<dyn Handler>) {
        let mut routes = lock(&self.routes);
        let backlog = routes.buffered.remove(&service).unwrap_or_default();
        // Delivered with the routing lock held so no newer message overtakes the backlog.
        for (from, msg, resp) in backlog {
            handler.on_message(from, msg, resp);
        }
        routes.handlers.insert(service, handler);
    }

    /// Removes the handler of `service`.
    pub fn unregister(&self, service: Service) {
        lock(&self.routes).handlers.remove(&service);
    }

    /// Hands an incoming message to its service's handler, or buffers it.
    pub fn dispatch(&self, from: HostId, msg: Message, responder: Option<Responder>) {
        let service = msg.service();
        let handler = {
            let mut routes = lock(&self.routes);
            match routes.handlers.get(&service) {
                Some(h) => h.clone(),
                None => {
                    let q = routes.buffered.entry(service).or_default();
                    if q.len() >= MAX_BUFFERED {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            "no handler for {service:?}: dropping {} from {from}",
                            msg.name()
                        );
                        if let Some(r) = responder {
                            let _ = r.reply(Message::Error {
                                code: Message::ERR_NO_HANDLER,
                                message: format!("no handler for {service:?}"),
                            });
                        }
                    } else {
                        debug!("no handler for {service:?} yet: buffering {}", msg.name());
                        q.push_back((from, msg, responder));
                    }
                    return;
                }
            }
        };
        handler.on_message(from, msg, responder);
    }

    /// Tells every handler about a peer event.
    pub fn peer_event(&self, event: &PeerEvent) {
        let handlers: Vec<_> = lock(&self.routes).handlers.values().cloned().collect();
        for h in handlers {
            h.on_peer_event(event);
        }
    }

    /// Messages dropped because a service had no handler and its buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Allocates a request id and a slot its response will be delivered to.
    pub fn new_request(&self, to: HostId) -> (u64, mpsc::Receiver<Result<Message, Error>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::sync_channel(1);
        lock(&self.pending).insert(id, (to, tx));
        (id, rx)
    }

    /// Waits for the response to request `id`.
    pub fn wait(
        &self,
        id: u64,
        to: HostId,
        rx: mpsc::Receiver<Result<Message, Error>>,
        timeout: Duration,
    ) -> Result<Message, Error> {
        let r = rx.recv_timeout(timeout);
        lock(&self.pending).remove(&id);
        match r {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout { peer: to, timeout }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::PeerDown(to)),
        }
    }

    /// Forgets request `id` (its send failed).
    pub fn cancel(&self, id: u64) {
        lock(&self.pending).remove(&id);
    }

    /// Delivers a response frame from `from`. Unknown or foreign ids are ignored (late answers).
    pub fn complete(&self, from: HostId, id: u64, msg: Message) {
        let mut pending = lock(&self.pending);
        match pending.get(&id) {
            Some((peer, _)) if *peer == from => {
                if let Some((_, tx)) = pending.remove(&id) {
                    let _ = tx.try_send(Ok(msg));
                }
            }
            Some(_) => warn!("{from} answered request #{id} that was sent to another host"),
            None => debug!("late or unknown response #{id} from {from}"),
        }
    }

    /// Fails every request waiting on `peer`.
    pub fn fail_peer(&self, peer: HostId) {
        let mut pending = lock(&self.pending);
        let ids: Vec<u64> = pending
            .iter()
            .filter(|(_, (p, _))| *p == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, tx)) = pending.remove(&id) {
                let _ = tx.try_send(Err(Error::PeerDown(peer)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Record(Mutex<Vec<(HostId, Message)>>);
    impl Handler for Record {
        fn on_message(&self, from: HostId, msg: Message, _r: Option<Responder>) {
            self.0.lock().unwrap().push((from, msg));
        }
    }

    #[test]
    fn messages_before_registration_are_delivered_in_order() {
        let d = Dispatcher::default();
        for n in 0..3 {
            d.dispatch(HostId(1), Message::Ping { nonce: n }, None);
        }
        d.dispatch(HostId(1), Message::ReadReq { pfn: 9 }, None);
        let rec = Arc::new(Record::default());
        d.register(Service::Control, rec.clone());
        d.dispatch(HostId(2), Message::Ping { nonce: 3 }, None);
        let got: Vec<u64> = rec
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| match m {
                Message::Ping { nonce } => *nonce,
                _ => 99,
            })
            .collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
    }

    #[test]
    fn responses_match_requests_and_peer_failure_fails_them() {
        let d = Dispatcher::default();
        let (a, rxa) = d.new_request(HostId(1));
        let (b, rxb) = d.new_request(HostId(2));
        d.complete(HostId(2), a, Message::Pong { nonce: 0 }); // wrong peer: ignored
        d.complete(HostId(1), a, Message::Pong { nonce: 1 });
        assert_eq!(
            d.wait(a, HostId(1), rxa, Duration::from_secs(1)),
            Ok(Message::Pong { nonce: 1 })
        );
        d.fail_peer(HostId(2));
        assert_eq!(
            d.wait(b, HostId(2), rxb, Duration::from_secs(1)),
            Err(Error::PeerDown(HostId(2)))
        );
        let (c, rxc) = d.new_request(HostId(3));
        assert!(matches!(
            d.wait(c, HostId(3), rxc, Duration::from_millis(10)),
            Err(Error::Timeout { .. })
        ));
    }
}
