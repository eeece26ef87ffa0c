//! Shared test helpers: a store served on its own thread, its clients (every call with a
//! deadline), and framed frames.
#![allow(dead_code, unreachable_pub)]

mod clients;

// Not every test file calls a store through the client library.
#[allow(unused_imports)]
pub use clients::*;

use capnp_rdma::frame::{FrameSpec, FrameWriter, PixelFormat};
use staging_store::server::{self, Bound, Listen};
use staging_store::store::{Store, StoreOptions};
use std::path::PathBuf;
use std::sync::mpsc;

/// A store running on a thread; stopped (gracefully) on drop.
pub struct TestStore {
    pub bound: Bound,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<staging_store::proto::StoreStat>>,
    pub dir: PathBuf,
}

impl TestStore {
    pub fn unix(&self) -> String {
        format!("unix:{}", self.bound.unix.as_ref().unwrap().display())
    }

    pub fn tcp(&self) -> String {
        format!("tcp:{}", self.bound.tcp.unwrap())
    }

    /// The control address without a transport prefix: RDMA when both sides can, else tcp.
    pub fn remote(&self) -> String {
        self.bound.tcp.unwrap().to_string()
    }

    /// Stops the store and returns its final counters.
    pub fn stop(mut self) -> staging_store::proto::StoreStat {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "staging-store-test-{tag}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Serves `make()`'s store on a Unix socket and loopback TCP.
pub fn start(tag: &str, make: impl FnOnce() -> Store + Send + 'static) -> TestStore {
    start_with(tag, None, make)
}

/// [`start`], with an RDMA handshake listener at `verbs` (which needs a device).
pub fn start_with(
    tag: &str,
    verbs: Option<std::net::SocketAddr>,
    make: impl FnOnce() -> Store + Send + 'static,
) -> TestStore {
    let dir = temp_dir(tag);
    let sock = dir.join("store.sock");
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            server::serve(
                make(),
                Listen {
                    unix: Some(sock),
                    tcp: Some("127.0.0.1:0".parse().unwrap()),
                    data: None,
                    metrics: Some("127.0.0.1:0".parse().unwrap()),
                    verbs,
                },
                |b| ready_tx.send(b.clone()).unwrap(),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap()
        })
    });
    let bound = ready_rx.recv().unwrap();
    TestStore {
        bound,
        stop: Some(stop_tx),
        thread: Some(thread),
        dir,
    }
}

/// A memory-backed store of `size` bytes with 64 KiB blocks.
pub fn memory_store(size: u64) -> Store {
    let region = capnp_rdma::Region::create(&capnp_rdma::RegionOptions::memfd(size)).unwrap();
    Store::new(region, StoreOptions::default(), None)
}

/// A framed I420 frame with `seq` stamped in its first luma bytes and sequence field.
pub fn framed(width: u32, height: u32, seq: u64) -> Vec<u8> {
    let mut message = capnp::message::Builder::new_default();
    let mut w = FrameWriter::init(
        &mut message,
        &FrameSpec::new(PixelFormat::I420, width, height),
    )
    .unwrap();
    w.builder().set_sequence(seq);
    w.plane_mut(0).unwrap()[..8].copy_from_slice(&seq.to_le_bytes());
    capnp::serialize::write_message_to_words(&message)
}

/// The stamp of a framed frame.
pub fn stamp(bytes: &[u8]) -> u64 {
    let (reader, _) = capnp_rdma::reader::read_frame(bytes, &Default::default()).unwrap();
    let view = capnp_rdma::frame::FrameView::new(&reader).unwrap();
    let seq = view.reader().get_sequence();
    assert_eq!(
        u64::from_le_bytes(view.plane(0).unwrap()[..8].try_into().unwrap()),
        seq
    );
    seq
}

/// Writes a 1080p I420 frame in place (where the client's transport sends it from): `seq`
/// stamped as [`framed`] does, chroma filled with `seq as u8`. Returns the sealed seq.
pub async fn in_place_frame(
    client: &staging_store::client::Client,
    stream: &str,
    seq: u64,
) -> Result<u64, staging_store::in_place::InPlaceError> {
    let spec = FrameSpec::new(PixelFormat::I420, 1920, 1080);
    let mut frame = staging_store::in_place::InPlace::create_frame(client, stream, &spec).await?;
    let mut w = frame.message_mut().init_frame(&spec)?;
    w.builder().set_sequence(seq);
    w.plane_mut(0)?[..8].copy_from_slice(&seq.to_le_bytes());
    w.plane_mut(1)?.fill(seq as u8);
    w.plane_mut(2)?.fill(!(seq as u8));
    frame.seal().await
}

/// Checks a frame written by [`in_place_frame`]: its stamp, and every chroma byte.
pub fn check_in_place(bytes: &[u8]) -> u64 {
    let seq = stamp(bytes);
    let (reader, _) = capnp_rdma::reader::read_frame(bytes, &Default::default()).unwrap();
    let view = capnp_rdma::frame::FrameView::new(&reader).unwrap();
    assert!(view.plane(1).unwrap().iter().all(|&b| b == seq as u8));
    assert!(view.plane(2).unwrap().iter().all(|&b| b == !(seq as u8)));
    seq
}
