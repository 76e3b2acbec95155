//! The sandbox runtime: one warm, hardened container per conversation.
//!
//! A container is created on a conversation's first tool call and kept running (PID 1 sleeps)
//! so follow-up calls only pay for a `docker exec`. It is removed after an idle timeout, on a
//! tool-call timeout (the next call recreates it), and at shutdown. Containers carry labels so
//! the ones left behind by a crashed run are removed at start-up ([`Sandbox::reap_orphans`]).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use tokio_util::sync::CancellationToken;

use super::SandboxError;
use super::exec::{self, ExecOutput, SANDBOX_ENV};
use super::image::SANDBOX_UID;
use super::policy::{ResolvedMount, SandboxConfig, validate_mounts};
use super::quota::{Limits, LoopDisk, Quota, QuotaError, QuotaMode};

/// Label present on every sandbox container.
pub const LABEL_SANDBOX: &str = "iom.sandbox";
/// Label holding the id of the node that owns the container.
pub const LABEL_NODE: &str = "iom.node";
/// Label holding the conversation id.
pub const LABEL_CONVERSATION: &str = "iom.conversation";
/// Where the conversation workspace is mounted in the container.
pub const WORKSPACE: &str = "/workspace";

/// PID 1 of a warm container: sleep until killed, exit at once on SIGTERM.
const IDLE_CMD: &str = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done";

/// The sandbox runtime. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Sandbox {
    docker: Docker,
    cfg: SandboxConfig,
    data_dir: PathBuf,
    node_id: String,
    mounts: Vec<ResolvedMount>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// The workspace quota; `None` with `quota = "off"`.
    quota: Option<Arc<Quota>>,
    /// Serialises mounting, evicting and unmounting workspaces (the total's bookkeeping).
    mount_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("node_id", &self.node_id)
            .field("data_dir", &self.data_dir)
            .field("image", &self.cfg.image)
            .finish_non_exhaustive()
    }
}

/// Per-conversation state.
struct Slot {
    /// The warm container's id; the lock serialises creation.
    warm: tokio::sync::Mutex<Option<String>>,
    /// Tool calls in flight.
    busy: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Slot {
    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        lock(&self.last_used).elapsed()
    }
}

/// Decrements a slot's busy count when a tool call ends, even if it is cancelled.
struct BusyGuard(Arc<Slot>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs blocking quota work (mount tables, `mkfs.ext4`, `mount`) off the async threads.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, QuotaError>
where
    T: Send + 'static,
    E: Into<QuotaError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(QuotaError::Unavailable(format!("quota task failed: {e}"))),
    }
}

/// Connects to the local Docker engine (`$DOCKER_HOST` or `/var/run/docker.sock`) and
/// negotiates the API version (mandatory with engines older than bollard's default API).
pub async fn connect_docker() -> Result<Docker, SandboxError> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| unreachable_error(&e))?
        .with_timeout(Duration::from_secs(120));
    docker
        .negotiate_version()
        .await
        .map_err(|e| unreachable_error(&e))
}

/// The Docker Engine's version, or `unknown`.
pub async fn engine_version(docker: &Docker) -> String {
    docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_else(|| "unknown".into())
}

fn unreachable_error(e: &bollard::errors::Error) -> SandboxError {
    let detail = e.to_string();
    let hint = if detail.to_lowercase().contains("permission denied") {
        "Add your user to the docker group (sudo usermod -aG docker $USER, then log in again) \
         or run the node as a user that can open /var/run/docker.sock."
    } else {
        "Start the Docker engine: sudo systemctl start docker (or point DOCKER_HOST at it)."
    };
    SandboxError::DockerUnreachable {
        detail,
        hint: hint.to_string(),
    }
}

impl Sandbox {
    /// Connects to Docker, validates the configured mounts and prepares `DATA/workspaces`.
    pub async fn connect(
        cfg: SandboxConfig,
        data_dir: PathBuf,
        node_id: String,
    ) -> Result<Self, SandboxError> {
        let mounts = validate_mounts(&cfg, &data_dir)?;
        let workspaces = data_dir.join("workspaces");
        tokio::fs::create_dir_all(&workspaces)
            .await
            .map_err(SandboxError::io(&workspaces))?;
        let docker = connect_docker().await?;
        let quota = (cfg.quota != QuotaMode::Off).then(|| {
            let disk = LoopDisk::new(&data_dir);
            let images = disk.images_dir().to_path_buf();
            let limits = Limits {
                per_workspace: cfg.workspace_quota_mb.saturating_mul(1 << 20),
                total: cfg.workspaces_total_mb.saturating_mul(1 << 20),
            };
            Arc::new(Quota::new(Box::new(disk), limits, images))
        });
        match (&quota, super::quota::capability()) {
            (None, _) => tracing::warn!(
                "[sandbox] quota = \"off\": workspaces have no disk quota, a tool call can fill \
                 the disk"
            ),
            (Some(_), Err(why)) => tracing::warn!(
                mode = ?cfg.quota,
                "the workspace disk quota cannot be enforced: {why}; a tool call can fill the disk"
            ),
            (Some(_), Ok(())) => {}
        }
        Ok(Self {
            docker,
            cfg,
            data_dir,
            node_id,
            mounts,
            slots: Mutex::new(HashMap::new()),
            quota,
            mount_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The connected Docker client.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The configuration this sandbox runs with.
    pub fn config(&self) -> &SandboxConfig {
        &self.cfg
    }

    /// The host directory mounted at `/workspace` for a conversation.
    pub fn workspace_dir(&self, conversation_id: &str) -> Result<PathBuf, SandboxError> {
        check_conversation_id(conversation_id)?;
        Ok(self.data_dir.join("workspaces").join(conversation_id))
    }

    /// The container name used for a conversation: `iom-<node short>-<conversation>`, where
    /// the short form is the last 12 characters of the node id (device ids all begin with the
    /// same `12D3KooW`, so their tails are what tells two nodes on one engine apart).
    pub fn container_name(&self, conversation_id: &str) -> String {
        let alnum: Vec<char> = self
            .node_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let short: String = alnum[alnum.len().saturating_sub(12)..].iter().collect();
        format!("iom-{short}-{conversation_id}")
    }

    /// Returns the id of the conversation's running container, creating it if needed.
    pub async fn ensure_container(&self, conversation_id: &str) -> Result<String, SandboxError> {
        let slot = self.slot(conversation_id)?;
        slot.touch();
        let id = self.ensure_in(&slot, conversation_id).await?;
        // Idle from now: creating it (and mounting its workspace) can take a while.
        slot.touch();
        Ok(id)
    }

    /// Removes containers of this node left over from a previous run. Returns how many.
    pub async fn reap_orphans(&self) -> Result<usize, SandboxError> {
        let ids = self.labelled_containers().await?;
        let n = ids.len();
        for id in ids {
            self.remove(&id).await;
        }
        // Anything this instance had cached is gone now.
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            if let Ok(mut warm) = slot.warm.try_lock() {
                *warm = None;
            }
        }
        if n > 0 {
            tracing::info!(count = n, "removed orphaned sandbox containers");
        }
        // Workspaces a crashed run left mounted: unmounted now, mounted again when used.
        let unmounted = self.unmount_all().await;
        if unmounted > 0 {
            tracing::info!(
                count = unmounted,
                "unmounted workspaces left mounted by a previous run"
            );
        }
        Ok(n)
    }

    /// Removes containers idle for longer than `idle_timeout_secs`. Returns how many.
    pub async fn reap_idle(&self) -> usize {
        let idle = Duration::from_secs(self.cfg.idle_timeout_secs);
        let slots: Vec<(String, Arc<Slot>)> = lock(&self.slots)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut reaped = 0;
        let _mounts = self.mount_lock.lock().await;
        let mounted = self.mounted().await;
        for (conv, slot) in slots {
            if slot.busy.load(Ordering::SeqCst) > 0 || slot.idle_for() < idle {
                continue;
            }
            let Ok(mut warm) = slot.warm.try_lock() else {
                continue;
            };
            if let Some(id) = warm.take() {
                tracing::debug!(conversation = %conv, "removing idle sandbox container");
                self.remove(&id).await;
                reaped += 1;
            }
            if mounted.contains(&conv) {
                self.unmount(&conv).await;
            }
        }
        reaped
    }

    /// The conversations whose workspaces are mounted now.
    async fn mounted(&self) -> std::collections::HashSet<String> {
        let Some(q) = self.quota.clone() else {
            return Default::default();
        };
        match blocking(move || q.disk().images()).await {
            Ok(images) => images
                .into_iter()
                .filter(|i| i.mounted)
                .map(|i| i.id)
                .collect(),
            Err(e) => {
                tracing::warn!(cause = %e, "cannot list the workspace images");
                Default::default()
            }
        }
    }

    async fn unmount(&self, conversation_id: &str) {
        let Some(q) = self.quota.clone() else { return };
        let id = conversation_id.to_string();
        if let Err(e) = blocking(move || q.disk().unmount(&id)).await {
            tracing::warn!(conversation = %conversation_id, cause = %e, "cannot unmount workspace");
        }
    }

    async fn unmount_all(&self) -> usize {
        let Some(q) = self.quota.clone() else {
            return 0;
        };
        let _mounts = self.mount_lock.lock().await;
        blocking(move || Ok::<_, QuotaError>(q.disk().unmount_all()))
            .await
            .unwrap_or(0)
    }

    /// Conversations whose workspaces may be unmounted (no call in flight), least recently
    /// used first.
    fn idle_lru(&self, except: &str) -> Vec<String> {
        let mut idle: Vec<(Duration, String)> = lock(&self.slots)
            .iter()
            .filter(|(k, s)| k.as_str() != except && s.busy.load(Ordering::SeqCst) == 0)
            .map(|(k, s)| (s.idle_for(), k.clone()))
            .collect();
        idle.sort_by_key(|b| std::cmp::Reverse(b.0));
        idle.into_iter().map(|(_, k)| k).collect()
    }

    /// Removes an idle conversation's container and unmounts its workspace. `false` if it
    /// became busy meanwhile.
    async fn evict(&self, conversation_id: &str) -> bool {
        let slot = lock(&self.slots).get(conversation_id).cloned();
        if let Some(slot) = slot {
            if slot.busy.load(Ordering::SeqCst) > 0 {
                return false;
            }
            let Ok(mut warm) = slot.warm.try_lock() else {
                return false;
            };
            if let Some(id) = warm.take() {
                self.remove(&id).await;
            }
        }
        tracing::info!(conversation = %conversation_id, "unmounting an idle workspace to stay within workspaces_total_mb");
        self.unmount(conversation_id).await;
        true
    }

    /// Makes sure the conversation's workspace is ready: its image mounted (within the total,
    /// evicting idle workspaces if needed), or a plain directory when the quota is off or
    /// cannot be enforced in `best-effort` mode. Returns the host directory.
    async fn ensure_workspace(&self, conversation_id: &str) -> Result<PathBuf, SandboxError> {
        let dir = self.workspace_dir(conversation_id)?;
        let Some(quota) = self.quota.clone() else {
            prepare_workspace(&dir).await?;
            return Ok(dir);
        };
        let _mounts = self.mount_lock.lock().await;
        let mut result = Err(QuotaError::Unavailable("no attempt".into()));
        for _ in 0..4 {
            let idle = self.idle_lru(conversation_id);
            let (q, id) = (quota.clone(), conversation_id.to_string());
            let admission = match blocking(move || q.admit(&id, &idle)).await {
                Ok(None) => return Ok(dir),
                Ok(Some(a)) => a,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let mut evicted_all = true;
            for e in &admission.evict {
                evicted_all &= self.evict(e).await;
            }
            if !evicted_all {
                // One became busy: plan again with what is idle now.
                continue;
            }
            let (q, id) = (quota.clone(), conversation_id.to_string());
            result = blocking(move || q.mount(&id)).await;
            break;
        }
        match result {
            Ok(()) => Ok(dir),
            Err(e @ QuotaError::Full { .. }) => Err(e.into()),
            Err(e) if self.cfg.quota == QuotaMode::Required => Err(e.into()),
            Err(e) => {
                tracing::warn!(
                    conversation = %conversation_id,
                    "workspace without a disk quota ([sandbox] quota = \"best-effort\"): {e}"
                );
                prepare_workspace(&dir).await?;
                Ok(dir)
            }
        }
    }

    /// Writes `bytes` to `/workspace/DIR/NAME` of a conversation (the agent's attachments),
    /// inside the workspace's image. Created readable by the sandbox user, replacing an
    /// earlier copy; `name` is one path component.
    pub async fn write_workspace_file(
        &self,
        conversation_id: &str,
        dir: &str,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<PathBuf, SandboxError> {
        let slot = self.slot(conversation_id)?;
        slot.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = BusyGuard(Arc::clone(&slot));
        self.ensure_workspace(conversation_id).await?;
        write_into_workspace(&self.data_dir, conversation_id, dir, name, bytes).await
    }

    /// Runs [`Sandbox::reap_idle`] periodically until `shutdown` is cancelled, then removes
    /// every container ([`Sandbox::shutdown`]).
    pub fn spawn_reaper(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let period = Duration::from_secs((self.cfg.idle_timeout_secs / 4).clamp(1, 60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => { self.reap_idle().await; }
                }
            }
            self.shutdown().await;
        })
    }

    /// Removes every container this node owns (warm ones and labelled leftovers).
    pub async fn shutdown(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            let id = slot.warm.lock().await.take();
            if let Some(id) = id {
                self.remove(&id).await;
            }
        }
        match self.labelled_containers().await {
            Ok(ids) => {
                for id in ids {
                    self.remove(&id).await;
                }
            }
            Err(e) => tracing::warn!(cause = %e, "could not list sandbox containers at shutdown"),
        }
        self.unmount_all().await;
    }

    /// Runs one command in the conversation's container (internal entry point for tools).
    ///
    /// On timeout the container is removed. If the container vanished (reaped, crashed, or
    /// removed by hand), it is recreated once and the command retried.
    pub(crate) async fn exec(
        &self,
        conversation_id: &str,
        cmd: Vec<String>,
        stdin: Option<Vec<u8>>,
        cap: usize,
    ) -> Result<ExecOutput, SandboxError> {
        let slot = self.slot(conversation_id)?;
        slot.busy.fetch_add(1, Ordering::SeqCst);
        let _busy = BusyGuard(Arc::clone(&slot));
        slot.touch();
        let limit = Duration::from_secs(self.cfg.tool_timeout_secs.max(1));
        let mut retried = false;
        loop {
            let id = self.ensure_in(&slot, conversation_id).await?;
            let deadline = tokio::time::Instant::now() + limit;
            let res = exec::run(
                &self.docker,
                &id,
                cmd.clone(),
                stdin.clone(),
                cap,
                deadline,
                limit,
            )
            .await;
            match res {
                Err(SandboxError::Timeout(d)) => {
                    tracing::info!(conversation = %conversation_id, "tool call timed out; resetting sandbox");
                    self.reset(&slot, &id).await;
                    return Err(SandboxError::Timeout(d));
                }
                Err(SandboxError::Docker { source, .. }) if !retried && container_gone(&source) => {
                    tracing::debug!(conversation = %conversation_id, cause = %source, "sandbox container gone; recreating");
                    self.reset(&slot, &id).await;
                    retried = true;
                }
                Ok(mut out) if exec::hit_process_limit(&out) => {
                    tracing::info!(conversation = %conversation_id, "process limit reached; resetting sandbox");
                    self.reset(&slot, &id).await;
                    out.note = Some(format!(
                        "the process limit (pids_limit = {}) was reached, so the sandbox was \
                         reset: files in /workspace are kept, /tmp and background processes \
                         are gone",
                        self.cfg.pids_limit
                    ));
                    return Ok(out);
                }
                other => return other,
            }
        }
    }

    fn slot(&self, conversation_id: &str) -> Result<Arc<Slot>, SandboxError> {
        check_conversation_id(conversation_id)?;
        let mut slots = lock(&self.slots);
        Ok(Arc::clone(
            slots.entry(conversation_id.to_string()).or_insert_with(|| {
                Arc::new(Slot {
                    warm: tokio::sync::Mutex::new(None),
                    busy: AtomicUsize::new(0),
                    last_used: Mutex::new(Instant::now()),
                })
            }),
        ))
    }

    async fn ensure_in(&self, slot: &Slot, conversation_id: &str) -> Result<String, SandboxError> {
        let mut warm = slot.warm.lock().await;
        if let Some(id) = warm.as_ref() {
            return Ok(id.clone());
        }
        let id = self.create(conversation_id).await?;
        *warm = Some(id.clone());
        Ok(id)
    }

    /// Forgets `id` if it is the slot's current container, and removes it.
    async fn reset(&self, slot: &Slot, id: &str) {
        {
            let mut warm = slot.warm.lock().await;
            if warm.as_deref() == Some(id) {
                *warm = None;
            }
        }
        self.remove(id).await;
    }

    async fn create(&self, conversation_id: &str) -> Result<String, SandboxError> {
        let workspace = self.ensure_workspace(conversation_id).await?;
        let Some(ws) = workspace.to_str() else {
            return Err(SandboxError::Rootfs(format!(
                "workspace path {} is not UTF-8",
                workspace.display()
            )));
        };
        let labels = HashMap::from([
            (LABEL_SANDBOX.to_string(), "1".to_string()),
            (LABEL_NODE.to_string(), self.node_id.clone()),
            (LABEL_CONVERSATION.to_string(), conversation_id.to_string()),
        ]);
        let body = hardened_body(
            &self.cfg,
            &self.cfg.image,
            vec!["/bin/sh".into(), "-c".into(), IDLE_CMD.into()],
            labels,
            Some(ws),
            &self.mounts,
        );
        let name = self.container_name(conversation_id);
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = match self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                // A container of that name survived somewhere (a previous run): replace it.
                self.remove(&name).await;
                self.docker.create_container(Some(opts), body).await
            }
            other => other,
        }
        .map_err(|e| image_hint(e, &self.cfg.image))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.remove(&created.id).await;
            return Err(SandboxError::docker("container start")(e));
        }
        tracing::debug!(conversation = %conversation_id, container = %name, "sandbox container started");
        Ok(created.id)
    }

    async fn labelled_containers(&self) -> Result<Vec<String>, SandboxError> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_SANDBOX}=1"),
                format!("{LABEL_NODE}={}", self.node_id),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(SandboxError::docker("container list"))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    async fn remove(&self, id: &str) {
        remove_container(&self.docker, id).await;
    }
}

/// Force-removes a container (SIGKILL to everything in it); a missing container is fine.
pub(crate) async fn remove_container(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => {}
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        // Another task is removing it already (an MCP server stopping at shutdown).
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            message,
        }) if message.contains("already in progress") => {}
        Err(e) => tracing::warn!(container = %id, cause = %e, "could not remove sandbox container"),
    }
}

/// Did an exec fail because its container is missing or stopped?
fn container_gone(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404 | 409,
            ..
        }
    )
}

fn image_hint(e: bollard::errors::Error, image: &str) -> SandboxError {
    if let bollard::errors::Error::DockerResponseServerError {
        status_code: 404,
        message,
    } = &e
        && message.to_lowercase().contains("image")
    {
        return SandboxError::Rootfs(format!(
            "image {image} not found ({message}); run `iom sandbox build`"
        ));
    }
    SandboxError::docker("container create")(e)
}

/// Writes `bytes` to `workspace/DIR/NAME` of a conversation as the workspace is now (mounted
/// by [`Sandbox::write_workspace_file`]). `name` is one path component (checked here); the
/// directory is made by us, so no symlink is followed into it from the container's side
/// except through `name`, which is replaced.
async fn write_into_workspace(
    data_dir: &Path,
    conversation_id: &str,
    dir: &str,
    name: &str,
    bytes: Vec<u8>,
) -> Result<PathBuf, SandboxError> {
    check_conversation_id(conversation_id)?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(SandboxError::BadConversationId(format!(
            "{conversation_id}/{name}"
        )));
    }
    let workspace = data_dir.join("workspaces").join(conversation_id);
    prepare_workspace(&workspace).await?;
    let dir = workspace.join(dir);
    prepare_workspace(&dir).await?;
    let path = dir.join(name);
    // Remove what is there first: the container could have put a symlink in its place.
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SandboxError::io(&path)(e)),
    }
    let tmp = dir.join(format!(".{name}.iom-partial"));
    let _ = tokio::fs::remove_file(&tmp).await;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .await
        .map_err(SandboxError::io(&tmp))?;
    // Flushed before it counts as written: a tokio file reports a failed write (no space)
    // only on the next operation.
    let written = match tokio::io::AsyncWriteExt::write_all(&mut f, &bytes).await {
        Ok(()) => tokio::io::AsyncWriteExt::flush(&mut f).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        // A full workspace: leave no partial file taking its space.
        drop(f);
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(SandboxError::io(&tmp)(e));
    }
    drop(f);
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(SandboxError::io(&path))?;
    Ok(path)
}

/// Conversation ids become directory and container names: keep them boring.
fn check_conversation_id(id: &str) -> Result<(), SandboxError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::BadConversationId(id.to_string()))
    }
}

/// Creates the workspace and makes it writable by the sandbox user.
async fn prepare_workspace(dir: &Path) -> Result<(), SandboxError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(SandboxError::io(dir))?;
    let mode = match std::os::unix::fs::chown(dir, Some(SANDBOX_UID), Some(SANDBOX_UID)) {
        Ok(()) => 0o750,
        // Not root and not the sandbox uid: let the container user in through the mode bits.
        // The data dir above is private to the node user.
        Err(_) => 0o777,
    };
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(SandboxError::io(dir))
}

/// The create request for a hardened container (shared with `check`).
pub(crate) fn hardened_body(
    cfg: &SandboxConfig,
    image: &str,
    cmd: Vec<String>,
    labels: HashMap<String, String>,
    workspace: Option<&str>,
    extra: &[ResolvedMount],
) -> ContainerCreateBody {
    let memory = i64::try_from(cfg.memory_mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    let nano_cpus = (cfg.cpus.clamp(0.01, 1024.0) * 1e9) as i64;
    let mut mounts = Vec::with_capacity(extra.len() + 1);
    if let Some(ws) = workspace {
        mounts.push(bind(ws, WORKSPACE, true));
    }
    for m in extra {
        mounts.push(bind(
            &m.host.to_string_lossy(),
            &m.container.to_string_lossy(),
            m.writable,
        ));
    }
    let host_config = HostConfig {
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some(nano_cpus),
        pids_limit: Some(cfg.pids_limit.max(8)),
        network_mode: Some("none".into()),
        readonly_rootfs: Some(true),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        tmpfs: Some(HashMap::from([(
            "/tmp".into(),
            "rw,noexec,nosuid,size=64m".into(),
        )])),
        mounts: Some(mounts),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(cmd),
        user: Some(format!("{SANDBOX_UID}:{SANDBOX_UID}")),
        env: Some(SANDBOX_ENV.iter().map(|s| (*s).to_string()).collect()),
        working_dir: Some(WORKSPACE.into()),
        hostname: Some("sandbox".into()),
        network_disabled: Some(true),
        labels: Some(labels),
        host_config: Some(host_config),
        ..Default::default()
    }
}

fn bind(host: &str, target: &str, writable: bool) -> Mount {
    Mount {
        typ: Some(MountType::BIND),
        source: Some(host.to_string()),
        target: Some(target.to_string()),
        read_only: Some(!writable),
        ..Default::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_cannot_escape_or_break_names() {
        for ok in ["c1", "0b7e-uuid-like-123", "a.b_c"] {
            assert!(check_conversation_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", "../x", "a/b", ".hidden", "a b", &"x".repeat(129)] {
            assert!(check_conversation_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_create_body_is_hardened() {
        let cfg = SandboxConfig::default();
        let b = hardened_body(&cfg, "img", vec![], HashMap::new(), Some("/w"), &[]);
        let h = b.host_config.unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(b.network_disabled, Some(true));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.memory, h.memory_swap);
        assert_eq!(h.memory, Some(256 << 20));
        assert_eq!(h.nano_cpus, Some(1_000_000_000));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(b.user.as_deref(), Some("1000:1000"));
        let env = b.env.unwrap();
        assert!(
            env.iter()
                .all(|e| e.starts_with("HOME=") || e.starts_with("PATH="))
        );
        let m = &h.mounts.unwrap()[0];
        assert_eq!(m.target.as_deref(), Some("/workspace"));
        assert_eq!(m.read_only, Some(false));
    }
}
