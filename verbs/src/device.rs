//! Device discovery: the device list, opened contexts, port attributes, the
//! GID table (with RoCE v2 IPv4 GID selection) and a printable
//! [`DeviceReport`].

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{returned_errno, verbs_error, Error, Result};
use crate::sys;

/// Where the kernel publishes RDMA device attributes that verbs does not
/// return (GID types, NUMA node).
pub const SYSFS_INFINIBAND: &str = "/sys/class/infiniband";

/// A device as listed by `ibv_get_device_list`, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kernel name, e.g. `rxe0`, `mlx5_0`.
    pub name: String,
    /// Node GUID, host byte order.
    pub guid: u64,
}

/// The device list, owned; freed on drop.
struct DeviceList {
    list: NonNull<*mut sys::ibv_device>,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<DeviceList> {
        let mut n: libc::c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the returned array (if any) is
        // owned by us until `ibv_free_device_list` (in `Drop`).
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        let Some(list) = NonNull::new(list) else {
            let err = io::Error::last_os_error();
            return Err(verbs_error("ibv_get_device_list", err, |source| {
                Error::ListDevices { source }
            }));
        };
        let list = DeviceList {
            list,
            len: usize::try_from(n).unwrap_or(0),
        };
        if list.len == 0 {
            return Err(Error::NoDevice);
        }
        Ok(list)
    }

    fn devices(&self) -> impl Iterator<Item = *mut sys::ibv_device> + '_ {
        // SAFETY: libibverbs returns an array of `len` valid device pointers
        // (NULL-terminated), alive until the list is freed, which cannot
        // happen while `self` is borrowed.
        (0..self.len).map(move |i| unsafe { *self.list.as_ptr().add(i) })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from `ibv_get_device_list` and is freed once.
        // Contexts opened from it stay valid (libibverbs keeps its own
        // reference to each opened device).
        unsafe { sys::ibv_free_device_list(self.list.as_ptr()) };
    }
}

fn device_name(dev: *mut sys::ibv_device) -> String {
    // SAFETY: `dev` is a live entry of the device list; the returned string
    // is owned by libibverbs and NUL-terminated; we copy it out at once.
    let name = unsafe { sys::ibv_get_device_name(dev) };
    if name.is_null() {
        return String::from("?");
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// List the RDMA devices of this host.
///
/// # Errors
/// [`Error::Unsupported`] when the host has no RDMA support (libibverbs fails
/// with `ENOSYS`), [`Error::NoDevice`] when it lists no device: both satisfy
/// [`Error::is_no_rdma`]. [`Error::ListDevices`] for other failures.
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let list = DeviceList::get()?;
    Ok(list
        .devices()
        .map(|dev| DeviceInfo {
            name: device_name(dev),
            // SAFETY: `dev` is a live entry of the device list.
            guid: u64::from_be(unsafe { sys::ibv_get_device_guid(dev) }),
        })
        .collect())
}

/// A report on every device of this host (what `ferry devices` prints).
///
/// # Errors
/// As [`devices`], plus any error of [`Context::open`] / [`Context::report`].
pub fn device_reports() -> Result<Vec<DeviceReport>> {
    devices()?
        .iter()
        .map(|d| Context::open(&d.name)?.report())
        .collect()
}

pub(crate) struct ContextInner {
    ctx: NonNull<sys::ibv_context>,
    name: String,
    limits: DeviceLimits,
    node_guid: u64,
    fw_ver: String,
    port_count: u8,
}

// SAFETY: an `ibv_context` may be used from any thread; libibverbs serializes
// what needs serializing internally. The pointer is owned (closed once, in
// Drop) and the other fields are plain data.
unsafe impl Send for ContextInner {}
// SAFETY: as above: all verbs taking a context are thread-safe.
unsafe impl Sync for ContextInner {}

impl ContextInner {
    pub(crate) fn as_ptr(&self) -> *mut sys::ibv_context {
        self.ctx.as_ptr()
    }
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
    pub(crate) fn limits(&self) -> &DeviceLimits {
        &self.limits
    }
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: the context was opened by `ibv_open_device` and every child
        // resource (PD, CQ, QP, MR) holds an `Arc` to this value, so all of
        // them are already destroyed when it is closed.
        let rc = unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, rc, "ibv_close_device failed");
        }
    }
}

/// An opened RDMA device.
///
/// Cheap to clone (reference counted); the device is closed when the last
/// clone and the last resource created from it are dropped.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// Limits of a device that Ferry's data path depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Maximum number of queue pairs.
    pub max_qp: u32,
    /// Maximum work requests per queue (send queue depth).
    pub max_qp_wr: u32,
    /// Maximum completion-queue entries.
    pub max_cqe: u32,
    /// Outstanding RDMA READs a queue pair can *serve* as responder
    /// (our `max_dest_rd_atomic`, advertised to the peer).
    pub max_qp_rd_atom: u32,
    /// Outstanding RDMA READs a queue pair can *issue* as requester
    /// (bounds our `max_rd_atomic`).
    pub max_qp_init_rd_atom: u32,
    /// Largest single memory registration, in bytes.
    pub max_mr_size: u64,
}

impl Context {
    /// Open the device called `name`.
    ///
    /// # Errors
    /// As [`devices`]; [`Error::DeviceNotFound`] if no device has that name;
    /// [`Error::OpenDevice`] / [`Error::QueryDevice`] if it cannot be opened.
    pub fn open(name: &str) -> Result<Context> {
        let list = DeviceList::get()?;
        let dev = list
            .devices()
            .find(|&d| device_name(d) == name)
            .ok_or_else(|| Error::DeviceNotFound {
                name: name.to_owned(),
            })?;
        Self::open_device(dev, name.to_owned())
    }

    /// Open the first device in the list (the only one on an rxe test guest).
    ///
    /// # Errors
    /// As [`Context::open`].
    pub fn open_first() -> Result<Context> {
        let list = DeviceList::get()?;
        let dev = list.devices().next().ok_or(Error::NoDevice)?;
        Self::open_device(dev, device_name(dev))
    }

    fn open_device(dev: *mut sys::ibv_device, name: String) -> Result<Context> {
        // SAFETY: `dev` is a live entry of a device list that outlives this
        // call; the returned context is owned by `ContextInner`.
        let ctx = unsafe { sys::ibv_open_device(dev) };
        let Some(ctx) = NonNull::new(ctx) else {
            let err = io::Error::last_os_error();
            return Err(verbs_error("ibv_open_device", err, |source| {
                Error::OpenDevice {
                    name: name.clone(),
                    source,
                }
            }));
        };
        // SAFETY: `ibv_device_attr` is a plain C struct for which all-zero
        // bytes are a valid value; it is only an out-parameter here.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is a just-opened context, `attr` a valid out-pointer.
        let rc = unsafe { sys::ibv_query_device(ctx.as_ptr(), &mut attr) };
        if rc != 0 {
            // SAFETY: we opened it above and nothing else refers to it.
            unsafe { sys::ibv_close_device(ctx.as_ptr()) };
            return Err(verbs_error(
                "ibv_query_device",
                returned_errno(rc),
                |source| Error::QueryDevice { name, source },
            ));
        }
        let nonneg = |v: libc::c_int| u32::try_from(v).unwrap_or(0);
        let limits = DeviceLimits {
            max_qp: nonneg(attr.max_qp),
            max_qp_wr: nonneg(attr.max_qp_wr),
            max_cqe: nonneg(attr.max_cqe),
            max_qp_rd_atom: nonneg(attr.max_qp_rd_atom),
            max_qp_init_rd_atom: nonneg(attr.max_qp_init_rd_atom),
            max_mr_size: attr.max_mr_size,
        };
        let fw: Vec<u8> = attr
            .fw_ver
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(Context {
            inner: Arc::new(ContextInner {
                ctx,
                name,
                limits,
                node_guid: u64::from_be(attr.node_guid),
                fw_ver: String::from_utf8_lossy(&fw).into_owned(),
                port_count: attr.phys_port_cnt,
            }),
        })
    }

    /// Device name (`rxe0`, ...).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device's limits (queried once, at open).
    #[must_use]
    pub fn limits(&self) -> DeviceLimits {
        self.inner.limits
    }

    /// Number of physical ports; ports are numbered from 1.
    #[must_use]
    pub fn port_count(&self) -> u8 {
        self.inner.port_count
    }

    /// Query port `port` (1-based).
    ///
    /// # Errors
    /// [`Error::QueryPort`] if the port does not exist or the query fails.
    pub fn port(&self, port: u8) -> Result<PortAttr> {
        // SAFETY: plain C struct, all-zero is valid; out-parameter only.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open for as long as `self` lives; `attr` is
        // a valid out-pointer of the size the provider is told.
        let rc = unsafe { sys::ibv_query_port(self.inner.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(verbs_error(
                "ibv_query_port",
                returned_errno(rc),
                |source| Error::QueryPort {
                    name: self.inner.name.clone(),
                    port,
                    source,
                },
            ));
        }
        Ok(PortAttr {
            port,
            state: PortState::from_raw(attr.state),
            link_layer: LinkLayer::from_raw(attr.link_layer),
            active_mtu: Mtu::from_raw(attr.active_mtu),
            max_mtu: Mtu::from_raw(attr.max_mtu),
            max_msg_size: attr.max_msg_sz,
            lid: attr.lid,
            gid_table_len: u32::try_from(attr.gid_tbl_len).unwrap_or(0),
        })
    }

    /// Query GID `index` of `port` through verbs.
    ///
    /// # Errors
    /// [`Error::QueryGid`] if the query fails.
    pub fn gid(&self, port: u8, index: u32) -> Result<Gid> {
        // SAFETY: `ibv_gid` is a 16-byte union of plain integers; zero is valid.
        let mut gid: sys::ibv_gid = unsafe { std::mem::zeroed() };
        let idx = libc::c_int::try_from(index).map_err(|_| Error::Invalid {
            what: "GID index",
            reason: format!("{index} does not fit a C int"),
        })?;
        // SAFETY: open context, valid out-pointer to a 16-byte `union ibv_gid`.
        let rc = unsafe { sys::ibv_query_gid(self.inner.as_ptr(), port, idx, &mut gid) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(verbs_error("ibv_query_gid", err, |source| {
                Error::QueryGid {
                    port,
                    index,
                    source,
                }
            }));
        }
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        Ok(Gid(unsafe { gid.raw }))
    }

    /// The populated GID table of `port`: every entry whose type sysfs
    /// reports, with its value (from verbs). Unpopulated entries are skipped.
    ///
    /// # Errors
    /// [`Error::QueryPort`] / [`Error::QueryGid`].
    pub fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>> {
        let attr = self.port(port)?;
        let dir = port_dir(Path::new(SYSFS_INFINIBAND), &self.inner.name, port);
        let mut out = Vec::new();
        for index in 0..attr.gid_table_len {
            // Unpopulated entries fail to read (EINVAL) or are all-zero.
            let Some(kind) = read_gid_type(&dir, index) else {
                continue;
            };
            let gid = match self.gid(port, index) {
                Ok(g) => g,
                Err(_) => continue,
            };
            if gid.0 == [0; 16] {
                continue;
            }
            out.push(GidEntry { index, gid, kind });
        }
        Ok(out)
    }

    /// The RoCE v2 GID of `port` that carries an IPv4 address (on rxe over
    /// `lo`: index 1, `::ffff:127.0.0.1`). The lowest such index wins.
    ///
    /// # Errors
    /// [`Error::NoRoceV2Ipv4Gid`] if there is none; errors of [`Context::gid_table`].
    pub fn roce_v2_ipv4_gid(&self, port: u8) -> Result<GidEntry> {
        select_roce_v2_ipv4(&self.gid_table(port)?).ok_or_else(|| Error::NoRoceV2Ipv4Gid {
            name: self.inner.name.clone(),
            port,
        })
    }

    /// NUMA node of the NIC, from sysfs; `None` when unknown (no `device/`
    /// link, as on rxe, or `-1`).
    #[must_use]
    pub fn numa_node(&self) -> Option<u32> {
        numa_node_at(&Path::new(SYSFS_INFINIBAND).join(&self.inner.name))
    }

    /// Everything `ferry devices` prints about this device.
    ///
    /// # Errors
    /// Errors of [`Context::port`] and [`Context::gid_table`].
    pub fn report(&self) -> Result<DeviceReport> {
        let mut ports = Vec::new();
        for p in 1..=self.inner.port_count {
            let attr = self.port(p)?;
            let gids = self.gid_table(p)?;
            let roce_v2_ipv4 = select_roce_v2_ipv4(&gids).map(|g| g.index);
            ports.push(PortReport {
                attr,
                gids,
                roce_v2_ipv4,
            });
        }
        Ok(DeviceReport {
            name: self.inner.name.clone(),
            node_guid: self.inner.node_guid,
            fw_ver: self.inner.fw_ver.clone(),
            numa_node: self.numa_node(),
            limits: self.inner.limits,
            ports,
        })
    }

    /// Allocate a protection domain on this device.
    ///
    /// # Errors
    /// [`Error::AllocPd`].
    pub fn alloc_pd(&self) -> Result<crate::ProtectionDomain> {
        crate::ProtectionDomain::new(self)
    }

    /// Create a completion queue with room for `capacity` completions.
    ///
    /// # Errors
    /// [`Error::CreateCq`].
    pub fn create_cq(&self, capacity: u32) -> Result<crate::CompletionQueue> {
        crate::CompletionQueue::new(self, capacity)
    }

    /// The raw `ibv_context`.
    ///
    /// Escape hatch for verbs this crate does not wrap. The pointer is valid
    /// while `self` (or any resource created from it) lives; do not close it
    /// or otherwise break the invariants the wrappers rely on.
    #[must_use]
    pub fn as_raw(&self) -> *mut sys::ibv_context {
        self.inner.as_ptr()
    }
}

/// Read `gid_attrs/types/<index>` under a port's sysfs directory; `None` when
/// the entry is unpopulated (the kernel answers EINVAL) or unreadable.
fn read_gid_type(port_dir: &Path, index: u32) -> Option<GidType> {
    let path = port_dir.join("gid_attrs/types").join(index.to_string());
    std::fs::read_to_string(path)
        .ok()
        .map(|s| GidType::parse(&s))
}

/// Parse `<dev_dir>/device/numa_node`; `-1` or a missing file mean unknown.
fn numa_node_at(dev_dir: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(dev_dir.join("device/numa_node")).ok()?;
    s.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

/// Lowest-index RoCE v2 entry whose GID is an IPv4-mapped address.
fn select_roce_v2_ipv4(gids: &[GidEntry]) -> Option<GidEntry> {
    gids.iter()
        .filter(|g| g.kind == GidType::RoceV2 && g.gid.is_ipv4_mapped())
        .min_by_key(|g| g.index)
        .cloned()
}

/// A 128-bit GID, in network byte order (as on the wire and in sysfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// True for `::ffff:a.b.c.d`, the form RoCE v2 uses for IPv4 addresses.
    #[must_use]
    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10..12] == [0xff, 0xff]
    }

    /// The GID as an IPv6 address.
    #[must_use]
    pub fn to_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.0)
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ipv6Addr prints IPv4-mapped addresses as ::ffff:a.b.c.d.
        fmt::Display::fmt(&self.to_ipv6(), f)
    }
}

/// The type of a GID table entry, from `gid_attrs/types/<i>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GidType {
    /// `IB/RoCE v1`.
    IbOrRoceV1,
    /// `RoCE v2` (UDP/IP encapsulated; routable; what Ferry uses).
    RoceV2,
    /// Anything else the kernel reports.
    Other(String),
}

impl GidType {
    fn parse(s: &str) -> GidType {
        match s.trim() {
            "RoCE v2" => GidType::RoceV2,
            "IB/RoCE v1" => GidType::IbOrRoceV1,
            other => GidType::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for GidType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GidType::IbOrRoceV1 => f.write_str("IB/RoCE v1"),
            GidType::RoceV2 => f.write_str("RoCE v2"),
            GidType::Other(s) => f.write_str(s),
        }
    }
}

/// One populated GID table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    /// Index in the port's GID table (what a QP's `sgid_index` names).
    pub index: u32,
    /// The GID.
    pub gid: Gid,
    /// Its type.
    pub kind: GidType,
}

/// Logical port state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    /// `IBV_PORT_NOP`.
    Nop,
    /// `IBV_PORT_DOWN`.
    Down,
    /// `IBV_PORT_INIT`.
    Init,
    /// `IBV_PORT_ARMED`.
    Armed,
    /// `IBV_PORT_ACTIVE`: usable.
    Active,
    /// `IBV_PORT_ACTIVE_DEFER`.
    ActiveDefer,
    /// A value this crate does not know.
    Unknown(u32),
}

impl PortState {
    fn from_raw(v: u32) -> PortState {
        use sys::ibv_port_state as s;
        match v {
            s::IBV_PORT_NOP => PortState::Nop,
            s::IBV_PORT_DOWN => PortState::Down,
            s::IBV_PORT_INIT => PortState::Init,
            s::IBV_PORT_ARMED => PortState::Armed,
            s::IBV_PORT_ACTIVE => PortState::Active,
            s::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Unknown(other),
        }
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortState::Nop => f.write_str("NOP"),
            PortState::Down => f.write_str("DOWN"),
            PortState::Init => f.write_str("INIT"),
            PortState::Armed => f.write_str("ARMED"),
            PortState::Active => f.write_str("ACTIVE"),
            PortState::ActiveDefer => f.write_str("ACTIVE_DEFER"),
            PortState::Unknown(v) => write!(f, "unknown({v})"),
        }
    }
}

/// Link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand (LID-routed).
    InfiniBand,
    /// Ethernet: RoCE (GID-routed; rxe is always this).
    Ethernet,
    /// Unspecified or unknown.
    Unspecified(u8),
}

impl LinkLayer {
    fn from_raw(v: u8) -> LinkLayer {
        match v {
            sys::IBV_LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
            sys::IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            other => LinkLayer::Unspecified(other),
        }
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkLayer::InfiniBand => f.write_str("InfiniBand"),
            LinkLayer::Ethernet => f.write_str("Ethernet"),
            LinkLayer::Unspecified(v) => write!(f, "unspecified({v})"),
        }
    }
}

/// A path MTU (`enum ibv_mtu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mtu {
    /// 256 bytes.
    Mtu256,
    /// 512 bytes.
    Mtu512,
    /// 1024 bytes.
    Mtu1024,
    /// 2048 bytes.
    Mtu2048,
    /// 4096 bytes.
    Mtu4096,
    /// A value this crate does not know (treated as 1024 when connecting).
    Unknown(u32),
}

impl Mtu {
    fn from_raw(v: u32) -> Mtu {
        use sys::ibv_mtu as m;
        match v {
            m::IBV_MTU_256 => Mtu::Mtu256,
            m::IBV_MTU_512 => Mtu::Mtu512,
            m::IBV_MTU_1024 => Mtu::Mtu1024,
            m::IBV_MTU_2048 => Mtu::Mtu2048,
            m::IBV_MTU_4096 => Mtu::Mtu4096,
            other => Mtu::Unknown(other),
        }
    }

    pub(crate) fn to_raw(self) -> u32 {
        use sys::ibv_mtu as m;
        match self {
            Mtu::Mtu256 => m::IBV_MTU_256,
            Mtu::Mtu512 => m::IBV_MTU_512,
            Mtu::Mtu1024 | Mtu::Unknown(_) => m::IBV_MTU_1024,
            Mtu::Mtu2048 => m::IBV_MTU_2048,
            Mtu::Mtu4096 => m::IBV_MTU_4096,
        }
    }

    /// The MTU in bytes (`None` for an unknown value).
    #[must_use]
    pub fn bytes(self) -> Option<u32> {
        match self {
            Mtu::Mtu256 => Some(256),
            Mtu::Mtu512 => Some(512),
            Mtu::Mtu1024 => Some(1024),
            Mtu::Mtu2048 => Some(2048),
            Mtu::Mtu4096 => Some(4096),
            Mtu::Unknown(_) => None,
        }
    }
}

impl fmt::Display for Mtu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.bytes() {
            Some(b) => write!(f, "{b}"),
            None => write!(f, "unknown"),
        }
    }
}

/// Attributes of one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAttr {
    /// Port number (1-based).
    pub port: u8,
    /// Logical state; only [`PortState::Active`] ports carry traffic.
    pub state: PortState,
    /// InfiniBand or Ethernet (RoCE).
    pub link_layer: LinkLayer,
    /// Active path MTU.
    pub active_mtu: Mtu,
    /// Largest MTU the port supports.
    pub max_mtu: Mtu,
    /// Largest message (and so largest single RDMA READ), in bytes.
    pub max_msg_size: u32,
    /// LID (0 on RoCE).
    pub lid: u16,
    /// Size of the GID table.
    pub gid_table_len: u32,
}

/// A port as shown by [`DeviceReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReport {
    /// Port attributes.
    pub attr: PortAttr,
    /// Populated GID entries.
    pub gids: Vec<GidEntry>,
    /// Index of the RoCE v2 IPv4 GID Ferry would use, if any.
    pub roce_v2_ipv4: Option<u32>,
}

/// Everything Ferry knows about a device; `Display` is what `ferry devices`
/// prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// Device name.
    pub name: String,
    /// Node GUID, host byte order.
    pub node_guid: u64,
    /// Firmware version string (empty on rxe).
    pub fw_ver: String,
    /// NUMA node of the NIC; `None` = unknown.
    pub numa_node: Option<u32>,
    /// Device limits.
    pub limits: DeviceLimits,
    /// Ports, in order.
    pub ports: Vec<PortReport>,
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.node_guid.to_be_bytes();
        write!(
            f,
            "{}: node GUID {:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
            self.name, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
        )?;
        if !self.fw_ver.is_empty() {
            write!(f, ", firmware {}", self.fw_ver)?;
        }
        match self.numa_node {
            Some(n) => writeln!(f, ", NUMA node {n}")?,
            None => writeln!(f, ", NUMA node unknown")?,
        }
        let l = &self.limits;
        writeln!(
            f,
            "  limits: max_qp {}, max_qp_wr {}, max_cqe {}, max_qp_rd_atom {}, max_qp_init_rd_atom {}, max_mr_size {}",
            l.max_qp, l.max_qp_wr, l.max_cqe, l.max_qp_rd_atom, l.max_qp_init_rd_atom, l.max_mr_size
        )?;
        for p in &self.ports {
            let a = &p.attr;
            writeln!(
                f,
                "  port {}: {}, link layer {}, active MTU {} (max {}), max message {} bytes, LID {}",
                a.port, a.state, a.link_layer, a.active_mtu, a.max_mtu, a.max_msg_size, a.lid
            )?;
            for e in &p.gids {
                let mark = if Some(e.index) == p.roce_v2_ipv4 {
                    "  <- RoCE v2 IPv4 (used by Ferry)"
                } else {
                    ""
                };
                writeln!(f, "    gid[{}] {} {}{}", e.index, e.gid, e.kind, mark)?;
            }
            if p.roce_v2_ipv4.is_none() {
                writeln!(f, "    no RoCE v2 IPv4 GID on this port")?;
            }
        }
        Ok(())
    }
}

/// A port's sysfs directory under `root` (a parameter so tests can fake it).
fn port_dir(root: &Path, dev: &str, port: u8) -> PathBuf {
    root.join(dev).join("ports").join(port.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-verbs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create temp dir");
        d
    }

    #[test]
    fn gid_types_and_numa_node_come_from_sysfs() {
        let root = tmpdir("sysfs");
        let port = port_dir(&root, "rxe0", 1);
        std::fs::create_dir_all(port.join("gid_attrs/types")).expect("mkdir");
        std::fs::write(port.join("gid_attrs/types/0"), "IB/RoCE v1\n").expect("write");
        std::fs::write(port.join("gid_attrs/types/1"), "RoCE v2\n").expect("write");
        assert_eq!(read_gid_type(&port, 0), Some(GidType::IbOrRoceV1));
        assert_eq!(read_gid_type(&port, 1), Some(GidType::RoceV2));
        assert_eq!(read_gid_type(&port, 2), None);

        let dev = root.join("rxe0");
        assert_eq!(numa_node_at(&dev), None);
        std::fs::create_dir_all(dev.join("device")).expect("mkdir");
        std::fs::write(dev.join("device/numa_node"), "-1\n").expect("write");
        assert_eq!(numa_node_at(&dev), None);
        std::fs::write(dev.join("device/numa_node"), "1\n").expect("write");
        assert_eq!(numa_node_at(&dev), Some(1));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn gid(s: &str) -> Gid {
        Gid(s.parse::<Ipv6Addr>().expect("test GID").octets())
    }

    #[test]
    fn selects_the_roce_v2_ipv4_gid() {
        let table = vec![
            GidEntry {
                index: 0,
                gid: gid("fe80::200:ff:fe00:0"),
                kind: GidType::RoceV2,
            },
            GidEntry {
                index: 1,
                gid: gid("::ffff:127.0.0.1"),
                kind: GidType::IbOrRoceV1,
            },
            GidEntry {
                index: 3,
                gid: gid("::ffff:127.0.0.1"),
                kind: GidType::RoceV2,
            },
            GidEntry {
                index: 2,
                gid: gid("::1"),
                kind: GidType::RoceV2,
            },
        ];
        let sel = select_roce_v2_ipv4(&table).expect("one matches");
        assert_eq!(sel.index, 3);
        assert_eq!(sel.gid.to_string(), "::ffff:127.0.0.1");
        assert!(select_roce_v2_ipv4(&table[..1]).is_none());
    }

    #[test]
    fn report_display_names_what_matters() {
        let r = DeviceReport {
            name: "rxe0".into(),
            node_guid: 0x0200_00ff_fe00_0000,
            fw_ver: String::new(),
            numa_node: None,
            limits: DeviceLimits {
                max_qp: 1,
                max_qp_wr: 2,
                max_cqe: 3,
                max_qp_rd_atom: 128,
                max_qp_init_rd_atom: 128,
                max_mr_size: u64::MAX,
            },
            ports: vec![PortReport {
                attr: PortAttr {
                    port: 1,
                    state: PortState::Active,
                    link_layer: LinkLayer::Ethernet,
                    active_mtu: Mtu::Mtu1024,
                    max_mtu: Mtu::Mtu4096,
                    max_msg_size: 1 << 31,
                    lid: 0,
                    gid_table_len: 1024,
                },
                gids: vec![GidEntry {
                    index: 1,
                    gid: gid("::ffff:127.0.0.1"),
                    kind: GidType::RoceV2,
                }],
                roce_v2_ipv4: Some(1),
            }],
        };
        let s = r.to_string();
        assert!(
            s.starts_with("rxe0: node GUID 0200:00ff:fe00:0000, NUMA node unknown"),
            "{s}"
        );
        assert!(s.contains("max_qp_rd_atom 128"), "{s}");
        assert!(
            s.contains("port 1: ACTIVE, link layer Ethernet, active MTU 1024"),
            "{s}"
        );
        assert!(s.contains("max message 2147483648 bytes"), "{s}");
        assert!(
            s.contains("gid[1] ::ffff:127.0.0.1 RoCE v2  <- RoCE v2 IPv4"),
            "{s}"
        );
    }
}
