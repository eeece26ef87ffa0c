//! The receiving end over verbs ([`VerbsTarget`]): it grants a lease of the registered region,
//! keeps receives posted for the writer's immediates, and reports each message as it lands.

use super::cq::{Wc, WC_RECV_RDMA_WITH_IMM, WC_SUCCESS};
use super::device::device_err;
use super::handshake::{answer, exchange, peer_gone, Endpoint, READY};
use super::qp::{connect_qp, create_qp, Qp};
use super::{PollStats, RegisteredRegion, VerbsOptions};
use crate::region::{BlockLease, Region};
use crate::transport::{Incoming, RemoteRegion, Target, TransportError};
use sideway::ibverbs::queue_pair::QueuePair;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The receiving end over verbs: owns the granted range; the writer's NIC writes into it.
pub struct VerbsTarget {
    // Drop order: the QP first (no more remote writes), then the grant.
    qp: Qp,
    posted: u32,
    window: u32,
    stream: TcpStream,
    granted: RemoteRegion,
    done: bool,
    wcs: Vec<Wc>,
    lease: BlockLease,
    _registration: Arc<RegisteredRegion>,
}

impl std::fmt::Debug for VerbsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTarget")
            .field("granted", &self.granted)
            .finish()
    }
}

impl VerbsTarget {
    /// Accepts one writer on `listener` and grants it `lease`, which must come from the
    /// registered region.
    pub async fn accept(
        listener: &TcpListener,
        registration: &Arc<RegisteredRegion>,
        lease: BlockLease,
        options: &VerbsOptions,
    ) -> Result<Self, TransportError> {
        if lease.region().id() != registration.region().id() {
            return Err(TransportError::ForeignPayload(
                "the lease is not in the registered region",
            ));
        }
        let mut stream = answer(listener).await?;
        let dev = registration.device().clone();
        let window = options.window.max(1);
        let recv_wr = window * 2;
        let mut qp = create_qp(&dev, 1, recv_wr, options.max_spin)?;
        let granted = RemoteRegion {
            region_id: registration.region().id(),
            rkey: registration.rkey(),
            base: registration.region().as_ptr() as u64,
            offset: lease.offset(),
            len: lease.len(),
        };
        let mine = Endpoint {
            qpn: qp.qp.qp_number(),
            psn: qp.psn,
            gid: dev.inner.gid.raw,
            remote: granted,
            window,
        };
        let peer = exchange(&mut stream, &mine).await?;
        connect_qp(&dev, &mut qp, &peer)?;
        let mut target = Self {
            qp,
            posted: 0,
            window: recv_wr,
            stream,
            granted,
            done: false,
            wcs: Vec::new(),
            lease,
            _registration: Arc::clone(registration),
        };
        target.replenish()?;
        target
            .stream
            .write_all(&[READY])
            .await
            .map_err(TransportError::io("confirm"))?;
        Ok(target)
    }

    /// Polling counters of the receive CQ.
    pub fn poll_stats(&self) -> PollStats {
        self.qp.cq.stats()
    }

    /// The lease holding the granted range.
    pub fn lease(&self) -> &BlockLease {
        &self.lease
    }

    /// Posts receives (no scatter-gather entries: RDMA WRITE with immediate consumes a receive
    /// only for its immediate) until `window` are outstanding.
    fn replenish(&mut self) -> Result<(), TransportError> {
        if self.posted >= self.window {
            return Ok(());
        }
        let mut guard = self.qp.qp.start_post_recv();
        for _ in self.posted..self.window {
            guard.construct_wr(0);
        }
        guard.post().map_err(|e| device_err("ibv_post_recv", e))?;
        self.posted = self.window;
        Ok(())
    }
}

impl Target for VerbsTarget {
    fn region(&self) -> &Region {
        self.lease.region()
    }

    fn granted(&self) -> RemoteRegion {
        self.granted
    }

    async fn incoming(&mut self, out: &mut Vec<Incoming>) -> Result<usize, TransportError> {
        if self.done {
            return Err(TransportError::Disconnected);
        }
        let mut wcs = std::mem::take(&mut self.wcs);
        wcs.clear();
        // Completions that already arrived are delivered before a disconnect is reported.
        let polled = self.qp.cq.poll_once(&mut wcs)?;
        let waited = if polled > 0 {
            Ok(Some(polled))
        } else {
            tokio::select! {
                r = self.qp.cq.wait(&mut wcs) => r.map(Some),
                () = peer_gone(&mut self.stream) => Ok(None),
            }
        };
        let result = match waited {
            Ok(Some(_)) => {
                let mut n = 0;
                let mut error = None;
                for wc in &wcs {
                    self.posted = self.posted.saturating_sub(1);
                    if wc.status != WC_SUCCESS {
                        error.get_or_insert(TransportError::Device(format!(
                            "receive completion status {}",
                            wc.status
                        )));
                    } else if wc.opcode == WC_RECV_RDMA_WITH_IMM {
                        out.push(Incoming {
                            imm: wc.imm,
                            at: None,
                        });
                        n += 1;
                    }
                }
                match error {
                    Some(e) => {
                        self.done = true;
                        if n > 0 {
                            Ok(n)
                        } else {
                            Err(e)
                        }
                    }
                    None => self.replenish().map(|()| n),
                }
            }
            Ok(None) => {
                // Deliver anything that landed before the writer left, then report it.
                let mut n = 0;
                while self.qp.cq.poll_once(&mut wcs)? > 0 {}
                for wc in &wcs {
                    if wc.status == WC_SUCCESS && wc.opcode == WC_RECV_RDMA_WITH_IMM {
                        out.push(Incoming {
                            imm: wc.imm,
                            at: None,
                        });
                        n += 1;
                    }
                }
                self.done = true;
                if n > 0 {
                    Ok(n)
                } else {
                    Err(TransportError::Disconnected)
                }
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        };
        self.wcs = wcs;
        result
    }
}
