//! [`FrameRef`]: a frame this client holds, its bytes wherever its transport put them (the
//! store's region mapped here, a receive buffer, or a lease of the RDMA staging region).

use super::{Client, ClientError};
use crate::proto::Delivery;
use capnp::message::Reader;
use capnp_rdma::reader::{read_framed, InPlaceSegments, ReadOptions};
use capnp_rdma::{BlockLease, Region};

/// Where a received frame's bytes live.
pub(super) enum Bytes {
    /// In the store's region, mapped here.
    Shared(Region),
    /// Received on the data connection (8-byte aligned).
    Owned(Vec<capnp::Word>),
    /// Read by RDMA into this client's region (verbs).
    Leased(BlockLease),
}

/// A frame held by this client: its bytes stay valid (and its blocks allocated) until it is
/// released or dropped (dropping releases without waiting).
pub struct FrameRef {
    client: Client,
    delivery: Delivery,
    bytes: Bytes,
    released: bool,
}

impl std::fmt::Debug for FrameRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameRef")
            .field("delivery", &self.delivery)
            .finish()
    }
}

impl FrameRef {
    pub(super) fn new(client: Client, delivery: Delivery, bytes: Bytes) -> Self {
        Self {
            client,
            delivery,
            bytes,
            released: false,
        }
    }

    /// Its sequence number in the stream.
    pub fn seq(&self) -> u64 {
        self.delivery.seq
    }

    /// What the store said about it.
    pub fn delivery(&self) -> &Delivery {
        &self.delivery
    }

    /// The frame: one Cap'n Proto message in standard stream framing.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Shared(region) => {
                // SAFETY: the frame is sealed (nobody writes it) and this reference keeps its
                // blocks allocated until it is released, which consumes or drops `self`.
                unsafe { region.bytes(self.delivery.offset, self.delivery.len) }.unwrap_or_default()
            }
            Bytes::Owned(words) => {
                &capnp::Word::words_to_bytes(words)[..self.delivery.len as usize]
            }
            Bytes::Leased(lease) => &lease.as_slice()[..self.delivery.len as usize],
        }
    }

    /// Reads the message in place (bounds-checked).
    pub fn read(&self, options: &ReadOptions) -> Result<Reader<InPlaceSegments<'_>>, ClientError> {
        Ok(read_framed(self.bytes(), options)?.0)
    }

    /// Verifies the seal's checksum, if it has one.
    pub fn verify(&self) -> bool {
        self.delivery
            .checksum
            .is_none_or(|crc| crate::journal::frame_crc(self.bytes()) == crc)
    }

    /// Releases it and waits for the store's answer.
    pub async fn release(mut self) -> Result<(), ClientError> {
        self.released = true;
        self.client.release(self.delivery.reference).await
    }

    /// Gives it up without releasing it: its reference was released by another call
    /// ([`Client::seal_releasing`], [`Client::commit`]). Its bytes must not be read after.
    pub fn forget(mut self) {
        self.released = true;
    }
}

impl Drop for FrameRef {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.client.release_nowait(self.delivery.reference);
        }
        if let Bytes::Owned(words) = &mut self.bytes {
            self.client.inner.give_back(std::mem::take(words));
        }
    }
}
