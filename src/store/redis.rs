//! Placeholder: `RedisStore` is being written.

/// Placeholder.
#[derive(Debug)]
pub struct RedisStore;
