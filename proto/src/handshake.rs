//! Connection handshake: version check and mutual proof of the cluster key.
//!
//! ```text
//! connector (lower HostId)                         acceptor (higher HostId)
//!   |-- Hello{magic,version,cluster,host,caps,ciphers,Nc} -->|  checks magic, version, cluster, host
//!   |<-- Challenge{Hello{..,Ns}, Ms} -------------------------|  Ms = HMAC(K, "ssi-vmm acceptor" || Hc || Hs)
//!   | verifies Ms                                             |
//!   |-- Response{Mc} ---------------------------------------->|  Mc = HMAC(K, "ssi-vmm connector" || Hc || Hs)
//!   |                                                         |  verifies Mc
//!   |<-- Welcome{caps, cipher} -------------------------------|  negotiated capabilities and cipher
//!   |== frames (see `frame`) ================================|
//! ```
//!
//! `Hc`/`Hs` are the encoded hellos, so both MACs cover both nonces, host ids, versions,
//! capabilities and offered ciphers (no downgrade without the key). Any failure: the side that
//! detects it may send `Reject{reason}`, logs, and closes; nothing else is sent on that
//! connection. The MAC itself is computed by the transport (HMAC-SHA256); this module only defines
//! the bytes. `ciphers` is a bit set of stream ciphers a host can run after `Welcome`; only
//! [`cipher::NONE`] exists today, the field is there so encryption can be added later.

use crate::codec::{Error, Reader, Writer};
use crate::frame::{read_length_prefixed, ReadError};
use crate::HostId;
use std::io::Read;

/// First bytes of every `Hello`.
pub const MAGIC: [u8; 4] = *b"SSIV";
/// Length of the random nonces.
pub const NONCE_LEN: usize = 32;
/// Length of the HMAC-SHA256 proofs.
pub const MAC_LEN: usize = 32;
/// Largest handshake frame accepted.
pub const MAX_HANDSHAKE: usize = 256;
/// MAC label of the acceptor's proof.
pub const LABEL_ACCEPTOR: &[u8] = b"ssi-vmm acceptor";
/// MAC label of the connector's proof.
pub const LABEL_CONNECTOR: &[u8] = b"ssi-vmm connector";

/// Capability bits announced in `Hello` and intersected in `Welcome`.
pub mod caps {
    /// Distributed shared memory messages.
    pub const DSM: u64 = 1 << 0;
    /// Remote IPIs.
    pub const IPI: u64 = 1 << 1;
    /// Forwarded MMIO/PIO.
    pub const IO: u64 = 1 << 2;
    /// Everything this version implements.
    pub const ALL: u64 = DSM | IPI | IO;
}

/// Cipher identifiers (bit positions in `Hello::ciphers`, values in `Welcome::cipher`).
pub mod cipher {
    /// Plaintext frames after an authenticated handshake.
    pub const NONE: u16 = 0;
}

/// A host's introduction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version (must equal [`crate::PROTOCOL_VERSION`]).
    pub version: u16,
    /// Cluster identifier from the configuration (both ends must agree).
    pub cluster_id: u64,
    /// Sender's host id.
    pub host: HostId,
    /// Capability bits ([`caps`]).
    pub capabilities: u64,
    /// Bit set of supported ciphers (bit n = cipher id n).
    pub ciphers: u16,
    /// Fresh random nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// Why a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Protocol versions differ.
    Version = 0,
    /// Cluster ids differ.
    Cluster = 1,
    /// The host id is not expected on this connection.
    UnknownHost = 2,
    /// The key proof did not verify.
    AuthFailed = 3,
    /// No cipher in common.
    Cipher = 4,
}

const REASONS: [RejectReason; 5] = [
    RejectReason::Version,
    RejectReason::Cluster,
    RejectReason::UnknownHost,
    RejectReason::AuthFailed,
    RejectReason::Cipher,
];

/// One handshake step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Connector -> acceptor.
    Hello(Hello),
    /// Acceptor -> connector: the acceptor's hello and its proof.
    Challenge {
        /// Acceptor's hello.
        hello: Hello,
        /// HMAC(K, LABEL_ACCEPTOR || Hc || Hs).
        mac: [u8; MAC_LEN],
    },
    /// Connector -> acceptor: the connector's proof.
    Response {
        /// HMAC(K, LABEL_CONNECTOR || Hc || Hs).
        mac: [u8; MAC_LEN],
    },
    /// Acceptor -> connector: accepted; frames may flow.
    Welcome {
        /// Capabilities both sides have.
        capabilities: u64,
        /// Cipher used from now on.
        cipher: u16,
    },
    /// Either side: refused, the connection closes.
    Reject {
        /// Why.
        reason: RejectReason,
    },
}

impl Hello {
    fn encode(&self, w: &mut Writer<'_>) {
        w.bytes(&MAGIC);
        w.u16(self.version);
        w.u64(self.cluster_id);
        w.u16(self.host.0);
        w.u64(self.capabilities);
        w.u16(self.ciphers);
        w.bytes(&self.nonce);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Hello, Error> {
        let magic = r.array::<4>("magic")?;
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = r.u16("version")?;
        if version != crate::PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                ours: crate::PROTOCOL_VERSION,
                theirs: version,
            });
        }
        Ok(Hello {
            version,
            cluster_id: r.u64("cluster id")?,
            host: HostId(r.u16("host id")?),
            capabilities: r.u64("capabilities")?,
            ciphers: r.u16("ciphers")?,
            nonce: r.array("nonce")?,
        })
    }

    /// The encoded hello, as covered by the MACs.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut Writer::new(&mut v));
        v
    }
}

/// The bytes a proof MACs: `label || connector hello || acceptor hello`.
pub fn transcript(label: &[u8], connector: &Hello, acceptor: &Hello) -> Vec<u8> {
    let mut v = label.to_vec();
    v.extend_from_slice(&connector.to_bytes());
    v.extend_from_slice(&acceptor.to_bytes());
    v
}

impl Handshake {
    /// Appends the length-prefixed encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer::new(out);
        match self {
            Handshake::Hello(h) => {
                w.u8(1);
                h.encode(&mut w);
            }
            Handshake::Challenge { hello, mac } => {
                w.u8(2);
                hello.encode(&mut w);
                w.bytes(mac);
            }
            Handshake::Response { mac } => {
                w.u8(3);
                w.bytes(mac);
            }
            Handshake::Welcome {
                capabilities,
                cipher,
            } => {
                w.u8(4);
                w.u64(*capabilities);
                w.u16(*cipher);
            }
            Handshake::Reject { reason } => {
                w.u8(5);
                w.u8(*reason as u8);
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Decodes a handshake body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<Handshake, Error> {
        let mut r = Reader::new(body);
        let h = match r.u8("handshake tag")? {
            1 => Handshake::Hello(Hello::decode(&mut r)?),
            2 => Handshake::Challenge {
                hello: Hello::decode(&mut r)?,
                mac: r.array("mac")?,
            },
            3 => Handshake::Response {
                mac: r.array("mac")?,
            },
            4 => Handshake::Welcome {
                capabilities: r.u64("capabilities")?,
                cipher: r.u16("cipher")?,
            },
            5 => {
                let v = r.u8("reject reason")?;
                Handshake::Reject {
                    reason: REASONS
                        .get(usize::from(v))
                        .copied()
                        .ok_or(Error::BadValue {
                            field: "reject reason",
                            value: u64::from(v),
                        })?,
                }
            }
            t => {
                return Err(Error::UnknownTag {
                    what: "handshake",
                    tag: t,
                })
            }
        };
        r.finish()?;
        Ok(h)
    }

    /// Reads one handshake step from a stream.
    pub fn read<R: Read>(r: &mut R) -> Result<Handshake, ReadError> {
        let body = read_length_prefixed(r, MAX_HANDSHAKE)?;
        Ok(Handshake::decode(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::rng;
    use std::io::Cursor;

    fn hello() -> Hello {
        Hello {
            version: crate::PROTOCOL_VERSION,
            cluster_id: 0xc1,
            host: HostId(3),
            capabilities: caps::ALL,
            ciphers: 1 << cipher::NONE,
            nonce: [7; NONCE_LEN],
        }
    }

    fn samples() -> Vec<Handshake> {
        vec![
            Handshake::Hello(hello()),
            Handshake::Challenge {
                hello: hello(),
                mac: [9; MAC_LEN],
            },
            Handshake::Response { mac: [1; MAC_LEN] },
            Handshake::Welcome {
                capabilities: caps::DSM,
                cipher: cipher::NONE,
            },
            Handshake::Reject {
                reason: RejectReason::AuthFailed,
            },
        ]
    }

    #[test]
    fn steps_round_trip() {
        for h in samples() {
            let mut b = Vec::new();
            h.encode(&mut b);
            assert_eq!(Handshake::read(&mut Cursor::new(b)).unwrap(), h);
        }
    }

    #[test]
    fn wrong_magic_version_and_garbage_are_errors() {
        let mut b = Vec::new();
        Handshake::Hello(hello()).encode(&mut b);
        let mut bad = b.clone();
        bad[5] = b'X';
        assert!(matches!(
            Handshake::read(&mut Cursor::new(bad)),
            Err(ReadError::Decode(Error::BadMagic(_)))
        ));
        let mut v2 = b.clone();
        v2[9] = 1; // version low byte: a version-1 peer
        assert!(matches!(
            Handshake::read(&mut Cursor::new(v2)),
            Err(ReadError::Decode(Error::VersionMismatch {
                ours: crate::PROTOCOL_VERSION,
                theirs: 1
            }))
        ));
        // An HTTP request is not a handshake, and a huge length is refused.
        assert!(Handshake::read(&mut Cursor::new(b"GET / HTTP/1.1\r\n\r\n".to_vec())).is_err());
        let mut seed = 99u64;
        for _ in 0..50_000 {
            let len = (rng(&mut seed) % 80) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            if len > 0 {
                v[0] = 1 + v[0] % 5;
            }
            let _ = Handshake::decode(&v);
        }
    }

    #[test]
    fn transcript_binds_both_hellos() {
        let a = hello();
        let mut b = hello();
        b.nonce[0] = 8;
        assert_ne!(
            transcript(LABEL_ACCEPTOR, &a, &b),
            transcript(LABEL_ACCEPTOR, &b, &a)
        );
        assert_ne!(
            transcript(LABEL_ACCEPTOR, &a, &b),
            transcript(LABEL_CONNECTOR, &a, &b)
        );
    }
}
