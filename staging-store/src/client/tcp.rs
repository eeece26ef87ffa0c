//! A tcp client's data connection, read by its own task: each DELIVER header and its frame
//! bytes go to the subscription (through routing) or to the `get` waiting for them, in receive
//! buffers that dropped frames give back for reuse.
//!
//! ```text
//!  data connection ─▶ data_reader: DELIVER { reference, subscription, len } + len bytes
//!                       ├─ subscription 0 (a get) ─▶ got_bytes[reference] ─▶ Client::get
//!                       └─ else ─▶ route_incoming ─▶ Subscription::next
//! ```

use super::routing::route_incoming;
use super::Inner;
use crate::data;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Receive buffers a client keeps for reuse.
const SPARE_BUFFERS: usize = 8;

impl Inner {
    /// A buffer of `words` words: a spare one of that size, or new (zeroed) memory.
    fn buffer(&self, words: usize) -> Vec<capnp::Word> {
        let mut spare = self.spare.lock().expect("not poisoned");
        match spare.iter().rposition(|b| b.len() == words) {
            Some(at) => spare.swap_remove(at),
            None => {
                drop(spare);
                capnp::Word::allocate_zeroed_vec(words)
            }
        }
    }

    /// Keeps `buffer` for a later delivery (the oldest spare goes when there are enough).
    pub(super) fn give_back(&self, buffer: Vec<capnp::Word>) {
        if buffer.is_empty() {
            return;
        }
        let mut spare = self.spare.lock().expect("not poisoned");
        if spare.len() == SPARE_BUFFERS {
            spare.remove(0);
        }
        spare.push(buffer);
    }
}

pub(super) enum GotBytes {
    Arrived(Vec<capnp::Word>),
    Waiting(oneshot::Sender<Vec<capnp::Word>>),
}

pub(super) async fn data_reader(
    inner: std::sync::Weak<Inner>,
    mut read: tokio::net::tcp::OwnedReadHalf,
) {
    let mut header = [0u8; data::DELIVER_LEN];
    loop {
        if read.read_exact(&mut header).await.is_err() {
            break;
        }
        let Ok(delivery) = data::decode_deliver(&header) else {
            break;
        };
        let region_limit = inner.upgrade().map_or(0, |i| i.welcome.region_bytes);
        if delivery.len > region_limit {
            break;
        }
        let Some(mut words) = inner
            .upgrade()
            .map(|i| i.buffer(delivery.len.div_ceil(8) as usize))
        else {
            return;
        };
        let bytes = &mut capnp::Word::words_to_bytes_mut(&mut words)[..delivery.len as usize];
        if data::read_body(&mut read, bytes).await.is_err() {
            break;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if delivery.subscription == 0 {
            let mut got = inner.got_bytes.lock().expect("not poisoned");
            match got.remove(&delivery.reference) {
                Some(GotBytes::Waiting(tx)) => {
                    let _ = tx.send(words);
                }
                _ => {
                    got.insert(delivery.reference, GotBytes::Arrived(words));
                }
            }
        } else {
            route_incoming(&inner, delivery.subscription, Ok((delivery, Some(words))));
        }
    }
    if let Some(inner) = inner.upgrade() {
        inner.subscriptions.lock().expect("not poisoned").clear();
        inner.got_bytes.lock().expect("not poisoned").clear();
    }
}
