//! File-system helpers shared by the local staging, the file store and the reply folder:
//! what counts as "disk full", private files, durable folder entries, and running blocking
//! file work off the async threads.

use std::io;
use std::path::Path;

/// Whether an error (or its source chain) is "no space left" or "quota exceeded".
pub(crate) fn is_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            // ENOSPC and EDQUOT on Linux; ERROR_DISK_FULL and ERROR_HANDLE_DISK_FULL on Windows.
            if io.kind() == io::ErrorKind::StorageFull
                || io.kind() == io::ErrorKind::QuotaExceeded
                || matches!(io.raw_os_error(), Some(28 | 122) if cfg!(unix))
                || matches!(io.raw_os_error(), Some(39 | 112) if cfg!(windows))
            {
                return true;
            }
        }
        current = e.source();
    }
    false
}

/// Creates (or truncates) a file readable and writable by the owner only.
pub(crate) fn private_file(path: &Path) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Fsyncs a directory so a rename or link in it is durable. A no-op where directories cannot
/// be opened (Windows).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Runs blocking file work on tokio's blocking pool. A panic in `f` becomes an I/O error.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<io::Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| E::from(io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_detection() {
        let full = io::Error::from_raw_os_error(if cfg!(unix) { 28 } else { 112 });
        assert!(is_disk_full(&full));
        assert!(is_disk_full(&io::Error::from(io::ErrorKind::QuotaExceeded)));
        assert!(!is_disk_full(&io::Error::other("x")));
        let wrapped =
            crate::store::StoreError::backend(io::Error::from(io::ErrorKind::StorageFull));
        assert!(is_disk_full(&wrapped));
    }

    #[tokio::test]
    async fn blocking_work_runs_and_a_panic_is_an_error() {
        let ok: io::Result<u32> = blocking(|| Ok(7)).await;
        assert_eq!(ok.unwrap(), 7);
        let panicked: io::Result<u32> = blocking(|| panic!("boom")).await;
        assert!(panicked.is_err());
    }
}
