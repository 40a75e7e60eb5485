//! workload-vmm
fn main() {}
