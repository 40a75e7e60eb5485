//! The pull protocol between the two sidecars of a post-copy, on each data connection:
//! `{u64 gpa, u64 length}` little-endian requests, answered by exactly `length` bytes of
//! guest RAM; three `gpa` values above RAM are requests of their own (the end, the data
//! map, RDMA).

use std::io::{Read, Write};
use std::sync::{Mutex, MutexGuard};

use anyhow::{bail, Context};

/// The unit of the pull: CH's fault granule on 4 KiB-page guests (a huge-page guest
/// faults whole huge pages, which are whole runs of these).
pub const PAGE: u64 = 4096;

/// Largest range one pull request may ask for.
pub const MAX_PULL: u64 = 64 << 20;

/// The `gpa` of the request that ends a pull connection.
pub(super) const PULL_END: u64 = u64::MAX;

/// The `gpa` of the request for the source's data map: answered by a u64 count and that
/// many `{u64 gpa, u64 length}` ranges of guest RAM that hold data (the rest are holes of
/// the source's memfds, which read as zero: the destination fills them itself).
pub(super) const DATA_MAP: u64 = u64::MAX - 1;

/// Most ranges a data map may hold.
pub(super) const MAX_DATA_RANGES: u64 = 1 << 24;

/// The `gpa` of the request that opens RDMA READ for the pull: answered by the source's
/// RDMA offer (u32 length and bytes; length 0: none), then the destination's answer the
/// same way (length 0: declined), then one byte (1: the source's queue pairs are
/// connected). The `PULL_END` of that connection carries the bytes pulled over RDMA.
pub(super) const RDMA_OFFER: u64 = u64::MAX - 2;

/// Largest RDMA offer or answer accepted.
pub(super) const MAX_RDMA_BLOB: u32 = 1 << 20;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn encode_pull(gpa: u64, length: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..].copy_from_slice(&length.to_le_bytes());
    h
}

pub(super) fn read_blob(conn: &mut impl Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let mut n = [0u8; 4];
    conn.read_exact(&mut n)
        .with_context(|| format!("reading the RDMA {what}"))?;
    let n = u32::from_le_bytes(n);
    if n > MAX_RDMA_BLOB {
        bail!("an RDMA {what} of {n} bytes");
    }
    let mut b = vec![0u8; n as usize];
    conn.read_exact(&mut b)
        .with_context(|| format!("reading the RDMA {what}"))?;
    Ok(b)
}

pub(super) fn write_blob(conn: &mut impl Write, b: &[u8]) -> anyhow::Result<()> {
    let n = u32::try_from(b.len()).context("RDMA blob too large")?;
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(b);
    conn.write_all(&out).context("sending an RDMA blob")
}
