//! Hybrid completion-queue polling: spin, then arm, re-poll, and sleep on the channel fd.
//!
//! ```text
//!  poll ×N ──found──▶ return
//!    │ empty
//!  ibv_req_notify_cq ─▶ poll once more ──found──▶ return   (closes the arm/complete race)
//!    │ empty
//!  await channel fd (tokio AsyncFd) ─▶ ibv_get_cq_event ─▶ (ack in batches) ─▶ poll ×N ...
//! ```
//!
//! The spin budget adapts: completions found while spinning keep it (up to the configured
//! maximum), a sleep halves it, so a busy connection polls without system calls and an idle
//! one sleeps without burning a core.

use crate::transport::TransportError;
use rdma_mummy_sys::{
    ibv_ack_cq_events, ibv_comp_channel, ibv_cq, ibv_get_cq_event, ibv_req_notify_cq,
};
use sideway::ibverbs::completion::{
    BasicCompletionQueue, CompletionChannel, CompletionQueue, PollCompletionQueueError,
};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Events are acknowledged in batches of this many (each ack takes a lock in libibverbs).
const ACK_BATCH: u32 = 16;

/// One polled work completion, copied out of the CQ.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Wc {
    pub(crate) wr_id: u64,
    pub(crate) status: u32,
    pub(crate) opcode: u32,
    /// Immediate in host byte order.
    pub(crate) imm: u32,
}

/// Counters of a hybrid poller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Polls of the CQ.
    pub polls: u64,
    /// Polls that found nothing.
    pub empty_polls: u64,
    /// Times the poller armed the CQ and slept on the channel.
    pub sleeps: u64,
    /// Completions returned.
    pub completions: u64,
    /// Wake-ups (returns from a wait that found completions).
    pub wakes: u64,
}

struct ChannelFd(RawFd);

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A CQ with its completion channel, polled the hybrid way.
pub(crate) struct HybridCq {
    // Field order matters for Drop: events are acked (in `drop`) before the CQ goes, and the
    // CQ before its channel.
    fd: AsyncFd<ChannelFd>,
    cq: Arc<BasicCompletionQueue>,
    channel: Arc<CompletionChannel>,
    unacked: u32,
    spin: u32,
    max_spin: u32,
    stats: PollStats,
}

impl HybridCq {
    pub(crate) fn new(
        cq: Arc<BasicCompletionQueue>,
        channel: Arc<CompletionChannel>,
        max_spin: u32,
    ) -> Result<Self, TransportError> {
        channel
            .set_nonblocking(true)
            .map_err(TransportError::io("set completion channel non-blocking"))?;
        // SAFETY: the channel's descriptor stays open for as long as the AsyncFd: `fd` is the
        // first field of HybridCq, so it is dropped before the Arc<CompletionChannel> we hold.
        let fd = unsafe {
            AsyncFd::register_with_interest(ChannelFd(channel.as_raw_fd()), Interest::READABLE)
        }
        .map_err(|e| TransportError::Io {
            op: "register completion channel",
            source: e.into_parts().1,
        })?;
        Ok(Self {
            fd,
            cq,
            channel,
            unacked: 0,
            spin: max_spin,
            max_spin,
            stats: PollStats::default(),
        })
    }

    pub(crate) fn stats(&self) -> PollStats {
        self.stats
    }

    fn raw_cq(&self) -> *mut ibv_cq {
        // SAFETY: the pointer is only used while `self.cq` (an Arc we hold) is alive.
        unsafe { self.cq.cq() }.as_ptr()
    }

    /// Polls once, appending what it finds; returns how many.
    pub(crate) fn poll_once(&mut self, out: &mut Vec<Wc>) -> Result<usize, TransportError> {
        self.stats.polls += 1;
        match self.cq.start_poll() {
            Ok(poller) => {
                let before = out.len();
                out.extend(poller.map(|wc| Wc {
                    wr_id: wc.wr_id(),
                    status: wc.status(),
                    opcode: wc.opcode(),
                    imm: u32::from_be(wc.imm_data()),
                }));
                let n = out.len() - before;
                self.stats.completions += n as u64;
                Ok(n)
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {
                self.stats.empty_polls += 1;
                Ok(0)
            }
            Err(e) => Err(TransportError::Device(format!("poll CQ: {e}"))),
        }
    }

    /// Waits until at least one completion is available and appends every available one.
    pub(crate) async fn wait(&mut self, out: &mut Vec<Wc>) -> Result<usize, TransportError> {
        loop {
            for _ in 0..self.spin.max(1) {
                let n = self.poll_once(out)?;
                if n > 0 {
                    self.spin = (self.spin.saturating_mul(2)).clamp(1, self.max_spin.max(1));
                    return Ok(n);
                }
                std::hint::spin_loop();
            }
            // Arm, then poll once more: a completion that arrived between the last poll and
            // the arming would otherwise raise no event.
            // SAFETY: the CQ is alive (we hold its Arc); solicited_only = 0 asks for any event.
            let rc = unsafe { ibv_req_notify_cq(self.raw_cq(), 0) };
            if rc != 0 {
                return Err(TransportError::Io {
                    op: "ibv_req_notify_cq",
                    source: io::Error::from_raw_os_error(rc),
                });
            }
            let n = self.poll_once(out)?;
            if n > 0 {
                return Ok(n);
            }
            self.stats.sleeps += 1;
            self.spin = (self.spin / 2).max(1);
            self.sleep_for_event().await?;
            let n = self.poll_once(out)?;
            if n > 0 {
                self.stats.wakes += 1;
                return Ok(n);
            }
        }
    }

    async fn sleep_for_event(&mut self) -> Result<(), TransportError> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(TransportError::io("wait on completion channel"))?;
            let mut cq: *mut ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut std::ffi::c_void = std::ptr::null_mut();
            // SAFETY: the channel is alive (we hold its Arc) and non-blocking; the out-pointers
            // are valid locals.
            let rc = unsafe { ibv_get_cq_event(self.channel_ptr(), &mut cq, &mut ctx) };
            if rc == 0 {
                self.unacked += 1;
                if self.unacked >= ACK_BATCH {
                    self.ack();
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(TransportError::Io {
                op: "ibv_get_cq_event",
                source: err,
            });
        }
    }

    fn channel_ptr(&self) -> *mut ibv_comp_channel {
        // SAFETY: used only while `self.channel` (an Arc we hold) is alive.
        unsafe { self.channel.comp_channel() }.as_ptr()
    }

    fn ack(&mut self) {
        if self.unacked > 0 {
            // SAFETY: the CQ is alive; we ack exactly the events we got from the channel.
            unsafe { ibv_ack_cq_events(self.raw_cq(), self.unacked) };
            self.unacked = 0;
        }
    }
}

impl Drop for HybridCq {
    fn drop(&mut self) {
        // ibv_destroy_cq waits for every event to be acknowledged.
        self.ack();
    }
}

/// Work completion status `IBV_WC_SUCCESS`.
pub(crate) const WC_SUCCESS: u32 = 0;
/// Opcode of a receive completion for an RDMA WRITE with immediate.
pub(crate) const WC_RECV_RDMA_WITH_IMM: u32 =
    rdma_mummy_sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
