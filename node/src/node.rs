//! The running node: shared state ([`NodeCtx`]) and the lifecycle ([`run`]): lock the data dir,
//! load keys and config, open the store, start the services, serve the local API, and shut
//! down cleanly on SIGINT/SIGTERM.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iom_crdt::{DocId, DocKind};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::ApiError;
use crate::config::Config;
use crate::docs::{Docs, Origin};
use crate::identity::{Identity, SharedIdentity};
use crate::lock::DataDirLock;
use crate::net::{Net, TransportKind};
use crate::pairing::Pairing;
use crate::store::Store;
use crate::sync::blobs::{Blobs, BlobsConfig};
use crate::trust::TrustBook;

/// State shared by every service of a running node.
pub struct NodeCtx {
    /// Validated configuration.
    pub config: Config,
    /// This device's keys (the person can change once, on join).
    pub identity: SharedIdentity,
    /// The sled store.
    pub store: Store,
    /// The document service.
    pub docs: Docs,
    /// Certificates and trust.
    pub trust: Arc<TrustBook>,
    /// The network.
    pub net: Net,
    /// Invites and joins.
    pub pairing: Arc<Pairing>,
    /// Sync sessions.
    pub sync: Arc<crate::sync::Manager>,
    /// Blob replication.
    pub blobs: Arc<Blobs>,
    /// The agent runner (active while this device holds the role).
    pub agent: Arc<crate::agent::runner::Runner>,
    /// The asking side: requests, following them, `/iom/agent/1`.
    pub asking: Arc<crate::agent::ask::Asking>,
    /// The scheduler.
    pub scheduler: Arc<crate::schedule::Scheduler>,
    /// The email channel, when `[email]` is configured.
    pub email: Option<Arc<crate::channels::email::EmailChannel>>,
    /// When the node started.
    pub started: Instant,
    /// The id of every API token revoked while the node runs (WebSocket connections opened
    /// with it close at once).
    pub token_revoked: tokio::sync::broadcast::Sender<String>,
    /// Flips to `true` when the node is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Where the web listeners serve, once they are bound.
    pub web: std::sync::OnceLock<WebListeners>,
    /// Browser sessions and their challenges.
    pub sessions: crate::http::browser::Sessions,
    /// The names relays gave this node for reaching its HTTPS listener from anywhere.
    pub relay_names: crate::http::relayed::RelayNames,
}

/// The addresses the page and the API are served on (`iom status` shows them; invite URLs
/// are made from them).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WebListeners {
    /// `http://IP:PORT/`, if plain HTTP is on.
    pub http: Option<String>,
    /// `https://IP:PORT/`, if HTTPS is on.
    pub https: Option<String>,
    /// SHA-256 of the HTTPS certificate (`AB:CD:…`).
    pub fingerprint: Option<String>,
    /// Whether that certificate is the node's self-signed one.
    pub self_signed: bool,
}

impl std::fmt::Debug for NodeCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCtx").finish_non_exhaustive()
    }
}

impl NodeCtx {
    /// The device id (libp2p PeerId string).
    pub fn device_id(&self) -> String {
        self.identity.device_id().to_string()
    }

    /// This device's keys.
    pub fn identity(&self) -> std::sync::RwLockReadGuard<'_, Identity> {
        self.identity.read()
    }

    /// The `iom status` document.
    pub async fn status_json(&self) -> Value {
        let (device, person, holds_person_key) = {
            let id = self.identity.read();
            (
                id.device.id().to_string(),
                id.person.to_string(),
                id.person_key.is_some(),
            )
        };
        json!({
            "device": device,
            "name": self.config.name,
            "person": person,
            "holds_person_key": holds_person_key,
            "data_dir": self.config.data_dir.display().to_string(),
            "uptime_secs": self.started.elapsed().as_secs(),
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "data_format": crate::format::CURRENT,
            // From the in-memory inventory (a count of the store walks every document).
            "documents": self.docs.with_inventory(iom_crdt::Inventory::len),
            // Equal on two devices exactly when they hold the same documents at the same heads.
            "inventory_root": hex::encode(self.docs.with_inventory(|i| i.root())),
            "blobs": self.store.blob_count(),
            "disk_bytes": self.store.size_on_disk(),
            "disk": self.disk_json(),
            "listen": self.net.listen_addrs().await.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "peers": self.peers_json(),
            "sync": self.sync.progress(),
            "blob_transfers": self.blobs.active().iter().map(|(id, done, total)| json!({
                "blob": id.to_string(), "chunks_done": done, "chunks_total": total,
            })).collect::<Vec<_>>(),
            "blob_bytes_pending": self.blobs.pending_bytes(),
            "backup": self.backup_json(),
            "web": self.web_json(),
        })
    }

    /// The web listeners and the names relays gave this node.
    fn web_json(&self) -> Value {
        let Some(web) = self.web.get() else {
            return Value::Null;
        };
        let mut v = serde_json::to_value(web).unwrap_or(Value::Null);
        if let Some(map) = v.as_object_mut() {
            let names = self.relay_names.list();
            map.insert(
                "relay_url".into(),
                names.first().map_or(Value::Null, |n| json!(n.url)),
            );
            map.insert("relays".into(), json!(names));
        }
        v
    }

    /// Scheduled backups: where, how often, the last success and the last error.
    fn backup_json(&self) -> Value {
        let (last, error) = crate::backup::schedule::last(&self.store);
        json!({
            "dir": self.config.backup.dir.as_ref().map(|d| d.display().to_string()),
            "every_secs": self.config.backup_every.map(|d| d.as_secs()),
            "last": last,
            "last_error": error,
        })
    }

    /// The disk reserve: free space, the reserve, and whether writes are accepted (and why not).
    fn disk_json(&self) -> Value {
        match self.store.space() {
            Ok(s) if s.writable() => json!({
                "free_bytes": s.free, "reserve_bytes": s.reserve, "writable": true,
            }),
            Ok(s) => json!({
                "free_bytes": s.free, "reserve_bytes": s.reserve, "writable": false,
                "why": crate::store::StoreError::DiskFull {
                    dir: self.config.data_dir.display().to_string(),
                    free: s.free,
                    reserve: s.reserve,
                }.to_string(),
            }),
            Err(e) => json!({ "writable": false, "why": e.to_string() }),
        }
    }

    /// Connected peers with their link kind.
    pub fn peers_json(&self) -> Vec<Value> {
        let state = self.trust.state();
        let peers = self.net.peers.read().unwrap_or_else(|e| e.into_inner());
        peers
            .map
            .iter()
            .filter(|(_, e)| !e.conns.is_empty())
            .map(|(p, e)| {
                let device = iom_protocol::keys::DeviceId::from_peer_id(p).ok();
                let name = device
                    .and_then(|d| state.devices.get(&d).map(|t| t.name.clone()))
                    .unwrap_or_default();
                json!({
                    "device": p.to_string(),
                    "name": name,
                    "trusted": device.is_some_and(|d| state.is_trusted(&d)),
                    "connection": e.link().to_string(),
                    "connections": e.conns.len(),
                    "rtt_ms": e.rtt_ms,
                })
            })
            .collect()
    }

    /// Called after a blob was stored locally.
    pub fn blob_added(&self, id: [u8; 32], len: u64) {
        tracing::debug!(blob = %hex::encode(id), "blob stored");
        self.announce_blob(iom_protocol::id::ContentId::from_bytes(id), len);
    }

    /// Tells every peer's session that this node holds blob `id` (stored here, or arrived).
    fn announce_blob(&self, id: iom_protocol::id::ContentId, len: u64) {
        self.sync.broadcast(iom_protocol::wire::SyncMsg::Blobs {
            have: vec![(id, len)],
        });
    }

    /// The memory text.
    pub async fn memory_text(&self) -> Result<String, ApiError> {
        self.docs.create(DocKind::Memory).await?;
        self.docs
            .read(DocId::MEMORY, |doc| {
                iom_crdt::Memory::open(doc).map(|m| m.text())
            })
            .await?
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Appends to (or replaces) the memory text; returns the new text.
    pub async fn memory_edit(&self, text: String, append: bool) -> Result<String, ApiError> {
        self.docs.create(DocKind::Memory).await?;
        let now = crate::time::now_secs() as i64;
        self.docs
            .modify(DocId::MEMORY, Origin::Local, false, move |doc| {
                let r = iom_crdt::Memory::open(&mut *doc).and_then(|mut m| {
                    if append {
                        m.append(&text, "memory append", now)?;
                    } else {
                        m.replace(&text, "memory edit", now)?;
                    }
                    Ok(m.text())
                });
                Ok(r)
            })
            .await?
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data dir is in use or unusable.
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    /// Keys could not be loaded.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The store could not be opened.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The store dir.
        dir: String,
        /// Cause.
        source: crate::store::StoreError,
    },
    /// The data dir's format is newer than this binary, unreadable, or failed to migrate.
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    /// Any other start-up failure.
    #[error("{0}")]
    Other(String),
}

/// Creates the data dir (0700) and the keys of a new mesh if there are none yet.
/// Returns `true` when keys were created.
pub fn init_data_dir(data_dir: &Path) -> Result<bool, StartError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StartError::Other(format!("cannot create {}: {e}", data_dir.display())))?;
    let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    // Before anything is created: a dir written by a newer iom is refused untouched.
    crate::format::check(data_dir)?;
    crate::format::mark_new(data_dir)?;
    Ok(Identity::create(data_dir)?.is_some())
}

/// A started node: its services, their tasks, and the data-dir lock. Built by
/// [`Node::start`]; [`run`] adds the local API and the HTTP listener around it, and in-process
/// tests use it directly (with [`TransportKind::Memory`], no port is bound).
pub struct Node {
    ctx: Arc<NodeCtx>,
    /// Every long-running task of the node's services.
    tasks: JoinSet<()>,
    cancel: CancellationToken,
    shutdown_tx: watch::Sender<bool>,
    _lock: DataDirLock,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("device", &self.ctx.identity.device_id())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Locks the data dir, loads keys and config, opens the store and starts every service
    /// (network, pairing, sync, agent, scheduler). The local API is not served.
    pub async fn start(config: Config, transport: TransportKind) -> Result<Node, StartError> {
        let data_dir = config.data_dir.clone();
        init_data_dir(&data_dir)?;
        let lock = DataDirLock::acquire(&data_dir)?;
        crate::format::open(&data_dir)?;
        // Workspaces a killed run left mounted (their loop devices with them): unmounted before
        // anything can use them; the next tool call mounts them again.
        unmount_workspaces(&data_dir, "left mounted by a previous run").await;
        let identity = Identity::load(&data_dir)?;
        let device = identity.device.id();
        let db_dir = data_dir.join("db");
        let store_error = |source| StartError::Store {
            dir: db_dir.display().to_string(),
            source,
        };
        let store = Store::open_with_reserve(
            &db_dir,
            config.storage.cache_mb << 20,
            config.storage.reserve_mb << 20,
            Box::new(crate::store::space::Statvfs),
        )
        .map_err(store_error)?;
        let actor = iom_crdt::actor_for(device.as_bytes(), crate::time::random_bytes::<8>());
        let docs = Docs::new(store.clone(), actor, config.storage.loaded_docs)
            .map_err(|e| StartError::Other(format!("cannot read the document index: {e}")))?;
        let trust = Arc::new(TrustBook::load(store.clone(), identity.person).map_err(store_error)?);
        ensure_self_certificate(&identity, &trust, &config.name).await?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let net = crate::net::event_loop::start(
            &identity.device,
            crate::net::NetConfig {
                listen: config.listen.clone(),
                relays: config.relays.clone(),
                mdns: config.mdns,
                transport,
            },
            trust.clone(),
            store.clone(),
            shutdown_rx.clone(),
            &mut tasks,
        )
        .await
        .map_err(|e| StartError::Other(e.to_string()))?;
        let identity = SharedIdentity::new(identity, &data_dir);
        let pairing = Pairing::new(
            identity.clone(),
            trust.clone(),
            store.clone(),
            net.clone(),
            config.name.clone(),
        );
        // Refusals of untrusted peers, counted across sync, blobs and asking.
        let gate = Arc::new(crate::sync::gate::Gate::default());
        let blobs = Arc::new(Blobs::new(
            store.clone(),
            net.clone(),
            trust.clone(),
            gate.clone(),
            BlobsConfig {
                corrupt_chunks: config.fault_corrupt_blob_chunks,
                ..BlobsConfig::default()
            },
        ));
        let sync = Arc::new(crate::sync::Manager::new(
            docs.clone(),
            trust.clone(),
            net.clone(),
            store.clone(),
            Arc::new(crate::sync::StoreBlobs::new(store.clone(), blobs.clone())),
            gate.clone(),
            crate::sync::SyncConfig {
                share_addrs: !config.fault_no_addr_sharing,
                fault_garbage_sync: config.fault_garbage_sync,
                fault_garbage_snapshot: config.fault_garbage_snapshot,
                ..crate::sync::SyncConfig::default()
            },
        ));
        let announce: crate::agent::mesh_tools::Announce = {
            let sync = sync.clone();
            Arc::new(move |id, len| {
                sync.broadcast(iom_protocol::wire::SyncMsg::Blobs {
                    have: vec![(iom_protocol::id::ContentId::from_bytes(id), len)],
                })
            })
        };
        let (agent, asking, scheduler) = agent_services(
            &config, &identity, &store, &docs, &trust, &net, gate, announce,
        );
        let email = config.email.clone().map(|cfg| {
            crate::channels::email::EmailChannel::new(cfg, store.clone(), asking.clone(), &data_dir)
        });
        let ctx = Arc::new(NodeCtx {
            config,
            identity,
            store,
            docs,
            trust,
            net,
            pairing,
            sync,
            blobs,
            agent,
            asking,
            scheduler,
            email,
            started: Instant::now(),
            token_revoked: tokio::sync::broadcast::channel(16).0,
            web: std::sync::OnceLock::new(),
            sessions: Default::default(),
            relay_names: Default::default(),
            shutdown: shutdown_rx,
        });
        let cancel = CancellationToken::new();
        ctx.pairing.start(&mut tasks, cancel.clone());
        forward_blob_arrivals(&ctx, &mut tasks, cancel.clone());
        ctx.blobs.start(&mut tasks, cancel.clone());
        ctx.sync.start(cancel.clone());
        ctx.asking.start_server(&ctx.net, &cancel);
        ctx.agent.start(&cancel);
        tasks.spawn(ctx.scheduler.clone().run(cancel.clone()));
        if let Some(email) = &ctx.email {
            email.start(&mut tasks, cancel.clone());
        }
        if let Some(every) = ctx.config.backup_every {
            tasks.spawn(crate::backup::schedule::run(
                ctx.store.clone(),
                ctx.config.data_dir.clone(),
                ctx.config.backup.clone(),
                every,
                cancel.clone(),
            ));
        }
        // Every protocol is registered: peers may connect now.
        ctx.net.go_online();
        Ok(Node {
            ctx,
            tasks,
            cancel,
            shutdown_tx,
            _lock: lock,
        })
    }

    /// The whole node, for the API and for tests.
    pub fn ctx(&self) -> &Arc<NodeCtx> {
        &self.ctx
    }

    /// A token cancelled when the node stops.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops every service (waiting up to 5 s for their tasks), removes this node's tool
    /// containers and flushes the store.
    pub async fn stop(mut self) -> Result<(), StartError> {
        self.cancel.cancel();
        let _ = self.shutdown_tx.send(true);
        // Sessions persist their per-peer states on the way out.
        self.ctx.sync.shutdown().await;
        let tasks = &mut self.tasks;
        if tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                "tasks did not stop within 5 s; aborting them"
            );
            self.tasks.shutdown().await;
        }
        self.ctx.asking.stop().await;
        // Remove this node's tool containers before the process ends.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.ctx.agent.stop()).await;
        // The sandbox unmounts what it mounted; this catches any it could not reach (a
        // sandbox that never connected, or a stop that timed out).
        unmount_workspaces(&self.ctx.config.data_dir, "still mounted at shutdown").await;
        self.ctx
            .store
            .flush()
            .await
            .map_err(|e| StartError::Other(format!("final flush failed: {e}")))
    }
}

/// Unmounts every workspace image mounted under `DATA/workspaces` (reading the mount table is
/// all it costs when there is none), logging how many with `why`.
async fn unmount_workspaces(data_dir: &Path, why: &'static str) {
    use crate::agent::sandbox::quota::{LoopDisk, WorkspaceDisk};
    let disk = LoopDisk::new(data_dir);
    match tokio::task::spawn_blocking(move || disk.unmount_all()).await {
        Ok(0) => {}
        Ok(count) => tracing::info!(count, "unmounted workspaces {why}"),
        Err(e) => tracing::warn!(error = %e, "unmounting workspaces failed"),
    }
}

/// Runs a node until `shutdown` resolves: [`Node::start`], then the local API on the unix
/// socket and, if configured, the HTTP listener.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let data_dir = config.data_dir.clone();
    let http_addr = config.http;
    let https_config = config.https.clone();
    let node = Node::start(config, TransportKind::Os).await?;
    let ctx = node.ctx().clone();
    let device = ctx.identity.device_id();
    let span = tracing::info_span!("node", id = %device);
    let _enter = span.enter();
    let http_listener = match http_addr {
        Some(addr) => Some(
            crate::http::bind(&ctx, addr)
                .await
                .map_err(|e| StartError::Other(e.to_string()))?,
        ),
        None => None,
    };
    let https_listener = match &https_config {
        Some(c) => Some(
            crate::http::bind_https(&ctx, c)
                .await
                .map_err(|e| StartError::Other(e.to_string()))?,
        ),
        None => None,
    };

    let socket_path = data_dir.join("iom.sock");
    let listener = crate::api::bind_socket(&socket_path)
        .map_err(|e| StartError::Other(format!("cannot bind {}: {e}", socket_path.display())))?;
    let router = crate::api::routes::router(ctx.clone())
        .merge(crate::api::tokens::routes(ctx.clone()))
        .merge(crate::api::backup::routes(ctx.clone()))
        .fallback(crate::http::errors::no_route)
        .layer(axum::middleware::map_response(
            crate::http::errors::json_errors,
        ));
    let api_cancel = node.shutdown_token();
    let api = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(api_cancel.cancelled_owned())
            .await;
    });

    let mut web = WebListeners {
        http: http_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("http://{a}/")),
        ..WebListeners::default()
    };
    let mut http_addr = web
        .http
        .as_ref()
        .map(|u| format!(", http {u}"))
        .unwrap_or_default();
    if let Some((l, material)) = &https_listener
        && let Ok(a) = axum::serve::Listener::local_addr(l)
    {
        let kind = if material.self_signed {
            "self-signed certificate"
        } else {
            "certificate"
        };
        http_addr.push_str(&format!(
            ", https https://{a}/ ({kind} sha256 {})",
            material.fingerprint
        ));
        web.https = Some(format!("https://{a}/"));
        web.fingerprint = Some(material.fingerprint.clone());
        web.self_signed = material.self_signed;
    }
    let _ = ctx.web.set(web);
    if http_listener.is_some() || https_listener.is_some() {
        crate::http::webhook::resume(&ctx);
    }
    let http = http_listener.map(|l| crate::http::serve(ctx.clone(), l));
    if let Some((l, _)) = &https_listener {
        crate::http::relayed::start(&ctx, l.relayed(), node.shutdown_token());
    }
    let https = https_listener.map(|(l, _)| crate::http::serve(ctx.clone(), l));

    tracing::info!(
        device = %device,
        socket = %socket_path.display(),
        documents = ctx.docs.with_inventory(iom_crdt::Inventory::len),
        "node ready"
    );
    println!(
        "iom node ready: device {device}, socket {}{http_addr}",
        socket_path.display()
    );

    shutdown.await;
    tracing::info!("shutting down");
    node.shutdown_token().cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async move {
        let _ = api.await;
        for h in [http, https].into_iter().flatten() {
            let _ = h.await;
        }
    })
    .await;
    drop(ctx);
    node.stop().await?;
    let _ = std::fs::remove_file(&socket_path);
    Ok(())
}

/// Blobs that arrive by transfer are announced to every peer's session, until `shutdown`.
fn forward_blob_arrivals(
    ctx: &Arc<NodeCtx>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    let mut arrivals = ctx.blobs.arrivals();
    let ctx = ctx.clone();
    tasks.spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = arrivals.recv() => next,
            };
            match next {
                Ok((id, len)) => ctx.announce_blob(id, len),
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            }
        }
    });
}

/// The agent's services, wired from their parts: the runner (Claude, the Docker sandbox with
/// the mesh's own tools beside it, the wall clock), the asking side (over libp2p) and the
/// scheduler (its clock moved by `clock_offset_secs`).
#[allow(clippy::too_many_arguments)]
fn agent_services(
    config: &Config,
    identity: &SharedIdentity,
    store: &Store,
    docs: &Docs,
    trust: &Arc<TrustBook>,
    net: &Net,
    gate: Arc<crate::sync::gate::Gate>,
    announce: crate::agent::mesh_tools::Announce,
) -> (
    Arc<crate::agent::runner::Runner>,
    Arc<crate::agent::ask::Asking>,
    Arc<crate::schedule::Scheduler>,
) {
    use crate::agent::clock::{OffsetClock, SystemClock};
    use crate::agent::{ask, runner};
    let builtin = crate::agent::model::ClaudeFactory {
        device_name: config.name.clone(),
        api_key: config.api_key.clone(),
        key_file: config.agent.key_file.clone(),
        model: config.agent.model.clone(),
        max_tokens: config.agent.max_tokens,
        base_url: config.agent.base_url.clone(),
    };
    let model = crate::agent::providers::MeshModels::new(docs.clone(), builtin);
    let sandbox = crate::agent::sandbox::host::DockerHost::new(
        config.sandbox.clone(),
        config.data_dir.clone(),
        identity.device_id().to_string(),
    );
    // MCP servers declared in the mesh, beside the sandbox's tools.
    let tools = crate::agent::mcp::McpToolHost::new(
        Arc::new(sandbox),
        crate::agent::mcp::McpHub::new(
            config.sandbox.clone(),
            config.data_dir.clone(),
            identity.device_id().to_string(),
        ),
        docs.clone(),
        trust.clone(),
    );
    let agent = runner::Runner::new(
        runner::Deps {
            docs: docs.clone(),
            store: store.clone(),
            identity: identity.clone(),
            trust: trust.clone(),
            model: Arc::new(model),
            // The mesh's own tools beside the sandbox's.
            tools: Arc::new(crate::agent::mesh_tools::MeshTools::new(
                Arc::new(tools),
                crate::agent::conversations::Conversations::new(
                    docs.clone(),
                    Arc::new(SystemClock),
                ),
                store.clone(),
                announce,
            )),
            clock: Arc::new(SystemClock),
        },
        runner::RunnerConfig::from_config(&config.agent),
    );
    let asking = ask::Asking::new(ask::Deps {
        conversations: crate::agent::conversations::Conversations::new(
            docs.clone(),
            Arc::new(SystemClock),
        ),
        identity: identity.clone(),
        trust: trust.clone(),
        link: Arc::new(ask::NetLink(net.clone())),
        runner: agent.clone(),
        gate,
    });
    let scheduler = crate::schedule::Scheduler::new(crate::schedule::Deps {
        identity: identity.clone(),
        trust: trust.clone(),
        clock: Arc::new(OffsetClock::new(config.clock_offset_secs)),
        asking: asking.clone(),
    });
    (agent, asking, scheduler)
}

/// The first device of a mesh certifies itself (as an admin) with the person key. A device
/// that holds the person key but lost its own certificate gets it back the same way, and so
/// does one that imported the person key (a recovery kit) while it was not an admin.
async fn ensure_self_certificate(
    identity: &Identity,
    trust: &TrustBook,
    name: &str,
) -> Result<(), StartError> {
    let me = identity.device.id();
    let Some(person_key) = &identity.person_key else {
        return Ok(());
    };
    if trust.state().is_admin(&me) || trust.state().is_revoked(&me) {
        return Ok(());
    }
    let body = iom_protocol::cert::CertBody::Device {
        kind: None,
        person: identity.person,
        device: me,
        name: name.to_string(),
        admin: true,
        issued_at: crate::time::now_secs(),
    };
    let cert = crate::identity::issue(body, Some(person_key), &identity.device)
        .map_err(|e| StartError::Other(format!("cannot certify this device: {e}")))?;
    trust
        .add(vec![cert])
        .await
        .map_err(|e| StartError::Other(format!("cannot store this device's certificate: {e}")))?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
