//! Control calls: a request out through the writer task, its answer back through the
//! control reader (pipelined, any number in flight), and the calls built on them: streams,
//! create / seal / abort, put, get, release, and the store's statistics.

use super::frame_ref::Bytes;
use super::tcp::GotBytes;
use super::{Client, ClientError, FrameRef};
use crate::proto::{
    encode_request, Body, Grant, Reply, Request, StoreError, StoreStat, StreamConfig, StreamStat,
    Transport,
};
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

impl Client {
    pub(super) fn send(
        &self,
        body: Body,
        wait: bool,
    ) -> Result<Option<oneshot::Receiver<Result<Reply, StoreError>>>, ClientError> {
        // Id 0: no answer unless the request fails (then a notice).
        let id = if wait {
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let rx = if wait {
            let (tx, rx) = oneshot::channel();
            self.inner
                .waiters
                .lock()
                .expect("not poisoned")
                .insert(id, tx);
            Some(rx)
        } else {
            None
        };
        let mut bytes = Vec::with_capacity(64);
        encode_request(&Request { id, body }, &mut bytes);
        self.inner
            .writer
            .send(bytes)
            .map_err(|_| ClientError::Closed)?;
        Ok(rx)
    }

    /// Sends a request and waits for its answer.
    pub async fn call(&self, body: Body) -> Result<Reply, ClientError> {
        let rx = self.send(body, true)?.expect("asked to wait");
        match rx.await {
            Ok(result) => result.map_err(ClientError::Store),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Creates a stream (`exist_ok`: succeed if it exists).
    pub async fn create_stream(
        &self,
        name: &str,
        config: StreamConfig,
        exist_ok: bool,
    ) -> Result<(), ClientError> {
        self.call(Body::CreateStream {
            name: name.to_owned(),
            config,
            exist_ok,
        })
        .await
        .map(drop)
    }

    /// Deletes a stream.
    pub async fn delete_stream(&self, name: &str) -> Result<(), ClientError> {
        self.call(Body::DeleteStream(name.to_owned()))
            .await
            .map(drop)
    }

    /// A writable grant of at least `size` bytes for the next frame of `stream` (may wait
    /// for room, as the stream's policy says).
    pub async fn create(&self, stream: &str, size: u64) -> Result<Grant, ClientError> {
        self.create_with(stream, size, false).await
    }

    /// Like [`Client::create`]; `dirty_ok`: this client overwrites every byte it will seal, so
    /// the grant need not be zeroed (the store may reuse a freed frame's blocks as they are,
    /// which saves zeroing the frame). Honoured for shm clients only.
    pub async fn create_with(
        &self,
        stream: &str,
        size: u64,
        dirty_ok: bool,
    ) -> Result<Grant, ClientError> {
        match self
            .call(Body::Create {
                stream: stream.to_owned(),
                size,
                dirty_ok,
            })
            .await?
        {
            Reply::Granted(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Makes `len` bytes at `offset` (inside the grant) readable as the stream's next frame.
    pub async fn seal(
        &self,
        grant: &Grant,
        offset: u64,
        len: u64,
        checksum: Option<u32>,
    ) -> Result<u64, ClientError> {
        self.seal_releasing(grant, offset, len, checksum, &[]).await
    }

    /// [`seal`](Self::seal), and releases (acknowledges) `releases` in the same store
    /// operation: both happen or neither does, whatever crashes (a filter's output and the
    /// input it came from). A reference that is not this client's fails the whole call.
    pub async fn seal_releasing(
        &self,
        grant: &Grant,
        offset: u64,
        len: u64,
        checksum: Option<u32>,
        releases: &[u64],
    ) -> Result<u64, ClientError> {
        if releases.len() > crate::proto::MAX_RELEASE_BATCH {
            return Err(ClientError::TooLarge {
                what: "a seal's release list",
                len: releases.len(),
                max: crate::proto::MAX_RELEASE_BATCH,
            });
        }
        match self
            .call(Body::Seal {
                object: grant.object,
                offset,
                len,
                checksum,
                releases: releases.to_vec(),
            })
            .await?
        {
            Reply::Sealed(seq) => Ok(seq),
            other => Err(unexpected(other)),
        }
    }

    /// Ends `stream` after its last sealed frame: every consumer, also one that subscribes
    /// later, gets every frame and then the end ([`ClientError::is_end_of_stream`]). Ending
    /// an ended stream succeeds.
    pub async fn end_stream(&self, stream: &str) -> Result<(), ClientError> {
        self.call(Body::EndStream(stream.to_owned()))
            .await
            .map(drop)
    }

    /// Releases `references` (deliveries of durable subscription `subscription`) and records
    /// `state` with the consumer's cursor, in one store operation: a sink commits its output
    /// position with the frames it wrote. The state comes back in
    /// [`Subscription::state`](super::Subscription::state) when the consumer resumes.
    pub async fn commit(
        &self,
        subscription: u32,
        references: &[u64],
        state: &[u8],
    ) -> Result<(), ClientError> {
        let max = crate::proto::MAX_CONSUMER_STATE;
        if state.len() > max {
            return Err(ClientError::TooLarge {
                what: "a consumer state",
                len: state.len(),
                max,
            });
        }
        if references.len() > crate::proto::MAX_RELEASE_BATCH {
            return Err(ClientError::TooLarge {
                what: "a commit's reference list",
                len: references.len(),
                max: crate::proto::MAX_RELEASE_BATCH,
            });
        }
        self.call(Body::Commit {
            subscription,
            references: references.to_vec(),
            state: state.to_vec(),
        })
        .await
        .map(drop)
    }

    /// Gives up a grant.
    pub async fn abort(&self, grant: &Grant) -> Result<(), ClientError> {
        self.call(Body::Abort(grant.object)).await.map(drop)
    }

    /// Writes one framed message (standard Cap'n Proto stream framing) as the stream's next
    /// frame: create, copy into the grant (shm) or send it (tcp), seal. Returns its sequence
    /// number. Builds the checksum when the store or `checksum` asks for one.
    pub async fn put_with(
        &self,
        stream: &str,
        framed: &[u8],
        checksum: bool,
    ) -> Result<u64, ClientError> {
        // The whole message is copied into the grant: it need not be zeroed first.
        let grant = self.create_with(stream, framed.len() as u64, true).await?;
        let crc =
            (checksum || self.inner.welcome.checksums).then(|| crate::journal::frame_crc(framed));
        let written = match self.inner.transport {
            Transport::Shm => {
                // SAFETY: the only slice of this fresh grant, dropped before the seal.
                unsafe { self.grant_bytes(&grant) }?[..framed.len()].copy_from_slice(framed);
                Ok(())
            }
            Transport::Tcp | Transport::Verbs => self.write_grant(&grant, 0, framed).await,
        };
        if let Err(e) = written {
            let _ = self.abort(&grant).await;
            return Err(e);
        }
        self.seal(&grant, grant.offset, framed.len() as u64, crc)
            .await
    }

    /// [`Client::put_with`] with a checksum only if the store requires one.
    pub async fn put(&self, stream: &str, framed: &[u8]) -> Result<u64, ClientError> {
        self.put_with(stream, framed, false).await
    }

    /// One sealed frame (the newest when `seq` is `None`), held until released.
    pub async fn get(&self, stream: &str, seq: Option<u64>) -> Result<FrameRef, ClientError> {
        let delivery = match self
            .call(Body::Get {
                stream: stream.to_owned(),
                seq,
            })
            .await?
        {
            Reply::Got(d) => d,
            other => return Err(unexpected(other)),
        };
        let bytes = match self.inner.transport {
            Transport::Shm => Bytes::Shared(self.inner.region.clone().expect("shm has a region")),
            Transport::Verbs => self.fetch(&delivery).await?,
            Transport::Tcp => {
                let rx = {
                    let mut got = self.inner.got_bytes.lock().expect("not poisoned");
                    match got.remove(&delivery.reference) {
                        Some(GotBytes::Arrived(words)) => Ok(words),
                        _ => {
                            let (tx, rx) = oneshot::channel();
                            got.insert(delivery.reference, GotBytes::Waiting(tx));
                            Err(rx)
                        }
                    }
                };
                match rx {
                    Ok(words) => Bytes::Owned(words),
                    Err(rx) => Bytes::Owned(rx.await.map_err(|_| ClientError::Closed)?),
                }
            }
        };
        Ok(FrameRef::new(self.clone(), delivery, bytes))
    }

    /// Drops a reference (and acknowledges a subscription's frame), waiting for the answer.
    pub async fn release(&self, reference: u64) -> Result<(), ClientError> {
        self.call(Body::Release(reference)).await.map(drop)
    }

    /// Gives up a grant without waiting for the answer.
    pub fn abort_nowait(&self, grant: &Grant) -> Result<(), ClientError> {
        self.send(Body::Abort(grant.object), false).map(drop)
    }

    /// Drops a reference without waiting for the answer (errors are reported as notices).
    pub fn release_nowait(&self, reference: u64) -> Result<(), ClientError> {
        self.send(Body::Release(reference), false).map(drop)
    }

    /// Store-wide counters.
    pub async fn stat(&self) -> Result<StoreStat, ClientError> {
        match self.call(Body::Stat).await? {
            Reply::Stat(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Every stream's state.
    pub async fn streams(&self) -> Result<Vec<StreamStat>, ClientError> {
        match self.call(Body::Streams).await? {
            Reply::Streams(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// One stream's state.
    pub async fn stream_stat(&self, name: &str) -> Result<StreamStat, ClientError> {
        match self.call(Body::StreamStat(name.to_owned())).await? {
            Reply::StreamStat(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }
}

pub(super) fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}
