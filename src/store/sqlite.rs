//! Placeholder: `SqliteStore` is being written.

/// Placeholder.
#[derive(Debug)]
pub struct SqliteStore;
