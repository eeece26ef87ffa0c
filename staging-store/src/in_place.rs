//! Zero-copy frame writing for shm clients: the producer builds its Cap'n Proto message
//! straight into the store's grant, and the seal hands it over. No byte is copied.
//!
//! ```text
//!  create(stream, SlotMessage::frame_capacity(spec)) ─▶ grant (blocks in the shared region)
//!  InPlace::message_mut().init_frame(spec) ─▶ plane_mut(i): the decoder writes pixels here
//!  InPlace::seal(): framing table written in front of segment 0 ─▶ seal(offset, len) ─▶ seq
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
//! writer.plane_mut(0)?.fill(16); // luma, written in the shared region
//! let seq = frame.seal().await?;
//! # let _ = seq; Ok(()) }
//! ```

use crate::client::{Client, ClientError};
use crate::proto::{Grant, Transport};
use capnp_rdma::frame::{FrameError, FrameSpec};
use capnp_rdma::slot::{SlotError, SlotMessage};

/// A grant being written in place as one message. Dropping it unsealed aborts the grant.
pub struct InPlace {
    client: Client,
    grant: Grant,
    message: Option<SlotMessage>,
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
    /// A grant of `size` bytes of `stream` to build one message in (shm clients only).
    pub async fn create(client: &Client, stream: &str, size: u64) -> Result<Self, InPlaceError> {
        let region = match (client.transport(), client.region()) {
            (Transport::Shm, Some(region)) => region.clone(),
            _ => {
                return Err(ClientError::Grant(
                    "in-place writes need an shm client (a Unix socket address)".into(),
                )
                .into())
            }
        };
        let grant = client.create(stream, size).await?;
        // SAFETY: the store zeroed the grant's blocks when it leased them and granted them to
        // this session alone; nobody reads or writes them until this message is sealed, and
        // they stay allocated until then (the session holds the grant).
        let message = match unsafe { SlotMessage::new(&region, grant.offset, grant.len) } {
            Ok(m) => m,
            Err(e) => {
                let _ = client.abort(&grant).await;
                return Err(e.into());
            }
        };
        Ok(Self {
            client: client.clone(),
            grant,
            message: Some(message),
            checksum: client.welcome().checksums,
        })
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

    /// Frames the message in place and seals it; returns its sequence number. A message that
    /// outgrew the grant is an error ([`SlotError::Overflow`] says the size needed) and the
    /// grant is aborted.
    pub async fn seal(mut self) -> Result<u64, InPlaceError> {
        let message = self.message.take().expect("present until sealed");
        let framed = match message.finish() {
            Ok(f) => f,
            Err(e) => {
                let _ = self.client.abort(&self.grant).await;
                return Err(e.into());
            }
        };
        let checksum = if self.checksum {
            let region = self.client.region().expect("shm client");
            // SAFETY: the message is finished and this session still owns the grant: nobody
            // writes these bytes.
            let bytes = unsafe { region.bytes(framed.offset, framed.len) }
                .map_err(|e| InPlaceError::Client(ClientError::Region(e)))?;
            Some(crate::journal::frame_crc(bytes))
        } else {
            None
        };
        let grant = self.grant;
        match self
            .client
            .seal(&grant, framed.offset, framed.len, checksum)
            .await
        {
            Ok(seq) => Ok(seq),
            Err(e) => {
                let _ = self.client.abort(&grant).await;
                Err(e.into())
            }
        }
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
