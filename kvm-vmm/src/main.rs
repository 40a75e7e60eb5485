//! kvm-vmm
fn main() {}
