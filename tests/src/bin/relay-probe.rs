//! `relay-probe`: a minimal libp2p client for testing `iom relay run` (relay client, DCUtR,
//! identify, ping, raw streams). Prints one JSON object per line on stdout for every event a
//! test may assert on.
//!
//! ```text
//! relay-probe listen --relay ADDR --seed HEX [--chain FILE] [--no-dcutr] [--run-secs N]
//! relay-probe dial   --relay ADDR --remote PEER --seed HEX [--chain FILE] [--push BYTES]
//!                    [--no-dcutr] [--run-secs N]
//! relay-probe peer-id --seed HEX
//! relay-probe relay  DATA_DIR [iom relay run flags...]   (the relay without the iom CLI)
//! ```
//!
//! `--seed` is the 32-byte device key seed in hex; `--chain` a file with one certificate per
//! line (hex of its bytes), sent with `/iom/relay-auth/1` before reserving or dialing.
//! `--push N` (dial mode) sends N bytes to the remote over `/iom-test/push/1` once connected
//! through the relay; the listener counts them and answers with the count.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use iom_protocol::keys::DeviceKey;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, dcutr, identify, noise, ping, relay, tcp, yamux};
use serde_json::json;

const PUSH: StreamProtocol = StreamProtocol::new("/iom-test/push/1");

#[derive(NetworkBehaviour)]
struct Probe {
    relay_client: relay::client::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    dcutr: Toggle<dcutr::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

#[derive(Debug, Default)]
struct Args {
    mode: String,
    relay: Option<Multiaddr>,
    remote: Option<PeerId>,
    seed: Option<[u8; 32]>,
    chain: Option<PathBuf>,
    push: Option<u64>,
    no_dcutr: bool,
    run_secs: u64,
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        mode: it
            .next()
            .context("missing mode (listen, dial, peer-id, relay)")?,
        run_secs: 120,
        ..Args::default()
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--relay" => a.relay = Some(value()?.parse()?),
            "--remote" => a.remote = Some(value()?.parse()?),
            "--seed" => {
                let mut seed = [0u8; 32];
                hex::decode_to_slice(value()?, &mut seed).context("--seed: 64 hex digits")?;
                a.seed = Some(seed);
            }
            "--chain" => a.chain = Some(value()?.into()),
            "--push" => a.push = Some(value()?.parse()?),
            "--run-secs" => a.run_secs = value()?.parse()?,
            "--no-dcutr" => a.no_dcutr = true,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if mode == "relay" {
        return rt.block_on(relay_mode());
    }
    let args = parse_args()?;
    let seed = args.seed.context("--seed is required")?;
    let device = DeviceKey::from_seed(seed);
    if args.mode == "peer-id" {
        println!("{}", device.id().to_peer_id());
        return Ok(());
    }
    rt.block_on(async move {
        match tokio::time::timeout(Duration::from_secs(args.run_secs), probe(args, device)).await {
            Ok(result) => result,
            Err(_) => {
                emit(json!({"event": "timeout"}));
                Ok(())
            }
        }
    })
}

/// `relay-probe relay DATA_DIR [flags]`: the same relay `iom relay run --json` runs, for test
/// runs where the `iom` binary does not have the `relay` command wired in yet.
async fn relay_mode() -> Result<()> {
    let mut argv: Vec<String> = std::env::args().skip(2).collect();
    if argv.is_empty() {
        bail!(
            "usage: relay-probe relay DATA_DIR [--listen ADDR]... [--external-addr ADDR]... [--allow-person P]... [--no-rate-limits] [--max-reservations N]"
        );
    }
    let data_dir = PathBuf::from(argv.remove(0));
    let mut config = iom_node::relay::RelayConfig::default();
    let (mut listen, mut external) = (Vec::new(), Vec::new());
    let mut it = argv.into_iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--no-rate-limits" => config.limits.rates = None,
            "--json" => {}
            _ => {
                let value = it.next().with_context(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--listen" => listen.push(value.parse()?),
                    "--external-addr" => external.push(value.parse()?),
                    "--allow-person" => config.allowed_persons.push(value.parse()?),
                    "--max-reservations" => config.limits.max_reservations = value.parse()?,
                    other => bail!("unknown flag {other}"),
                }
            }
        }
    }
    if !listen.is_empty() {
        config.listen = listen;
    }
    config.external = external;
    let key = iom_node::relay::load_or_create_relay_key(&data_dir)?;
    let mut server = iom_node::relay::RelayServer::new(key, config)?;
    let addrs = server.start().await?;
    emit(json!({
        "peer_id": server.peer_id().to_string(),
        "addrs": addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }));
    server.run(iom_node::node::shutdown_signal()).await?;
    Ok(())
}

fn read_chain(path: &PathBuf) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| hex::decode(l.trim()).context("chain line is not hex"))
        .collect()
}

enum Task {
    Authenticated(Result<iom_node::relay::RelayAuthReply, String>),
}

async fn probe(args: Args, device: DeviceKey) -> Result<()> {
    let relay_addr = args.relay.clone().context("--relay is required")?;
    let relay_id = match relay_addr.iter().last() {
        Some(Protocol::P2p(id)) => id,
        _ => bail!("--relay must end in /p2p/RELAY_ID"),
    };
    let dial = args.mode == "dial";
    if dial && args.remote.is_none() {
        bail!("dial mode needs --remote");
    }
    let no_dcutr = args.no_dcutr;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(device.to_libp2p_keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| Probe {
            relay_client,
            identify: identify::Behaviour::new(identify::Config::new(
                "/iom/id/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(1))),
            dcutr: Toggle::from(
                (!no_dcutr).then(|| dcutr::Behaviour::new(key.public().to_peer_id())),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let me = *swarm.local_peer_id();
    emit(json!({"event": "start", "peer_id": me.to_string(), "mode": args.mode}));

    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control.accept(PUSH).map_err(|e| anyhow!("accept: {e}"))?;
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total: u64 = 0;
                let error = loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break None,
                        Ok(n) => total += n as u64,
                        Err(e) => break Some(e.to_string()),
                    }
                };
                if error.is_none() {
                    let _ = stream.write_all(&total.to_be_bytes()).await;
                    let _ = stream.close().await;
                }
                emit(
                    json!({"event": "push_received", "peer": peer.to_string(), "bytes": total, "error": error}),
                );
            });
        }
    });

    swarm.listen_on("/ip4/0.0.0.0/tcp/0".parse()?)?;
    swarm.listen_on("/ip4/0.0.0.0/udp/0/quic-v1".parse()?)?;
    let settle = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(event)) = tokio::time::timeout_at(settle, swarm.next()).await {
        if let SwarmEvent::NewListenAddr { address, .. } = event {
            emit(json!({"event": "listen_addr", "addr": address.to_string()}));
        }
    }

    swarm.dial(relay_addr.clone())?;
    let (mut sent, mut received) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(sent && received) {
        let event = tokio::time::timeout_at(deadline, swarm.next())
            .await
            .map_err(|_| anyhow!("no identify exchange with the relay within 20 s"))?
            .context("swarm ended")?;
        match event {
            SwarmEvent::Behaviour(ProbeEvent::Identify(identify::Event::Sent {
                peer_id, ..
            })) if peer_id == relay_id => {
                sent = true;
            }
            SwarmEvent::Behaviour(ProbeEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if peer_id == relay_id => {
                emit(json!({"event": "observed_addr", "addr": info.observed_addr.to_string()}));
                received = true;
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                emit(json!({"event": "dial_error", "error": error.to_string()}));
                bail!("cannot reach the relay: {error}");
            }
            _ => {}
        }
    }

    let (task_tx, mut task_rx) = tokio::sync::mpsc::channel::<Task>(8);
    let mut waiting_auth = false;
    if let Some(path) = &args.chain {
        let chain = read_chain(path)?;
        let mut control = swarm.behaviour().stream.new_control();
        let tx = task_tx.clone();
        waiting_auth = true;
        tokio::spawn(async move {
            let r = iom_node::relay::authenticate_to_relay(&mut control, relay_id, chain)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Task::Authenticated(r)).await;
        });
    }
    let mut started = false;
    let mut pushed = false;
    let start = |swarm: &mut libp2p::Swarm<Probe>| -> Result<()> {
        let circuit = relay_addr.clone().with(Protocol::P2pCircuit);
        if dial {
            let remote = args.remote.context("dial mode needs --remote")?;
            swarm.dial(circuit.with(Protocol::P2p(remote)))?;
        } else {
            swarm.listen_on(circuit)?;
        }
        Ok(())
    };
    if !waiting_auth {
        start(&mut swarm)?;
        started = true;
    }

    loop {
        tokio::select! {
            Some(task) = task_rx.recv() => match task {
                Task::Authenticated(r) => {
                    match &r {
                        Ok(reply) => emit(json!({"event": "auth", "ok": reply.ok, "reason": reply.reason})),
                        Err(e) => emit(json!({"event": "auth", "ok": false, "error": e})),
                    }
                    if !started {
                        start(&mut swarm)?;
                        started = true;
                    }
                }
            },
            event = swarm.next() => {
                let Some(event) = event else { break };
                match event {
                    SwarmEvent::ConnectionEstablished { peer_id, endpoint, connection_id, .. } => {
                        let relayed = endpoint.is_relayed();
                        emit(json!({
                            "event": "connected", "peer": peer_id.to_string(), "relayed": relayed,
                            "addr": endpoint.get_remote_address().to_string(),
                            "dialer": endpoint.is_dialer(), "connection": format!("{connection_id}"),
                        }));
                        if dial && Some(peer_id) == args.remote && relayed && !pushed
                            && let Some(bytes) = args.push
                        {
                            pushed = true;
                            let mut control = swarm.behaviour().stream.new_control();
                            tokio::spawn(async move { push(&mut control, peer_id, bytes).await });
                        }
                    }
                    SwarmEvent::ConnectionClosed { peer_id, endpoint, cause, .. } => {
                        emit(json!({
                            "event": "closed", "peer": peer_id.to_string(),
                            "relayed": endpoint.is_relayed(),
                            "cause": cause.map(|c| c.to_string()),
                        }));
                    }
                    SwarmEvent::Behaviour(ProbeEvent::RelayClient(
                        relay::client::Event::ReservationReqAccepted { renewal, limit, .. },
                    )) => {
                        emit(json!({"event": "reservation", "renewal": renewal, "limit": format!("{limit:?}")}));
                    }
                    SwarmEvent::Behaviour(ProbeEvent::RelayClient(
                        relay::client::Event::OutboundCircuitEstablished { limit, .. },
                    )) => {
                        emit(json!({"event": "circuit_out", "limit": format!("{limit:?}")}));
                    }
                    SwarmEvent::Behaviour(ProbeEvent::RelayClient(
                        relay::client::Event::InboundCircuitEstablished { src_peer_id, limit },
                    )) => {
                        emit(json!({"event": "circuit_in", "src": src_peer_id.to_string(), "limit": format!("{limit:?}")}));
                    }
                    SwarmEvent::Behaviour(ProbeEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => {
                        emit(json!({
                            "event": "dcutr", "peer": remote_peer_id.to_string(), "ok": result.is_ok(),
                            "error": result.err().map(|e| e.to_string()),
                        }));
                    }
                    SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                        emit(json!({
                            "event": "listener_closed",
                            "addrs": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            "reason": format!("{reason:?}"),
                        }));
                    }
                    SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                        emit(json!({"event": "dial_error", "peer": peer_id.map(|p| p.to_string()), "error": error.to_string()}));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

async fn push(control: &mut libp2p_stream::Control, peer: PeerId, bytes: u64) {
    let result: Result<u64> = async {
        let mut stream = control
            .open_stream(peer, PUSH)
            .await
            .map_err(|e| anyhow!("open: {e}"))?;
        let chunk = vec![0x5a_u8; 16 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..n]).await?;
            left -= n as u64;
        }
        stream.close().await?;
        let mut ack = [0u8; 8];
        stream.read_exact(&mut ack).await?;
        Ok(u64::from_be_bytes(ack))
    }
    .await;
    match result {
        Ok(acked) => {
            emit(json!({"event": "push", "ok": acked == bytes, "sent": bytes, "acked": acked}))
        }
        Err(e) => {
            emit(json!({"event": "push", "ok": false, "sent": bytes, "error": e.to_string()}))
        }
    }
}
