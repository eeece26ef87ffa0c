//! The RDMA device: which one to open and how ([`VerbsOptions`]), and the opened device with
//! its protection domain, port, GID and limits ([`VerbsDevice`]).

use crate::transport::TransportError;
use sideway::ibverbs::address::Gid;
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use std::sync::Arc;

/// How to pick and use an RDMA device.
#[derive(Clone, Debug)]
pub struct VerbsOptions {
    /// Device name (e.g. `mlx5_0`, `rxe0`); `None` = the first device.
    pub device: Option<String>,
    /// Port number (1-based).
    pub port: u8,
    /// GID index; `None` = the GID of `ip` if given, else the first RoCE v2 IPv4-mapped GID
    /// among the first 16, else 0.
    pub gid_index: Option<u32>,
    /// Select the device, port GID and index by the IPv4 address the GID maps (RoCE v2):
    /// the first device (or the named one) with a GID `::ffff:ip` on `port`.
    pub ip: Option<std::net::Ipv4Addr>,
    /// Most writes in flight per connection (the target announces it).
    pub window: u32,
    /// Most empty polls before the poller arms the CQ and sleeps (adaptive below this).
    pub max_spin: u32,
}

impl Default for VerbsOptions {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            ip: None,
            window: 16,
            max_spin: 256,
        }
    }
}

impl VerbsOptions {
    /// Defaults overridden by `CAPNP_RDMA_DEVICE`, `CAPNP_RDMA_PORT`, `CAPNP_RDMA_GID_INDEX`
    /// and `CAPNP_RDMA_IP`.
    pub fn from_env() -> Self {
        let mut o = Self::default();
        if let Ok(d) = std::env::var("CAPNP_RDMA_DEVICE") {
            o.device = Some(d);
        }
        if let Some(p) = std::env::var("CAPNP_RDMA_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
        {
            o.port = p;
        }
        if let Some(ip) = std::env::var("CAPNP_RDMA_IP")
            .ok()
            .and_then(|ip| ip.parse().ok())
        {
            o.ip = Some(ip);
        }
        if let Some(g) = std::env::var("CAPNP_RDMA_GID_INDEX")
            .ok()
            .and_then(|g| g.parse().ok())
        {
            o.gid_index = Some(g);
        }
        o
    }
}

pub(super) fn device_err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Device(format!("{what}: {e}"))
}

pub(super) struct DeviceInner {
    pub(super) ctx: Arc<DeviceContext>,
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) name: String,
    pub(super) port: u8,
    pub(super) gid: Gid,
    pub(super) gid_index: u32,
    pub(super) mtu: Mtu,
    pub(super) max_send_sge: u32,
    pub(super) max_qp_wr: u32,
}

/// An opened RDMA device: context, protection domain, port and GID.
#[derive(Clone)]
pub struct VerbsDevice {
    pub(super) inner: Arc<DeviceInner>,
}

impl std::fmt::Debug for VerbsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDevice")
            .field("name", &self.inner.name)
            .field("port", &self.inner.port)
            .field("gid_index", &self.inner.gid_index)
            .field("max_send_sge", &self.inner.max_send_sge)
            .finish()
    }
}

impl VerbsDevice {
    /// Opens the device `options` selects. No device at all (including a kernel without RDMA
    /// support, where the device list fails with ENOSYS) is [`TransportError::NoDevice`].
    pub fn open(options: &VerbsOptions) -> Result<Self, TransportError> {
        let list = DeviceList::new().map_err(|e| {
            TransportError::NoDevice(format!(
                "cannot list RDMA devices ({e:?}); is rdma-core installed and an RDMA driver \
                 (e.g. rdma_rxe for Soft-RoCE) loaded?"
            ))
        })?;
        let mapped = |ip: std::net::Ipv4Addr| {
            let mut raw = [0u8; 16];
            raw[10] = 0xff;
            raw[11] = 0xff;
            raw[12..].copy_from_slice(&ip.octets());
            raw
        };
        let roce_v2_ipv4 = |g: &Gid| g.raw[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let mut chosen = None;
        let mut seen = Vec::new();
        for device in list.iter() {
            let name = device.name();
            seen.push(name.clone());
            if options.device.as_ref().is_some_and(|want| *want != name) {
                continue;
            }
            let ctx = device.open().map_err(|e| device_err("open device", e))?;
            let gid_index = match (options.gid_index, options.ip) {
                (Some(i), _) => Some(i),
                (None, Some(ip)) => (0..16u32).find(|&i| {
                    ctx.query_gid(options.port, i)
                        .is_ok_and(|g| g.raw == mapped(ip))
                }),
                (None, None) => Some(
                    (0..16u32)
                        .find(|&i| {
                            ctx.query_gid(options.port, i)
                                .is_ok_and(|g| roce_v2_ipv4(&g))
                        })
                        .unwrap_or(0),
                ),
            };
            if let Some(gid_index) = gid_index {
                chosen = Some((name, ctx, gid_index));
                break;
            }
        }
        let (name, ctx, gid_index) = chosen.ok_or_else(|| {
            TransportError::NoDevice(match (&options.device, options.ip) {
                (_, Some(ip)) => format!(
                    "no device has a GID for {ip} on port {}; devices: {seen:?}",
                    options.port
                ),
                (Some(name), None) => format!("no device named {name}; devices: {seen:?}"),
                (None, None) => "the RDMA device list is empty".into(),
            })
        })?;
        let attr = ctx
            .query_device()
            .map_err(|e| device_err("query device", e))?;
        let port = ctx
            .query_port(options.port)
            .map_err(|e| device_err("query port", e))?;
        let gid = ctx
            .query_gid(options.port, gid_index)
            .map_err(|e| device_err("query gid", e))?;
        let pd = ctx.alloc_pd().map_err(|e| device_err("allocate PD", e))?;
        Ok(Self {
            inner: Arc::new(DeviceInner {
                mtu: port.active_mtu(),
                max_send_sge: u32::try_from(attr.max_sge()).unwrap_or(1).max(1),
                max_qp_wr: u32::try_from(attr.max_qp_wr()).unwrap_or(1).max(1),
                ctx,
                pd,
                name,
                port: options.port,
                gid,
                gid_index,
            }),
        })
    }

    /// The GID index in use.
    pub fn gid_index(&self) -> u32 {
        self.inner.gid_index
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Scatter-gather entries one send work request may carry.
    pub fn max_send_sge(&self) -> u32 {
        self.inner.max_send_sge
    }
}
