//! The store conformance suite (placeholder while the suite is written).
