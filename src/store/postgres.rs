//! Placeholder: `PostgresStore` is being written.

/// Placeholder.
#[derive(Debug)]
pub struct PostgresStore;
