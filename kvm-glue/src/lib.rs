//! kvm-glue (under construction).

pub mod endpoint;
