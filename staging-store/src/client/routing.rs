//! The control reader task: each message from the store goes to the caller waiting for its
//! answer, to its subscription, or to the notices.
//!
//! ```text
//!  control connection ─▶ read_message ─▶ Response { id } ─▶ waiters[id]
//!                                        (no waiter: an error becomes a notice)
//!                                        Delivery, Ended ─▶ route_incoming ─▶ subscription
//!                                        (or parked until `subscribe` has its id, or
//!                                        released if the subscription is closed)
//!                                        Notice ─▶ notices
//! ```

use super::{io_err, Client, ClientError, Incoming, Inner};
use crate::proto::{decode_server_message, MessageBuf, ServerMessage};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

pub(super) async fn read_message(
    read: &mut (impl AsyncReadExt + Unpin),
    buf: &mut MessageBuf,
) -> Result<Option<ServerMessage>, ClientError> {
    loop {
        if let Some(m) = buf.next_message() {
            let bytes = m.map_err(|e| ClientError::Protocol(e.to_string()))?;
            return decode_server_message(bytes)
                .map(Some)
                .map_err(|e| ClientError::Protocol(e.to_string()));
        }
        let n = read
            .read(buf.spare())
            .await
            .map_err(io_err("reading from the store"))?;
        if n == 0 {
            return Ok(None);
        }
        buf.filled(n);
    }
}

pub(super) async fn control_reader(
    inner: std::sync::Weak<Inner>,
    mut read: impl AsyncReadExt + Unpin,
    mut buf: MessageBuf,
) {
    loop {
        let message = match read_message(&mut read, &mut buf).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match message {
            ServerMessage::Response(r) => {
                let waiter = inner.waiters.lock().expect("not poisoned").remove(&r.id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(r.result);
                    }
                    None => {
                        if let Err(e) = r.result {
                            inner.notices.lock().expect("not poisoned").push(e);
                        }
                    }
                }
            }
            ServerMessage::Delivery(d) => route_incoming(&inner, d.subscription, Ok((d, None))),
            ServerMessage::Ended {
                subscription,
                reason,
                delivered,
            } => route_incoming(&inner, subscription, Err((reason, delivered))),
            ServerMessage::Notice(e) => inner.notices.lock().expect("not poisoned").push(e),
        }
    }
    // The connection is gone: every waiter learns it (dropping the senders).
    if let Some(inner) = inner.upgrade() {
        inner.waiters.lock().expect("not poisoned").clear();
        inner.subscriptions.lock().expect("not poisoned").clear();
        inner.got_bytes.lock().expect("not poisoned").clear();
    }
}

pub(super) fn route_incoming(inner: &Arc<Inner>, subscription: u32, item: Incoming) {
    let subs = inner.subscriptions.lock().expect("not poisoned");
    match subs.get(&subscription) {
        Some(tx) => {
            let _ = tx.send(item);
        }
        // Sent before the store saw this client's unsubscribe: nobody will take it.
        None if inner
            .closed_subscriptions
            .lock()
            .expect("not poisoned")
            .contains(&subscription) =>
        {
            drop(subs);
            if let Ok((delivery, _)) = item {
                let _ = (Client {
                    inner: Arc::clone(inner),
                })
                .release_nowait(delivery.reference);
            }
        }
        // A delivery can overtake the `subscribed` answer's waiter: keep it for `subscribe`.
        None => inner
            .early
            .lock()
            .expect("not poisoned")
            .entry(subscription)
            .or_default()
            .push(item),
    }
}
