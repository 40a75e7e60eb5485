//! tcp-fallback (under construction).
