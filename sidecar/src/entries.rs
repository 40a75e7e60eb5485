//! What the registry holds: VMs and VMMs with their links, migrations in both
//! directions, held VMs, and the data connections migrations wait for.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crossbeam_channel::Sender;
use ferry_engine::session::{DestSession, SessionId};
use ferry_proto::auth::SessionKey;
use ferry_proto::common::RegionInfo;
use ferry_proto::mem::GuestRegion;
use ferry_proto::vmm::Fence;

use crate::peer::PeerStream;

/// A VM a source VMM registered.
pub struct SourceVm {
    /// The VMM's link, for requests.
    pub link: UnixStream,
    /// Layout.
    pub regions: Vec<RegionInfo>,
    /// The VM's RAM, mapped from the VMM's memfds.
    pub mem: Arc<Vec<GuestRegion>>,
    /// Those memfds, one per region (their holes are known zero without a read).
    pub memfds: Vec<std::os::fd::OwnedFd>,
    /// CPU compatibility blob.
    pub cpu_profile: Vec<u8>,
    /// Size of the pages behind its memfds (huge pages, or 4 KiB).
    pub backing_page_size: u64,
    /// The commit fence the VM is paused under, if any.
    pub fence: Option<Fence>,
}

/// A VMM waiting for an incoming VM (or holding a loaded one).
pub struct WaitingVmm {
    /// The VMM's link.
    pub link: UnixStream,
}

/// A loaded VM whose source went silent after `Ready`, or whose start failed: kept with
/// its session until the source's decision (or the operator) settles it.
pub struct HeldVm {
    /// The VM.
    pub vm_id: String,
    /// Its VMM, while one holds it.
    pub vmm: Option<WaitingVmm>,
    /// The destination session (held, or start failed).
    pub session: DestSession,
}

/// An outgoing migration, for status and for a VMM that reattaches mid-way.
#[derive(Default)]
pub struct Outgoing {
    /// Destination.
    pub to: String,
    /// Session, once offered.
    pub session: Option<SessionId>,
    /// Where it stands.
    pub phase: &'static str,
    /// Current round.
    pub round: u32,
    /// Payload bytes moved.
    pub bytes: u64,
    /// The VMM re-registered (under the fence) after its link broke.
    pub reattached: Option<SourceVm>,
}

/// An incoming migration in progress.
pub struct Incoming {
    /// The VM.
    pub vm_id: String,
    /// Where it stands.
    pub phase: &'static str,
    /// The control connection's socket, so a replayed decision can cut a half-open one.
    pub control: Option<TcpStream>,
}

/// Data connections awaited by an incoming migration.
pub struct DataWaiter {
    /// The key the connections prove they belong to the session with.
    pub key: SessionKey,
    /// Where to hand them (channel index, connection).
    pub tx: Sender<(u16, PeerStream)>,
}

/// Whether the other end of an idle link is still there (no hang-up, no EOF pending).
pub fn link_alive(link: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: link.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; timeout 0.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n <= 0 {
        return n == 0;
    }
    let gone = libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL;
    if pfd.revents & gone != 0 {
        return false;
    }
    // Readable on an idle link: a stray message or EOF. Peek to tell.
    let mut b = [0u8; 1];
    // SAFETY: `b` is a valid one-byte buffer; MSG_PEEK|MSG_DONTWAIT leaves the data queued.
    let r = unsafe {
        libc::recv(
            link.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    r != 0
}

/// A snapshot for `ferry status`.
pub struct Snapshot {
    /// Registered VMs: id, regions, RAM bytes, fenced session.
    pub registered: Vec<(String, usize, u64, Option<SessionId>)>,
    /// VMs waited for.
    pub waiting: Vec<String>,
    /// Migrations: VM, direction, phase, round, bytes, peer (outgoing: the destination).
    pub migrating: Vec<(String, &'static str, &'static str, u32, u64, String)>,
    /// Held VMs: VM, session, phase.
    pub held: Vec<(String, SessionId, &'static str)>,
}
