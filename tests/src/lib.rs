//! Helpers for integration tests that run real roomcast nodes.
