//! `frame-bench`: end-to-end benchmarks of capnp-rdma against the serializations a video
//! pipeline would otherwise use, each reported as a ratio against the staging path measured in
//! the same run.
//!
//! ```text
//! frame-bench roundtrip [--json] [--frames 720p,1080p,4k] [--systems staging,capnp-heap,prost]
//!                       [--variants pixels-ready,with-pixels] [--min-iters N]
//!                       [--min-time-ms MS] [--batch N] [--quick] [--in-process]
//! frame-bench transport [--json] [--frames 1080p,4k] [--systems raw-tcp,tcp,shm,shm-copy,verbs]
//!                       [--window N] [--min-frames N] [--min-time-ms MS] [--warmup-frames N]
//!                       [--quick] [--ib-write-bw 1080p=MB_S,4k=MB_S]
//! frame-bench store     [--json] [--frames 1080p,4k] [--systems control,store-shm,store-tcp,redis]
//!                       [--in-flight N] [--min-frames N] [--min-time-ms MS] [--warmup-frames N]
//!                       [--quick]
//! ```
//!
//! Every round trip checks what it read back, and every transported frame is checked where it
//! landed; a wrong byte makes the process exit non-zero.

use capnp_rdma_benches::CountingAlloc;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod common;
mod roundtrip;
mod store;
mod transport;

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Benchmarks for capnp-rdma.
#[derive(Debug, Parser)]
#[command(name = "frame-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build, frame and read back one video frame per iteration, for each system.
    Roundtrip(roundtrip::Args),
    /// Stream frames from a writer to a target in this process over each transport backend,
    /// against a plain TCP socket pair.
    Transport(transport::Args),
    /// Carry frames producer → store → consumer through the staging store (shm, tcp) and
    /// through Redis, measured in the same run.
    Store(store::Args),
    /// A staging store server for `store` (started by it; stops when its stdin closes).
    #[command(hide = true)]
    StoreServer(store::ServerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Roundtrip(args) => roundtrip::run(&args).map_err(Into::into),
        Command::Transport(args) => transport::run(&args).map_err(Into::into),
        Command::Store(args) => store::run(&args).map_err(Into::into),
        Command::StoreServer(args) => store::serve(&args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("frame-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
