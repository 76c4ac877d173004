//! TcpTransport on 127.0.0.1: flows, request/response matching, authentication, peer death.

use proto::{HostId, Message, Service};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use transport::{auth, Error, Handler, PeerEvent, Responder, TcpConfig, TcpTransport, Transport};

const KEY: &[u8] = b"loopback-test-cluster-key";

#[derive(Default)]
struct Recorder {
    msgs: Mutex<Vec<(HostId, Message)>>,
    events: Mutex<Vec<(Instant, PeerEvent)>>,
}

impl Handler for Recorder {
    fn on_message(&self, from: HostId, msg: Message, responder: Option<Responder>) {
        if let (Some(r), Message::Ping { nonce }) = (responder, &msg) {
            r.reply(Message::Pong { nonce: *nonce }).unwrap();
        }
        self.msgs.lock().unwrap().push((from, msg));
    }
    fn on_peer_event(&self, e: &PeerEvent) {
        self.events
            .lock()
            .unwrap()
            .push((Instant::now(), e.clone()));
    }
}

impl Recorder {
    fn wait_msgs(&self, n: usize) -> Vec<(HostId, Message)> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.msgs.lock().unwrap().clone();
            if m.len() >= n || Instant::now() > end {
                return m;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    fn wait_event(&self, f: impl Fn(&PeerEvent) -> bool, within: Duration) -> Option<Instant> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some((t, _)) = self.events.lock().unwrap().iter().find(|(_, e)| f(e)) {
                return Some(*t);
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

fn config(i: usize, addrs: &[SocketAddr], key: &[u8]) -> TcpConfig {
    let peers = addrs
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(j, a)| (HostId(j as u16), *a))
        .collect();
    let mut c = TcpConfig::new(HostId(i as u16), peers, 0x55, key);
    c.heartbeat = Duration::from_millis(100);
    c.dead_after = Duration::from_millis(1000);
    c
}

fn cluster(n: usize) -> (Vec<Arc<TcpTransport>>, Vec<Arc<Recorder>>) {
    let (ls, addrs) = listeners(n);
    let mut ts = Vec::new();
    let mut rs = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        let t = TcpTransport::start(config(i, &addrs, KEY), l).unwrap();
        let r = Arc::new(Recorder::default());
        t.register(Service::Control, r.clone());
        t.register(Service::Dsm, r.clone());
        ts.push(t);
        rs.push(r);
    }
    for t in &ts {
        t.wait_connected(Duration::from_secs(10)).unwrap();
    }
    (ts, rs)
}

#[test]
fn messages_flow_every_way_in_order() {
    let (ts, rs) = cluster(3);
    for (i, t) in ts.iter().enumerate() {
        for j in 0..3 {
            if i != j {
                for k in 0..100 {
                    let pfn = (i * 1000 + k) as u64;
                    t.send(HostId(j as u16), Message::ReadReq { pfn }).unwrap();
                }
            }
        }
    }
    for (j, r) in rs.iter().enumerate() {
        let got = r.wait_msgs(200);
        assert_eq!(got.len(), 200, "host {j}");
        for i in 0..3u16 {
            let from_i: Vec<u64> = got
                .iter()
                .filter(|(f, _)| *f == HostId(i))
                .map(|(_, m)| match m {
                    Message::ReadReq { pfn } => *pfn,
                    _ => panic!("unexpected {m:?}"),
                })
                .collect();
            if usize::from(i) != j {
                let want: Vec<u64> = (0..100).map(|k| u64::from(i) * 1000 + k).collect();
                assert_eq!(from_i, want, "order from host {i} to host {j}");
            }
        }
    }
    assert_eq!(
        ts[0].send(HostId(0), Message::Ping { nonce: 0 }),
        Err(Error::SelfSend(HostId(0)))
    );
    assert_eq!(
        ts[0].send(HostId(9), Message::Ping { nonce: 0 }),
        Err(Error::UnknownPeer(HostId(9)))
    );
    let s = ts[0].stats();
    assert!(s.writes <= s.frames_sent, "{s:?}");
}

#[test]
fn concurrent_requests_get_their_own_responses() {
    let (ts, _rs) = cluster(3);
    let mut handles = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        for th in 0..4u64 {
            let t = t.clone();
            handles.push(thread::spawn(move || {
                for k in 0..200u64 {
                    let to = HostId(((i as u64 + 1 + (k % 2)) % 3) as u16);
                    let nonce = (i as u64) << 32 | th << 16 | k;
                    let r = t
                        .request(to, Message::Ping { nonce }, Duration::from_secs(10))
                        .unwrap();
                    assert_eq!(r, Message::Pong { nonce });
                }
            }));
        }
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn unhandled_service_requests_are_buffered_then_served() {
    let (ts, _rs) = cluster(2);
    // Nobody registered for Io on host 1 yet: the request waits in the buffer.
    let t0 = ts[0].clone();
    let h = thread::spawn(move || {
        t0.request(
            HostId(1),
            Message::IoReply { data: 1 },
            Duration::from_secs(10),
        )
    });
    thread::sleep(Duration::from_millis(200));
    struct Io;
    impl Handler for Io {
        fn on_message(&self, _: HostId, _m: Message, r: Option<Responder>) {
            drop(r); // answered with an Error by the drop
        }
    }
    ts[1].register(Service::Io, Arc::new(Io));
    match h.join().unwrap() {
        Ok(Message::Error { code, .. }) => assert_eq!(code, Message::ERR_NO_REPLY),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_key_is_rejected_logged_and_gets_nothing() {
    let _ = env_logger::builder().is_test(true).try_init();
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let good = TcpTransport::start(config(0, &addrs, KEY), it.next().unwrap()).unwrap();
    let bad = TcpTransport::start(
        config(1, &addrs, b"not-the-cluster-key!"),
        it.next().unwrap(),
    )
    .unwrap();
    let rg = Arc::new(Recorder::default());
    let rb = Arc::new(Recorder::default());
    good.register(Service::Control, rg.clone());
    bad.register(Service::Control, rb.clone());
    let e = good
        .wait_connected(Duration::from_millis(1500))
        .unwrap_err();
    match e {
        Error::NotConnected(m) => {
            assert_eq!(m.len(), 1);
            assert!(m[0].1.contains("prove the cluster key"), "{}", m[0].1);
        }
        e => panic!("{e}"),
    }
    assert!(good.stats().auth_failures >= 1);
    assert!(bad.stats().auth_failures >= 1);
    assert_eq!(good.stats().handshakes, 0);
    assert_eq!(
        good.send(HostId(1), Message::Ping { nonce: 1 }),
        Err(Error::PeerDown(HostId(1)))
    );
    assert!(bad.send(HostId(0), Message::Ping { nonce: 1 }).is_err());
    thread::sleep(Duration::from_millis(200));
    assert!(rg.msgs.lock().unwrap().is_empty());
    assert!(rb.msgs.lock().unwrap().is_empty());
    assert!(rg.events.lock().unwrap().is_empty());
}

#[test]
fn garbage_and_impostors_do_not_disturb_the_cluster() {
    let (ts, rs) = cluster(2);
    let addr = ts[1].local_addr();
    // Not a handshake at all.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_end(&mut buf); // closed by the transport
                                     // A well-formed client with the wrong key, claiming to be host 0.
    let mut s = TcpStream::connect(addr).unwrap();
    let p = auth::Params {
        local: HostId(0),
        cluster_id: 0x55,
        key: b"impostor-key-impostor-key".to_vec(),
    };
    let e = auth::connect(&mut s, &p, HostId(1)).unwrap_err();
    assert!(e.is_auth_failure(), "{e}");
    // The real connection is untouched.
    ts[0].send(HostId(1), Message::Ping { nonce: 7 }).unwrap();
    let got = rs[1].wait_msgs(1);
    assert_eq!(got, vec![(HostId(0), Message::Ping { nonce: 7 })]);
    assert!(ts[1].is_up(HostId(0)));
    assert!(ts[1].stats().handshake_failures + ts[1].stats().auth_failures >= 1);
}

#[test]
fn dead_peer_is_reported_and_fails_requests() {
    let (ts, rs) = cluster(3);
    let killed = Instant::now();
    ts[2].shutdown();
    for i in 0..2 {
        let t = rs[i]
            .wait_event(
                |e| matches!(e, PeerEvent::Down { peer, .. } if *peer == HostId(2)),
                Duration::from_secs(5),
            )
            .expect("down reported");
        assert!(t - killed < Duration::from_secs(3));
        assert!(!ts[i].is_up(HostId(2)));
        assert_eq!(
            ts[i].request(
                HostId(2),
                Message::Ping { nonce: 0 },
                Duration::from_secs(1)
            ),
            Err(Error::PeerDown(HostId(2)))
        );
    }
    // The survivors still talk.
    let r = ts[0].request(
        HostId(1),
        Message::Ping { nonce: 3 },
        Duration::from_secs(5),
    );
    assert_eq!(r, Ok(Message::Pong { nonce: 3 }));
}

#[test]
fn silent_peer_is_declared_dead_within_dead_after() {
    // Host 1 is a fake that completes the handshake and then never sends a byte.
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let l0 = it.next().unwrap();
    let l1 = it.next().unwrap();
    let fake = thread::spawn(move || {
        let (mut s, _) = l1.accept().unwrap();
        let p = auth::Params {
            local: HostId(1),
            cluster_id: 0x55,
            key: KEY.to_vec(),
        };
        auth::accept(&mut s, &p, |h| h == HostId(0)).unwrap();
        thread::sleep(Duration::from_secs(3));
        drop(s);
    });
    let t0 = TcpTransport::start(config(0, &addrs, KEY), l0).unwrap();
    let r0 = Arc::new(Recorder::default());
    t0.register(Service::Control, r0.clone());
    t0.wait_connected(Duration::from_secs(5)).unwrap();
    let up = Instant::now();
    let down = r0
        .wait_event(
            |e| matches!(e, PeerEvent::Down { reason, .. } if reason.contains("nothing received")),
            Duration::from_secs(3),
        )
        .expect("silence detected");
    let after = down - up;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2000),
        "{after:?}"
    );
    fake.join().unwrap();
}

#[test]
fn restarted_peer_reconnects() {
    let (ls, addrs) = listeners(2);
    let mut it = ls.into_iter();
    let t0 = TcpTransport::start(config(0, &addrs, KEY), it.next().unwrap()).unwrap();
    let r0 = Arc::new(Recorder::default());
    t0.register(Service::Control, r0.clone());
    let t1 = TcpTransport::start(config(1, &addrs, KEY), it.next().unwrap()).unwrap();
    t0.wait_connected(Duration::from_secs(5)).unwrap();
    t1.shutdown();
    drop(t1);
    r0.wait_event(
        |e| matches!(e, PeerEvent::Down { .. }),
        Duration::from_secs(3),
    )
    .expect("down");
    let t1 = TcpTransport::bind(config(1, &addrs, KEY), addrs[1]).unwrap();
    let r1 = Arc::new(Recorder::default());
    t1.register(Service::Control, r1.clone());
    t0.wait_connected(Duration::from_secs(5)).unwrap();
    t0.send(HostId(1), Message::Ping { nonce: 11 }).unwrap();
    assert_eq!(
        r1.wait_msgs(1),
        vec![(HostId(0), Message::Ping { nonce: 11 })]
    );
    let ups = r0
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| matches!(e, PeerEvent::Up(_)))
        .count();
    assert_eq!(ups, 2, "up, down, up again");
}
