//! One module per command group.

mod agent;
mod approvals;
mod ask;
mod backup;
mod blob;
mod completions;
mod doc;
mod doctor;
mod email;
mod events;
mod first_sync;
mod memory;
mod mesh;
mod models;
pub mod node;
pub mod relay;
mod schedule;
mod service;
mod status;
mod token;
mod tools;
mod usage;
mod webhook;

use std::path::PathBuf;

use iom_node::api::client::ApiClient;

use crate::Failure;
use crate::args::{Cli, Command, RelayCommand};

/// Global options every command sees.
pub struct Global {
    /// The data dir.
    pub data_dir: PathBuf,
    /// `--json`.
    pub json: bool,
}

impl Global {
    /// A client for the running node.
    pub fn client(&self) -> Result<ApiClient, Failure> {
        Ok(ApiClient::new(&self.data_dir)?)
    }
}

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let default_dir = || {
        iom_node::config::default_data_dir(
            std::env::var("XDG_DATA_HOME").ok(),
            std::env::var("HOME").ok(),
        )
    };
    let relay_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| default_dir().join("relay"));
    let data_dir = cli.data_dir.unwrap_or_else(default_dir);
    let g = Global {
        data_dir,
        json: cli.json,
    };
    match cli.command {
        Command::Init { name } => node::init(&g, name),
        Command::Node(cmd) => node::run(&g, cmd).await,
        Command::Status => status::status(&g).await,
        Command::Doc(cmd) => doc::run(&g, cmd).await,
        Command::Blob(cmd) => blob::run(&g, cmd).await,
        Command::Memory(cmd) => memory::run(&g, cmd).await,
        Command::Invite {
            ttl,
            admin,
            web,
            url,
        } => mesh::invite(&g, ttl, admin, web.then_some(url)).await,
        Command::Join {
            code,
            name,
            wait,
            no_wait,
        } => mesh::join(&g, code, name, mesh::JoinWait::from_flags(wait, no_wait)).await,
        Command::Devices { command } => mesh::devices(&g, command).await,
        Command::Ask(args) => ask::ask(&g, args).await,
        Command::Events => events::events(&g).await,
        Command::Chat { conversation } => agent::chat(&g, conversation).await,
        Command::Approvals { all, command } => approvals::run(&g, all, command).await,
        Command::Approve { id, reason } => approvals::answer(&g, &id, true, reason).await,
        Command::Deny { id, reason } => approvals::answer(&g, &id, false, reason).await,
        Command::Conversations(cmd) => agent::conversations(&g, cmd).await,
        Command::Agent(cmd) => agent::agent(&g, cmd).await,
        Command::Sandbox(cmd) => agent::sandbox(&g, cmd).await,
        Command::Token(cmd) => token::run(&g, cmd).await,
        Command::Schedule(cmd) => schedule::run(&g, cmd).await,
        Command::Models(cmd) => models::run(&g, cmd).await,
        Command::Tools(cmd) => tools::run(&g, cmd).await,
        Command::Webhook(cmd) => webhook::run(&g, cmd).await,
        Command::Doctor => doctor::run(&g).await,
        Command::Usage { days } => usage::run(&g, days).await,
        Command::Service(cmd) => service::run(&g, &relay_dir, cmd),
        Command::Completions { shell } => completions::completions(shell),
        Command::Man { out_dir } => completions::man(out_dir.as_deref()),
        Command::Email(cmd) => email::run(&g, cmd).await,
        Command::Backup(cmd) => backup::run(&g, cmd).await,
        Command::Person(cmd) => backup::person(&g, cmd).await,
        Command::Relay(RelayCommand::Run(args)) => Ok(relay::run(&relay_dir, g.json, args).await?),
    }
}
