//! Stable-Rust "smoke fuzz": runs each fuzz target body (`iom_protocol::fuzzing`) over 20,000
//! deterministic inputs — random bytes and mutations of valid encodings. The real fuzzer
//! (`cargo +nightly fuzz run <target>` in `fuzz/`) runs the same bodies with coverage guidance.
#![allow(clippy::unwrap_used)]

use iom_protocol::cert::{CertBody, Certificate};
use iom_protocol::frame::encode_frame;
use iom_protocol::fuzzing::{fuzz_certificate, fuzz_frame, fuzz_invite, fuzz_wire};
use iom_protocol::invite::{Invite, pair_proof};
use iom_protocol::keys::{DeviceKey, PersonKey};
use iom_protocol::pair::{JoinRejection, JoinRequest, JoinResponse};

const INPUTS_PER_TARGET: usize = 20_000;

/// xorshift64*: tiny, seeded, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// One to four random edits: bit flip, byte set to an interesting value, insert, delete,
/// truncate, duplicate a slice.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    const INTERESTING: [u8; 8] = [0x00, 0x01, 0x17, 0x18, 0x7f, 0x80, 0xfe, 0xff];
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let (i, bit) = (at.min(out.len() - 1), rng.below(8));
                out[i] ^= 1 << bit;
            }
            1 if !out.is_empty() => {
                let (i, value) = (at.min(out.len() - 1), INTERESTING[rng.below(8)]);
                out[i] = value;
            }
            2 => {
                let byte = rng.next() as u8;
                out.insert(at, byte);
            }
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => out.truncate(at),
            _ if !out.is_empty() => {
                let start = rng.below(out.len());
                let len = rng.below(out.len() - start).min(16);
                let piece = out[start..start + len].to_vec();
                out.splice(at..at, piece);
            }
            _ => {}
        }
    }
    out
}

/// Feeds `target` random inputs and mutations of `seeds`.
fn run(seed: u64, seeds: &[Vec<u8>], target: fn(&[u8])) {
    let mut rng = Rng(seed);
    for seed_input in seeds {
        target(seed_input);
    }
    for i in 0..INPUTS_PER_TARGET {
        let input = if i % 4 == 0 || seeds.is_empty() {
            let len = rng.below(300);
            rng.bytes(len)
        } else {
            let pick = rng.below(seeds.len());
            mutate(&mut rng, &seeds[pick])
        };
        target(&input);
    }
}

fn person() -> PersonKey {
    PersonKey::from_seed([1; 32])
}

fn certificates() -> Vec<Certificate> {
    let person = person();
    let laptop = DeviceKey::from_seed([2; 32]);
    let phone = DeviceKey::from_seed([3; 32]);
    vec![
        Certificate::issue_by_person(
            CertBody::Device {
                kind: None,
                person: person.id(),
                device: laptop.id(),
                name: "laptop".into(),
                admin: true,
                issued_at: 1_700_000_000,
            },
            &person,
        )
        .unwrap(),
        Certificate::issue_by_device(
            CertBody::AgentRole {
                person: person.id(),
                device: phone.id(),
                epoch: 3,
                issued_at: 9,
            },
            &laptop,
        )
        .unwrap(),
        Certificate::issue_by_person(
            CertBody::Revocation {
                person: person.id(),
                device: phone.id(),
                reason: "lost on a train".into(),
                issued_at: 10,
            },
            &person,
        )
        .unwrap(),
    ]
}

fn certificate_seeds() -> Vec<Vec<u8>> {
    certificates().iter().map(Certificate::to_bytes).collect()
}

fn invite_seeds() -> Vec<Vec<u8>> {
    let invite = Invite {
        person: person().id(),
        inviter: DeviceKey::from_seed([2; 32]).id(),
        addrs: vec![
            "/ip4/192.168.1.20/tcp/4001".into(),
            "/dns4/relay.example.net/udp/4001/quic-v1/p2p-circuit".into(),
        ],
        secret: [9; 32],
        expires_at: 1_700_000_900,
        admin: true,
    };
    let code = invite.encode().unwrap();
    vec![code.clone().into_bytes(), code.to_uppercase().into_bytes()]
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let inviter = DeviceKey::from_seed([2; 32]).id();
    let joiner = DeviceKey::from_seed([3; 32]).id();
    let request = JoinRequest {
        invite_id: iom_protocol::invite::invite_id(&[9; 32]),
        joiner,
        name: "phone".into(),
        proof: pair_proof(&[9; 32], &inviter, &joiner),
    };
    let certs = certificates();
    let accepted = JoinResponse::Accepted {
        device_cert: certs[0].clone(),
        certs,
    };
    let rejected = JoinResponse::Rejected(JoinRejection::AlreadyUsed);
    // fuzz_frame reads a max-length byte and a chunk-size byte before the stream.
    [request.encode().unwrap(), accepted.encode().unwrap()]
        .into_iter()
        .chain([rejected.encode().unwrap()])
        .map(|payload| {
            let mut input = vec![0xff, 7];
            input.extend(encode_frame(&payload, 0xff * 8).unwrap());
            input.extend(encode_frame(b"", 16).unwrap());
            input
        })
        .collect()
}

fn wire_seeds() -> Vec<Vec<u8>> {
    use iom_protocol::frame::encode_message;
    use iom_protocol::id::ContentId;
    use iom_protocol::wire::{
        AgentRequest, AgentResponse, BlobRequest, BlobResponse, DocSnapshot, PeerAddrs, SyncMsg,
    };
    let sync = [
        SyncMsg::Hello {
            version: 1,
            person: person().id(),
            chain: certificates(),
            blobs: Some(iom_protocol::blobset::BlobSetDigest::EMPTY),
        },
        SyncMsg::Refused {
            reason: "not trusted".into(),
        },
        SyncMsg::Addrs {
            peers: vec![PeerAddrs {
                peer: vec![0, 36, 8, 1],
                addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            }],
        },
        SyncMsg::Root { root: [7; 32] },
        SyncMsg::Entries {
            buckets: vec![1, 2],
            records: vec![3; 96],
        },
        SyncMsg::Doc {
            doc: [4; 16],
            msg: vec![0x42, 0, 1, 2],
        },
        SyncMsg::Snapshots {
            docs: vec![DocSnapshot {
                doc: [5; 16],
                bytes: vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
            }],
        },
        SyncMsg::Blobs {
            have: vec![(ContentId::from_bytes([6; 32]), 1 << 20)],
        },
    ];
    let blob = [
        BlobResponse::Manifest {
            len: 300_000,
            chunk_size: 262_144,
            chunk_hashes: vec![8; 64],
        },
        BlobResponse::Chunk {
            index: 1,
            bytes: vec![9; 40],
        },
        BlobResponse::NotFound,
    ];
    let mut seeds: Vec<Vec<u8>> = sync.iter().map(|m| m.encode().unwrap()).collect();
    seeds.extend(blob.iter().map(|m| m.encode().unwrap()));
    seeds.push(
        encode_message(&BlobRequest::Get {
            id: ContentId::from_bytes([6; 32]),
            from_chunk: 3,
        })
        .unwrap(),
    );
    seeds.push(
        encode_message(&AgentRequest::Notify {
            doc: [4; 16],
            request_id: "r1".into(),
        })
        .unwrap(),
    );
    seeds.push(encode_message(&AgentResponse::Accepted { queued: 2 }).unwrap());
    seeds
}

#[test]
fn smoke_fuzz_wire() {
    run(0x5eed_0004, &wire_seeds(), fuzz_wire);
}

#[test]
fn smoke_fuzz_certificate() {
    run(0x5eed_0001, &certificate_seeds(), fuzz_certificate);
}

#[test]
fn smoke_fuzz_invite() {
    run(0x5eed_0002, &invite_seeds(), fuzz_invite);
}

#[test]
fn smoke_fuzz_frame() {
    run(0x5eed_0003, &frame_seeds(), fuzz_frame);
}

/// A fuzz target's name, its seeds and its decoder.
type Corpus = (&'static str, Vec<Vec<u8>>, fn(&[u8]));

/// The cargo-fuzz seed corpus in `fuzz/seeds/<target>/` is there, one file per seed this test
/// builds, and every file in it goes through its decoder. With `IOM_WRITE_FUZZ_SEEDS=1` the
/// seeds are written first (to refresh the corpus after a format change):
/// `IOM_WRITE_FUZZ_SEEDS=1 cargo test -p iom-protocol --test fuzz_smoke fuzz_seed_corpus`.
#[test]
fn fuzz_seed_corpus_is_in_the_repo_and_decodes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let write = std::env::var("IOM_WRITE_FUZZ_SEEDS").is_ok_and(|v| v == "1");
    let targets: [Corpus; 4] = [
        ("certificate", certificate_seeds(), fuzz_certificate),
        ("invite", invite_seeds(), fuzz_invite),
        ("frame", frame_seeds(), fuzz_frame),
        ("wire", wire_seeds(), fuzz_wire),
    ];
    for (target, seeds, decode) in targets {
        let dir = root.join(target);
        if write {
            std::fs::create_dir_all(&dir).expect("create the seed dir");
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), seed).expect("write a seed");
            }
        }
        for i in 0..seeds.len() {
            let path = dir.join(format!("seed-{i}"));
            assert!(
                path.is_file(),
                "{} is missing: refresh the corpus with IOM_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
        let files = std::fs::read_dir(&dir).expect("read the seed dir");
        for entry in files {
            let bytes = std::fs::read(entry.expect("a dir entry").path()).expect("read a seed");
            decode(&bytes);
        }
    }
}
