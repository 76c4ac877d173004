//! One authenticated connection: its reader loop, its writer thread, and its death.

use super::{bump, lock, Conn, Shared};
use crate::auth::Session;
use crate::dispatch::{Responder, ResponseSink};
use crate::PeerEvent;
use log::{error, info, warn};
use proto::frame::{read_frame, Frame, FrameKind};
use proto::HostId;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Weak};
use std::thread;
use std::time::Duration;

impl Shared {
    /// Installs an authenticated connection and runs its reader until it dies.
    pub(super) fn run_connection(&self, stream: TcpStream, session: Session) {
        let peer = session.peer;
        bump(&self.counters.handshakes, 1);
        let setup = (|| {
            stream.set_read_timeout(Some(self.cfg.dead_after))?;
            stream.set_write_timeout(Some(self.cfg.dead_after))?;
            Ok::<_, io::Error>((stream.try_clone()?, stream.try_clone()?))
        })();
        let (wstream, kept) = match setup {
            Ok(s) => s,
            Err(e) => {
                warn!("{peer}: socket setup failed: {e}");
                return;
            }
        };
        let gen = self.next_gen.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let conn = Arc::new(Conn {
            gen,
            tx,
            stream: kept,
        });
        let me = self.me.clone();
        let hb = self.cfg.heartbeat;
        let spawned = thread::Builder::new()
            .name(format!("tcp-write-{}", peer.0))
            .spawn(move || write_loop(me, peer, gen, wstream, rx, hb));
        if let Err(e) = spawned {
            warn!("{peer}: cannot start writer: {e}");
            return;
        }
        let old = {
            let mut slots = lock(&self.slots);
            if self.stopping() {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            let Some(slot) = slots.get_mut(&peer) else {
                return;
            };
            slot.last_error.clear();
            slot.conn.replace(conn.clone())
        };
        if let Some(old) = old {
            let _ = old.stream.shutdown(Shutdown::Both);
            self.dispatcher.fail_peer(peer);
            self.dispatcher.peer_event(&PeerEvent::Down {
                peer,
                reason: "replaced by a new connection".into(),
            });
        }
        info!(
            "{peer} up (caps {:#x}, cipher {})",
            session.capabilities, session.cipher
        );
        self.dispatcher.peer_event(&PeerEvent::Up(peer));
        self.changed.notify_all();
        let reason = self.read_loop(peer, &stream);
        drop(conn);
        self.conn_lost(peer, gen, &reason);
    }

    fn read_loop(&self, peer: HostId, stream: &TcpStream) -> String {
        let mut r = Counting {
            inner: BufReader::with_capacity(256 << 10, stream),
            n: 0,
        };
        loop {
            let frame = match read_frame(&mut r) {
                Ok(f) => f,
                Err(proto::frame::ReadError::Io(e)) => {
                    return match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                            format!("nothing received for {:?}", self.cfg.dead_after)
                        }
                        io::ErrorKind::UnexpectedEof => "connection closed by peer".into(),
                        _ => format!("read error: {e}"),
                    };
                }
                Err(e) => {
                    error!("{peer} sent a malformed frame, closing: {e}");
                    return format!("protocol violation: {e}");
                }
            };
            bump(&self.counters.frames_received, 1);
            bump(&self.counters.bytes_received, std::mem::take(&mut r.n));
            let Some(msg) = frame.msg else { continue };
            match frame.kind {
                FrameKind::OneWay => self.dispatcher.dispatch(peer, msg, None),
                FrameKind::Request => {
                    let sink: Weak<dyn ResponseSink> = self.me.clone();
                    let resp = Responder::new(sink, peer, frame.id);
                    self.dispatcher.dispatch(peer, msg, Some(resp));
                }
                FrameKind::Response => self.dispatcher.complete(peer, frame.id, msg),
                FrameKind::Heartbeat => {}
            }
        }
    }

    fn conn_lost(&self, peer: HostId, gen: u64, reason: &str) {
        let conn = {
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(&peer) else {
                return;
            };
            if slot.conn.as_ref().map(|c| c.gen) != Some(gen) {
                return; // already replaced or reported
            }
            slot.last_error = reason.to_string();
            slot.conn.take()
        };
        if let Some(c) = conn {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        if self.stopping() {
            return;
        }
        bump(&self.counters.peer_downs, 1);
        warn!("{peer} down: {reason}");
        self.dispatcher.fail_peer(peer);
        self.dispatcher.peer_event(&PeerEvent::Down {
            peer,
            reason: reason.to_string(),
        });
    }
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: io::Read> io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn write_loop(
    sh: Weak<Shared>,
    peer: HostId,
    gen: u64,
    mut stream: TcpStream,
    rx: mpsc::Receiver<Frame>,
    heartbeat: Duration,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    let reason = loop {
        buf.clear();
        let mut frames = 0u64;
        match rx.recv_timeout(heartbeat) {
            Ok(f) => {
                f.encode(&mut buf);
                frames += 1;
                while buf.len() < (256 << 10) {
                    match rx.try_recv() {
                        Ok(f) => {
                            f.encode(&mut buf);
                            frames += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Frame::heartbeat().encode(&mut buf);
                frames += 1;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if let Err(e) = stream.write_all(&buf) {
            break format!("write error: {e}");
        }
        let Some(s) = sh.upgrade() else { return };
        bump(&s.counters.frames_sent, frames);
        bump(&s.counters.bytes_sent, buf.len() as u64);
        bump(&s.counters.writes, 1);
    };
    if let Some(s) = sh.upgrade() {
        s.conn_lost(peer, gen, &reason);
    }
}
