//! The Prometheus text endpoint (`GET /metrics`), and the rendering it serves.
//!
//! Gauges: region bytes and blocks in use, objects, sessions, streams; per stream the retained
//! and unconsumed frames, bytes and grants being written; per consumer its cursor and
//! outstanding deliveries. Counters: creates, seals, gets, deliveries, releases, references
//! reclaimed from dead clients, aborted writes, errors, backpressure waits and refusals per
//! stream, recovered and corrupt frames, and the server's connection and data-byte counters.
//!
//! This module knows nothing of the server: it renders a [`MetricsSnapshot`], and its listener
//! takes a fresh one from the closure it is given for each scrape (the server builds them from
//! its store and its [`IoCounters`]).

use crate::proto::{StoreStat, StreamStat};
use crate::store::BlockCounts;
use capnp_rdma::RegionStats;
use std::fmt::Write as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Server-side counters (transport level), exported as metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCounters {
    /// Control connections accepted.
    pub connections: u64,
    /// Control connections closed for protocol errors.
    pub protocol_errors: u64,
    /// Control messages received.
    pub requests: u64,
    /// Bytes received on data connections into grants.
    pub data_bytes_in: u64,
    /// Bytes sent on data connections from frames.
    pub data_bytes_out: u64,
    /// Data writes refused (outside the grant, unknown object).
    pub data_rejected: u64,
    /// RC queue pairs of verbs clients connected to the region.
    pub verbs_connections: u64,
}

/// Everything [`render`] reads, taken at one instant.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Store-wide state and counters, as [`Store::stat_now`](crate::store::Store::stat_now)
    /// gives them (without waiting for the scrubber).
    pub stat: StoreStat,
    /// Where the region's blocks are ([`Store::blocks`](crate::store::Store::blocks)).
    pub blocks: BlockCounts,
    /// The region's counters (its scrubber's are rendered).
    pub region: RegionStats,
    /// Every stream's state with its consumers, sorted by name.
    pub streams: Vec<StreamStat>,
    /// The server's transport-level counters.
    pub io: IoCounters,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics in the Prometheus text format (version 0.0.4).
pub fn render(snapshot: &MetricsSnapshot) -> String {
    let MetricsSnapshot {
        stat,
        blocks,
        region,
        streams,
        io,
    } = snapshot;
    let mut s = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(s, "# HELP staging_store_{name} {help}");
        let _ = writeln!(s, "# TYPE staging_store_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(s, "staging_store_{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "region_bytes",
        "gauge",
        "Size of the staging region.",
        &one(stat.region_bytes),
    );
    metric(
        "block_bytes",
        "gauge",
        "Block size.",
        &one(stat.block_bytes),
    );
    metric(
        "blocks_total",
        "gauge",
        "Blocks in the region.",
        &one(stat.blocks_total),
    );
    metric(
        "blocks_in_use",
        "gauge",
        "Blocks held by frames, grants and sends in flight (stat's blocksInUse).",
        &one(blocks.held),
    );
    metric(
        "bytes_in_use",
        "gauge",
        "Bytes of the blocks held by frames, grants and sends in flight.",
        &one(blocks.held * stat.block_bytes),
    );
    metric(
        "blocks_recycled",
        "gauge",
        "Freed frames' blocks kept un-zeroed for dirtyOk creates (free for the store).",
        &one(blocks.recycled),
    );
    metric(
        "blocks_allocated",
        "gauge",
        "Blocks allocated in the region's bitmap: held, recycled and waiting to be zeroed.",
        &one(blocks.allocated),
    );
    metric(
        "scrub_pending_bytes",
        "gauge",
        "Released bytes waiting to be zeroed.",
        &one(region.scrub_pending),
    );
    metric(
        "scrubbed_bytes_total",
        "counter",
        "Bytes zeroed by the background scrubber.",
        &one(region.scrubbed_bytes),
    );
    metric(
        "objects",
        "gauge",
        "Grants and frames alive.",
        &one(stat.objects),
    );
    metric(
        "sessions",
        "gauge",
        "Connected clients.",
        &one(u64::from(stat.sessions)),
    );
    metric(
        "streams",
        "gauge",
        "Streams.",
        &one(u64::from(stat.streams)),
    );
    metric(
        "creates_total",
        "counter",
        "Grants handed out.",
        &one(stat.creates),
    );
    metric("seals_total", "counter", "Frames sealed.", &one(stat.seals));
    metric("gets_total", "counter", "Gets answered.", &one(stat.gets));
    metric(
        "deliveries_total",
        "counter",
        "Subscription deliveries.",
        &one(stat.deliveries),
    );
    metric(
        "releases_total",
        "counter",
        "References released by clients.",
        &one(stat.releases),
    );
    metric(
        "reclaimed_references_total",
        "counter",
        "References dropped because their client went away.",
        &one(stat.reclaimed_references),
    );
    metric(
        "aborted_writes_total",
        "counter",
        "Grants never sealed (aborted or writer gone).",
        &one(stat.aborted_writes),
    );
    metric(
        "errors_total",
        "counter",
        "Requests that failed.",
        &one(stat.errors),
    );
    metric(
        "recovered_frames_total",
        "counter",
        "Frames recovered from the persistence directory.",
        &one(stat.recovered_frames),
    );
    metric(
        "corrupt_frames_total",
        "counter",
        "Frames found corrupt at recovery.",
        &one(stat.corrupt_frames),
    );
    metric(
        "recycled_grants_total",
        "counter",
        "Grants served from a freed frame's blocks without zeroing.",
        &one(stat.recycled_grants),
    );
    metric(
        "connections_total",
        "counter",
        "Control connections.",
        &one(io.connections),
    );
    metric(
        "protocol_errors_total",
        "counter",
        "Connections closed for protocol errors.",
        &one(io.protocol_errors),
    );
    metric(
        "requests_total",
        "counter",
        "Control requests.",
        &one(io.requests),
    );
    metric(
        "data_bytes_in_total",
        "counter",
        "Bytes received into grants on data connections.",
        &one(io.data_bytes_in),
    );
    metric(
        "data_bytes_out_total",
        "counter",
        "Frame bytes sent on data connections.",
        &one(io.data_bytes_out),
    );
    metric(
        "data_rejected_total",
        "counter",
        "Data writes refused (outside the grant, unknown object).",
        &one(io.data_rejected),
    );
    metric(
        "verbs_connections_total",
        "counter",
        "RC queue pairs of verbs clients connected to the region (they move bytes by RDMA).",
        &one(io.verbs_connections),
    );
    let per_stream = |f: &dyn Fn(&StreamStat) -> u64| -> Vec<(String, u64)> {
        streams
            .iter()
            .map(|st| (format!("{{stream=\"{}\"}}", escape(&st.name)), f(st)))
            .collect()
    };
    metric(
        "stream_frames",
        "gauge",
        "Frames retained.",
        &per_stream(&|s| u64::from(s.frames)),
    );
    metric(
        "stream_bytes",
        "gauge",
        "Bytes of frames retained.",
        &per_stream(&|s| s.bytes),
    );
    metric(
        "stream_unconsumed_frames",
        "gauge",
        "Frames some consumer has not released.",
        &per_stream(&|s| u64::from(s.unconsumed_frames)),
    );
    metric(
        "stream_writing",
        "gauge",
        "Grants being written.",
        &per_stream(&|s| u64::from(s.writing)),
    );
    metric(
        "stream_sealed_total",
        "counter",
        "Frames sealed.",
        &per_stream(&|s| s.sealed_total),
    );
    metric(
        "stream_dropped_total",
        "counter",
        "Frames dropped by the drop-oldest policy.",
        &per_stream(&|s| s.dropped_total),
    );
    metric(
        "stream_backpressure_waits_total",
        "counter",
        "Creates that waited for room.",
        &per_stream(&|s| s.blocked_creates),
    );
    metric(
        "stream_backpressure_rejections_total",
        "counter",
        "Creates refused: stream full, or timed out waiting.",
        &per_stream(&|s| s.rejected_creates),
    );
    let per_consumer = |f: &dyn Fn(&crate::proto::ConsumerStat) -> u64| -> Vec<(String, u64)> {
        streams
            .iter()
            .flat_map(|st| {
                st.consumers.iter().map(move |c| {
                    (
                        format!(
                            "{{stream=\"{}\",consumer=\"{}\"}}",
                            escape(&st.name),
                            escape(&c.name)
                        ),
                        f(c),
                    )
                })
            })
            .collect()
    };
    metric(
        "consumer_committed",
        "gauge",
        "Every frame before this sequence number is released.",
        &per_consumer(&|c| c.committed),
    );
    metric(
        "consumer_outstanding",
        "gauge",
        "Deliveries held and not released.",
        &per_consumer(&|c| u64::from(c.outstanding)),
    );
    s
}

/// Serves `GET /metrics` (any path, in fact) over plain HTTP/1.0-style responses, rendering
/// the snapshot `snapshot` returns when each connection is accepted.
pub(crate) async fn serve(listener: TcpListener, snapshot: impl Fn() -> MetricsSnapshot) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let body = render(&snapshot());
        tokio::task::spawn_local(async move {
            // Read the request head (bounded); the answer does not depend on it.
            let mut head = [0u8; 4096];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut head))
                .await;
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
