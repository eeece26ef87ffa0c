//! The writing end over verbs ([`VerbsWriter`]): a message's entries go out as RDMA WRITEs
//! ending in one WRITE with immediate, all in one `ibv_post_send`, and each payload is kept
//! until its work request completes.

use super::cq::{Wc, WC_SUCCESS};
use super::device::device_err;
use super::handshake::{dial, exchange, peer_gone, Endpoint, READY};
use super::qp::{connect_qp, create_qp, to_error_state, Qp};
use super::{PollStats, RegisteredRegion, VerbsOptions};
use crate::framing::OutboundMessage;
use crate::transport::{
    check_post, Completion, Payload, RemoteRegion, SendError, TransportError, Writer,
};
use rdma_mummy_sys::ibv_sge;
use sideway::ibverbs::queue_pair::{
    PostSendGuard, QueuePair, SetScatterGatherEntry, WorkRequestFlags,
};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, ToSocketAddrs};

/// The writing end over verbs.
pub struct VerbsWriter<P: Payload = OutboundMessage> {
    // Drop order: the QP first (no DMA from payloads after it), then the payloads.
    qp: Qp,
    in_flight: VecDeque<(u64, P)>,
    local: Arc<RegisteredRegion>,
    remote: RemoteRegion,
    window: usize,
    next_id: u64,
    stream: TcpStream,
    peer_gone: bool,
    wcs: Vec<Wc>,
}

impl<P: Payload> std::fmt::Debug for VerbsWriter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsWriter")
            .field("remote", &self.remote)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

/// Most work requests one message may need: 511 segments + the table, `max_send_sge` each.
fn max_chain(max_sge: u32) -> u32 {
    512u32.div_ceil(max_sge.max(1)) + 1
}

impl<P: Payload> VerbsWriter<P> {
    /// Connects to a [`VerbsTarget`](super::VerbsTarget) listening at `addr`; payloads must come
    /// from `local`.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        local: &Arc<RegisteredRegion>,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        let dev = local.device().clone();
        let mut stream = dial(addr).await?;
        let send_wr = options.window.max(1) * max_chain(dev.max_send_sge());
        let mut qp = create_qp(&dev, send_wr, 1, options.max_spin)?;
        let mine = Endpoint {
            qpn: qp.qp.qp_number(),
            psn: qp.psn,
            gid: dev.inner.gid.raw,
            remote: RemoteRegion {
                region_id: local.region().id(),
                rkey: 0,
                base: 0,
                offset: 0,
                len: 0,
            },
            window: 0,
        };
        let peer = exchange(&mut stream, &mine).await?;
        if peer.window == 0 {
            return Err(TransportError::Protocol(
                "target announced a window of 0".into(),
            ));
        }
        connect_qp(&dev, &mut qp, &peer)?;
        let mut ready = [0u8; 1];
        stream
            .read_exact(&mut ready)
            .await
            .map_err(TransportError::io("wait for target"))?;
        if ready[0] != READY {
            return Err(TransportError::Protocol("target did not confirm".into()));
        }
        Ok(Self {
            qp,
            in_flight: VecDeque::new(),
            local: Arc::clone(local),
            remote: peer.remote,
            window: peer.window.min(options.window.max(1)) as usize,
            next_id: 1,
            stream,
            peer_gone: false,
            wcs: Vec::new(),
        })
    }

    /// Polling counters of the send CQ.
    pub fn poll_stats(&self) -> PollStats {
        self.qp.cq.stats()
    }

    fn post(
        &mut self,
        payload: &P,
        remote_offset: u64,
        imm: u32,
        id: u64,
    ) -> Result<(), TransportError> {
        let base = self.local.region().as_ptr() as u64;
        let lkey = self.local.mr.lkey();
        let sges: Vec<ibv_sge> = payload
            .entries()
            .iter()
            .map(|e| ibv_sge {
                addr: base + e.offset,
                length: e.len,
                lkey,
            })
            .collect();
        let max = self.local.device().max_send_sge() as usize;
        let chunks: Vec<&[ibv_sge]> = sges.chunks(max).collect();
        let mut guard = self.qp.qp.start_post_send();
        let mut remote_addr = self.remote.base + remote_offset;
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let flags = if last {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            let wr = guard.construct_wr(id, flags);
            let buffer = if last {
                wr.setup_write_imm(self.remote.rkey, remote_addr, imm.to_be())
            } else {
                wr.setup_write(self.remote.rkey, remote_addr)
            };
            // SAFETY: every sge lies in the registered region (check_post verified the entries
            // against the region) under this MR's lkey, and the payload that owns those bytes
            // is kept in `in_flight` until the work request completes.
            unsafe { buffer.setup_sge_list(chunk) };
            remote_addr += chunk.iter().map(|s| u64::from(s.length)).sum::<u64>();
        }
        guard.post().map_err(|e| device_err("ibv_post_send", e))
    }

    fn fail_all(
        &mut self,
        out: &mut Vec<Completion<P>>,
        error: impl Fn() -> TransportError,
    ) -> usize {
        let n = self.in_flight.len();
        for (id, payload) in self.in_flight.drain(..) {
            out.push(Completion {
                id,
                payload,
                status: Err(error()),
            });
        }
        n
    }
}

impl<P: Payload> Writer for VerbsWriter<P> {
    type Payload = P;

    fn remote(&self) -> RemoteRegion {
        self.remote
    }

    fn window(&self) -> usize {
        self.window
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn post_write(
        &mut self,
        payload: P,
        remote_offset: u64,
        imm: u32,
    ) -> Result<u64, SendError<P>> {
        if self.peer_gone {
            return Err(SendError {
                payload,
                error: TransportError::Disconnected,
            });
        }
        if let Err(error) = check_post(
            &payload,
            self.local.region(),
            &self.remote,
            remote_offset,
            (self.in_flight.len(), self.window),
        ) {
            return Err(SendError { payload, error });
        }
        let id = self.next_id;
        if let Err(error) = self.post(&payload, remote_offset, imm, id) {
            return Err(SendError { payload, error });
        }
        self.next_id += 1;
        self.in_flight.push_back((id, payload));
        Ok(id)
    }

    async fn completions(&mut self, out: &mut Vec<Completion<P>>) -> Result<usize, TransportError> {
        if self.in_flight.is_empty() {
            return Ok(0);
        }
        let mut wcs = std::mem::take(&mut self.wcs);
        wcs.clear();
        let waited = if self.peer_gone {
            self.qp.cq.wait(&mut wcs).await.map(Some)
        } else {
            tokio::select! {
                r = self.qp.cq.wait(&mut wcs) => r.map(Some),
                () = peer_gone(&mut self.stream) => Ok(None),
            }
        };
        let result = match waited {
            Ok(Some(_)) => {
                let mut n = 0;
                for wc in &wcs {
                    // Unsignaled requests only complete on error, with the same id as the
                    // message's last request; pop everything up to this id.
                    while let Some(&(front, _)) = self.in_flight.front() {
                        if front > wc.wr_id {
                            break;
                        }
                        let (id, payload) = self.in_flight.pop_front().expect("front exists");
                        let status = if wc.status == WC_SUCCESS && id == wc.wr_id {
                            Ok(())
                        } else if wc.status == WC_SUCCESS {
                            Err(TransportError::Protocol(format!(
                                "completion for {} skipped {id}",
                                wc.wr_id
                            )))
                        } else {
                            Err(TransportError::Device(format!(
                                "work completion status {}",
                                wc.status
                            )))
                        };
                        out.push(Completion {
                            id,
                            payload,
                            status,
                        });
                        n += 1;
                    }
                }
                Ok(n)
            }
            Ok(None) => {
                // The target is gone. Flush the send queue so the NIC lets go of every
                // payload, then hand them back as they complete.
                self.peer_gone = true;
                to_error_state(&mut self.qp.qp);
                Ok(0)
            }
            Err(e) => {
                to_error_state(&mut self.qp.qp);
                let n = self.fail_all(out, || TransportError::Disconnected);
                self.wcs = wcs;
                return if n > 0 { Ok(n) } else { Err(e) };
            }
        };
        self.wcs = wcs;
        result
    }
}
