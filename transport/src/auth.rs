//! Both sides of the connection handshake ([`proto::handshake`]): version and cluster checks,
//! HMAC-SHA256 proofs of the cluster key over fresh nonces in both directions.

use hmac::{Hmac, Mac};
use proto::frame::ReadError;
use proto::handshake::{
    caps, cipher, transcript, Handshake, Hello, RejectReason, LABEL_ACCEPTOR, LABEL_CONNECTOR,
    MAC_LEN, NONCE_LEN,
};
use proto::{HostId, PROTOCOL_VERSION};
use sha2::Sha256;
use std::io::{self, Read, Write};
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Shortest cluster key accepted.
pub const MIN_KEY_LEN: usize = 16;

/// Why a handshake failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The socket failed or closed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid handshake step (includes version mismatch).
    #[error("malformed handshake: {0}")]
    Decode(#[from] proto::Error),
    /// The peer refused us.
    #[error("rejected by peer: {0:?}")]
    Rejected(RejectReason),
    /// The peer's proof of the cluster key is wrong.
    #[error("peer {0} failed to prove the cluster key")]
    AuthFailed(HostId),
    /// The peer belongs to another cluster.
    #[error("cluster id mismatch: ours {ours:#x}, peer {theirs:#x}")]
    Cluster {
        /// Ours.
        ours: u64,
        /// Theirs.
        theirs: u64,
    },
    /// The peer's host id is not acceptable on this connection.
    #[error("unexpected host id {got} (expected {expected})")]
    UnexpectedHost {
        /// Claimed.
        got: HostId,
        /// What we accept.
        expected: String,
    },
    /// The peer sent a step out of order.
    #[error("unexpected handshake step {0}")]
    OutOfOrder(&'static str),
    /// No common cipher.
    #[error("no common cipher (peer offers {0:#x})")]
    NoCipher(u16),
    /// The kernel random source failed.
    #[error("random nonce: {0}")]
    Random(io::Error),
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => Error::Io(e),
            ReadError::Decode(e) => Error::Decode(e),
        }
    }
}

impl Error {
    /// Whether the failure means the peer does not hold the cluster key.
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            Error::AuthFailed(_) | Error::Rejected(RejectReason::AuthFailed)
        )
    }
}

/// What each side brings to a handshake.
#[derive(Clone)]
pub struct Params {
    /// Our host id.
    pub local: HostId,
    /// Cluster id both sides must share.
    pub cluster_id: u64,
    /// The cluster key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Params {{ local: {}, cluster_id: {:#x}, key: <{} bytes> }}",
            self.local,
            self.cluster_id,
            self.key.len()
        )
    }
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The authenticated peer.
    pub peer: HostId,
    /// Capabilities both sides have.
    pub capabilities: u64,
    /// Cipher in use.
    pub cipher: u16,
}

/// Fills a nonce from the kernel's random source.
pub fn nonce() -> Result<[u8; NONCE_LEN], Error> {
    let mut n = [0u8; NONCE_LEN];
    let mut got = 0;
    while got < NONCE_LEN {
        // SAFETY: the pointer and length describe the unfilled tail of `n`, which lives for
        // the whole call; getrandom writes at most that many bytes.
        let r = unsafe {
            libc::getrandom(
                n[got..].as_mut_ptr().cast::<libc::c_void>(),
                NONCE_LEN - got,
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::Random(e));
            }
        } else {
            got += r as usize;
        }
    }
    Ok(n)
}

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

/// The proof for `label` over both hellos.
pub fn prove(key: &[u8], label: &[u8], connector: &Hello, acceptor: &Hello) -> [u8; MAC_LEN] {
    let mut m = hmac(key);
    m.update(&transcript(label, connector, acceptor));
    m.finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify(key: &[u8], label: &[u8], c: &Hello, a: &Hello, mac: &[u8; MAC_LEN]) -> bool {
    let mut m = hmac(key);
    m.update(&transcript(label, c, a));
    m.verify_slice(mac).is_ok()
}

fn hello(p: &Params) -> Result<Hello, Error> {
    Ok(Hello {
        version: PROTOCOL_VERSION,
        cluster_id: p.cluster_id,
        host: p.local,
        capabilities: caps::ALL,
        ciphers: 1 << cipher::NONE,
        nonce: nonce()?,
    })
}

fn send<S: Write>(s: &mut S, h: &Handshake) -> Result<(), Error> {
    let mut b = Vec::new();
    h.encode(&mut b);
    s.write_all(&b)?;
    s.flush()?;
    Ok(())
}

fn reject<S: Write>(s: &mut S, reason: RejectReason, e: Error) -> Error {
    let _ = send(s, &Handshake::Reject { reason });
    e
}

fn pick_cipher(theirs: u16) -> Result<u16, Error> {
    if theirs & (1 << cipher::NONE) != 0 {
        Ok(cipher::NONE)
    } else {
        Err(Error::NoCipher(theirs))
    }
}

/// Runs the connector side against the host expected to be `peer`.
pub fn connect<S: Read + Write>(s: &mut S, p: &Params, peer: HostId) -> Result<Session, Error> {
    let ours = hello(p)?;
    send(s, &Handshake::Hello(ours.clone()))?;
    let (theirs, mac) = match Handshake::read(s)? {
        Handshake::Challenge { hello, mac } => (hello, mac),
        Handshake::Reject { reason } => return Err(Error::Rejected(reason)),
        _ => return Err(Error::OutOfOrder("expected Challenge")),
    };
    if theirs.host != peer {
        let e = Error::UnexpectedHost {
            got: theirs.host,
            expected: peer.to_string(),
        };
        return Err(reject(s, RejectReason::UnknownHost, e));
    }
    if theirs.cluster_id != p.cluster_id {
        let e = Error::Cluster {
            ours: p.cluster_id,
            theirs: theirs.cluster_id,
        };
        return Err(reject(s, RejectReason::Cluster, e));
    }
    if !verify(&p.key, LABEL_ACCEPTOR, &ours, &theirs, &mac) {
        return Err(reject(s, RejectReason::AuthFailed, Error::AuthFailed(peer)));
    }
    let mac = prove(&p.key, LABEL_CONNECTOR, &ours, &theirs);
    send(s, &Handshake::Response { mac })?;
    match Handshake::read(s)? {
        Handshake::Welcome {
            capabilities,
            cipher,
        } => Ok(Session {
            peer,
            capabilities: capabilities & ours.capabilities,
            cipher,
        }),
        Handshake::Reject { reason } => Err(Error::Rejected(reason)),
        _ => Err(Error::OutOfOrder("expected Welcome")),
    }
}

/// Runs the acceptor side; `allowed` says which claimed host ids may connect here.
pub fn accept<S: Read + Write>(
    s: &mut S,
    p: &Params,
    allowed: impl Fn(HostId) -> bool,
) -> Result<Session, Error> {
    let theirs = match Handshake::read(s) {
        Ok(Handshake::Hello(h)) => h,
        Ok(_) => return Err(Error::OutOfOrder("expected Hello")),
        Err(ReadError::Decode(e @ proto::Error::VersionMismatch { .. })) => {
            return Err(reject(s, RejectReason::Version, e.into()))
        }
        Err(e) => return Err(e.into()),
    };
    if theirs.cluster_id != p.cluster_id {
        let e = Error::Cluster {
            ours: p.cluster_id,
            theirs: theirs.cluster_id,
        };
        return Err(reject(s, RejectReason::Cluster, e));
    }
    if theirs.host == p.local || !allowed(theirs.host) {
        let e = Error::UnexpectedHost {
            got: theirs.host,
            expected: "a configured peer with a lower id".into(),
        };
        return Err(reject(s, RejectReason::UnknownHost, e));
    }
    let cipher = match pick_cipher(theirs.ciphers) {
        Ok(c) => c,
        Err(e) => return Err(reject(s, RejectReason::Cipher, e)),
    };
    let ours = hello(p)?;
    let mac = prove(&p.key, LABEL_ACCEPTOR, &theirs, &ours);
    send(
        s,
        &Handshake::Challenge {
            hello: ours.clone(),
            mac,
        },
    )?;
    let mac = match Handshake::read(s)? {
        Handshake::Response { mac } => mac,
        Handshake::Reject { reason } => return Err(Error::Rejected(reason)),
        _ => return Err(Error::OutOfOrder("expected Response")),
    };
    if !verify(&p.key, LABEL_CONNECTOR, &theirs, &ours, &mac) {
        let e = Error::AuthFailed(theirs.host);
        return Err(reject(s, RejectReason::AuthFailed, e));
    }
    let capabilities = theirs.capabilities & ours.capabilities;
    send(
        s,
        &Handshake::Welcome {
            capabilities,
            cipher,
        },
    )?;
    Ok(Session {
        peer: theirs.host,
        capabilities,
        cipher,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn params(id: u16, key: &[u8], cluster: u64) -> Params {
        Params {
            local: HostId(id),
            cluster_id: cluster,
            key: key.to_vec(),
        }
    }

    fn run(
        c: Params,
        a: Params,
        expect: HostId,
    ) -> (Result<Session, Error>, Result<Session, Error>) {
        let (mut x, mut y) = UnixStream::pair().unwrap();
        let t = thread::spawn(move || {
            let r = accept(&mut y, &a, |h| h.0 < a.local.0);
            drop(y);
            r
        });
        let rc = connect(&mut x, &c, expect);
        drop(x);
        (rc, t.join().unwrap())
    }

    const KEY: &[u8] = b"0123456789abcdef-cluster-key";

    #[test]
    fn same_key_authenticates_both_ways() {
        let (c, a) = run(params(1, KEY, 7), params(2, KEY, 7), HostId(2));
        assert_eq!(c.unwrap().peer, HostId(2));
        let a = a.unwrap();
        assert_eq!(a.peer, HostId(1));
        assert_eq!(a.capabilities, caps::ALL);
        assert_eq!(a.cipher, cipher::NONE);
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (c, a) = run(
            params(1, b"another-key-entirely!", 7),
            params(2, KEY, 7),
            HostId(2),
        );
        // The connector sees the acceptor's proof fail first and refuses.
        assert!(c.unwrap_err().is_auth_failure());
        assert!(a.unwrap_err().is_auth_failure());
    }

    #[test]
    fn cluster_and_host_mismatches_are_refused() {
        let (c, a) = run(params(1, KEY, 7), params(2, KEY, 8), HostId(2));
        assert!(matches!(a, Err(Error::Cluster { .. })));
        assert!(matches!(c, Err(Error::Rejected(RejectReason::Cluster))));
        // Host 3 may not dial host 2 (only lower ids dial higher ones).
        let (c, a) = run(params(3, KEY, 7), params(2, KEY, 7), HostId(2));
        assert!(matches!(a, Err(Error::UnexpectedHost { .. })));
        assert!(matches!(c, Err(Error::Rejected(RejectReason::UnknownHost))));
        // The connector expected host 5 but reached host 2.
        let (c, _) = run(params(1, KEY, 7), params(2, KEY, 7), HostId(5));
        assert!(matches!(c, Err(Error::UnexpectedHost { .. })));
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
