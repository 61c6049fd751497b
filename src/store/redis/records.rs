//! How a record is laid out in Redis: the key names, the fields a write sets, and the footprint
//! (destination claim, owner count) a record occupies.

use redis::ScriptInvocation;

use super::SCHEMA_VERSION;
use crate::session::{Owner, SessionId, SessionRecord};
use crate::store::StoreError;

/// The key names of one store.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// `{prefix}:`, the start of every key.
    pub(super) base: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            base: format!("{{{prefix}}}:"),
        }
    }

    pub(super) fn session(&self, id: SessionId) -> String {
        format!("{}s:{}", self.base, member(id))
    }

    pub(super) fn destination(&self, destination: &str) -> String {
        format!("{}d:{destination}", self.base)
    }

    pub(super) fn owner(&self, owner: &str) -> String {
        format!("{}o:{owner}", self.base)
    }

    pub(super) fn lease(&self, id: SessionId) -> String {
        format!("{}l:{}", self.base, member(id))
    }

    pub(super) fn updated(&self) -> String {
        format!("{}updated", self.base)
    }

    pub(super) fn open(&self) -> String {
        format!("{}open", self.base)
    }

    pub(super) fn schema(&self) -> String {
        format!("{}schema", self.base)
    }
}

/// How an id appears in keys and index sets: the GUID without braces.
pub(super) fn member(id: SessionId) -> String {
    id.to_string().trim_matches(['{', '}']).to_owned()
}

/// The arguments a record is written with (ARGV 1 to 8 of the create and update scripts).
pub(super) struct Write {
    pub(super) id: String,
    pub(super) json: String,
    pub(super) revision: String,
    pub(super) destination: String,
    pub(super) holds: &'static str,
    pub(super) open: &'static str,
    pub(super) owner: String,
    pub(super) updated_ms: String,
}

impl Write {
    pub(super) fn new(record: &SessionRecord) -> Result<Self, StoreError> {
        Ok(Self {
            id: member(record.id),
            json: serde_json::to_string(record).map_err(StoreError::backend)?,
            revision: record.revision.to_string(),
            destination: record.destination.clone(),
            holds: flag(record.holds_destination()),
            open: flag(record.is_open()),
            owner: encode(record.counted_as().as_ref().map(Owner::as_str)),
            updated_ms: record.updated_ms.to_string(),
        })
    }

    pub(super) fn args(&self, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .arg(&self.id)
            .arg(&self.json)
            .arg(&self.revision)
            .arg(&self.destination)
            .arg(self.holds)
            .arg(self.open)
            .arg(&self.owner)
            .arg(&self.updated_ms);
    }
}

/// The index keys with a variable name that a stored record occupies.
#[derive(Debug, Default)]
pub(super) struct Footprint {
    /// The destination it holds.
    pub(super) held: Option<String>,
    /// The owner whose open-session set it is in.
    pub(super) counted: Option<String>,
}

impl Footprint {
    /// From the script's `moved` answer.
    pub(super) fn decode(held: &str, counted: &str) -> Self {
        let decode = |s: &str| s.strip_prefix('=').map(str::to_owned);
        Self {
            held: decode(held),
            counted: decode(counted),
        }
    }

    pub(super) fn args(&self, invocation: &mut ScriptInvocation<'_>) {
        invocation
            .arg(encode(self.held.as_deref()))
            .arg(encode(self.counted.as_deref()));
    }
}

/// An optional string as a script argument: `=` and the string, or empty for none.
pub(super) fn encode(value: Option<&str>) -> String {
    value.map_or_else(String::new, |v| format!("={v}"))
}

pub(super) fn flag(value: bool) -> &'static str {
    if value { "1" } else { "0" }
}

pub(super) fn decode(id: SessionId, key: &str, json: &[u8]) -> Result<SessionRecord, StoreError> {
    let record: SessionRecord = serde_json::from_slice(json).map_err(|source| {
        StoreError::backend(Error::Decode {
            key: key.to_owned(),
            source,
        })
    })?;
    if record.id != id {
        return Err(StoreError::backend(Error::WrongId(key.to_owned())));
    }
    Ok(record)
}

pub(super) fn busy_error(holder: &str) -> StoreError {
    match SessionId::parse(holder) {
        Some(holder) => StoreError::DestinationBusy { holder },
        None => StoreError::backend(Error::Member(holder.to_owned())),
    }
}

pub(super) fn unexpected(reply: &[String]) -> StoreError {
    StoreError::backend(Error::Reply(reply.join(" ")))
}

/// What went wrong beyond the driver's own errors.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error("invalid key prefix {0:?}: it must be 1 to 64 bytes without braces")]
    Prefix(String),
    #[error(
        "the key prefix holds data of layout version {0:?}; this version expects {SCHEMA_VERSION:?}"
    )]
    Schema(String),
    #[error("cannot decode the session record at {key}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the session record at {0} has another session's id")]
    WrongId(String),
    #[error("an index names {0:?}, which is not a session id")]
    Member(String),
    #[error("unexpected script reply {0:?}")]
    Reply(String),
    #[error("the record's destination or owner kept changing during the operation")]
    Moving,
}
