//! Prometheus metrics: process-wide atomic counters that the services bump, and the text
//! exposition format (version 0.0.4) they are served in (`GET /metrics` on the node's HTTP
//! listener, `--metrics-listen` of the relay).
//!
//! The counters are per process: one node (or one relay) runs in one process. In-process tests
//! that run several nodes in one process share them, so those tests check gauges, not
//! counters; the real-process tests in `tests/tests/operations.rs` check the counters.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero (usable in a `static`).
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The node's counters.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// Bytes written in iom protocol frames (sync, blobs, agent, pairing), headers included.
    pub bytes_sent: Counter,
    /// Bytes read in iom protocol frames.
    pub bytes_received: Counter,
    /// Documents loaded from the store into memory (a miss of the document cache).
    pub docs_loaded: Counter,
    /// Requests this device's agent claimed and ran.
    pub asks: Counter,
    /// Requests that ended `failed`.
    pub asks_failed: Counter,
    /// Input tokens reported by the model API.
    pub tokens_input: Counter,
    /// Output tokens reported by the model API.
    pub tokens_output: Counter,
    /// Input tokens written to the prompt cache.
    pub tokens_cache_creation: Counter,
    /// Input tokens read from the prompt cache.
    pub tokens_cache_read: Counter,
    /// What the model calls cost, in nano-dollars (priced by the agent's price table).
    pub cost_nanos: Counter,
    /// Tool calls the agent ran in the sandbox.
    pub tool_calls: Counter,
    /// Tool calls that returned an error.
    pub tool_call_errors: Counter,
    /// Relay reservations accepted (first ones and renewals).
    pub relay_reservations: Counter,
    /// Hole punches (DCUtR) that gave a direct connection.
    pub hole_punches_ok: Counter,
    /// Hole punches that failed (the peer stays relayed).
    pub hole_punches_failed: Counter,
    /// Log events at WARN.
    pub log_warnings: Counter,
    /// Log events at ERROR.
    pub log_errors: Counter,
}

impl NodeCounters {
    /// All counters at zero.
    pub const fn new() -> NodeCounters {
        NodeCounters {
            bytes_sent: Counter::new(),
            bytes_received: Counter::new(),
            docs_loaded: Counter::new(),
            asks: Counter::new(),
            asks_failed: Counter::new(),
            tokens_input: Counter::new(),
            tokens_output: Counter::new(),
            tokens_cache_creation: Counter::new(),
            tokens_cache_read: Counter::new(),
            cost_nanos: Counter::new(),
            tool_calls: Counter::new(),
            tool_call_errors: Counter::new(),
            relay_reservations: Counter::new(),
            hole_punches_ok: Counter::new(),
            hole_punches_failed: Counter::new(),
            log_warnings: Counter::new(),
            log_errors: Counter::new(),
        }
    }
}

/// The relay's counters.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Reservations accepted (renewals included).
    pub reservations_accepted: Counter,
    /// Reservations denied (limits, rates).
    pub reservations_denied: Counter,
    /// Circuits accepted.
    pub circuits_accepted: Counter,
    /// Circuits denied.
    pub circuits_denied: Counter,
    /// Circuits closed.
    pub circuits_closed: Counter,
    /// Connections established.
    pub connections: Counter,
    /// TLS connections forwarded to a device by server name.
    pub tls_forwarded: Counter,
    /// TLS connections refused (no or unknown server name, garbage, limits).
    pub tls_refused: Counter,
}

impl RelayCounters {
    /// All counters at zero.
    pub const fn new() -> RelayCounters {
        RelayCounters {
            reservations_accepted: Counter::new(),
            reservations_denied: Counter::new(),
            circuits_accepted: Counter::new(),
            circuits_denied: Counter::new(),
            circuits_closed: Counter::new(),
            connections: Counter::new(),
            tls_forwarded: Counter::new(),
            tls_refused: Counter::new(),
        }
    }
}

static NODE: NodeCounters = NodeCounters::new();
static RELAY: RelayCounters = RelayCounters::new();

/// This process's node counters.
pub fn node() -> &'static NodeCounters {
    &NODE
}

/// This process's relay counters.
pub fn relay() -> &'static RelayCounters {
    &RELAY
}

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Builds a text exposition: `# HELP`, `# TYPE` and sample lines.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.header(name, help, "counter");
        let _ = writeln!(self.text, "{name} {value}");
        self
    }

    /// A counter without labels whose value is not a whole number (dollars, seconds).
    pub fn counter_f64(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.header(name, help, "counter");
        let _ = writeln!(self.text, "{name} {}", number(value));
        self
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.header(name, help, "gauge");
        let _ = writeln!(self.text, "{name} {}", number(value));
        self
    }

    /// A metric (`kind` is `counter` or `gauge`) with one sample per label set.
    pub fn labelled(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        samples: &[(Vec<(&str, String)>, f64)],
    ) -> &mut Self {
        self.header(name, help, kind);
        for (labels, value) in samples {
            let labels = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(self.text, "{name}{{{labels}}} {}", number(*value));
        }
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.text
    }
}

fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The relay's metrics in the text format; `connected_peers` is the swarm's current count.
pub fn render_relay(connected_peers: u64, allowed_devices: u64) -> String {
    let c = relay();
    let mut e = Exposition::new();
    e.gauge(
        "iom_relay_connected_peers",
        "Peers connected to the relay now.",
        connected_peers as f64,
    )
    .gauge(
        "iom_relay_allowed_devices",
        "Devices that proved a certificate of an allowed person (since start).",
        allowed_devices as f64,
    )
    .counter(
        "iom_relay_connections_total",
        "Connections established.",
        c.connections.get(),
    )
    .counter(
        "iom_relay_reservations_accepted_total",
        "Reservations accepted (renewals included).",
        c.reservations_accepted.get(),
    )
    .counter(
        "iom_relay_reservations_denied_total",
        "Reservations denied by limits or rates.",
        c.reservations_denied.get(),
    )
    .counter(
        "iom_relay_circuits_accepted_total",
        "Circuits accepted.",
        c.circuits_accepted.get(),
    )
    .counter(
        "iom_relay_tls_forwarded_total",
        "TLS connections forwarded to a device by server name.",
        c.tls_forwarded.get(),
    )
    .counter(
        "iom_relay_tls_refused_total",
        "TLS connections refused (no or unknown server name, garbage, limits).",
        c.tls_refused.get(),
    )
    .counter(
        "iom_relay_circuits_denied_total",
        "Circuits denied.",
        c.circuits_denied.get(),
    )
    .counter(
        "iom_relay_circuits_closed_total",
        "Circuits closed.",
        c.circuits_closed.get(),
    );
    e.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_samples() {
        let mut e = Exposition::new();
        e.counter("a_total", "A thing.\nTwo lines.", 3)
            .gauge("b", "B.", 1.5)
            .labelled(
                "c",
                "C.",
                "gauge",
                &[
                    (vec![("peer", "x\"y".to_string())], 2.0),
                    (vec![("peer", "z".to_string()), ("k", "v".into())], 0.0),
                ],
            );
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP a_total A thing.\\nTwo lines.\n# TYPE a_total counter\na_total 3\n\
             # HELP b B.\n# TYPE b gauge\nb 1.5\n\
             # HELP c C.\n# TYPE c gauge\nc{peer=\"x\\\"y\"} 2\nc{peer=\"z\",k=\"v\"} 0\n"
        );
    }

    #[test]
    fn counters_move() {
        let c = Counter::new();
        c.inc();
        c.add(41);
        assert_eq!(c.get(), 42);
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(7.0), "7");
    }

    #[test]
    fn relay_exposition_names_every_metric() {
        let text = render_relay(2, 1);
        for name in [
            "iom_relay_connected_peers 2",
            "iom_relay_allowed_devices 1",
            "iom_relay_reservations_accepted_total",
            "iom_relay_circuits_closed_total",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }
}
