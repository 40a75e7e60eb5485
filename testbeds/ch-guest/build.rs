//! Assembles `guest.S` into a PVH ELF kernel (`$OUT_DIR/guest.elf`) with binutils' `as`
//! and `ld` (Debian's `binutils`, part of `build-essential`).

use std::path::PathBuf;
use std::process::Command;

fn run(c: &mut Command) {
    let status = c
        .status()
        .unwrap_or_else(|e| panic!("running {c:?}: {e} (install binutils)"));
    assert!(status.success(), "{c:?} failed");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let obj = out.join("guest.o");
    let elf = out.join("guest.elf");
    run(Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg("guest.S"));
    run(Command::new("ld")
        .args(["-T", "guest.ld", "-o"])
        .arg(&elf)
        .arg(&obj));
    println!("cargo:rerun-if-changed=guest.S");
    println!("cargo:rerun-if-changed=guest.ld");
}
