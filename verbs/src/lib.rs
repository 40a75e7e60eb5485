//! verbs (under construction).
