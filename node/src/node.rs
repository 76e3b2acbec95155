//! The running node: shared state ([`NodeCtx`]) and the lifecycle ([`run`]): lock the data dir,
//! load keys and config, open the store, start the services, serve the local API, and shut
//! down cleanly on SIGINT/SIGTERM.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use iom_crdt::{DocId, DocKind};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::ApiError;
use crate::config::Config;
use crate::docs::{Docs, Origin};
use crate::identity::Identity;
use crate::lock::DataDirLock;
use crate::store::Store;

/// State shared by every service of a running node.
pub struct NodeCtx {
    /// Validated configuration.
    pub config: Config,
    /// This device's keys (the person can change once, on join).
    pub identity: RwLock<Identity>,
    /// The sled store.
    pub store: Store,
    /// The document service.
    pub docs: Docs,
    /// When the node started.
    pub started: Instant,
    /// Flips to `true` when the node is shutting down.
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for NodeCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCtx").finish_non_exhaustive()
    }
}

/// Routes that other subsystems add to the local API.
pub fn extra_routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new()
}

impl NodeCtx {
    /// The device id (libp2p PeerId string).
    pub fn device_id(&self) -> String {
        read(&self.identity).device.id().to_string()
    }

    /// The `iom status` document.
    pub async fn status_json(&self) -> Value {
        let (device, person, holds_person_key) = {
            let id = read(&self.identity);
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
            "documents": self.store.doc_count(),
            "disk_bytes": self.store.size_on_disk(),
        })
    }

    /// Called after a blob was stored locally.
    pub fn blob_added(&self, id: [u8; 32]) {
        tracing::debug!(blob = %hex::encode(id), "blob stored");
    }

    /// The memory text.
    pub async fn memory_text(&self) -> Result<String, ApiError> {
        self.docs.create(DocKind::Memory).await?;
        Ok(self
            .docs
            .read(DocId::MEMORY, |doc| iom_crdt::Memory::text(doc))
            .await??)
    }

    /// Appends to (or replaces) the memory text; returns the new text.
    pub async fn memory_edit(&self, text: String, append: bool) -> Result<String, ApiError> {
        self.docs.create(DocKind::Memory).await?;
        let now = crate::time::now_secs() as i64;
        Ok(self
            .docs
            .modify(DocId::MEMORY, Origin::Local, false, move |doc| {
                let r = if append {
                    iom_crdt::Memory::append(doc, &text, "memory append", now)
                } else {
                    iom_crdt::Memory::replace(doc, &text, "memory edit", now)
                };
                Ok(r.and_then(|()| iom_crdt::Memory::text(doc)))
            })
            .await?
            .map_err(|e| ApiError::bad_request(e.to_string()))?)
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
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
    Ok(Identity::create(data_dir)?.is_some())
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let data_dir = config.data_dir.clone();
    init_data_dir(&data_dir)?;
    let _lock = DataDirLock::acquire(&data_dir)?;
    let identity = Identity::load(&data_dir)?;
    let device = identity.device.id();
    let span = tracing::info_span!("node", id = %device);
    let _enter = span.enter();
    let db_dir = data_dir.join("db");
    let store = Store::open(&db_dir, config.storage.cache_mb << 20).map_err(|source| {
        StartError::Store {
            dir: db_dir.display().to_string(),
            source,
        }
    })?;
    let actor = iom_crdt::actor_for(device.as_bytes(), crate::time::random_bytes::<8>());
    let docs = Docs::new(store.clone(), actor, config.storage.loaded_docs);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ctx = Arc::new(NodeCtx {
        config,
        identity: RwLock::new(identity),
        store: store.clone(),
        docs,
        started: Instant::now(),
        shutdown: shutdown_rx,
    });

    let socket_path = data_dir.join("iom.sock");
    let listener = crate::api::bind_socket(&socket_path)
        .map_err(|e| StartError::Other(format!("cannot bind {}: {e}", socket_path.display())))?;
    let router = crate::api::routes::router(ctx.clone());
    let mut api_shutdown = ctx.shutdown.clone();
    let api = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = api_shutdown.wait_for(|s| *s).await;
            })
            .await;
    });

    tracing::info!(
        device = %device,
        socket = %socket_path.display(),
        documents = store.doc_count(),
        "node ready"
    );
    println!("iom node ready: device {device}, socket {}", socket_path.display());

    shutdown.await;
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), api).await;
    store
        .flush()
        .await
        .map_err(|e| StartError::Other(format!("final flush failed: {e}")))?;
    let _ = std::fs::remove_file(&socket_path);
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
