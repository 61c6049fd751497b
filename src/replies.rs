//! Replies of upload-reply sessions: where they are kept and the URL they are served at (the
//! GET/HEAD handler that serves them is [`download`](crate::download)).
//!
//! A reply is served at `<upload folder>/.bits/replies/{id}/reply.bin` on the host the client
//! uploaded to (or the host id, or the configured public origin), so it is relative to the
//! upload URL as in IIS, but sent as an absolute URL. The `.bits` name is reserved at every
//! depth, so no upload can collide with it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use percent_encoding::percent_decode_str;
use tokio::io::AsyncSeekExt;

use crate::completion::Reply;
use crate::destination::strip_prefix;
use crate::session::{SessionId, StoredReply, now_ms};
use crate::staging::dir::{Dir, Open, session_files};

/// Where replies are stored: one file per session in a private folder, opened once; every
/// operation on a reply file is relative to that handle and never follows a symbolic link.
#[derive(Debug, Clone)]
pub(crate) struct Replies {
    dir: PathBuf,
    handle: Arc<Dir>,
}

impl Replies {
    /// Creates the folder `dir` if needed and opens it: beneath the upload `root` without
    /// following links if it lies below it (the default, `root/.bits/replies`), as given
    /// otherwise.
    pub(crate) fn open(root: &Path, dir: PathBuf) -> io::Result<Self> {
        let handle = Dir::create_and_open(root)?.open_folder(root, &dir)?;
        Ok(Self {
            dir,
            handle: Arc::new(handle),
        })
    }

    /// The reply file of a session.
    pub(crate) fn path(&self, id: SessionId) -> PathBuf {
        self.dir.join(file_name(id))
    }

    /// Runs `f` with the folder's handle on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Dir) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let handle = self.handle.clone();
        crate::fs::blocking(move || f(&handle)).await
    }

    /// Stores `reply` as the session's reply file (a static URL stores nothing).
    pub(crate) async fn store(&self, id: SessionId, reply: Reply) -> io::Result<StoredReply> {
        let path = self.path(id);
        let bytes = match reply {
            Reply::File(from) if from == path => None,
            Reply::File(from) => {
                self.blocking(move |dir| move_in(dir, &from, &file_name(id)))
                    .await?;
                None
            }
            Reply::Bytes(bytes) => Some(bytes),
            Reply::None | Reply::StaticUrl(_) => Some(Bytes::new()),
        };
        let len = self
            .blocking(move |dir| {
                let name = file_name(id);
                match bytes {
                    Some(bytes) => write_private(dir, &name, &bytes),
                    None => Ok(dir.open_file(&name, Open::Read)?.metadata()?.len()),
                }
            })
            .await?;
        Ok(StoredReply {
            len,
            stored_ms: now_ms(),
        })
    }

    /// Sessions that have a reply file or a local copy of their upload (for recovery).
    pub(crate) async fn list(&self) -> io::Result<Vec<SessionId>> {
        self.blocking(|dir| {
            let mut ids = session_files(dir, SUFFIX)?;
            ids.extend(session_files(dir, UPLOAD_SUFFIX)?);
            ids.sort();
            ids.dedup();
            Ok(ids)
        })
        .await
    }

    /// Deletes the session's reply file and the local copy of its upload, if there are any.
    pub(crate) async fn remove(&self, id: SessionId) -> io::Result<()> {
        self.blocking(move |dir| {
            for name in [file_name(id), upload_name(id)] {
                match dir.remove_file(&name) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }

    /// Deletes the session's reply file only (an earlier attempt's answer), keeping the local
    /// copy of its upload.
    pub(crate) async fn remove_reply(&self, id: SessionId) -> io::Result<()> {
        self.blocking(move |dir| match dir.remove_file(&file_name(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }

    /// Copies a session's upload from `reader` into a private local file beside its reply, for
    /// an application that needs a path when the staging has none (object storage); deleted
    /// with the reply. Returns its path.
    pub(crate) async fn store_upload(
        &self,
        id: SessionId,
        mut reader: crate::staging::PartReader,
    ) -> io::Result<PathBuf> {
        use tokio::io::AsyncWriteExt;
        let file = self
            .blocking(move |dir| dir.open_file(&upload_name(id), Open::Truncate))
            .await?;
        let mut file = tokio::fs::File::from_std(file);
        tokio::io::copy(&mut reader, &mut file).await?;
        file.flush().await?;
        Ok(self.dir.join(upload_name(id)))
    }

    /// Opens the session's reply file for reading from `offset`.
    pub(crate) async fn open_at(&self, id: SessionId, offset: u64) -> io::Result<tokio::fs::File> {
        let file = self
            .blocking(move |dir| dir.open_file(&file_name(id), Open::Read))
            .await?;
        let mut file = tokio::fs::File::from_std(file);
        file.seek(io::SeekFrom::Start(offset)).await?;
        Ok(file)
    }
}

const SUFFIX: &str = ".reply";
const UPLOAD_SUFFIX: &str = ".upload";

fn upload_name(id: SessionId) -> String {
    format!("{id}{UPLOAD_SUFFIX}")
}

fn file_name(id: SessionId) -> String {
    format!("{id}{SUFFIX}")
}

/// Moves the handler's file `from` to `name` in `dir`: a rename, or across filesystems a copy
/// and the removal of the original, as promised.
fn move_in(dir: &Dir, from: &Path, name: &str) -> io::Result<()> {
    if dir.rename_from(from, name).is_ok() {
        return Ok(());
    }
    let mut source = std::fs::File::open(from)?;
    let mut target = dir.open_file(name, Open::Truncate)?;
    io::copy(&mut source, &mut target)?;
    std::fs::remove_file(from)
}

fn write_private(dir: &Dir, name: &str, bytes: &[u8]) -> io::Result<u64> {
    use std::io::Write;
    let mut file = dir.open_file(name, Open::Truncate)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(bytes.len() as u64)
}

/// The reply URL of session `id` uploaded at `request_url` (path and query) on `origin`
/// (`scheme://host[:port]`; empty for a URL relative to the host).
pub(crate) fn reply_url(origin: &str, request_url: &str, id: SessionId) -> String {
    let path = request_url.split(['?', '#']).next().unwrap_or("/");
    let folder = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let folder = if folder.is_empty() { "/" } else { folder };
    let id = id.to_string();
    let inner = id.trim_start_matches('{').trim_end_matches('}');
    format!("{origin}{folder}.bits/replies/%7B{inner}%7D/reply.bin")
}

/// The session whose reply `path` names, if it is a reply URL under `prefix`.
pub(crate) fn parse_reply_path(path: &str, prefix: &str) -> Option<SessionId> {
    let rest = strip_prefix(path, prefix)?;
    let rest = rest.strip_suffix("/reply.bin")?;
    let (rest, id) = rest.rsplit_once('/')?;
    let rest = rest.strip_suffix("/replies")?;
    let (_, bits) = rest.rsplit_once('/')?;
    if !bits.eq_ignore_ascii_case(".bits") {
        return None;
    }
    SessionId::parse(&percent_decode_str(id).decode_utf8().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_urls_round_trip() {
        let id = SessionId::new();
        let url = reply_url("https://files.example.com", "/orders/order.xml?acct=42", id);
        let path = url.strip_prefix("https://files.example.com").unwrap();
        assert!(path.starts_with("/orders/.bits/replies/%7B"), "{path}");
        assert_eq!(parse_reply_path(path, "/"), Some(id));
        assert_eq!(parse_reply_path(path, "/orders"), Some(id));
        assert_eq!(parse_reply_path(path, "/other"), None);
        assert_eq!(
            reply_url("", "/f.bin", id),
            format!("/.bits/replies/%7B{}%7D/reply.bin", &id.to_string()[1..37])
        );
        assert_eq!(
            parse_reply_path(&reply_url("", "/f.bin", id), "/"),
            Some(id)
        );
        let raw = format!("/a/.bits/replies/{id}/reply.bin");
        assert_eq!(parse_reply_path(&raw, "/"), Some(id));
        for bad in [
            "/a/.bits/replies/nope/reply.bin",
            "/a/bits/replies/{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40}/reply.bin",
            "/a/.bits/replies/{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40}/other.bin",
            "/a/.bits/x/{6F1C2B7E-0D4A-4C55-9B8E-2A7D3C1E9F40}/reply.bin",
        ] {
            assert_eq!(parse_reply_path(bad, "/"), None, "{bad}");
        }
    }
}
