//! Cloud Hypervisor (CH) for Ferry: the pieces the sidecar's CH adapter is built from.
//!
//! - [`wire`]: CH's live-migration protocol, byte by byte (requests, responses, range
//!   tables, connection roles), so Ferry can be the peer of an unmodified CH on either
//!   side of a migration.
//! - [`api`]: CH's HTTP API over its `--api-socket` (`vmm.ping`, `vm.info`, and the
//!   migration calls).
//!
//! `docs/cloud-hypervisor.md` has the protocol as CH implements it, with sources.

pub mod api;
pub mod wire;
