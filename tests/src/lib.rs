//! Test harness for iom: helpers shared by the scenario tests and benchmarks.
//!
//! # Layout
//! - [`fake_anthropic`]: a fake Anthropic Messages API server (real HTTP and SSE) that the
//!   real Claude client reaches through `ANTHROPIC_BASE_URL`.
//! - [`harness`]: real `iom` processes in temporary data dirs.
//! - [`llama`]: a real local model (llama.cpp's `llama-server` with SmolLM2-135M from PyPI).
//! - [`maillab`]: a real Dovecot and Postfix for the email channel's tests.
//! - [`natlab`], [`natlab_mesh`]: network namespaces with NAT routers and a relay.
//! - [`soaklab`]: five namespaces on one switch, with partitions, for the soak.
//! - [`tmpfs`]: a small tmpfs to fill, for full-disk tests.
//! - [`webdriver`]: headless Chromium driven over WebDriver, for the web page's tests.

pub mod fake_anthropic;
pub mod harness;
pub mod llama;
pub mod maillab;
pub mod natlab;
pub mod natlab_mesh;
pub mod soaklab;
pub mod tmpfs;
pub mod webdriver;
