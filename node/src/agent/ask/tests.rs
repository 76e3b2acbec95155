//! Asking unit tests.
