//! Where the store is and how to reach it: `unix:PATH` or a path (shm, same host),
//! `tcp:HOST:PORT` (a data connection), `verbs:HOST:PORT` (RDMA, required), or `HOST:PORT`
//! (RDMA when this host has a device and the store offers it, else a data connection).

use super::ClientError;

pub(super) enum Addr {
    Unix(String),
    /// `tcp:`: a data connection; `verbs:`: RDMA, required; neither: RDMA when there is a
    /// device here and the store offers it, else a data connection.
    Tcp(String, Remote),
}

/// How a remote client moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Remote {
    Tcp,
    Verbs,
    Auto,
}

pub(super) fn parse_addr(addr: &str) -> Result<Addr, ClientError> {
    if let Some(path) = addr.strip_prefix("unix:") {
        return Ok(Addr::Unix(path.to_owned()));
    }
    if let Some(hostport) = addr.strip_prefix("tcp:") {
        return Ok(Addr::Tcp(hostport.to_owned(), Remote::Tcp));
    }
    if let Some(hostport) = addr.strip_prefix("verbs:") {
        return Ok(Addr::Tcp(hostport.to_owned(), Remote::Verbs));
    }
    if addr.starts_with('/') || addr.starts_with('.') {
        return Ok(Addr::Unix(addr.to_owned()));
    }
    if addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        return Ok(Addr::Tcp(addr.to_owned(), Remote::Auto));
    }
    Err(ClientError::BadAddress(addr.to_owned()))
}
