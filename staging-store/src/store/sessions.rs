//! Sessions: one per connection. A session says hello (transport, client name), shows its
//! token on its other connections, and everything it holds goes when it disconnects.

use super::subscriptions::{Held, Subscription};
use super::{err, unix_nanos, Out, SessionId, Store};
use crate::proto::{ErrorCode, Reply, StoreError, Transport, Welcome, VERSION};
use std::collections::HashMap;
use std::time::{Instant, SystemTime};

#[derive(Debug)]
pub(super) struct Session {
    pub(super) transport: Option<Transport>,
    pub(super) local: bool,
    pub(super) client: String,
    pub(super) token: u64,
    pub(super) writing: Vec<u64>,
    pub(super) held: HashMap<u64, Held>,
    pub(super) subscriptions: HashMap<u32, Subscription>,
    pub(super) next_reference: u64,
    pub(super) next_subscription: u32,
}

/// A random 64-bit token (from the kernel's generator).
fn random_token() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_le_bytes(bytes),
        // Never reached on Linux; still unpredictable enough to catch a wrong session.
        Err(_) => unix_nanos(SystemTime::now()).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    }
}

impl Store {
    /// Opens a session for a new connection (`local`: a Unix socket, which may use shm).
    pub fn open_session(&mut self, local: bool) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                transport: None,
                local,
                client: String::new(),
                token: random_token(),
                writing: Vec::new(),
                held: HashMap::new(),
                subscriptions: HashMap::new(),
                next_reference: 1,
                next_subscription: 1,
            },
        );
        id
    }

    /// Whether `token` is the secret of `session`, which said hello with `transport`: what a
    /// tcp client's data connection or a verbs client's RDMA handshake must show.
    pub fn check_token(&self, session: SessionId, token: u64, transport: Transport) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.transport == Some(transport) && s.token == token)
    }

    /// The client name a session gave in its hello.
    pub fn client_name(&self, session: SessionId) -> Option<&str> {
        self.sessions.get(&session).map(|s| s.client.as_str())
    }

    pub(super) fn hello(
        &mut self,
        session: SessionId,
        version: u32,
        client: String,
        transport: Transport,
    ) -> Result<Reply, StoreError> {
        if version != VERSION {
            return Err(err(
                ErrorCode::Unsupported,
                format!("protocol version {version}; this store speaks {VERSION}"),
            ));
        }
        let s = self
            .sessions
            .get_mut(&session)
            .expect("checked by dispatch");
        if transport == Transport::Shm && !s.local {
            return Err(err(
                ErrorCode::Unsupported,
                "shm needs a local (Unix socket) connection",
            ));
        }
        if transport == Transport::Tcp && self.options.data_port == 0 {
            return Err(err(
                ErrorCode::Unsupported,
                "this store has no data listener for tcp clients (serve --listen-tcp)",
            ));
        }
        if transport == Transport::Verbs && self.options.verbs_port == 0 {
            return Err(err(
                ErrorCode::Unsupported,
                "this store offers no RDMA (serve --verbs)",
            ));
        }
        s.transport = Some(transport);
        s.client = client;
        Ok(Reply::Welcome(Welcome {
            version: VERSION,
            session,
            token: s.token,
            region_id: self.region.id(),
            region_bytes: self.region.len(),
            block_bytes: self.region.block_size(),
            data_port: self.options.data_port,
            checksums: self.options.checksums_required,
            verbs_port: self.options.verbs_port,
        }))
    }

    /// A connection ended: everything its session held is dropped, its grants that were
    /// never sealed are freed, its subscriptions detach.
    pub fn disconnect(&mut self, session: SessionId, now: Instant, out: &mut Vec<Out>) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        let subs: Vec<u32> = s.subscriptions.keys().copied().collect();
        let writing = s.writing.clone();
        for sub in subs {
            self.end_subscription(session, sub, false, out);
        }
        let held: Vec<u64> = self.sessions[&session].held.keys().copied().collect();
        for reference in held {
            let _ = self.release(session, reference, false, out);
        }
        for object in writing {
            self.drop_writing(session, object, out);
        }
        for stream in self.streams.values_mut() {
            stream.parked.retain(|p| p.session != session);
        }
        self.sessions.remove(&session);
        // Messages for the session that just left are pointless.
        out.retain(|o| match o {
            Out::Message(s, _) | Out::Data(s, _, _) => *s != session,
        });
        self.after_change(now, out);
    }
}
