//! The agent role: Claude requests for the whole mesh, tools in Docker containers.

pub mod claude;
pub mod sandbox;
