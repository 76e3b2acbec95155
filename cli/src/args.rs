//! Command-line arguments (clap). The contract is in `docs/cli.md`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// iom: your devices as one private mesh, with one AI assistant.
#[derive(Debug, Parser)]
#[command(name = "iom", version, about, propagate_version = true)]
pub struct Cli {
    /// Data directory [default: $XDG_DATA_HOME/iom or ~/.local/share/iom].
    #[arg(long, global = true, env = "IOM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `iom ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The prompt; `-` reads it from stdin.
    pub prompt: String,
    /// Continue this conversation.
    #[arg(long, short)]
    pub conversation: Option<String>,
    /// Return at once with the request id; don't wait for the answer (exit code 4).
    #[arg(long)]
    pub no_wait: bool,
    /// Attach a file (repeatable): stored as a blob, copied into the agent's tool workspace
    /// at /workspace/attachments/NAME, and named in the prompt.
    #[arg(long = "file", short = 'f', value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Output: `text` (stream as it comes), `json` (one object at the end; `--json` is the
    /// same), `markdown` (the answer and its tool calls as a Markdown document).
    #[arg(long, short, value_enum)]
    pub output: Option<OutputFormat>,
    /// Don't read stdin even when it is not a terminal.
    #[arg(long)]
    pub no_stdin: bool,
    /// Answer with this model: a provider of `iom models list` (`NAME`), or one of its models
    /// (`NAME/MODEL`). Default: the mesh's default model.
    #[arg(long, short = 'm', value_name = "NAME[/MODEL]")]
    pub model: Option<String>,
}

/// `iom ask --output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Stream the answer text to stdout, progress to stderr.
    Text,
    /// One JSON object at the end.
    Json,
    /// A Markdown document at the end.
    Markdown,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create keys for this device (and the person key, for a new mesh).
    Init {
        /// Name of this device.
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show this node's status.
    Status,
    /// Versioned documents.
    #[command(subcommand)]
    Doc(DocCommand),
    /// Content-addressed blobs.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// The memory document (sent to the assistant as its system prompt).
    #[command(subcommand)]
    Memory(MemoryCommand),
    /// Invite a new device (prints a code and a QR code).
    Invite {
        /// How long the invite is valid (e.g. 15m, 1h, 90s).
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        ttl: std::time::Duration,
        /// Make the new device an admin (it can invite and revoke).
        #[arg(long)]
        admin: bool,
        /// Invite a browser: print an https:// URL (and its QR code) that pairs the browser
        /// that opens it as a device of the mesh.
        #[arg(long, conflicts_with = "admin")]
        web: bool,
        /// The URL's origin for `--web` (e.g. `https://home.example:8443`); default: this
        /// node's HTTPS listener.
        #[arg(long, value_name = "URL", requires = "web")]
        url: Option<String>,
    },
    /// Join a mesh with an invite code from one of its admin devices. At a terminal it then
    /// waits for the first sync with a progress bar (Ctrl-C stops waiting, not the sync).
    Join {
        /// The invite code (iom1...).
        code: String,
        /// Name of this device.
        #[arg(long)]
        name: Option<String>,
        /// Wait for the first sync even when not at a terminal (for scripts); exit 1 if no
        /// peer is reachable within 60 s or the sync makes no progress for 120 s.
        #[arg(long, conflicts_with = "no_wait")]
        wait: bool,
        /// Return as soon as the device is trusted, without waiting for the first sync.
        #[arg(long)]
        no_wait: bool,
    },
    /// Ask the assistant (runs on the agent device; streams the answer). Piped input is part
    /// of the prompt: `cat log.txt | iom ask "what failed?"`, or `iom ask -` for stdin alone.
    /// Exit codes: 0 answered, 1 failed, 2 bad usage, 3 daily token budget exceeded,
    /// 4 queued (--no-wait, or the agent is unreachable).
    Ask(AskArgs),
    /// Print every event of the mesh as JSON lines (the WebSocket API, `GET /v1/ws`, over the
    /// node's socket): request progress and answers of every device, document changes.
    Events,
    /// Chat with the assistant interactively (one conversation; empty line or Ctrl-D ends).
    Chat {
        /// Continue this conversation.
        #[arg(long, short)]
        conversation: Option<String>,
    },
    /// Approval requests of risky tool calls: list them (pending ones; `--all` for every one),
    /// and the mesh's policy (`iom approvals policy ...`).
    Approvals {
        /// Every approval, decided ones too.
        #[arg(long)]
        all: bool,
        /// The policy.
        #[command(subcommand)]
        command: Option<ApprovalsCommand>,
    },
    /// Approve a pending tool call (admin devices only): the agent runs it.
    Approve {
        /// Approval id (see `iom approvals`).
        id: String,
        /// A note for the record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a pending tool call (admin devices only): it does not run and the request fails.
    Deny {
        /// Approval id (see `iom approvals`).
        id: String,
        /// Why (shown where the request failed).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Conversations with the assistant.
    #[command(subcommand)]
    Conversations(ConversationsCommand),
    /// The agent role.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The Docker sandbox for tool calls (works without a running node).
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Run a relay node (on a cloud VM) that makes devices behind NAT reachable.
    #[command(subcommand)]
    Relay(RelayCommand),
    /// Bearer tokens for the HTTP API (`iom node run --http`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Prompts the agent runs on a schedule (cron, UTC).
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Model providers of the mesh (Anthropic, OpenAI-compatible, local servers), the
    /// default model and the fallback chain.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The agent's MCP servers (declared in the mesh; each runs in a locked-down container on
    /// the agent node).
    #[command(subcommand)]
    Tools(ToolsCommand),
    /// Webhook answers posted to callback URLs: which are pending or given up; retry or drop.
    #[command(subcommand)]
    Webhook(WebhookCommand),
    /// Check this device's set-up (Docker, sandbox image, relay, disk, keys) and say what to
    /// fix; exits 1 when something is wrong.
    Doctor,
    /// Tokens and cost of the assistant per day, asking device, model and conversation (from
    /// the conversations this device holds), and the budgets when this device is the agent.
    Usage {
        /// Days covered, today included.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Run the node (or the relay) as a systemd service.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print a shell completion script: `source <(iom completions bash)`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory.
    Man {
        /// Write `iom.1` and a page per subcommand (`iom-node-run.1`, ...) into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// The email channel of this node (`[email]` in its config.toml).
    #[command(subcommand)]
    Email(EmailCommand),
    /// Encrypted backups of this device: create, list, verify, restore.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// The person key's recovery kit: export it, or import it on another device of the mesh.
    #[command(subcommand)]
    Person(PersonCommand),
    /// List this mesh's devices, or revoke one.
    Devices {
        /// `revoke DEVICE`.
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
}

/// `iom service ...`.
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write the unit file, reload systemd and enable and start the service.
    Install(ServiceArgs),
    /// Stop and disable the service and remove its unit file.
    Uninstall(ServiceArgs),
    /// Whether the unit is installed, enabled and active.
    Status(ServiceArgs),
    /// Print the unit file that `install` would write (nothing is changed).
    Show(ServiceArgs),
}

/// Flags shared by `iom service ...`.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// A user unit (`~/.config/systemd/user`, `systemctl --user`) instead of a system unit.
    #[arg(long)]
    pub user: bool,
    /// The relay (`iom relay run`) instead of the node.
    #[arg(long)]
    pub relay: bool,
    /// System units: the user the service runs as [default: $SUDO_USER, else $USER; none
    /// for root].
    #[arg(long, value_name = "USER", conflicts_with = "user")]
    pub run_as: Option<String>,
    /// Extra arguments for `iom node run` / `iom relay run` in the unit (after `--`).
    #[arg(last = true, value_name = "RUN_ARGS")]
    pub run_args: Vec<String>,
    /// Write the unit here instead of the systemd directory (and do not call systemctl).
    #[arg(long, value_name = "DIR", hide = true, env = "IOM_SERVICE_UNIT_DIR")]
    pub unit_dir: Option<PathBuf>,
}

/// `iom email ...`.
#[derive(Debug, Subcommand)]
pub enum EmailCommand {
    /// The IMAP connection, the last mail seen, counts and recent failures.
    Status,
}

/// `iom webhook ...`.
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Callbacks still being delivered, and the ones given up after every attempt failed.
    Callbacks,
    /// Deliver a given-up callback again (a fresh set of attempts).
    Retry {
        /// The request id (`wh-…`).
        request_id: String,
    },
    /// Forget a given-up callback.
    Drop {
        /// The request id (`wh-…`).
        request_id: String,
    },
}

/// `iom token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token (printed once; only its hash is stored).
    Create {
        /// A name to recognise it by.
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (ids and names, never the tokens).
    List,
    /// Revoke a token by id (or unique name).
    Revoke {
        /// Token id or name.
        id: String,
    },
}

/// `iom approvals ...`.
#[derive(Debug, Subcommand)]
pub enum ApprovalsCommand {
    /// The mesh's approval policy (synced to every device).
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// `iom approvals policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the rules and the timeout.
    List,
    /// Mark a tool (a glob: `bash`, `mcp__git__*`, `*`) `ask`, `allow` or `deny`, optionally
    /// only for calls whose arguments match `--args` (a glob over each argument value).
    Set {
        /// Tool name or glob.
        tool: String,
        /// What to do with a matching call.
        #[arg(value_parser = ["ask", "allow", "deny"])]
        action: String,
        /// Only calls with an argument matching this glob (e.g. `*rm -rf*`).
        #[arg(long)]
        args: Option<String>,
    },
    /// Remove a rule.
    Remove {
        /// Tool name or glob of the rule.
        tool: String,
        /// The rule's argument glob.
        #[arg(long)]
        args: Option<String>,
    },
    /// How long an approval waits for an answer before it counts as denied (default 10m).
    Timeout {
        /// e.g. 10m, 90s, 1h.
        #[arg(value_parser = parse_duration)]
        duration: std::time::Duration,
    },
}

/// `iom schedule ...`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule: `iom schedule add "0 9 * * Mon-Fri" "Plan my day"`.
    Add {
        /// Cron expression, five fields `MIN HOUR DAY MONTH WEEKDAY`, in UTC.
        cron: String,
        /// The prompt sent to the agent at each slot.
        prompt: String,
        /// Post into this conversation (default: a new conversation for this schedule).
        #[arg(long, short)]
        conversation: Option<String>,
        /// Also deliver each result by mail: `email` (to the owner address of the node whose
        /// `[email]` is configured).
        #[arg(long, value_parser = ["email"])]
        to: Option<String>,
        /// The model its requests ask for (`NAME` or `NAME/MODEL`; default: the mesh's).
        #[arg(long, short = 'm', value_name = "NAME[/MODEL]")]
        model: Option<String>,
    },
    /// List schedules with their next and last slots.
    List,
    /// Remove a schedule.
    Remove {
        /// Schedule id.
        id: String,
    },
    /// Stop a schedule from firing, keeping it (and its history) for later.
    Disable {
        /// Schedule id.
        id: String,
    },
    /// Let a disabled schedule fire again, from its next slot (slots missed while it was
    /// disabled do not fire).
    Enable {
        /// Schedule id.
        id: String,
    },
}

/// `iom models ...`.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Add (or replace) a provider: `iom models add local --kind openai --base-url
    /// http://127.0.0.1:8080 --model smollm2 --local`. Keys stay on the agent device: name
    /// the environment variable (`--key-env`) or key file (`--key-file`) that holds it there.
    Add(ModelsAddArgs),
    /// List the providers, the default and the fallback chain.
    List,
    /// Remove a provider.
    Remove {
        /// Provider name.
        name: String,
    },
    /// Set the default model (`NAME` or `NAME/MODEL`); with `--fallback`, also the providers
    /// tried after it, in order.
    Default {
        /// Provider name, or `NAME/MODEL`.
        model: String,
        /// Providers tried in order when the chosen one is overloaded, out of quota or
        /// unreachable (comma-separated).
        #[arg(long, value_delimiter = ',')]
        fallback: Option<Vec<String>>,
    },
}

/// `iom models add`.
#[derive(Debug, clap::Args)]
pub struct ModelsAddArgs {
    /// Provider name (letters, digits, `-`, `_`, `.`), as used by `--model NAME`.
    pub name: String,
    /// The API it speaks: `anthropic` (Messages API) or `openai` (chat completions).
    #[arg(long, value_parser = ["anthropic", "openai"])]
    pub kind: String,
    /// Base URL without the API path (required for `openai`; default for `anthropic`: the
    /// hosted API).
    #[arg(long)]
    pub base_url: Option<String>,
    /// Model name sent to the server.
    #[arg(long)]
    pub model: String,
    /// Environment variable on the agent device that holds the key.
    #[arg(long)]
    pub key_env: Option<String>,
    /// Key file on the agent device (mode 0600).
    #[arg(long)]
    pub key_file: Option<String>,
    /// `max_tokens` per reply.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// A local server: tried whenever the others fail, so the assistant answers offline.
    #[arg(long)]
    pub local: bool,
    /// Tool choice on a request's first call: `auto`, `required`, `none`, `tool:NAME`, or for
    /// `openai` servers that ignore tool choice `schema` / `schema:NAME` (forced by a JSON
    /// schema on the reply).
    #[arg(long)]
    pub tool_choice: Option<String>,
    /// Retries of a failed call before the next provider answers.
    #[arg(long)]
    pub retries: Option<u32>,
    /// Longest wait in seconds for the response and each piece of the stream.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
}

/// `iom tools ...`.
#[derive(Debug, Subcommand)]
pub enum ToolsCommand {
    /// Declare an MCP server (admin devices only): `iom tools add time -- python3 -m
    /// mcp_server_time`. The agent node starts it in its own hardened container (no network)
    /// and offers its tools to the model as `mcp__NAME__TOOL`.
    Add {
        /// Server name: a-z, 0-9 and -, starting with a letter.
        name: String,
        /// The server's command in its container (after `--`); it speaks MCP on stdio.
        #[arg(required = true, last = true)]
        command: Vec<String>,
        /// Image to run it in (default: iom-sandbox-python:1, from `iom sandbox build --python`).
        #[arg(long)]
        image: Option<String>,
        /// An environment variable, `KEY=VALUE` (repeatable). Not for secrets: the declaration
        /// syncs to every device.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Mount a host path of the agent node, `HOST:CONTAINER[:ro|:rw]` (repeatable; read-only
        /// by default; checked against the agent's `[sandbox] allowed_roots`).
        #[arg(long = "mount", value_name = "HOST:CONTAINER")]
        mounts: Vec<String>,
        /// Per-call limit in seconds (default: `[sandbox] tool_timeout_secs`).
        #[arg(long)]
        timeout: Option<u64>,
        /// Add it disabled.
        #[arg(long)]
        disabled: bool,
        /// Replace a server of the same name.
        #[arg(long)]
        replace: bool,
        /// Let it reach HOST (`HOST[:PORT]`, `*.DOMAIN`; no port: 80 and 443) through the
        /// agent node's egress proxy (repeatable). Without this it has no network at all.
        #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
        allow_hosts: Vec<String>,
        /// A header the proxy adds to plain-HTTP requests to an allowed host, from a secret
        /// of the agent node: `'HOST=Authorization: Bearer {env:TOKEN}'` or `{file:/path}`
        /// (repeatable). The server never sees the value; a CONNECT (HTTPS) tunnel cannot
        /// carry it.
        #[arg(long = "secret-header", value_name = "HOST=HEADER: VALUE")]
        secret_headers: Vec<String>,
        /// Put a secret of the agent node into the server's environment:
        /// `'VAR={env:NAME}'` or `'VAR={file:/path}'` (repeatable). The server can read it and
        /// send it wherever its egress allows: prefer --secret-header.
        #[arg(long = "secret-env", value_name = "VAR={env:NAME}")]
        secret_env: Vec<String>,
    },
    /// List the MCP servers with their state (as the agent node reports it) and tools.
    List,
    /// Remove an MCP server (the agent stops it).
    Remove {
        /// Server name.
        name: String,
    },
    /// Run a disabled MCP server again.
    Enable {
        /// Server name.
        name: String,
    },
    /// Stop an MCP server, keeping its declaration.
    Disable {
        /// Server name.
        name: String,
    },
}

/// `iom relay ...`.
#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// Run the relay in the foreground until SIGINT/SIGTERM. Its data dir defaults to the
    /// platform data dir plus `/relay` (a relay needs no device keys).
    Run(crate::commands::relay::RelayRunArgs),
}

/// `iom conversations ...`.
#[derive(Debug, Subcommand)]
pub enum ConversationsCommand {
    /// List conversations, newest first.
    List,
    /// Show a conversation.
    Show {
        /// Conversation id.
        id: String,
    },
}

/// `iom agent ...`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Give the agent role to a device (by id or name).
    Assign {
        /// Device id or name.
        device: String,
    },
    /// Who holds the role, and its state.
    Status,
}

/// `iom sandbox ...`.
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Build the default sandbox image locally (no registry needed); with `--python`, the
    /// fuller image for MCP servers instead.
    Build {
        /// Import this root filesystem (a directory or a tar/tar.gz) instead of busybox.
        #[arg(long, value_name = "DIR|TAR", conflicts_with = "python")]
        rootfs: Option<std::path::PathBuf>,
        /// Build iom-sandbox-python:1: Debian (debootstrap, needs root) with python3, pip, git
        /// and tzdata, the debootstrap result cached so a rebuild is fast.
        #[arg(long)]
        python: bool,
        /// With --python: install the wheels of this directory offline (from `pip download
        /// mcp-server-time -d DIR`; repeatable).
        #[arg(long, value_name = "DIR", requires = "python")]
        wheels: Vec<std::path::PathBuf>,
        /// With --wheels: install only these requirements (repeatable; default: every wheel).
        #[arg(long = "pip", value_name = "REQUIREMENT", requires = "wheels")]
        pip: Vec<String>,
        /// With --python: one more Debian package (repeatable), e.g. nodejs.
        #[arg(long = "apt", value_name = "PACKAGE", requires = "python")]
        apt: Vec<String>,
        /// With --python: the Debian suite (default trixie).
        #[arg(long, requires = "python")]
        suite: Option<String>,
        /// With --python: the Debian mirror (default: the first in the host's apt sources).
        #[arg(long, requires = "python")]
        mirror: Option<String>,
        /// With --python: the image tag (default iom-sandbox-python:1).
        #[arg(long, requires = "python")]
        tag: Option<String>,
    },
    /// Check the Docker set-up and say what to fix.
    Check,
}

/// `iom devices ...`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Revoke a device: every device disconnects it and refuses it from then on.
    Revoke {
        /// Device id, or its unique name.
        device: String,
    },
}

/// Parses `15m`, `1h`, `90s`, `2d` or plain seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (num, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .unwrap_or((text, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (like 15m, 1h, 90s)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use s, m, h or d)"
            ));
        }
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// `iom node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run the node in the foreground until SIGINT/SIGTERM.
    Run(NodeRunArgs),
}

/// Flags of `iom node run`.
#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// Listen address (multiaddr, or IP:PORT for TCP); repeatable.
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Relay address (/ip4/IP/tcp/PORT/p2p/RELAY_ID); repeatable.
    #[arg(long = "relay", value_name = "ADDR")]
    pub relays: Vec<String>,
    /// Serve the HTTP API and web page over plain HTTP on this loopback address (e.g.
    /// 127.0.0.1:8080).
    #[arg(long, value_name = "IP:PORT")]
    pub http: Option<String>,
    /// Allow `--http` on a non-loopback address (tokens and sessions then travel in clear).
    #[arg(long)]
    pub insecure_http: bool,
    /// Serve the HTTP API and web page over HTTPS on this address (e.g. 0.0.0.0:8443).
    #[arg(long, value_name = "IP:PORT")]
    pub https: Option<String>,
    /// PEM certificate chain for `--https` (with `--tls-key`); without: self-signed.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for `--https` (with `--tls-cert`).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Name of this device (used when the data dir is new).
    #[arg(long)]
    pub name: Option<String>,
}

/// `iom doc ...`.
#[derive(Debug, Subcommand)]
pub enum DocCommand {
    /// Create a document; prints its id.
    New {
        /// Kind: generic, conversation, memory, schedules, settings.
        #[arg(long, default_value = "generic")]
        kind: String,
        /// Initial content as a JSON object.
        #[arg(long)]
        content: Option<String>,
    },
    /// List documents.
    List,
    /// Show a document (or one value in it) as JSON.
    Get {
        /// Document id.
        id: String,
        /// Path inside the document (a.b.0).
        path: Option<String>,
        /// Read the version at these heads (comma-separated hashes, from `iom doc log`).
        #[arg(long, value_name = "HEADS")]
        at: Option<String>,
    },
    /// Set a value: `iom doc put ID PATH JSON` (a non-JSON value is taken as a string).
    Put {
        /// Document id.
        id: String,
        /// Path (a.b.0).
        path: String,
        /// Value as JSON, or plain text.
        value: Option<String>,
        /// Delete the value at the path instead.
        #[arg(long, conflicts_with = "value")]
        delete: bool,
        /// Change message shown by `iom doc log`.
        #[arg(long, short)]
        message: Option<String>,
    },
    /// Show a document's history: changes with author device, time and message.
    Log {
        /// Document id.
        id: String,
    },
}

/// `iom blob ...`.
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Store a file; prints its hash.
    Add {
        /// The file.
        file: PathBuf,
    },
    /// Write a blob to a file (verified against its hash).
    Get {
        /// The blob hash.
        hash: String,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List blobs.
    List,
}

/// `iom memory ...`.
#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// Print the memory text.
    Show,
    /// Append text (a new line) to the memory.
    Append {
        /// The text.
        text: String,
    },
    /// Edit the memory in $EDITOR.
    Edit,
}

/// How a backup or a kit is encrypted (one of the two; `IOM_PASSPHRASE` is the fallback).
#[derive(Debug, Args)]
pub struct SealArgs {
    /// Read the passphrase from the first line of this file.
    #[arg(long, value_name = "FILE", conflicts_with = "recipient")]
    pub passphrase_file: Option<PathBuf>,
    /// Encrypt to this age recipient key (age1…) instead of a passphrase.
    #[arg(long, value_name = "AGE_PUBKEY")]
    pub recipient: Option<String>,
}

/// How a backup is decrypted.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// Read the passphrase from the first line of this file.
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
    /// Decrypt with this age identity file (AGE-SECRET-KEY-1…), for archives made with
    /// `--recipient`.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
}

/// `iom backup ...`.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up this device (from the running node, or from its data dir when stopped).
    Create {
        /// A backup directory (incremental: blobs earlier archives there hold are not copied
        /// again) or one FILE.age [default: `[backup] dir` of the config].
        #[arg(long, value_name = "DIR|FILE")]
        to: Option<PathBuf>,
        /// Include the blobs.
        #[arg(long)]
        blobs: bool,
        /// Encryption.
        #[command(flatten)]
        seal: SealArgs,
    },
    /// List the archives of a backup directory (from their plaintext catalogs).
    List {
        /// The directory [default: `[backup] dir` of the config].
        dir: Option<PathBuf>,
    },
    /// Decrypt an archive and check every entry against its manifest hash.
    Verify {
        /// The archive.
        archive: PathBuf,
        /// Decryption.
        #[command(flatten)]
        unlock: UnlockArgs,
    },
    /// Restore an archive onto an empty data dir (`--data-dir`), as the same device.
    Restore {
        /// The archive.
        archive: PathBuf,
        /// Come back as a new device (fresh key) and revoke the old one (its key may be
        /// compromised).
        #[arg(long)]
        new_device: bool,
        /// Decryption.
        #[command(flatten)]
        unlock: UnlockArgs,
    },
}

/// `iom person ...`.
#[derive(Debug, Subcommand)]
pub enum PersonCommand {
    /// Export the person key as a recovery kit (passphrase-encrypted; also as words or a QR
    /// code to print).
    Export {
        /// Write the kit to this file (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Also print the key as recovery words (unencrypted: keep the paper safe).
        #[arg(long)]
        words: bool,
        /// Also print the encrypted kit as a QR code.
        #[arg(long)]
        qr: bool,
        /// Read the kit's passphrase from the first line of this file.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Import the person key from a recovery kit (or its words) onto this device; it can then
    /// invite and revoke.
    Import {
        /// The kit file.
        #[arg(required_unless_present = "words", conflicts_with = "words")]
        file: Option<PathBuf>,
        /// The recovery words (iomk1-…).
        #[arg(long, value_name = "WORDS")]
        words: Option<String>,
        /// Read the kit's passphrase from the first line of this file.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}
