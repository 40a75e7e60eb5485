//! sidecar
fn main() {}
