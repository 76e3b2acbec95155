//! `GET /metrics`: the node's Prometheus metrics in the text exposition format. On the HTTP
//! listener it needs a bearer token like every API route; on the unix socket it is open to
//! whoever can open the socket (the device's user).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{CONTENT_TYPE, Exposition};
use crate::net::Link;
use crate::node::NodeCtx;

/// The metrics route.
pub fn routes() -> axum::Router<Arc<NodeCtx>> {
    axum::Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(ctx): State<Arc<NodeCtx>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&ctx))
}

/// The node's metrics: gauges read from the running services, then the process's counters.
pub fn render(ctx: &NodeCtx) -> String {
    let (direct, relayed, reserved) = {
        let peers = ctx.net.peers.read().unwrap_or_else(|e| e.into_inner());
        let count = |want: Link| peers.map.values().filter(|e| e.link() == want).count();
        (
            count(Link::Direct),
            count(Link::Relayed),
            peers.reservations.len(),
        )
    };
    let behind: Vec<(String, f64)> = ctx
        .sync
        .progress()
        .iter()
        .map(|s| {
            (
                s["device"].as_str().unwrap_or_default().to_string(),
                // To send, and waiting for the peer's news: both still to exchange.
                (s["docs_behind"].as_u64().unwrap_or(0) + s["docs_waiting"].as_u64().unwrap_or(0))
                    as f64,
            )
        })
        .collect();
    let behind_total: f64 = behind.iter().map(|(_, n)| n).sum();
    let c = crate::metrics::node();
    let mut e = Exposition::new();
    e.labelled(
        "iom_peers",
        "Connected peers by link kind.",
        "gauge",
        &two(
            "link",
            ("direct", direct as f64),
            ("relayed", relayed as f64),
        ),
    )
    .gauge(
        "iom_relay_reservations",
        "Relays holding a reservation for this device now.",
        reserved as f64,
    )
    .gauge(
        "iom_relays_configured",
        "Relays in the configuration.",
        ctx.config.relays.len() as f64,
    )
    .gauge(
        "iom_sync_docs_behind",
        "Sync lag: documents still to exchange with connected peers, all sessions together.",
        behind_total,
    )
    .labelled(
        "iom_sync_peer_docs_behind",
        "Sync lag per peer session: documents still to exchange.",
        "gauge",
        &behind
            .into_iter()
            .map(|(peer, n)| (vec![("peer", peer)], n))
            .collect::<Vec<_>>(),
    )
    .gauge(
        "iom_blob_bytes_pending",
        "Blob bytes still to fetch from peers.",
        ctx.blobs.pending_bytes() as f64,
    )
    .gauge(
        "iom_documents",
        "Documents held.",
        ctx.docs.with_inventory(iom_crdt::Inventory::len) as f64,
    )
    .gauge("iom_blobs", "Blobs held.", ctx.store.blob_count() as f64)
    .gauge(
        "iom_store_bytes",
        "Size of the store on disk.",
        ctx.store.size_on_disk() as f64,
    )
    .gauge(
        "iom_uptime_seconds",
        "Seconds since the node started.",
        ctx.started.elapsed().as_secs() as f64,
    )
    .gauge(
        "iom_agent_tokens_today",
        "Model tokens the agent used today (UTC), the daily budget's count.",
        ctx.agent.tokens_used_today() as f64,
    )
    .counter(
        "iom_bytes_sent_total",
        "Bytes sent in iom protocol frames (sync, blobs, agent, pairing).",
        c.bytes_sent.get(),
    )
    .counter(
        "iom_bytes_received_total",
        "Bytes received in iom protocol frames.",
        c.bytes_received.get(),
    )
    .counter(
        "iom_docs_loaded_total",
        "Documents loaded from the store into memory (misses of the document cache).",
        c.docs_loaded.get(),
    )
    .counter(
        "iom_asks_total",
        "Requests this device's agent ran.",
        c.asks.get(),
    )
    .counter(
        "iom_asks_failed_total",
        "Requests that ended failed (model errors, limits, budget).",
        c.asks_failed.get(),
    )
    .labelled(
        "iom_tokens_total",
        "Model tokens reported by the API, by direction.",
        "counter",
        &two(
            "direction",
            ("input", c.tokens_input.get() as f64),
            ("output", c.tokens_output.get() as f64),
        ),
    )
    .labelled(
        "iom_agent_tokens_total",
        "Model tokens this device's agent used, by kind (input not cached, output, input \
         written to and read from the prompt cache).",
        "counter",
        &[
            ("input", c.tokens_input.get()),
            ("output", c.tokens_output.get()),
            ("cache_creation", c.tokens_cache_creation.get()),
            ("cache_read", c.tokens_cache_read.get()),
        ]
        .map(|(kind, n)| (vec![("kind", kind.to_string())], n as f64)),
    )
    .counter_f64(
        "iom_agent_cost_usd_total",
        "What this device's agent spent on model calls, in US dollars (the agent's price \
         table; models without a price count 0).",
        crate::agent::cost::usd(c.cost_nanos.get()),
    )
    .counter(
        "iom_tool_calls_total",
        "Tool calls the agent ran in the sandbox.",
        c.tool_calls.get(),
    )
    .counter(
        "iom_tool_call_errors_total",
        "Tool calls that returned an error.",
        c.tool_call_errors.get(),
    )
    .counter(
        "iom_relay_reservations_accepted_total",
        "Relay reservations accepted (renewals included).",
        c.relay_reservations.get(),
    )
    .labelled(
        "iom_hole_punches_total",
        "Hole punches (DCUtR) by result.",
        "counter",
        &two(
            "result",
            ("ok", c.hole_punches_ok.get() as f64),
            ("failed", c.hole_punches_failed.get() as f64),
        ),
    )
    .labelled(
        "iom_errors_total",
        "Logged problems by level (every WARN and ERROR the node logged).",
        "counter",
        &two(
            "level",
            ("warn", c.log_warnings.get() as f64),
            ("error", c.log_errors.get() as f64),
        ),
    );
    e.finish()
}

/// Two samples of one metric that differ in one label.
fn two(
    label: &'static str,
    a: (&str, f64),
    b: (&str, f64),
) -> Vec<(Vec<(&'static str, String)>, f64)> {
    vec![
        (vec![(label, a.0.to_string())], a.1),
        (vec![(label, b.0.to_string())], b.1),
    ]
}
