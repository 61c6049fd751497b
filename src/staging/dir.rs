//! Folder handles beneath the upload root.
//!
//! Every operation [`LocalStaging`](super::LocalStaging) and the reply store do on the upload
//! tree goes through a [`Dir`]: a folder opened once (the root, the staging folder) or resolved
//! beneath one without following a symbolic link (a destination's folder), and every file
//! operation is relative to such a handle. A folder of the tree swapped for a link between a
//! check and the operation therefore cannot lead anywhere else: the handle is the folder that
//! was checked.
//!
//! On Linux a folder is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`; where
//! the kernel lacks it, and on other Unix systems, one `O_NOFOLLOW | O_DIRECTORY` handle at a
//! time. Elsewhere (Windows) the operations are path-based checks, not atomic.

use std::io;
use std::path::{Component, Path};

use super::StagingError;
use crate::session::SessionId;

pub(crate) use imp::Dir;

/// How [`Dir::open_file`] opens a file. Symbolic links are never followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// For reading.
    Read,
    /// For writing; the file must exist.
    Write,
    /// For writing, created (owner-only) if missing.
    Create,
    /// For writing, created (owner-only) or emptied.
    Truncate,
}

/// What a name in a folder is, symbolic links not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Link,
    Other,
}

/// What [`Dir::stat`] found.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) kind: Kind,
    pub(crate) len: u64,
    /// Device and inode, where the platform has them.
    id: Option<(u64, u64)>,
}

impl Entry {
    /// Whether both name one file (a hard link pair).
    pub(crate) fn same_file(&self, other: &Entry) -> bool {
        self.id.is_some() && self.id == other.id
    }
}

/// Whether an I/O error is a symbolic link refused where a file or folder was expected.
pub(crate) fn is_refused_link(error: &io::Error) -> bool {
    imp::is_refused_link(error)
}

/// The components of `path` below `root`, if it lies lexically beneath it.
fn names_below<'a>(root: &Path, path: &'a Path) -> Option<Vec<&'a str>> {
    path.strip_prefix(root)
        .ok()?
        .components()
        .map(|c| match c {
            Component::Normal(name) => name.to_str(),
            _ => None,
        })
        .collect()
}

/// A name that stays in its folder: not empty, not `.` or `..`, no separator or NUL.
fn is_plain(name: &str) -> bool {
    !matches!(name, "" | "." | "..") && !name.contains(['/', '\\', '\0'])
}

impl Dir {
    /// Opens the folder `path`, creating it (and its parents) if needed. The path is the
    /// operator's and is followed as given, symbolic links included.
    pub(crate) fn create_and_open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        Self::open(path)
    }

    /// Opens the folder `path` that `self`, the folder `self_path`, may contain: resolved
    /// beneath `self` without following a link (and created, one folder at a time) if `path`
    /// is below `self_path`, otherwise opened as the operator gave it.
    pub(crate) fn open_folder(&self, self_path: &Path, path: &Path) -> io::Result<Self> {
        let Some(names) = names_below(self_path, path) else {
            return Self::create_and_open(path);
        };
        self.walk(&names, true).map_err(|e| match e {
            StagingError::Io(e) => e,
            _ => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} goes through a symbolic link or a file", path.display()),
            ),
        })
    }

    /// The folder `names` (one component each) beneath `self`, never following a symbolic
    /// link. A link or a file on the way is [`StagingError::Forbidden`]; a missing folder is
    /// [`StagingError::ParentMissing`] unless `create`, which creates it.
    pub(crate) fn walk(&self, names: &[&str], create: bool) -> Result<Self, StagingError> {
        if !names.iter().all(|name| is_plain(name)) {
            return Err(StagingError::Forbidden);
        }
        self.walk_plain(names, create)
    }
}

/// The sessions that have a file named `{id}{suffix}` in `dir`.
pub(crate) fn session_files(dir: &Dir, suffix: &str) -> io::Result<Vec<SessionId>> {
    Ok(dir
        .names()?
        .iter()
        .filter_map(|name| {
            name.to_str()
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(SessionId::parse)
        })
        .collect())
}

#[cfg(unix)]
mod imp {
    use std::ffi::OsString;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::os::unix::ffi::OsStringExt;
    use std::path::Path;

    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    use rustix::io::Errno;

    use super::{Entry, Kind, Open, StagingError};

    /// A folder handle.
    #[derive(Debug)]
    pub(crate) struct Dir {
        fd: OwnedFd,
    }

    impl AsFd for Dir {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
    }

    const DIR_FLAGS: OFlags = OFlags::RDONLY
        .union(OFlags::DIRECTORY)
        .union(OFlags::NOFOLLOW)
        .union(OFlags::CLOEXEC);

    pub(super) fn is_refused_link(error: &io::Error) -> bool {
        Errno::from_io_error(error) == Some(Errno::LOOP)
    }

    impl Dir {
        pub(super) fn open(path: &Path) -> io::Result<Self> {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
            Ok(Self {
                fd: rustix::fs::open(path, flags, Mode::empty())?,
            })
        }

        pub(super) fn walk_plain(
            &self,
            names: &[&str],
            create: bool,
        ) -> Result<Self, StagingError> {
            if names.is_empty() {
                return Ok(Self {
                    fd: self.fd.try_clone()?,
                });
            }
            #[cfg(any(target_os = "linux", target_os = "android"))]
            match beneath(self.fd.as_fd(), names) {
                Ok(Some(fd)) => return Ok(Self { fd }),
                // Not available: walk.
                Ok(None) => {}
                // A missing folder to create: the walk creates it.
                Err(StagingError::ParentMissing) if create => {}
                Err(e) => return Err(e),
            }
            self.walk_each(names, create)
        }

        /// The walk without `openat2`: one `O_NOFOLLOW | O_DIRECTORY` handle at a time, each
        /// opened relative to the one before.
        pub(super) fn walk_each(&self, names: &[&str], create: bool) -> Result<Self, StagingError> {
            let mut dir: Option<OwnedFd> = None;
            for name in names {
                let parent = dir.as_ref().map_or(self.fd.as_fd(), OwnedFd::as_fd);
                let next = match rustix::fs::openat(parent, *name, DIR_FLAGS, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) if create => {
                        match rustix::fs::mkdirat(parent, *name, Mode::from_raw_mode(0o777)) {
                            // Created meanwhile, perhaps as a link: the open below tells.
                            Ok(()) | Err(Errno::EXIST) => {}
                            Err(e) => return Err(StagingError::Io(e.into())),
                        }
                        rustix::fs::openat(parent, *name, DIR_FLAGS, Mode::empty())
                            .map_err(|e| refusal(parent, name, e))?
                    }
                    Err(e) => return Err(refusal(parent, name, e)),
                };
                dir = Some(next);
            }
            Ok(Self {
                fd: match dir {
                    Some(fd) => fd,
                    None => self.fd.try_clone()?,
                },
            })
        }

        pub(crate) fn stat(&self, name: &str) -> io::Result<Option<Entry>> {
            match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => Ok(Some(entry(&stat))),
                Err(Errno::NOENT) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }

        pub(crate) fn open_file(&self, name: &str, how: Open) -> io::Result<File> {
            let flags = OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let flags = match how {
                Open::Read => flags | OFlags::RDONLY,
                Open::Write => flags | OFlags::WRONLY,
                Open::Create => flags | OFlags::WRONLY | OFlags::CREATE,
                Open::Truncate => flags | OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
            };
            match rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(0o600)) {
                Ok(fd) => Ok(File::from(fd)),
                // ELOOP on Linux; FreeBSD says EMLINK, NetBSD EFTYPE: ask what is there.
                Err(e @ (Errno::LOOP | Errno::NOENT)) => Err(e.into()),
                Err(e) => match self.stat(name) {
                    Ok(Some(Entry {
                        kind: Kind::Link, ..
                    })) => Err(Errno::LOOP.into()),
                    _ => Err(e.into()),
                },
            }
        }

        pub(crate) fn remove_file(&self, name: &str) -> io::Result<()> {
            Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
        }

        /// Hard-links `name` as `to/to_name`; fails if that exists (even as a link).
        pub(crate) fn link(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
            Ok(rustix::fs::linkat(
                &self.fd,
                name,
                &to.fd,
                to_name,
                AtFlags::empty(),
            )?)
        }

        /// Renames `name` to `to/to_name`. With `replace`, whatever is there (a file or a
        /// symbolic link, never what a link points to) is replaced; without, an existing
        /// `to_name` is kept where the system can tell (Linux), otherwise the caller's check
        /// is all there is.
        pub(crate) fn rename(
            &self,
            name: &str,
            to: &Dir,
            to_name: &str,
            replace: bool,
        ) -> io::Result<()> {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            if !replace {
                use rustix::fs::RenameFlags;
                match rustix::fs::renameat_with(
                    &self.fd,
                    name,
                    &to.fd,
                    to_name,
                    RenameFlags::NOREPLACE,
                ) {
                    // A filesystem without RENAME_NOREPLACE: a plain rename.
                    Err(Errno::INVAL) => {}
                    other => return Ok(other?),
                }
            }
            let _ = replace;
            Ok(rustix::fs::renameat(&self.fd, name, &to.fd, to_name)?)
        }

        /// Moves the file at `from` (any path, followed as given) to `name` here.
        pub(crate) fn rename_from(&self, from: &Path, name: &str) -> io::Result<()> {
            Ok(rustix::fs::renameat(rustix::fs::CWD, from, &self.fd, name)?)
        }

        /// Makes the folder's entries durable.
        pub(crate) fn sync(&self) -> io::Result<()> {
            Ok(rustix::fs::fsync(&self.fd)?)
        }

        pub(crate) fn names(&self) -> io::Result<Vec<OsString>> {
            let mut names = Vec::new();
            for entry in rustix::fs::Dir::read_from(&self.fd)? {
                let name = entry?.file_name().to_bytes().to_vec();
                if name != b"." && name != b".." {
                    names.push(OsString::from_vec(name));
                }
            }
            Ok(names)
        }

        pub(crate) fn device(&self) -> io::Result<u64> {
            use std::os::unix::fs::MetadataExt;
            Ok(File::from(self.fd.try_clone()?).metadata()?.dev())
        }
    }

    /// `openat2` beneath `dir` with no link followed; `Ok(None)` where the kernel lacks it.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn beneath(dir: BorrowedFd<'_>, names: &[&str]) -> Result<Option<OwnedFd>, StagingError> {
        use std::sync::atomic::{AtomicBool, Ordering};

        use rustix::fs::ResolveFlags;

        static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
        if UNSUPPORTED.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(dir, names.join("/"), DIR_FLAGS, Mode::empty(), resolve) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::NOSYS) => {
                UNSUPPORTED.store(true, Ordering::Relaxed);
                Ok(None)
            }
            // A seccomp filter of an older container runtime, or a retry asked for (only for
            // `..`, which is never passed): the walk decides.
            Err(Errno::PERM | Errno::AGAIN) => Ok(None),
            Err(Errno::NOENT) => Err(StagingError::ParentMissing),
            // A link, an escape, a file on the way.
            Err(Errno::LOOP | Errno::XDEV | Errno::NOTDIR) => Err(StagingError::Forbidden),
            Err(e) => Err(StagingError::Io(e.into())),
        }
    }

    /// Why `name` in `parent` could not be opened as a folder.
    fn refusal(parent: BorrowedFd<'_>, name: &str, error: Errno) -> StagingError {
        match error {
            Errno::NOENT => StagingError::ParentMissing,
            Errno::LOOP | Errno::NOTDIR => StagingError::Forbidden,
            // FreeBSD says EMLINK for a link under O_NOFOLLOW, NetBSD EFTYPE.
            _ => match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) if entry(&stat).kind != Kind::Dir => StagingError::Forbidden,
                _ => StagingError::Io(error.into()),
            },
        }
    }

    // The field types of `stat` differ between systems.
    #[allow(clippy::unnecessary_cast)]
    fn entry(stat: &rustix::fs::Stat) -> Entry {
        let kind = match FileType::from_raw_mode(stat.st_mode as _) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Link,
            _ => Kind::Other,
        };
        Entry {
            kind,
            len: u64::try_from(stat.st_size).unwrap_or(0),
            id: Some((stat.st_dev as u64, stat.st_ino as u64)),
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use std::ffi::OsString;
    use std::fs::File;
    use std::io;
    use std::path::{Path, PathBuf};

    use super::{Entry, Kind, Open, StagingError};

    /// A folder, by path: each operation checks the names on its way, but not atomically
    /// with the operation.
    #[derive(Debug)]
    pub(crate) struct Dir {
        path: PathBuf,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("a symbolic link is in the way")]
    struct RefusedLink;

    fn refused_link() -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, RefusedLink)
    }

    pub(super) fn is_refused_link(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|e| e.is::<RefusedLink>())
    }

    impl Dir {
        pub(super) fn open(path: &Path) -> io::Result<Self> {
            if !std::fs::metadata(path)?.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not a folder", path.display()),
                ));
            }
            Ok(Self {
                path: path.to_path_buf(),
            })
        }

        pub(super) fn walk_plain(
            &self,
            names: &[&str],
            create: bool,
        ) -> Result<Self, StagingError> {
            let mut path = self.path.clone();
            for name in names {
                path.push(name);
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => return Err(StagingError::Forbidden),
                    Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                        match std::fs::create_dir(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                                if !std::fs::symlink_metadata(&path)?.is_dir() {
                                    return Err(StagingError::Forbidden);
                                }
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(StagingError::ParentMissing);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Self { path })
        }

        pub(crate) fn stat(&self, name: &str) -> io::Result<Option<Entry>> {
            match std::fs::symlink_metadata(self.path.join(name)) {
                Ok(meta) => {
                    let kind = if meta.is_symlink() {
                        Kind::Link
                    } else if meta.is_dir() {
                        Kind::Dir
                    } else if meta.is_file() {
                        Kind::File
                    } else {
                        Kind::Other
                    };
                    Ok(Some(Entry {
                        kind,
                        len: meta.len(),
                        id: None,
                    }))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        }

        pub(crate) fn open_file(&self, name: &str, how: Open) -> io::Result<File> {
            if self.stat(name)?.is_some_and(|e| e.kind == Kind::Link) {
                return Err(refused_link());
            }
            let mut options = std::fs::OpenOptions::new();
            match how {
                Open::Read => options.read(true),
                Open::Write => options.write(true),
                Open::Create => options.write(true).create(true),
                Open::Truncate => options.write(true).create(true).truncate(true),
            };
            options.open(self.path.join(name))
        }

        pub(crate) fn remove_file(&self, name: &str) -> io::Result<()> {
            std::fs::remove_file(self.path.join(name))
        }

        pub(crate) fn link(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
            std::fs::hard_link(self.path.join(name), to.path.join(to_name))
        }

        pub(crate) fn rename(
            &self,
            name: &str,
            to: &Dir,
            to_name: &str,
            replace: bool,
        ) -> io::Result<()> {
            let target = to.path.join(to_name);
            if !replace && std::fs::symlink_metadata(&target).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(self.path.join(name), target)
        }

        pub(crate) fn rename_from(&self, from: &Path, name: &str) -> io::Result<()> {
            std::fs::rename(from, self.path.join(name))
        }

        pub(crate) fn sync(&self) -> io::Result<()> {
            Ok(())
        }

        pub(crate) fn names(&self) -> io::Result<Vec<OsString>> {
            std::fs::read_dir(&self.path)?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect()
        }

        pub(crate) fn device(&self) -> io::Result<u64> {
            Ok(0)
        }
    }
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    /// `tmp/root` with a folder `real`, a file `file` and a link `link` to `tmp/outside`
    /// (which holds `target`).
    fn tree() -> (tempfile::TempDir, Dir) {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("target"), b"outside").unwrap();
        std::fs::write(root.join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let dir = Dir::create_and_open(&root).unwrap();
        (tmp, dir)
    }

    fn outside(tmp: &tempfile::TempDir) -> Vec<OsString> {
        let mut names = Dir::open(&tmp.path().join("outside"))
            .unwrap()
            .names()
            .unwrap();
        names.sort();
        names
    }

    type Walk = fn(&Dir, &[&str], bool) -> Result<Dir, StagingError>;

    /// The walk with `openat2` (where the kernel has it) and the one without.
    const WALKS: [(&str, Walk); 2] = [("openat2", Dir::walk), ("walk", Dir::walk_each)];

    #[test]
    fn links_and_files_on_the_way_are_refused_by_both_walks() {
        for (how, walk) in WALKS {
            let (tmp, root) = tree();
            let refused = |names: &[&str], create| {
                matches!(walk(&root, names, create), Err(StagingError::Forbidden))
            };
            assert!(refused(&["link"], false), "{how}");
            assert!(refused(&["link", "sub"], true), "{how}");
            assert!(refused(&["file"], false), "{how}");
            assert!(refused(&["file", "sub"], true), "{how}");
            // Even a link that stays inside the root.
            std::os::unix::fs::symlink("..", tmp.path().join("root/real/up")).unwrap();
            assert!(refused(&["real", "up", "real"], false), "{how}");
            assert!(
                matches!(
                    walk(&root, &["real", "x"], false),
                    Err(StagingError::ParentMissing)
                ),
                "{how}"
            );
            let deep = walk(&root, &["real", "new", "deeper"], true).unwrap();
            assert!(deep.names().unwrap().is_empty());
            assert!(tmp.path().join("root/real/new/deeper").is_dir(), "{how}");
            assert_eq!(outside(&tmp), ["target"], "{how}");
        }
        // Names that leave their folder never reach the system.
        let (_tmp, root) = tree();
        for name in ["..", ".", "", "a/b", "a\\b", "a\0b"] {
            assert!(
                matches!(root.walk(&[name], true), Err(StagingError::Forbidden)),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_link_in_place_of_a_file_is_never_followed() {
        let (tmp, root) = tree();
        let real = root.walk(&["real"], false).unwrap();
        std::os::unix::fs::symlink(
            tmp.path().join("outside/target"),
            tmp.path().join("root/real/f"),
        )
        .unwrap();
        for how in [Open::Read, Open::Write, Open::Create, Open::Truncate] {
            let error = real.open_file("f", how).unwrap_err();
            assert!(is_refused_link(&error), "{how:?}: {error}");
        }
        assert_eq!(real.stat("f").unwrap().map(|e| e.kind), Some(Kind::Link));
        // Removing and replacing act on the link, not on what it points to.
        std::fs::write(tmp.path().join("root/real/new"), b"new").unwrap();
        real.rename("new", &real, "f", true).unwrap();
        assert_eq!(real.stat("f").unwrap().map(|e| e.kind), Some(Kind::File));
        assert_eq!(
            std::fs::read(tmp.path().join("outside/target")).unwrap(),
            b"outside"
        );
    }

    /// A folder swapped with a link out of the root while handles are opened and files linked
    /// into them: nothing ever lands outside.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_swapped_folder_never_leads_outside() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        for (how, walk) in WALKS {
            let (tmp, root) = tree();
            std::fs::write(tmp.path().join("root/file"), b"data").unwrap();
            let root = Arc::new(root);
            let stop = Arc::new(AtomicBool::new(false));
            let swapper = std::thread::spawn({
                let (root, stop) = (root.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        rustix::fs::renameat_with(
                            &*root,
                            "real",
                            &*root,
                            "link",
                            rustix::fs::RenameFlags::EXCHANGE,
                        )
                        .unwrap();
                    }
                }
            });
            // Until both outcomes were seen often enough: a loaded machine may deschedule the
            // swapper for a long time, so a fixed number of walks could all find one state.
            let (mut linked, mut refused) = (0, 0);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let mut i = 0;
            while (linked < 200 || refused < 200) && std::time::Instant::now() < deadline {
                i += 1;
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
                match walk(&root, &["real"], false) {
                    Ok(folder) => {
                        root.link("file", &folder, &format!("f{i}")).unwrap();
                        linked += 1;
                    }
                    Err(StagingError::Forbidden) => refused += 1,
                    Err(e) => panic!("{how}: {e:?}"),
                }
            }
            stop.store(true, Ordering::Relaxed);
            swapper.join().unwrap();
            assert_eq!(outside(&tmp), ["target"], "{how}");
            assert!(linked > 0 && refused > 0, "{how}: {linked} / {refused}");
        }
    }
}
