//! Ferry's PVH test guest for Cloud Hypervisor, and the reading of what it prints.
//!
//! The guest (`guest.S`, entered by CH in 32-bit protected mode) keeps rewriting a 32 MiB
//! working set: every pass checks that each page still holds what the previous pass
//! wrote (first and last dword), prints `BAD page=.. pass=.. first=.. last=..` for one
//! that does not, and prints `pass=<hex> bad=<hex>` every 8 passes. A migrated guest must
//! keep counting at the destination with `bad` still zero.

use std::path::Path;

use serde::Serialize;

/// The guest kernel (ELF with a PVH entry note), assembled at build time.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// What a serial log says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Whether the guest printed its banner.
    pub started: bool,
    /// The last pass it reported.
    pub pass: u64,
    /// The bad-page count it reported last.
    pub bad: u64,
    /// `BAD ...` lines seen.
    pub bad_lines: Vec<String>,
}

/// Reads a serial log (the guest's COM1 written to a file).
pub fn progress_of_log(text: &str) -> Progress {
    let mut p = Progress::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("ferry-ch-guest: running") {
            p.started = true;
        } else if let Some(rest) = line.strip_prefix("pass=") {
            let mut parts = rest.split(" bad=");
            let pass = parts.next().and_then(|h| u64::from_str_radix(h, 16).ok());
            let bad = parts.next().and_then(|h| u64::from_str_radix(h, 16).ok());
            if let (Some(pass), Some(bad)) = (pass, bad) {
                p.pass = pass;
                p.bad = bad;
            }
        } else if line.starts_with("BAD ") {
            p.bad_lines.push(line.to_owned());
        }
    }
    p
}

/// Reads a serial log file (missing: nothing printed yet).
pub fn progress(path: &Path) -> Progress {
    progress_of_log(&std::fs::read_to_string(path).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_has_a_pvh_entry_note() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
        // XEN_ELFNOTE_PHYS32_ENTRY (18) with name "Xen" somewhere in the notes.
        let note = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
        assert!(GUEST_ELF.windows(note.len()).any(|w| w == note));
    }

    #[test]
    fn serial_logs_are_read() {
        let p = progress_of_log(
            "ferry-ch-guest: running\npass=00000008 bad=00000000\nBAD page=00000003 pass=00000009 first=00000000 last=00000000\npass=00000010 bad=00000001\n",
        );
        assert!(p.started);
        assert_eq!((p.pass, p.bad), (16, 1));
        assert_eq!(p.bad_lines.len(), 1);
        assert_eq!(progress_of_log(""), Progress::default());
    }
}
