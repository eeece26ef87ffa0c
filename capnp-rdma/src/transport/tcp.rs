//! The TCP backend: any host, no RDMA.
//!
//! ```text
//!  target → writer   HELLO  magic "CRDH" | version u32 | region id u64 | offset u64 | len u64 | window u32 | pad u32
//!  writer → target   WRITE  magic "CRDW" | imm u32     | offset u64    | len u64    | id u64            (32 bytes)
//!                           then `len` payload bytes: the entries, sent as one vectored write
//!  target → writer   ACK    magic "CRDA" | status u32  | id u64                                         (16 bytes)
//! ```
//!
//! The target checks every header against the range it granted before reading a byte of the
//! payload, reads the payload straight into its region at that offset, and only then
//! acknowledges and announces the write. A header that is malformed or out of range gets a
//! rejecting ACK and the connection is closed; a payload cut short by a disconnect is never
//! announced. A write completes on the writer when its ACK arrives.

use super::wire::{hello_prefix, put_hello_prefix, u32_at, u64_at};
use super::{
    check_post, payload_slices, Completion, Incoming, Landed, Payload, RemoteRegion, SendError,
    Target, TransportError, Writer,
};
use crate::framing::OutboundMessage;
use crate::region::{BlockLease, Region};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"CRDH");
const WRITE_MAGIC: u32 = u32::from_le_bytes(*b"CRDW");
const ACK_MAGIC: u32 = u32::from_le_bytes(*b"CRDA");
const VERSION: u32 = 1;
/// Bytes of a HELLO.
pub const HELLO_LEN: usize = 40;
/// Bytes of a WRITE header.
pub const WRITE_HEADER_LEN: usize = 32;
/// Bytes of an ACK.
pub const ACK_LEN: usize = 16;

const STATUS_OK: u32 = 0;
const STATUS_OUT_OF_RANGE: u32 = 1;
const STATUS_MALFORMED: u32 = 2;

/// The connection parameters a target announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The target's region and granted range.
    pub remote: RemoteRegion,
    /// Most writes the target accepts in flight.
    pub window: u32,
}

impl Hello {
    /// Encodes the HELLO message.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        put_hello_prefix(&mut b, HELLO_MAGIC, VERSION, &self.remote, self.window);
        b
    }

    /// Decodes and checks a HELLO from untrusted bytes.
    pub fn decode(b: &[u8]) -> Result<Self, TransportError> {
        let (remote, window) = hello_prefix(b, HELLO_LEN, HELLO_MAGIC, VERSION, "tcp")?;
        Ok(Self { remote, window })
    }
}

/// The header in front of each write's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteHeader {
    /// Immediate for the target.
    pub imm: u32,
    /// Offset in the target's region.
    pub offset: u64,
    /// Payload bytes that follow.
    pub len: u64,
    /// Writer-chosen id, echoed in the ACK.
    pub id: u64,
}

impl WriteHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; WRITE_HEADER_LEN] {
        let mut b = [0u8; WRITE_HEADER_LEN];
        b[0..4].copy_from_slice(&WRITE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.id.to_le_bytes());
        b
    }

    /// Decodes a header from untrusted bytes and checks it against the granted range.
    pub fn decode(b: &[u8], granted: &RemoteRegion) -> Result<Self, (u64, TransportError)> {
        if b.len() < WRITE_HEADER_LEN || u32_at(b, 0) != WRITE_MAGIC {
            return Err((0, TransportError::Protocol("bad write header".into())));
        }
        let header = Self {
            imm: u32_at(b, 4),
            offset: u64_at(b, 8),
            len: u64_at(b, 16),
            id: u64_at(b, 24),
        };
        granted
            .check(header.offset, header.len)
            .map_err(|e| (header.id, e))?;
        Ok(header)
    }
}

/// Decodes an ACK: (id, status) where status 0 is success.
pub fn decode_ack(b: &[u8]) -> Result<(u64, u32), TransportError> {
    if b.len() < ACK_LEN || u32_at(b, 0) != ACK_MAGIC {
        return Err(TransportError::Protocol("bad ack".into()));
    }
    Ok((u64_at(b, 8), u32_at(b, 4)))
}

fn encode_ack(id: u64, status: u32) -> [u8; ACK_LEN] {
    let mut b = [0u8; ACK_LEN];
    b[0..4].copy_from_slice(&ACK_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&status.to_le_bytes());
    b[8..16].copy_from_slice(&id.to_le_bytes());
    b
}

/// Tuning of TCP connections.
#[derive(Clone, Copy, Debug)]
pub struct TcpOptions {
    /// Most writes in flight (the target announces it; default 16).
    pub window: u32,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self { window: 16 }
    }
}

/// The receiving end over TCP: owns the granted range of its region.
#[derive(Debug)]
pub struct TcpTarget {
    /// Shared with the receiving task, which may still be inside a read into the granted range
    /// when the target is dropped: the lease is released only when both are done with it.
    lease: Arc<BlockLease>,
    granted: RemoteRegion,
    rx: mpsc::UnboundedReceiver<Result<Incoming, TransportError>>,
    done: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        // Stop receiving; the task holds its own reference to the lease until it has stopped.
        self.task.abort();
    }
}

impl TcpTarget {
    /// Accepts one writer on `listener` and grants it the whole of `lease`.
    pub async fn accept(
        listener: &TcpListener,
        lease: BlockLease,
        options: &TcpOptions,
    ) -> Result<Self, TransportError> {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(TransportError::io("accept"))?;
        Self::serve(stream, lease, options).await
    }

    /// Runs the target side on an accepted stream, granting the whole of `lease`.
    pub async fn serve(
        mut stream: TcpStream,
        lease: BlockLease,
        options: &TcpOptions,
    ) -> Result<Self, TransportError> {
        stream
            .set_nodelay(true)
            .map_err(TransportError::io("set_nodelay"))?;
        let granted = RemoteRegion {
            region_id: lease.region().id(),
            rkey: 0,
            base: 0,
            offset: lease.offset(),
            len: lease.len(),
        };
        let hello = Hello {
            remote: granted,
            window: options.window.max(1),
        };
        stream
            .write_all(&hello.encode())
            .await
            .map_err(TransportError::io("send hello"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let lease = Arc::new(lease);
        let task_lease = Arc::clone(&lease);
        let task = tokio::spawn(async move {
            let end = receive(&mut stream, task_lease.region(), &granted, &tx).await;
            let _ = tx.send(Err(end));
            drop(task_lease);
        });
        Ok(Self {
            lease,
            granted,
            rx,
            done: false,
            task,
        })
    }

    /// The lease holding the granted range.
    pub fn lease(&self) -> &BlockLease {
        &self.lease
    }
}

/// Reads writes until the connection ends; returns why it ended.
async fn receive(
    stream: &mut TcpStream,
    region: &Region,
    granted: &RemoteRegion,
    tx: &mpsc::UnboundedSender<Result<Incoming, TransportError>>,
) -> TransportError {
    let mut header = [0u8; WRITE_HEADER_LEN];
    loop {
        if let Err(e) = stream.read_exact(&mut header).await {
            return TransportError::io("read write header")(e);
        }
        let h = match WriteHeader::decode(&header, granted) {
            Ok(h) => h,
            Err((id, e)) => {
                let status = match e {
                    TransportError::OutOfRange { .. } => STATUS_OUT_OF_RANGE,
                    _ => STATUS_MALFORMED,
                };
                let _ = stream.write_all(&encode_ack(id, status)).await;
                return e;
            }
        };
        // SAFETY: the range was checked against the granted range, which lies inside the
        // lease this task holds a reference to (so it stays allocated while we write).
        // Reading the range while a write to it is in progress is the application's protocol
        // violation, exactly as with an RDMA NIC writing into registered memory.
        let buf =
            unsafe { std::slice::from_raw_parts_mut(region.data_ptr(h.offset), h.len as usize) };
        if let Err(e) = stream.read_exact(buf).await {
            // A payload cut short is never announced.
            return TransportError::io("read payload")(e);
        }
        if let Err(e) = stream.write_all(&encode_ack(h.id, STATUS_OK)).await {
            return TransportError::io("send ack")(e);
        }
        let incoming = Incoming {
            imm: h.imm,
            at: Some(Landed {
                offset: h.offset,
                len: h.len,
            }),
        };
        if tx.send(Ok(incoming)).is_err() {
            return TransportError::Disconnected; // the target was dropped
        }
    }
}

impl Target for TcpTarget {
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
        let mut n = 0;
        let first = self.rx.recv().await;
        let mut next = first;
        loop {
            match next {
                Some(Ok(incoming)) => {
                    out.push(incoming);
                    n += 1;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return if n > 0 { Ok(n) } else { Err(e) };
                }
                None => {
                    self.done = true;
                    return if n > 0 {
                        Ok(n)
                    } else {
                        Err(TransportError::Disconnected)
                    };
                }
            }
            match self.rx.try_recv() {
                Ok(item) => next = Some(item),
                Err(_) => return Ok(n),
            }
        }
    }
}

struct Request<P> {
    id: u64,
    payload: P,
    offset: u64,
    imm: u32,
}

/// The writing end over TCP.
pub struct TcpWriter<P: Payload = OutboundMessage> {
    region: Region,
    remote: RemoteRegion,
    window: usize,
    next_id: u64,
    in_flight: usize,
    requests: mpsc::UnboundedSender<Request<P>>,
    done: mpsc::UnboundedReceiver<Completion<P>>,
    task: tokio::task::JoinHandle<()>,
}

impl<P: Payload> std::fmt::Debug for TcpWriter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpWriter")
            .field("remote", &self.remote)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl<P: Payload> Drop for TcpWriter<P> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<P: Payload> TcpWriter<P> {
    /// Connects to a target and learns the range it grants. Payloads must come from `region`.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        region: &Region,
    ) -> Result<Self, TransportError> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(TransportError::io("connect"))?;
        stream
            .set_nodelay(true)
            .map_err(TransportError::io("set_nodelay"))?;
        let mut hello = [0u8; HELLO_LEN];
        stream
            .read_exact(&mut hello)
            .await
            .map_err(TransportError::io("read hello"))?;
        let hello = Hello::decode(&hello)?;
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let (done_tx, done) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(stream, requests_rx, done_tx));
        Ok(Self {
            region: region.clone(),
            remote: hello.remote,
            window: hello.window as usize,
            next_id: 0,
            in_flight: 0,
            requests,
            done,
            task,
        })
    }
}

/// Sends requests and matches ACKs to them until the connection ends; then fails everything
/// still pending, in order, handing every payload back.
async fn drive<P: Payload>(
    stream: TcpStream,
    mut requests: mpsc::UnboundedReceiver<Request<P>>,
    done: mpsc::UnboundedSender<Completion<P>>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut pending: VecDeque<Request<P>> = VecDeque::new();
    let mut ack = [0u8; ACK_LEN];
    let mut ack_fill = 0usize;
    let mut failure: Option<TransportError> = None;
    let mut closed = false;
    while failure.is_none() && !(closed && pending.is_empty()) {
        tokio::select! {
            request = requests.recv(), if !closed => {
                let Some(request) = request else {
                    closed = true;
                    continue;
                };
                let header = WriteHeader {
                    imm: request.imm,
                    offset: request.offset,
                    len: request.payload.total_len(),
                    id: request.id,
                };
                let result = send(&mut wr, &header, &request.payload).await;
                pending.push_back(request);
                if let Err(e) = result {
                    failure = Some(e);
                }
            }
            read = rd.read(&mut ack[ack_fill..]) => {
                match read {
                    Ok(0) => failure = Some(TransportError::Disconnected),
                    Ok(n) => {
                        ack_fill += n;
                        if ack_fill == ACK_LEN {
                            ack_fill = 0;
                            match (decode_ack(&ack), pending.pop_front()) {
                                (Ok((id, status)), Some(request)) if id == request.id => {
                                    let status = match status {
                                        STATUS_OK => Ok(()),
                                        STATUS_OUT_OF_RANGE => Err(TransportError::Rejected("out of the granted range".into())),
                                        other => Err(TransportError::Rejected(format!("status {other}"))),
                                    };
                                    let failed = status.is_err();
                                    let _ = done.send(Completion { id, payload: request.payload, status });
                                    if failed {
                                        failure = Some(TransportError::Disconnected);
                                    }
                                }
                                (_, request) => {
                                    if let Some(r) = request {
                                        pending.push_front(r);
                                    }
                                    failure = Some(TransportError::Protocol("unexpected ack".into()));
                                }
                            }
                        }
                    }
                    Err(e) => failure = Some(TransportError::io("read ack")(e)),
                }
            }
        }
    }
    // Hand every payload back: the ones sent and unacknowledged, then the ones never sent.
    requests.close();
    while let Ok(r) = requests.try_recv() {
        pending.push_back(r);
    }
    let mut first = failure;
    for request in pending {
        let status = Err(first.take().unwrap_or(TransportError::Disconnected));
        let _ = done.send(Completion {
            id: request.id,
            payload: request.payload,
            status,
        });
    }
}

async fn send<P: Payload>(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    header: &WriteHeader,
    payload: &P,
) -> Result<(), TransportError> {
    let header = header.encode();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + payload.entries().len());
    slices.push(IoSlice::new(&header));
    slices.extend(payload_slices(payload).map(IoSlice::new));
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = wr
            .write_vectored(bufs)
            .await
            .map_err(TransportError::io("write payload"))?;
        if n == 0 {
            return Err(TransportError::Disconnected);
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

impl<P: Payload> Writer for TcpWriter<P> {
    type Payload = P;

    fn remote(&self) -> RemoteRegion {
        self.remote
    }

    fn window(&self) -> usize {
        self.window
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn post_write(
        &mut self,
        payload: P,
        remote_offset: u64,
        imm: u32,
    ) -> Result<u64, SendError<P>> {
        let check = check_post(
            &payload,
            &self.region,
            &self.remote,
            remote_offset,
            (self.in_flight, self.window),
        );
        if let Err(error) = check {
            return Err(SendError { payload, error });
        }
        let id = self.next_id;
        let request = Request {
            id,
            payload,
            offset: remote_offset,
            imm,
        };
        match self.requests.send(request) {
            Ok(()) => {
                self.next_id += 1;
                self.in_flight += 1;
                Ok(id)
            }
            Err(mpsc::error::SendError(request)) => Err(SendError {
                payload: request.payload,
                error: TransportError::Disconnected,
            }),
        }
    }

    async fn completions(&mut self, out: &mut Vec<Completion<P>>) -> Result<usize, TransportError> {
        if self.in_flight == 0 {
            return Ok(0);
        }
        let Some(first) = self.done.recv().await else {
            return Err(TransportError::Disconnected);
        };
        out.push(first);
        let mut n = 1;
        while let Ok(c) = self.done.try_recv() {
            out.push(c);
            n += 1;
        }
        self.in_flight -= n;
        Ok(n)
    }
}
