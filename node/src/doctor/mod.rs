//! `iom doctor`: checks of this device's set-up, each a [`Finding`] with a severity and what to
//! do. The node serves them at `GET /v1/doctor`; with the node down the CLI runs the checks
//! that need no running node itself ([`probe::offline`]).
//!
//! # Layout
//! - [`checks`]: pure functions from observed facts to findings (unit-tested).
//! - [`probe`]: gathers the facts (Docker, the disk, the API key, the running node's peers).

pub mod checks;
pub mod probe;

use serde::{Deserialize, Serialize};

/// How bad a finding is. `iom doctor` exits 1 when any finding is an [`Severity::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Fine.
    Ok,
    /// Worth knowing; nothing is broken.
    Info,
    /// Something works worse than it could, or will break soon.
    Warning,
    /// Something is broken.
    Error,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// A stable name of the check (`docker`, `sandbox_image`, `relay`, `disk`, ...).
    pub check: String,
    /// How bad it is.
    pub severity: Severity,
    /// What was found.
    pub detail: String,
    /// What to do about it (empty when nothing needs doing).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Finding {
    /// A finding.
    pub fn new(
        check: &str,
        severity: Severity,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check: check.into(),
            severity,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    /// An `ok` finding.
    pub fn ok(check: &str, detail: impl Into<String>) -> Finding {
        Finding::new(check, Severity::Ok, detail, "")
    }
}

/// The worst severity among `findings` (`Ok` for none).
pub fn worst(findings: &[Finding]) -> Severity {
    findings
        .iter()
        .map(|f| f.severity)
        .max()
        .unwrap_or(Severity::Ok)
}
