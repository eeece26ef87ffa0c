//! Clients of a test store, every call on them with a deadline: a lost wake-up fails the test
//! instead of hanging it.

use staging_store::client::{Client, ClientError, FrameRef, Subscription};
use staging_store::proto::{Cursor, ErrorCode, FullPolicy, StoreError, StreamConfig};
use std::future::Future;
use std::time::{Duration, Instant};

/// Every await on the store gets a deadline: a lost wake-up fails the test instead of hanging.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("the store did not answer within 5 s")
}

/// The error code of a call that must fail with a store error.
pub fn failed<T>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => code(e),
    }
}

/// The code of a store error (any other error fails the test).
pub fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Store(StoreError { code, .. }) => code,
        other => panic!("expected a store error, got {other:?}"),
    }
}

/// A stream configuration that keeps `frames` consumed frames.
pub fn retaining(frames: u32) -> StreamConfig {
    StreamConfig {
        retain_frames: frames,
        ..Default::default()
    }
}

/// A stream configuration that holds at most `frames` frames, and does `on_full` when full.
pub fn bounded(frames: u32, on_full: FullPolicy) -> StreamConfig {
    StreamConfig {
        max_frames: frames,
        on_full,
        ..Default::default()
    }
}

/// A client named `name` connected to `addr` (`unix:…`, `tcp:…`).
pub async fn connect(addr: &str, name: &str) -> Client {
    within(Client::connect(addr, name)).await.unwrap()
}

/// `client` creates the stream `name` with `config` (it must not exist yet).
pub async fn create_stream(client: &Client, name: &str, config: StreamConfig) {
    within(client.create_stream(name, config, false))
        .await
        .unwrap();
}

/// A client named "producer" on the store's Unix socket that created `stream` with `config`.
pub async fn producer_of(store: &super::TestStore, stream: &str, config: StreamConfig) -> Client {
    let producer = connect(&store.unix(), "producer").await;
    create_stream(&producer, stream, config).await;
    producer
}

/// `client` subscribes to `stream` as `consumer` (`""`: anonymous) from `from`, with at most
/// `window` frames held at once.
pub async fn subscribe(
    client: &Client,
    stream: &str,
    consumer: &str,
    from: Cursor,
    window: u32,
) -> Subscription {
    within(client.subscribe(stream, consumer, from, window))
        .await
        .unwrap()
}

/// The next delivery of `sub`.
pub async fn next(sub: &mut Subscription) -> FrameRef {
    within(sub.next()).await.expect("a frame")
}

/// The store's live objects and the blocks they use, as `client` reads them.
pub async fn objects_and_blocks(client: &Client) -> (u64, u64) {
    let s = within(client.stat()).await.unwrap();
    (s.objects, s.blocks_in_use)
}

/// Polls `stat`-like state until `cond` holds, for events the store does not announce (a
/// client's disconnect being processed). Fails after 5 s.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
