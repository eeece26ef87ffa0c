//! Frame writing in place: the producer builds its Cap'n Proto message where the bytes will
//! travel from, and the seal hands it over.
//!
//! - **shm**: straight into the store's grant, in the shared region. No byte is copied.
//! - **verbs**: into a lease of the client's own registered region, then one RDMA WRITE of the
//!   framed message into the grant. The CPU copies no byte: the NIC moves them.
//! - **tcp**: into a lease of a region of the client's own, then one PUT on the data
//!   connection (the kernel's copy into the socket is the only one).
//!
//! The same operator code runs on all three.
//!
//! ```text
//!  create(stream, SlotMessage::frame_capacity(spec)) ─▶ grant (blocks in the store's region)
//!  InPlace::message_mut().init_frame(spec) ─▶ plane_mut(i): the decoder writes pixels here
//!  InPlace::seal(): framing table written in front of segment 0
//!                   (verbs: one RDMA WRITE; tcp: one PUT) ─▶ seal(offset, len) ─▶ seq
//! ```
//!
//! ```no_run
//! # async fn demo(client: staging_store::client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use capnp_rdma::frame::{FrameSpec, PixelFormat};
//! use staging_store::in_place::InPlace;
//!
//! let spec = FrameSpec::new(PixelFormat::I420, 1920, 1080);
//! let mut frame = InPlace::create_frame(&client, "cam0", &spec).await?;
//! let mut writer = frame.message_mut().init_frame(&spec)?;
//! writer.plane_mut(0)?.fill(16); // luma, written where it will be sent from
//! let seq = frame.seal().await?;
//! # let _ = seq; Ok(()) }
//! ```

use crate::client::{Client, ClientError};
use crate::proto::{Grant, Transport};
use capnp_rdma::frame::{FrameError, FrameSpec};
use capnp_rdma::slot::{SlotError, SlotMessage};
use capnp_rdma::BlockLease;

/// A grant being written in place as one message. Dropping it unsealed aborts the grant.
pub struct InPlace {
    client: Client,
    grant: Grant,
    message: Option<SlotMessage>,
    /// verbs and tcp: the lease of the client's own region the message is built in (kept
    /// until its bytes are sent). shm: none, the message is built in the grant.
    staging: Option<BlockLease>,
    checksum: bool,
}

impl std::fmt::Debug for InPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InPlace")
            .field("grant", &self.grant)
            .finish()
    }
}

/// Why an in-place write failed.
#[derive(Debug, thiserror::Error)]
pub enum InPlaceError {
    /// The store or the connection.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The message did not fit its grant, or the grant is not a usable slot.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The frame's geometry.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl InPlace {
    /// A grant of `size` bytes of `stream` to build one message in.
    pub async fn create(client: &Client, stream: &str, size: u64) -> Result<Self, InPlaceError> {
        if client.transport() == Transport::Shm {
            let region = client
                .region()
                .expect("an shm client has the store's region")
                .clone();
            let grant = client.create(stream, size).await?;
            // SAFETY: the store zeroed the grant's blocks when it leased them and granted them
            // to this session alone; nobody reads or writes them until this message is sealed,
            // and they stay allocated until then (the session holds the grant).
            let message = unsafe { SlotMessage::new(&region, grant.offset, grant.len) };
            return Self::started(client, grant, message, None).await;
        }
        // Built here, sent whole at the seal: every byte sealed is sent, so the grant need not
        // be zeroed.
        let region = client.staging_region()?;
        let lease = region.lease(size).map_err(ClientError::Region)?;
        let grant = client.create_with(stream, size, true).await?;
        // The grant may be rounded up to the store's blocks: the message gets what both hold.
        let len = grant.len.min(lease.len());
        // SAFETY: a fresh lease is zeroed and ours alone (the region is this client's, and
        // only leases write it); the message covers `len` ≤ `lease.len()` bytes of it, and
        // `staging` keeps the lease until the message is finished and sent.
        let message = unsafe { SlotMessage::new(&region, lease.offset(), len) };
        Self::started(client, grant, message, Some(lease)).await
    }

    async fn started(
        client: &Client,
        grant: Grant,
        message: Result<SlotMessage, SlotError>,
        staging: Option<BlockLease>,
    ) -> Result<Self, InPlaceError> {
        match message {
            Ok(message) => Ok(Self {
                client: client.clone(),
                grant,
                message: Some(message),
                staging,
                checksum: client.welcome().checksums,
            }),
            Err(e) => {
                let _ = client.abort(&grant).await;
                Err(e.into())
            }
        }
    }

    /// A grant exactly large enough for a `Frame` of `spec`.
    pub async fn create_frame(
        client: &Client,
        stream: &str,
        spec: &FrameSpec,
    ) -> Result<Self, InPlaceError> {
        let size = SlotMessage::frame_capacity(spec)?;
        Self::create(client, stream, size).await
    }

    /// Adds a CRC-32C to the seal even if the store does not require one.
    pub fn with_checksum(mut self) -> Self {
        self.checksum = true;
        self
    }

    /// The grant.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// The message, to build.
    pub fn message_mut(&mut self) -> &mut SlotMessage {
        self.message.as_mut().expect("present until sealed")
    }

    /// Frames the message and seals it (verbs and tcp clients first send it into the grant);
    /// returns its sequence number. A message that outgrew the grant is an error
    /// ([`SlotError::Overflow`] says the size needed), and on any error the grant is aborted.
    pub async fn seal(self) -> Result<u64, InPlaceError> {
        self.seal_releasing(&[]).await
    }

    /// [`seal`](Self::seal), releasing `releases` in the same store operation
    /// ([`Client::seal_releasing`]): a filter's output frame and the input it came from.
    pub async fn seal_releasing(mut self, releases: &[u64]) -> Result<u64, InPlaceError> {
        let message = self.message.take().expect("present until sealed");
        let grant = self.grant;
        let result = self.send_and_seal(message, releases).await;
        if result.is_err() {
            let _ = self.client.abort(&grant).await;
        }
        result
    }

    async fn send_and_seal(
        &mut self,
        message: SlotMessage,
        releases: &[u64],
    ) -> Result<u64, InPlaceError> {
        let region = message.region().clone();
        let framed = message.finish()?;
        let checksum = if self.checksum {
            // SAFETY: the message is finished and nobody writes its bytes: the grant is this
            // session's (shm), or the lease is held by `self` (verbs, tcp).
            let bytes = unsafe { region.bytes(framed.offset, framed.len) }
                .map_err(|e| InPlaceError::Client(ClientError::Region(e)))?;
            Some(crate::journal::frame_crc(bytes))
        } else {
            None
        };
        let at = match &self.staging {
            None => framed.offset,
            Some(lease) => {
                // SAFETY: the framed bytes lie in `lease`, which `self` holds until they are
                // sent; nothing writes them meanwhile (the message is finished).
                unsafe {
                    self.client
                        .write_staged(&self.grant, 0, framed.offset, framed.len)
                        .await?;
                }
                debug_assert_eq!(framed.offset, lease.offset());
                self.grant.offset
            }
        };
        // The bytes are in the grant: the lease can take the next message.
        self.staging = None;
        Ok(self
            .client
            .seal_releasing(&self.grant, at, framed.len, checksum, releases)
            .await?)
    }
}

impl Drop for InPlace {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            drop(message);
            // Unsealed: give the grant back (without waiting for the answer).
            let _ = self.client.abort_nowait(&self.grant);
        }
    }
}
