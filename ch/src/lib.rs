//! Cloud Hypervisor (CH) for Ferry: the pieces the sidecar's CH adapter is built from.
//!
//! - [`wire`]: CH's live-migration protocol, byte by byte (requests, responses, range
//!   tables, connection roles), so Ferry can be the peer of an unmodified CH on either
//!   side of a migration.
//! - [`api`]: CH's HTTP API over its `--api-socket` (`vmm.ping`, `vm.info`, and the
//!   migration calls).
//! - [`ram`]: a CH VM's RAM in memfds Ferry creates from the VM's layout.
//! - [`link`]: Ferry as the destination of a source CH, and as the source towards a
//!   destination CH (`MemoryFd` before `Config`: the destination runs from Ferry's memfds).
//! - [`relay`]: one migration through Ferry's memfds, in the order that keeps exactly one
//!   VM: on one host, or as the destination half behind [`proxy`].
//! - [`host`]: finding CH on a host and the nested-state shim PVM hosts need (tests and
//!   benchmarks).
//! - [`keeper`]: holds the source CH's connection through the commit window, across a
//!   source sidecar crash.
//! - [`proxy`]: the source half: the source CH's connections carried byte for byte over
//!   Ferry's connections to the destination half, memory paced, the commit decision
//!   recorded before `Complete` is carried.
//! - [`postcopy`]: post-copy: the source CH's memfds kept by the source sidecar, the VM
//!   run at the destination at once, its pages pulled on fault and in bulk.
//!
//! `docs/cloud-hypervisor.md` has the protocol as CH implements it, with sources.

pub mod api;
pub mod host;
pub mod keeper;
pub mod link;
pub mod postcopy;
pub mod proxy;
pub mod ram;
pub mod relay;
pub mod wire;
