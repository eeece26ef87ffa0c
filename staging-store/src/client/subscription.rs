//! [`Subscription`]: a subscription's frames, in order, as [`FrameRef`]s; closing or dropping
//! it gives frames never handed out back to the store.

use super::calls::unexpected;
use super::frame_ref::Bytes;
use super::{Client, ClientError, FrameRef, Incoming};
use crate::proto::{Body, Cursor, Delivery, Reply, StoreError, Subscribed, Transport};
use tokio::sync::mpsc;

impl Client {
    /// Subscribes to a stream as `consumer` (empty: anonymous), from `from`, with at most
    /// `window` frames held at once.
    pub async fn subscribe(
        &self,
        stream: &str,
        consumer: &str,
        from: Cursor,
        window: u32,
    ) -> Result<Subscription, ClientError> {
        let reply = self
            .call(Body::Subscribe {
                stream: stream.to_owned(),
                consumer: consumer.to_owned(),
                from,
                window,
            })
            .await?;
        let Reply::Subscribed(Subscribed {
            subscription,
            from_seq,
            state,
        }) = reply
        else {
            return Err(unexpected(reply));
        };
        let (rx, early) = {
            // Same lock order as `route_incoming`: deliveries that arrived before this point
            // were parked under the id, later ones go to the channel.
            let mut subs = self.inner.subscriptions.lock().expect("not poisoned");
            let (tx, rx) = mpsc::unbounded_channel();
            subs.insert(subscription, tx);
            let early = self
                .inner
                .early
                .lock()
                .expect("not poisoned")
                .remove(&subscription)
                .unwrap_or_default();
            (rx, early)
        };
        Ok(Subscription {
            client: self.clone(),
            id: subscription,
            from_seq,
            rx,
            early: early.into(),
            closed: false,
            received: 0,
            ended: None,
            state,
        })
    }
}

/// A subscription's frames, in order.
pub struct Subscription {
    client: Client,
    id: u32,
    from_seq: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    early: std::collections::VecDeque<Incoming>,
    closed: bool,
    /// Frames taken with `next`.
    received: u64,
    /// The store ended it: why, and after how many frames.
    ended: Option<(StoreError, u64)>,
    /// The durable consumer's state as last committed.
    state: Vec<u8>,
}

impl Subscription {
    /// Its id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The state its durable consumer last committed ([`Client::commit`]); empty if never.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// The first frame it delivers.
    pub fn from_seq(&self) -> u64 {
        self.from_seq
    }

    /// The next frame (waits for one). `Err(Closed)` when the connection ends; a store error
    /// when the subscription ended (its stream was deleted).
    pub async fn next(&mut self) -> Result<FrameRef, ClientError> {
        let (delivery, words) = loop {
            // Ended once every frame it was delivered is here (over tcp, frames travel on
            // the data connection and may come after the control connection's `ended`).
            if let Some((reason, delivered)) = &self.ended {
                if self.received >= *delivered {
                    return Err(ClientError::Store(reason.clone()));
                }
            }
            let item = match self.early.pop_front() {
                Some(item) => item,
                None => match self.rx.recv().await {
                    Some(item) => item,
                    None => return Err(ClientError::Closed),
                },
            };
            match item {
                Ok(frame) => break frame,
                Err(end) => self.ended = Some(end),
            }
        };
        self.received += 1;
        let bytes =
            match (words, self.client.inner.transport) {
                (Some(words), _) => Bytes::Owned(words),
                (None, Transport::Verbs) => self.client.fetch(&delivery).await?,
                (None, _) => Bytes::Shared(self.client.inner.region.clone().ok_or_else(|| {
                    ClientError::Protocol("shm delivery without a region".into())
                })?),
            };
        Ok(FrameRef::new(self.client.clone(), delivery, bytes))
    }

    /// Ends the subscription; frames it delivered and that are not released go back to the
    /// stream (a durable consumer gets them again when it resumes).
    pub async fn close(mut self) -> Result<(), ClientError> {
        let queued = self.detach();
        let result = self.client.call(Body::Unsubscribe(self.id)).await.map(drop);
        self.release_queued(queued);
        result
    }

    /// Stops routing deliveries here (later ones are released as they arrive) and takes the
    /// ones queued and never handed out.
    fn detach(&mut self) -> Vec<Delivery> {
        self.closed = true;
        let inner = &self.client.inner;
        inner
            .subscriptions
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
        inner
            .closed_subscriptions
            .lock()
            .expect("not poisoned")
            .insert(self.id);
        self.rx.close();
        let mut queued: Vec<Delivery> = self.early.drain(..).flatten().map(|(d, _)| d).collect();
        while let Ok(item) = self.rx.try_recv() {
            queued.extend(item.ok().map(|(d, _)| d));
        }
        queued
    }

    /// Gives frames that were never handed out back to the store (after the unsubscribe:
    /// unacknowledged, so a durable consumer gets them again when it resumes).
    fn release_queued(&self, queued: Vec<Delivery>) {
        for delivery in queued {
            let _ = self.client.release_nowait(delivery.reference);
        }
    }
}

impl Drop for Subscription {
    /// Unsubscribes without waiting: the store stops delivering, and frames delivered but
    /// not yet taken with `next` go back to it (a durable consumer gets them again when it
    /// resumes). Frames already taken stay valid until released or dropped.
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        let queued = self.detach();
        let _ = self.client.send(Body::Unsubscribe(self.id), false);
        self.release_queued(queued);
    }
}
