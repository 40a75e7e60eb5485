//! kvm-glue (under construction).
