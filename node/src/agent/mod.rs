//! The agent role: Claude requests for the whole mesh, tools in Docker containers.

pub mod ask;
pub mod claude;
pub mod progress;
pub mod role;
pub mod runner;
pub mod sandbox;
