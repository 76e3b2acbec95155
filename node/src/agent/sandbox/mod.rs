//! Locked-down Docker containers for tool calls (bollard).
