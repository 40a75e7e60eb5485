//! CPU compatibility: what the source guest was given, checked against what the
//! destination host can give.
//!
//! The source builds a [`CpuProfile`] from the CPUID its vCPUs were configured with
//! ([`CpuProfile::from_cpuid`]) and sends it in the handshake ([`CpuProfile::encode`]).
//! The destination builds one from `KVM_GET_SUPPORTED_CPUID` ([`CpuProfile::host`]) and
//! calls [`CpuProfile::check_runs_on`]: the migration is refused, naming every missing
//! feature, if the vendor differs or the guest was given a feature the host cannot offer
//! (the guest may already be using it: it would fault after the switch-over).
//!
//! Bits that the CPU sets from the guest's own control registers (`OSXSAVE`, `OSPKE`) are
//! not features and are ignored.

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::codec::{Reader, Writer};
use crate::error::{Error, Result};

/// Magic at the start of an encoded profile.
pub const PROFILE_MAGIC: [u8; 8] = *b"FERRYCPU";
/// The profile encoding version.
pub const PROFILE_VERSION: u32 = 1;
/// Cap on feature words in an encoded profile.
pub const MAX_FEATURE_WORDS: usize = 64;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum CpuidReg {
    /// EAX.
    Eax = 1,
    /// EBX.
    Ebx = 2,
    /// ECX.
    Ecx = 3,
    /// EDX.
    Edx = 4,
}

impl CpuidReg {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Eax,
            2 => Self::Ebx,
            3 => Self::Ecx,
            4 => Self::Edx,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Eax => "eax",
            Self::Ebx => "ebx",
            Self::Ecx => "ecx",
            Self::Edx => "edx",
        }
    }

    fn read(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Self::Eax => e.eax,
            Self::Ebx => e.ebx,
            Self::Ecx => e.ecx,
            Self::Edx => e.edx,
        }
    }
}

/// One 32-bit CPUID feature word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureWord {
    /// CPUID leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input).
    pub index: u32,
    /// Output register.
    pub reg: CpuidReg,
    /// The bits.
    pub value: u32,
}

/// The feature words compared, with the bits to ignore (set by the CPU from guest state).
const FEATURE_WORDS: &[(u32, u32, CpuidReg, u32)] = &[
    (1, 0, CpuidReg::Ecx, 1 << 27), // OSXSAVE mirrors CR4.OSXSAVE
    (1, 0, CpuidReg::Edx, 0),
    (7, 0, CpuidReg::Ebx, 0),
    (7, 0, CpuidReg::Ecx, 1 << 4), // OSPKE mirrors CR4.PKE
    (7, 0, CpuidReg::Edx, 0),
    (7, 1, CpuidReg::Eax, 0),
    (0xd, 0, CpuidReg::Eax, 0), // XCR0 components
    (0xd, 0, CpuidReg::Edx, 0),
    (0xd, 1, CpuidReg::Eax, 0),
    (0x8000_0001, 0, CpuidReg::Ecx, 0),
    (0x8000_0001, 0, CpuidReg::Edx, 0),
    (0x8000_0008, 0, CpuidReg::Ebx, 0),
];

/// Names of the feature bits most likely to differ between hosts.
const NAMES: &[(u32, u32, CpuidReg, u32, &str)] = &[
    (1, 0, CpuidReg::Ecx, 0, "sse3"),
    (1, 0, CpuidReg::Ecx, 1, "pclmulqdq"),
    (1, 0, CpuidReg::Ecx, 9, "ssse3"),
    (1, 0, CpuidReg::Ecx, 12, "fma"),
    (1, 0, CpuidReg::Ecx, 13, "cx16"),
    (1, 0, CpuidReg::Ecx, 19, "sse4_1"),
    (1, 0, CpuidReg::Ecx, 20, "sse4_2"),
    (1, 0, CpuidReg::Ecx, 22, "movbe"),
    (1, 0, CpuidReg::Ecx, 23, "popcnt"),
    (1, 0, CpuidReg::Ecx, 25, "aes"),
    (1, 0, CpuidReg::Ecx, 26, "xsave"),
    (1, 0, CpuidReg::Ecx, 28, "avx"),
    (1, 0, CpuidReg::Ecx, 29, "f16c"),
    (1, 0, CpuidReg::Ecx, 30, "rdrand"),
    (1, 0, CpuidReg::Ecx, 31, "hypervisor"),
    (1, 0, CpuidReg::Edx, 0, "fpu"),
    (1, 0, CpuidReg::Edx, 4, "tsc"),
    (1, 0, CpuidReg::Edx, 5, "msr"),
    (1, 0, CpuidReg::Edx, 9, "apic"),
    (1, 0, CpuidReg::Edx, 15, "cmov"),
    (1, 0, CpuidReg::Edx, 19, "clflush"),
    (1, 0, CpuidReg::Edx, 23, "mmx"),
    (1, 0, CpuidReg::Edx, 24, "fxsr"),
    (1, 0, CpuidReg::Edx, 25, "sse"),
    (1, 0, CpuidReg::Edx, 26, "sse2"),
    (7, 0, CpuidReg::Ebx, 0, "fsgsbase"),
    (7, 0, CpuidReg::Ebx, 3, "bmi1"),
    (7, 0, CpuidReg::Ebx, 5, "avx2"),
    (7, 0, CpuidReg::Ebx, 7, "smep"),
    (7, 0, CpuidReg::Ebx, 8, "bmi2"),
    (7, 0, CpuidReg::Ebx, 9, "erms"),
    (7, 0, CpuidReg::Ebx, 10, "invpcid"),
    (7, 0, CpuidReg::Ebx, 16, "avx512f"),
    (7, 0, CpuidReg::Ebx, 17, "avx512dq"),
    (7, 0, CpuidReg::Ebx, 18, "rdseed"),
    (7, 0, CpuidReg::Ebx, 19, "adx"),
    (7, 0, CpuidReg::Ebx, 20, "smap"),
    (7, 0, CpuidReg::Ebx, 21, "avx512ifma"),
    (7, 0, CpuidReg::Ebx, 23, "clflushopt"),
    (7, 0, CpuidReg::Ebx, 24, "clwb"),
    (7, 0, CpuidReg::Ebx, 28, "avx512cd"),
    (7, 0, CpuidReg::Ebx, 29, "sha_ni"),
    (7, 0, CpuidReg::Ebx, 30, "avx512bw"),
    (7, 0, CpuidReg::Ebx, 31, "avx512vl"),
    (7, 0, CpuidReg::Ecx, 1, "avx512vbmi"),
    (7, 0, CpuidReg::Ecx, 2, "umip"),
    (7, 0, CpuidReg::Ecx, 3, "pku"),
    (7, 0, CpuidReg::Ecx, 6, "avx512_vbmi2"),
    (7, 0, CpuidReg::Ecx, 8, "gfni"),
    (7, 0, CpuidReg::Ecx, 9, "vaes"),
    (7, 0, CpuidReg::Ecx, 10, "vpclmulqdq"),
    (7, 0, CpuidReg::Ecx, 11, "avx512_vnni"),
    (7, 0, CpuidReg::Ecx, 12, "avx512_bitalg"),
    (7, 0, CpuidReg::Ecx, 14, "avx512_vpopcntdq"),
    (7, 0, CpuidReg::Ecx, 22, "rdpid"),
    (7, 0, CpuidReg::Edx, 4, "fsrm"),
    (7, 0, CpuidReg::Edx, 14, "serialize"),
    (7, 0, CpuidReg::Edx, 22, "amx_bf16"),
    (7, 0, CpuidReg::Edx, 24, "amx_tile"),
    (7, 0, CpuidReg::Edx, 25, "amx_int8"),
    (7, 1, CpuidReg::Eax, 4, "avx_vnni"),
    (7, 1, CpuidReg::Eax, 5, "avx512_bf16"),
    (0xd, 0, CpuidReg::Eax, 2, "xsave-avx-state"),
    (0xd, 0, CpuidReg::Eax, 5, "xsave-avx512-opmask"),
    (0xd, 0, CpuidReg::Eax, 6, "xsave-avx512-zmm-hi256"),
    (0xd, 0, CpuidReg::Eax, 7, "xsave-avx512-hi16-zmm"),
    (0xd, 0, CpuidReg::Eax, 9, "xsave-pkru"),
    (0xd, 0, CpuidReg::Eax, 17, "xsave-amx-tilecfg"),
    (0xd, 0, CpuidReg::Eax, 18, "xsave-amx-tiledata"),
    (0xd, 1, CpuidReg::Eax, 0, "xsaveopt"),
    (0xd, 1, CpuidReg::Eax, 1, "xsavec"),
    (0xd, 1, CpuidReg::Eax, 2, "xgetbv1"),
    (0xd, 1, CpuidReg::Eax, 3, "xsaves"),
    (0x8000_0001, 0, CpuidReg::Ecx, 0, "lahf_lm"),
    (0x8000_0001, 0, CpuidReg::Ecx, 5, "abm"),
    (0x8000_0001, 0, CpuidReg::Ecx, 6, "sse4a"),
    (0x8000_0001, 0, CpuidReg::Ecx, 8, "3dnowprefetch"),
    (0x8000_0001, 0, CpuidReg::Ecx, 11, "xop"),
    (0x8000_0001, 0, CpuidReg::Ecx, 16, "fma4"),
    (0x8000_0001, 0, CpuidReg::Ecx, 21, "tbm"),
    (0x8000_0001, 0, CpuidReg::Edx, 11, "syscall"),
    (0x8000_0001, 0, CpuidReg::Edx, 20, "nx"),
    (0x8000_0001, 0, CpuidReg::Edx, 26, "pdpe1gb"),
    (0x8000_0001, 0, CpuidReg::Edx, 27, "rdtscp"),
    (0x8000_0001, 0, CpuidReg::Edx, 29, "lm"),
    (0x8000_0008, 0, CpuidReg::Ebx, 0, "clzero"),
    (0x8000_0008, 0, CpuidReg::Ebx, 9, "wbnoinvd"),
];

fn bit_name(function: u32, index: u32, reg: CpuidReg, bit: u32) -> String {
    NAMES
        .iter()
        .find(|n| n.0 == function && n.1 == index && n.2 == reg && n.3 == bit)
        .map_or_else(
            || format!("cpuid.{function:#x}.{index}.{}[{bit}]", reg.name()),
            |n| n.4.to_string(),
        )
}

/// The vendor and feature words a guest was given (or a host can give).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuProfile {
    /// The 12-byte vendor string of leaf 0 (EBX, EDX, ECX), e.g. `AuthenticAMD`.
    pub vendor: [u8; 12],
    /// The feature words of [`CpuProfile::from_cpuid`]'s list that were present.
    pub features: Vec<FeatureWord>,
}

impl CpuProfile {
    /// Builds a profile from CPUID entries (what `KVM_SET_CPUID2` was given, or what
    /// `KVM_GET_SUPPORTED_CPUID` offers).
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let mut vendor = [0u8; 12];
        if let Some(e) = entries.iter().find(|e| e.function == 0) {
            vendor[0..4].copy_from_slice(&e.ebx.to_le_bytes());
            vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
            vendor[8..12].copy_from_slice(&e.ecx.to_le_bytes());
        }
        let features = FEATURE_WORDS
            .iter()
            .filter_map(|&(function, index, reg, _)| {
                entries
                    .iter()
                    .find(|e| e.function == function && e.index == index)
                    .map(|e| FeatureWord {
                        function,
                        index,
                        reg,
                        value: reg.read(e),
                    })
            })
            .collect();
        Self { vendor, features }
    }

    /// The profile of what this host's KVM can give a guest (`KVM_GET_SUPPORTED_CPUID`).
    ///
    /// # Errors
    ///
    /// [`Error::GetVmState`] if the ioctl fails.
    pub fn host(kvm: &Kvm) -> Result<Self> {
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::GetVmState {
                what: "supported CPUID",
                source,
            })?;
        Ok(Self::from_cpuid(cpuid.as_slice()))
    }

    /// The vendor as text (lossy).
    pub fn vendor_str(&self) -> String {
        String::from_utf8_lossy(&self.vendor).into_owned()
    }

    /// Checks that a guest with this profile can run on a host offering `host`.
    ///
    /// # Errors
    ///
    /// [`Error::CpuIncompatible`] naming the vendor mismatch and every missing feature.
    pub fn check_runs_on(&self, host: &CpuProfile) -> Result<()> {
        let mut reasons = Vec::new();
        if self.vendor != host.vendor {
            reasons.push(format!(
                "vendor {} on the source, {} here",
                self.vendor_str(),
                host.vendor_str()
            ));
        }
        let mut missing = Vec::new();
        for w in &self.features {
            let ignore = FEATURE_WORDS
                .iter()
                .find(|f| f.0 == w.function && f.1 == w.index && f.2 == w.reg)
                .map_or(0, |f| f.3);
            let have = host
                .features
                .iter()
                .find(|h| h.function == w.function && h.index == w.index && h.reg == w.reg)
                .map_or(0, |h| h.value);
            let lacking = w.value & !have & !ignore;
            for bit in 0..32 {
                if lacking & (1 << bit) != 0 {
                    missing.push(bit_name(w.function, w.index, w.reg, bit));
                }
            }
        }
        if !missing.is_empty() {
            reasons.push(format!("missing features: {}", missing.join(", ")));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(Error::CpuIncompatible {
                reason: reasons.join("; "),
            })
        }
    }

    /// Encodes: magic, `u32` version, vendor, `u32` count, then per word `u32` function,
    /// `u32` index, `u8` register (1-4), `u32` value; little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.raw(&PROFILE_MAGIC);
        w.u32(PROFILE_VERSION);
        w.raw(&self.vendor);
        w.count(self.features.len());
        for f in &self.features {
            w.u32(f.function);
            w.u32(f.index);
            w.u8(f.reg as u8);
            w.u32(f.value);
        }
        w.finish()
    }

    /// Decodes [`encode`](Self::encode)'s output.
    ///
    /// # Errors
    ///
    /// [`Error::BadMagic`] (also for an invalid register tag), [`Error::UnsupportedVersion`],
    /// [`Error::Truncated`], [`Error::LengthCap`], [`Error::TrailingBytes`].
    pub fn decode(blob: &[u8]) -> Result<Self> {
        let mut r = Reader::new(blob);
        if r.take("magic", PROFILE_MAGIC.len())? != PROFILE_MAGIC {
            return Err(Error::BadMagic {
                what: "CPU profile",
            });
        }
        let version = r.u32("version")?;
        if version != PROFILE_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "CPU profile",
                found: version,
                supported: PROFILE_VERSION,
            });
        }
        let mut vendor = [0u8; 12];
        vendor.copy_from_slice(r.take("vendor", 12)?);
        let n = r.count("feature count", MAX_FEATURE_WORDS)?;
        let mut features = Vec::with_capacity(n);
        for _ in 0..n {
            let function = r.u32("function")?;
            let index = r.u32("index")?;
            let reg = CpuidReg::from_u8(r.u8("register")?).ok_or(Error::BadMagic {
                what: "CPU profile register tag",
            })?;
            let value = r.u32("value")?;
            features.push(FeatureWord {
                function,
                index,
                reg,
                value,
            });
        }
        r.finish()?;
        Ok(Self { vendor, features })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn amd(avx2: bool, avx512f: bool) -> Vec<kvm_cpuid_entry2> {
        // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
        let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
        let ebx7 = (u32::from(avx2) << 5) | (u32::from(avx512f) << 16) | 0b11;
        vec![
            entry(0, 0, 0xd, v(b"Auth"), v(b"cAMD"), v(b"enti")),
            entry(1, 0, 0, 0, (1 << 28) | (1 << 27), 1 << 26),
            entry(7, 0, 0, ebx7, 0, 0),
        ]
    }

    #[test]
    fn same_profile_is_compatible() {
        let p = CpuProfile::from_cpuid(&amd(true, true));
        assert_eq!(p.vendor_str(), "AuthenticAMD");
        p.check_runs_on(&p).expect("compatible with itself");
    }

    #[test]
    fn subset_is_compatible_superset_is_not() {
        let small = CpuProfile::from_cpuid(&amd(true, false));
        let big = CpuProfile::from_cpuid(&amd(true, true));
        small
            .check_runs_on(&big)
            .expect("fewer features run on more");
        let e = big.check_runs_on(&small).expect_err("avx512f missing");
        assert!(e.to_string().contains("missing features: avx512f"), "{e}");
    }

    #[test]
    fn dynamic_bits_are_ignored() {
        let src = CpuProfile::from_cpuid(&amd(true, false));
        let mut host_entries = amd(true, false);
        host_entries[1].ecx &= !(1 << 27); // host's supported CPUID has no OSXSAVE
        src.check_runs_on(&CpuProfile::from_cpuid(&host_entries))
            .expect("OSXSAVE ignored");
    }

    #[test]
    fn vendor_mismatch_and_missing_leaf_are_named() {
        let src = CpuProfile::from_cpuid(&amd(true, false));
        let mut intel = amd(true, false);
        intel[0].ebx = u32::from_le_bytes(*b"Genu");
        intel[0].edx = u32::from_le_bytes(*b"ineI");
        intel[0].ecx = u32::from_le_bytes(*b"ntel");
        intel.truncate(2); // no leaf 7 at all
        let e = src
            .check_runs_on(&CpuProfile::from_cpuid(&intel))
            .expect_err("incompatible");
        let s = e.to_string();
        assert!(
            s.contains("vendor AuthenticAMD on the source, GenuineIntel here"),
            "{s}"
        );
        assert!(s.contains("fsgsbase, cpuid.0x7.0.ebx[1], avx2"), "{s}");
    }

    #[test]
    fn codec_round_trip_and_errors() {
        let p = CpuProfile::from_cpuid(&amd(true, true));
        let blob = p.encode();
        assert_eq!(CpuProfile::decode(&blob).expect("decodes"), p);
        for len in 0..blob.len() {
            assert!(CpuProfile::decode(&blob[..len]).is_err());
        }
        let mut v2 = blob.clone();
        v2[8..12].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            CpuProfile::decode(&v2),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
        let mut big = blob;
        big[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            CpuProfile::decode(&big),
            Err(Error::LengthCap { .. })
        ));
    }
}
