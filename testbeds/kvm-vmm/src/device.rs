//! The VMM's own state, carried in kvm-glue's state blob (`VmState::device`): the guest
//! configuration (so the destination rebuilds the same layout), the pacing rate, and the
//! guest's counters at the moment of the pause (so the destination can check that the
//! guest continues from exactly there).
//!
//! Format (little-endian): magic `b"FKVMDEV1"`, `u32` version 1, `u64` RAM, `u32`
//! regions, `u32` vCPUs (<= 64), `u8` pattern tag (1-3), `u64` hot pages, `u64` burst,
//! `u64` fill words, `u64` rate, then per vCPU `u64` writes, bursts, cursor, cur_page.

use anyhow::{bail, ensure, Context, Result};

use crate::guest::{Counters, GuestConfig, Pattern, MAX_VCPUS};

const MAGIC: &[u8; 8] = b"FKVMDEV1";
const VERSION: u32 = 1;

/// The device state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Guest configuration.
    pub cfg: GuestConfig,
    /// Pacing rate (pages/s per vCPU, 0 = unpaced).
    pub rate: u64,
    /// Counters at the pause.
    pub counters: Vec<Counters>,
}

impl DeviceState {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + 32 * self.counters.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.cfg.ram.to_le_bytes());
        b.extend_from_slice(&self.cfg.regions.to_le_bytes());
        b.extend_from_slice(&self.cfg.vcpus.to_le_bytes());
        b.push(self.cfg.pattern.tag());
        for v in [
            self.cfg.hot_pages,
            self.cfg.burst,
            self.cfg.fill_words,
            self.rate,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for c in &self.counters {
            for v in [c.writes, c.bursts, c.cursor, c.cur_page] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    /// Decodes, checking every field.
    ///
    /// # Errors
    ///
    /// Wrong magic or version, truncation, out-of-range fields, trailing bytes.
    pub fn decode(mut b: &[u8]) -> Result<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8]> {
            ensure!(b.len() >= n, "device state truncated at {what}");
            let (h, t) = b.split_at(n);
            *b = t;
            Ok(h)
        }
        fn u64_(b: &mut &[u8], what: &str) -> Result<u64> {
            let mut a = [0u8; 8];
            a.copy_from_slice(take(b, 8, what)?);
            Ok(u64::from_le_bytes(a))
        }
        fn u32_(b: &mut &[u8], what: &str) -> Result<u32> {
            let mut a = [0u8; 4];
            a.copy_from_slice(take(b, 4, what)?);
            Ok(u32::from_le_bytes(a))
        }
        ensure!(
            take(&mut b, 8, "magic")? == MAGIC,
            "not ferry-kvm-vmm device state"
        );
        let version = u32_(&mut b, "version")?;
        if version != VERSION {
            bail!("device state version {version} is not supported (this build reads {VERSION})");
        }
        let ram = u64_(&mut b, "ram")?;
        let regions = u32_(&mut b, "regions")?;
        let vcpus = u32_(&mut b, "vcpus")?;
        ensure!(
            (1..=MAX_VCPUS as u32).contains(&vcpus),
            "device state has {vcpus} vCPUs"
        );
        let tag = take(&mut b, 1, "pattern")?[0];
        let pattern =
            Pattern::from_tag(tag).with_context(|| format!("unknown pattern tag {tag}"))?;
        let hot_pages = u64_(&mut b, "hot pages")?;
        let burst = u64_(&mut b, "burst")?;
        let fill_words = u64_(&mut b, "fill words")?;
        let rate = u64_(&mut b, "rate")?;
        let mut counters = Vec::with_capacity(vcpus as usize);
        for _ in 0..vcpus {
            counters.push(Counters {
                writes: u64_(&mut b, "writes")?,
                bursts: u64_(&mut b, "bursts")?,
                cursor: u64_(&mut b, "cursor")?,
                cur_page: u64_(&mut b, "cur_page")?,
            });
        }
        ensure!(b.is_empty(), "device state has {} trailing bytes", b.len());
        let cfg = GuestConfig {
            ram,
            regions,
            vcpus,
            pattern,
            hot_pages,
            burst,
            fill_words,
        };
        cfg.layout()
            .context("device state describes an invalid guest")?;
        Ok(Self {
            cfg,
            rate,
            counters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let d = DeviceState {
            cfg: GuestConfig {
                ram: 1 << 30,
                regions: 2,
                vcpus: 2,
                pattern: Pattern::Random,
                hot_pages: 0,
                burst: 64,
                fill_words: 8,
            },
            rate: 1000,
            counters: vec![
                Counters {
                    writes: 5,
                    bursts: 1,
                    cursor: 99,
                    cur_page: 3,
                };
                2
            ],
        };
        let b = d.encode();
        assert_eq!(DeviceState::decode(&b).expect("decodes"), d);
        for n in 0..b.len() {
            assert!(DeviceState::decode(&b[..n]).is_err());
        }
        let mut v = b.clone();
        v[8] = 2;
        assert!(DeviceState::decode(&v)
            .expect_err("v2")
            .to_string()
            .contains("version 2"));
    }
}
