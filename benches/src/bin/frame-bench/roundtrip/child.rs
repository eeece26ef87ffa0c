//! One measurement per child process.
//!
//! glibc's malloc adapts its mmap and trim thresholds to the sizes a process has freed, so a
//! baseline measured after another one would inherit that history. Running each
//! (system, frame, variant) as `frame-bench roundtrip --in-process --json ...` in a fresh
//! process gives every measurement the same starting point; its own warm-up then reaches the
//! steady state of a process that does only that.

use super::report::Record;
use super::{Args, BenchError, FrameSize, SystemKind, Variant};
use std::process::{Command, Stdio};

/// Runs one measurement in a child process and returns its record. The child's stderr goes to
/// ours; a failing child (for example a round trip that read back wrong bytes) is an error.
pub(crate) fn measure_one(
    args: &Args,
    system: SystemKind,
    size: FrameSize,
    variant: Variant,
) -> Result<Record, BenchError> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["roundtrip", "--json", "--in-process"])
        .args(["--systems", system.label()])
        .args(["--frames", size.label()])
        .args(["--variants", variant.label()])
        .args(["--batch", &args.batch.to_string()]);
    if let Some(n) = args.min_iters {
        cmd.args(["--min-iters", &n.to_string()]);
    }
    if let Some(ms) = args.min_time_ms {
        cmd.args(["--min-time-ms", &ms.to_string()]);
    }
    if args.quick {
        cmd.arg("--quick");
    }
    let what = format!("{} {} {}", system.label(), size.label(), variant.label());
    let output = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
    if !output.status.success() {
        return Err(BenchError::Child {
            what,
            why: format!("exited with {}", output.status),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Record>(line).ok())
        .find(|r| r.system == system.label())
        .ok_or_else(|| BenchError::Child {
            what,
            why: format!("printed no record: {stdout:?}"),
        })
}
