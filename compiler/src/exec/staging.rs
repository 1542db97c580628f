//! A run's staging folder, `.prunec-staging-*` inside the output folder, and
//! the cleanup of the ones that killed runs left behind.
//!
//! A live run holds an exclusive `flock` on its staging folder until the
//! folder is removed; a run starting in the same output folder removes only
//! the staging folders whose lock it can take, so it never deletes the
//! staging folder of a concurrent run. Where locks are unavailable (not
//! Unix, or a file system that refuses `flock` on a folder), nothing is
//! removed: a leftover is harmless, a removed live folder is not.

use std::path::Path;

/// The prefix of every staging folder's name.
pub const PREFIX: &str = ".prunec-staging-";

/// A run's staging folder. Fields drop in order: the folder is removed
/// before its lock is released.
pub struct Staging {
    dir: tempfile::TempDir,
    _lock: Option<std::fs::File>,
}

impl Staging {
    /// Creates and locks a fresh staging folder inside `out`.
    pub fn create(out: &Path) -> std::io::Result<Staging> {
        let mut tries = 0;
        loop {
            let dir = tempfile::Builder::new().prefix(PREFIX).tempdir_in(out)?;
            match lock(dir.path()) {
                Lock::Held(f) => {
                    return Ok(Staging {
                        dir,
                        _lock: Some(f),
                    })
                }
                Lock::Unsupported => return Ok(Staging { dir, _lock: None }),
                // A concurrent run's cleanup took the fresh folder's lock (or
                // removed it) before this run could: take another folder.
                Lock::Busy if tries < 8 => tries += 1,
                Lock::Busy => {
                    return Err(std::io::Error::other(
                        "cannot lock a staging folder (another run keeps removing them)",
                    ))
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the staging folders that killed runs left directly inside `out`:
/// folders (not links) whose name starts with [`PREFIX`] and whose lock can
/// be taken. Best effort: what cannot be read, locked or removed stays.
pub fn remove_stale(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for entry in entries.flatten() {
        let named = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(PREFIX));
        if !named || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if let Lock::Held(_held) = lock(&path) {
            // Removed while the lock is held, so a run that created the
            // folder an instant ago cannot take it (see `Staging::create`).
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

enum Lock {
    /// The lock, on the folder that `path` names now.
    Held(std::fs::File),
    /// Another process holds it, or the folder is gone or was replaced.
    Busy,
    /// Folder locks are not available here.
    Unsupported,
}

/// Takes an exclusive `flock` on the folder `path`, without waiting.
#[cfg(unix)]
fn lock(path: &Path) -> Lock {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    use std::os::unix::io::AsRawFd;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lock::Busy,
        Err(_) => return Lock::Unsupported,
    };
    // SAFETY: `flock` on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Lock::Busy
        } else {
            Lock::Unsupported
        };
    }
    // A cleaner may have removed the folder between `open` and `flock`.
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => Lock::Held(file),
        _ => Lock::Busy,
    }
}

#[cfg(not(unix))]
fn lock(_path: &Path) -> Lock {
    Lock::Unsupported
}
