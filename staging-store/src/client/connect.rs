//! The handshake: hello and welcome on the control connection, then what the transport
//! needs, then the tasks that write requests and read the store's messages.
//!
//! ```text
//!  connect(addr) ─┬─ unix ─▶ hello(shm) ─▶ welcome + the region's memfd ─▶ map the region
//!                 └─ host:port ─▶ no `tcp:` prefix and an RDMA device here?
//!                      yes ─▶ hello(verbs) ─▶ welcome ─▶ register a staging region, attach to
//!                             the store's RDMA handshake port, RC connection
//!                             (the store offers no RDMA, no `verbs:` prefix: on to tcp)
//!                      no  ─▶ (`verbs:`: an error) hello(tcp) ─▶ welcome ─▶ attach a data
//!                             connection (tcp.rs reads it)
//!  start ─▶ writer task (batches queued requests) + control reader task (routing.rs)
//! ```

use super::addr::{parse_addr, Addr, Remote};
use super::routing::{control_reader, read_message};
use super::tcp::data_reader;
use super::verbs::{verbs_staging_bytes, Verbs};
use super::{io_err, Client, ClientError, Inner};
use crate::data::Attach;
use crate::proto::{
    self, decode_server_message, encode_request, Body, ErrorCode, MessageBuf, Reply, Request,
    ServerMessage, Transport, Welcome,
};
use capnp_rdma::transport::verbs::rc::{RcConnection, RcRegion};
use capnp_rdma::transport::verbs::{VerbsDevice, VerbsOptions};
use capnp_rdma::{OpenOptions, Region, RegionOptions};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

fn hello(client: &str, transport: Transport) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(
        &Request {
            id: 0,
            body: Body::Hello {
                version: proto::VERSION,
                client: client.chars().take(proto::MAX_NAME_BYTES).collect(),
                transport,
            },
        },
        &mut out,
    );
    out
}

fn welcome_of(message: Option<ServerMessage>) -> Result<Welcome, ClientError> {
    match message {
        Some(ServerMessage::Response(proto::Response {
            result: Ok(Reply::Welcome(w)),
            ..
        })) => Ok(w),
        Some(ServerMessage::Response(proto::Response { result: Err(e), .. })) => Err(e.into()),
        Some(other) => Err(ClientError::Protocol(format!(
            "expected a welcome, got {other:?}"
        ))),
        None => Err(ClientError::Closed),
    }
}

/// A second socket to the store (same host as the control connection `control`, at `port`)
/// that has shown the session's ATTACH header: a tcp client's data connection, or a verbs
/// client's RDMA handshake.
async fn attached(
    control: &TcpStream,
    welcome: &Welcome,
    port: u16,
    what: &'static str,
) -> Result<TcpStream, ClientError> {
    let peer = control.peer_addr().map_err(io_err("the store's address"))?;
    let mut socket = TcpStream::connect((peer.ip(), port))
        .await
        .map_err(|source| ClientError::Io {
            what: "connecting to the store",
            source: io::Error::new(source.kind(), format!("{what}: {source}")),
        })?;
    let _ = socket.set_nodelay(true);
    let attach = Attach {
        session: welcome.session,
        token: welcome.token,
    };
    socket
        .write_all(&attach.encode())
        .await
        .map_err(|source| ClientError::Io {
            what: "attaching to the session",
            source: io::Error::new(source.kind(), format!("{what}: {source}")),
        })?;
    Ok(socket)
}

impl Client {
    /// Connects to the store at `addr` and says hello as `name`. `unix:PATH` or a path: shm
    /// (same host, frames read and written in place). `HOST:PORT`: RDMA when this host has a
    /// device (`CAPNP_RDMA_DEVICE`, or the first) and the store offers it, else tcp.
    /// `tcp:HOST:PORT`: tcp. `verbs:HOST:PORT`: RDMA or an error.
    pub async fn connect(addr: &str, name: &str) -> Result<Client, ClientError> {
        match parse_addr(addr)? {
            Addr::Unix(path) => Self::connect_unix(&path, name).await,
            Addr::Tcp(hostport, remote) => Self::connect_remote(&hostport, name, remote).await,
        }
    }

    async fn connect_remote(
        hostport: &str,
        name: &str,
        remote: Remote,
    ) -> Result<Client, ClientError> {
        let mut stream = TcpStream::connect(hostport)
            .await
            .map_err(io_err("connecting to the store"))?;
        let _ = stream.set_nodelay(true);
        let mut buf = MessageBuf::new(proto::MAX_SERVER_MESSAGE_BYTES);
        if remote != Remote::Tcp {
            let options = VerbsOptions::from_env();
            match VerbsDevice::open(&options) {
                Ok(device) => {
                    stream
                        .write_all(&hello(name, Transport::Verbs))
                        .await
                        .map_err(io_err("sending hello"))?;
                    match welcome_of(read_message(&mut stream, &mut buf).await?) {
                        Ok(welcome) => {
                            return Self::attach_verbs(stream, buf, welcome, &device, &options)
                                .await
                        }
                        // The store offers no RDMA: tcp on the same connection.
                        Err(ClientError::Store(e))
                            if e.code == ErrorCode::Unsupported && remote == Remote::Auto => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if remote == Remote::Verbs => return Err(e.into()),
                Err(_) => {}
            }
        }
        Self::connect_tcp(stream, buf, name).await
    }

    /// A verbs session: the region of this client (registered with its device) and an RC
    /// connection to the store's, set up over a socket to the store's handshake port that
    /// first shows the session's token.
    async fn attach_verbs(
        stream: TcpStream,
        buf: MessageBuf,
        welcome: Welcome,
        device: &VerbsDevice,
        options: &VerbsOptions,
    ) -> Result<Client, ClientError> {
        let staging = Region::create(&RegionOptions::memfd(verbs_staging_bytes()))?;
        let staging = RcRegion::register(device, &staging)?;
        let handshake = attached(&stream, &welcome, welcome.verbs_port, "RDMA handshake").await?;
        let connection = RcConnection::handshake(handshake, &staging, options).await?;
        let (read, write) = stream.into_split();
        let client = Self::start(read, write, buf, welcome, Transport::Verbs, None, None);
        client
            .inner
            .verbs
            .set(Verbs {
                connection,
                staging,
            })
            .map_err(|_| ClientError::Protocol("RDMA attached twice".into()))?;
        Ok(client)
    }

    async fn connect_unix(path: &str, name: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(io_err("connecting to the store's Unix socket"))?;
        stream
            .try_write(&hello(name, Transport::Shm))
            .map_err(io_err("sending hello"))?;
        // The welcome arrives with the region's descriptor.
        let mut buf = MessageBuf::new(proto::MAX_SERVER_MESSAGE_BYTES);
        let mut fd = None;
        let welcome = loop {
            if let Some(m) = buf.next_message() {
                let bytes = m.map_err(|e| ClientError::Protocol(e.to_string()))?;
                let message = decode_server_message(bytes)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?;
                break welcome_of(Some(message))?;
            }
            let (n, fds) = capnp_rdma::fdpass::recv_with_fds(&stream, buf.spare(), 1)
                .await
                .map_err(io_err("reading the welcome"))?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            buf.filled(n);
            if let Some(f) = fds.into_iter().next() {
                fd = Some(f);
            }
        };
        let fd = fd.ok_or_else(|| {
            ClientError::Protocol("the welcome came without the region's descriptor".into())
        })?;
        let region = Region::open_fd(
            fd,
            &OpenOptions {
                prefault: true,
                ..OpenOptions::default()
            },
        )?;
        if region.id() != welcome.region_id {
            return Err(ClientError::Protocol(
                "the descriptor is not the region the welcome names".into(),
            ));
        }
        let (read, write) = stream.into_split();
        Ok(Self::start(
            read,
            write,
            buf,
            welcome,
            Transport::Shm,
            Some(region),
            None,
        ))
    }

    async fn connect_tcp(
        mut stream: TcpStream,
        mut buf: MessageBuf,
        name: &str,
    ) -> Result<Client, ClientError> {
        stream
            .write_all(&hello(name, Transport::Tcp))
            .await
            .map_err(io_err("sending hello"))?;
        let welcome = welcome_of(read_message(&mut stream, &mut buf).await?)?;
        let data = attached(&stream, &welcome, welcome.data_port, "data connection").await?;
        let (data_read, data_write) = data.into_split();
        let (read, write) = stream.into_split();
        let client = Self::start(
            read,
            write,
            buf,
            welcome,
            Transport::Tcp,
            None,
            Some(data_write),
        );
        tokio::spawn(data_reader(Arc::downgrade(&client.inner), data_read));
        Ok(client)
    }

    fn start(
        read: impl AsyncReadExt + Unpin + Send + 'static,
        mut write: impl AsyncWriteExt + Unpin + Send + 'static,
        buf: MessageBuf,
        welcome: Welcome,
        transport: Transport,
        region: Option<Region>,
        data: Option<tokio::net::tcp::OwnedWriteHalf>,
    ) -> Client {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.clear();
                batch.extend_from_slice(&first);
                while let Ok(more) = rx.try_recv() {
                    batch.extend_from_slice(&more);
                }
                if write.write_all(&batch).await.is_err() {
                    return;
                }
            }
            let _ = write.shutdown().await;
        });
        let inner = Arc::new(Inner {
            writer: tx,
            waiters: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            got_bytes: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            welcome,
            transport,
            region,
            data: data.map(tokio::sync::Mutex::new),
            notices: Mutex::new(Vec::new()),
            spare: Mutex::new(Vec::new()),
            verbs: std::sync::OnceLock::new(),
            local: std::sync::OnceLock::new(),
            closed_subscriptions: Mutex::new(std::collections::HashSet::new()),
        });
        tokio::spawn(control_reader(Arc::downgrade(&inner), read, buf));
        Client { inner }
    }
}
