//! A raw libp2p peer with its own keys: it dials a node and speaks `/iom/pair/1`,
//! `/iom/sync/1` and `/iom/blob/1` by hand, so tests can send what a real node never would
//! (a wrong pairing proof, a `Hello` for another person) and assert the node's exact answer.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use iom_protocol::cert::{CertBody, Certificate};
use iom_protocol::id::ContentId;
use iom_protocol::keys::{DeviceKey, PersonKey};
use iom_protocol::pair::{JoinRequest, JoinResponse, MAX_PAIR_MESSAGE_LEN};
use iom_protocol::wire::{BlobRequest, BlobResponse, MAX_BLOB_FRAME, MAX_SYNC_FRAME, SyncMsg};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};

/// A foreign peer: its own person key and device key, a swarm on a private runtime.
pub struct RawPeer {
    rt: tokio::runtime::Runtime,
    control: libp2p_stream::Control,
    /// The device key (its PeerId is this peer's id).
    pub device: DeviceKey,
    /// The person key this peer claims to belong to.
    pub person: PersonKey,
    /// The libp2p id.
    pub peer_id: PeerId,
    _swarm_task: tokio::task::JoinHandle<()>,
}

fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut seed)?;
    Ok(seed)
}

impl RawPeer {
    /// A peer connected to `target`, which listens on `addrs` (multiaddr strings).
    pub fn new(target: PeerId, addrs: &[String]) -> Result<RawPeer> {
        let device = DeviceKey::from_seed(random_seed()?);
        let person = PersonKey::from_seed(random_seed()?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let keypair = device.to_libp2p_keypair();
        let (control, task, peer_id) = rt.block_on(async move {
            let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
                .with_tokio()
                .with_tcp(
                    tcp::Config::default().nodelay(true),
                    noise::Config::new,
                    yamux::Config::default,
                )
                .map_err(|e| anyhow!("tcp: {e}"))?
                .with_behaviour(|_| libp2p_stream::Behaviour::new())
                .map_err(|e| anyhow!("behaviour: {e}"))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build();
            let addrs = addrs
                .iter()
                .map(|a| {
                    a.parse::<Multiaddr>()
                        .with_context(|| format!("bad address {a}"))
                })
                .collect::<Result<Vec<_>>>()?;
            swarm
                .dial(DialOpts::peer_id(target).addresses(addrs).build())
                .map_err(|e| anyhow!("dialing {target}: {e}"))?;
            let connected = async {
                loop {
                    match swarm.select_next_some().await {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
                            return Ok(());
                        }
                        SwarmEvent::OutgoingConnectionError { error, .. } => {
                            return Err(anyhow!("cannot connect to {target}: {error}"));
                        }
                        _ => {}
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(20), connected)
                .await
                .map_err(|_| anyhow!("connecting to {target} timed out"))??;
            let control = swarm.behaviour().new_control();
            let peer_id = *swarm.local_peer_id();
            let task = tokio::spawn(async move {
                loop {
                    let _ = swarm.select_next_some().await;
                }
            });
            Ok::<_, anyhow::Error>((control, task, peer_id))
        })?;
        Ok(RawPeer {
            rt,
            control,
            device,
            person,
            peer_id,
            _swarm_task: task,
        })
    }

    /// A device certificate for this peer, signed by its own person key (valid, but for a
    /// different person than the node's).
    pub fn own_certificate(&self) -> Result<Certificate> {
        Certificate::issue_by_person(
            CertBody::Device {
                kind: None,
                person: self.person.id(),
                device: self.device.id(),
                name: "intruder".into(),
                admin: true,
                issued_at: 0,
            },
            &self.person,
        )
        .map_err(|e| anyhow!("{e}"))
    }

    /// Opens `protocol` to `peer`, writes one frame, reads one frame back.
    fn exchange(
        &self,
        peer: PeerId,
        protocol: &'static str,
        request: Vec<u8>,
        max: usize,
    ) -> Result<Vec<u8>> {
        let mut control = self.control.clone();
        self.rt.block_on(async move {
            let mut stream = open(&mut control, peer, protocol).await?;
            let len = u32::try_from(request.len())?;
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&request).await?;
            stream.flush().await?;
            let read = async {
                let mut header = [0u8; 4];
                stream.read_exact(&mut header).await?;
                let n = u32::from_be_bytes(header) as usize;
                if n > max {
                    bail!("answer frame of {n} bytes is over the maximum {max}");
                }
                let mut buf = vec![0u8; n];
                stream.read_exact(&mut buf).await?;
                Ok::<_, anyhow::Error>(buf)
            };
            tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .map_err(|_| anyhow!("no answer on {protocol} within 20 s"))?
        })
    }

    /// Opens `protocol`, writes raw `bytes` (a bad frame) and waits for the node to end the
    /// stream. Returns the bytes the node sent back before closing (normally none).
    pub fn send_garbage(
        &self,
        peer: PeerId,
        protocol: &'static str,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let mut control = self.control.clone();
        self.rt.block_on(async move {
            let mut stream = open(&mut control, peer, protocol).await?;
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            let mut back = Vec::new();
            // The node must end the stream (or the connection) on its own.
            match tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut back)).await
            {
                Ok(_) => Ok(back),
                Err(_) => bail!("the node kept a {protocol} stream open after garbage"),
            }
        })
    }

    /// Sends a join request on `/iom/pair/1` and returns the answer.
    pub fn join(&self, inviter: PeerId, request: &JoinRequest) -> Result<JoinResponse> {
        let bytes = request.encode().map_err(|e| anyhow!("{e}"))?;
        let answer = self.exchange(inviter, "/iom/pair/1", bytes, MAX_PAIR_MESSAGE_LEN)?;
        JoinResponse::decode(&answer).map_err(|e| anyhow!("undecodable join response: {e}"))
    }

    /// Sends a `Hello` on `/iom/sync/1` claiming this peer's own person and returns the answer.
    pub fn sync_hello(&self, node: PeerId) -> Result<SyncMsg> {
        let hello = SyncMsg::Hello {
            version: iom_protocol::wire::SYNC_VERSION,
            person: self.person.id(),
            chain: vec![self.own_certificate()?],
            // As a build from before the blob-set digest would.
            blobs: None,
        };
        let bytes = hello.encode().map_err(|e| anyhow!("{e}"))?;
        let answer = self.exchange(node, "/iom/sync/1", bytes, MAX_SYNC_FRAME)?;
        SyncMsg::decode(&answer).map_err(|e| anyhow!("undecodable sync answer: {e}"))
    }

    /// Pokes the agent on `/iom/agent/1` and returns the answer.
    pub fn agent_notify(&self, node: PeerId) -> Result<iom_protocol::wire::AgentResponse> {
        let req = iom_protocol::wire::AgentRequest::Notify {
            doc: [0u8; 16],
            request_id: "probe".into(),
        };
        let bytes = iom_protocol::frame::encode_message(&req).map_err(|e| anyhow!("{e}"))?;
        let answer = self.exchange(
            node,
            "/iom/agent/1",
            bytes,
            iom_protocol::wire::MAX_AGENT_FRAME,
        )?;
        iom_protocol::frame::decode_message(&answer)
            .map_err(|e| anyhow!("undecodable agent answer: {e}"))
    }

    /// Asks for a blob on `/iom/blob/1` and returns the first answer.
    pub fn blob_get(&self, node: PeerId, id: ContentId) -> Result<BlobResponse> {
        let req = BlobRequest::Get { id, from_chunk: 0 };
        let bytes = iom_protocol::frame::encode_message(&req).map_err(|e| anyhow!("{e}"))?;
        let answer = self.exchange(node, "/iom/blob/1", bytes, MAX_BLOB_FRAME)?;
        BlobResponse::decode(&answer).map_err(|e| anyhow!("undecodable blob answer: {e}"))
    }
}

/// Opens `protocol` to `peer`, within 20 s.
async fn open(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    protocol: &'static str,
) -> Result<libp2p::Stream> {
    tokio::time::timeout(
        Duration::from_secs(20),
        control.open_stream(peer, StreamProtocol::new(protocol)),
    )
    .await
    .map_err(|_| anyhow!("opening {protocol} timed out"))?
    .map_err(|e| anyhow!("opening {protocol}: {e}"))
}
