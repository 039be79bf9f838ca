//! Versions of local files: what a file's metadata says ([`StatKey`]), its content's hash
//! (cached per [`StatKey`]), reads and copies of exactly the identified bytes.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tokio::io::{AsyncRead, ReadBuf};

/// What the file system says of a file. Equal keys mean unchanged bytes: a write moves mtime
/// and ctime, and ctime cannot be set back. (ctime also moves without a byte changing, when a
/// link to the file is made or removed: checks *during* a read compare [`StatKey::same_bytes`].)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct StatKey {
    dev: u64,
    ino: u64,
    pub(super) size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    pub(super) fn modified(&self) -> chrono::DateTime<chrono::Utc> {
        let secs = self.mtime_ns.div_euclid(1_000_000_000) as i64;
        let nanos = self.mtime_ns.rem_euclid(1_000_000_000) as u32;
        chrono::DateTime::from_timestamp(secs, nanos).unwrap_or_default()
    }

    pub(super) fn of(meta: &Metadata) -> StatKey {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// The same inode with the same bytes, whatever its ctime (a link or rename moves ctime).
    pub(super) fn same_bytes(&self, other: &StatKey) -> bool {
        (self.dev, self.ino, self.size, self.mtime_ns) == (other.dev, other.ino, other.size, other.mtime_ns)
    }
}

/// Content versions already computed, by [`StatKey`].
#[derive(Default)]
pub(super) struct Versions(Mutex<HashMap<StatKey, String>>);

/// Entries kept before the cache starts over (a few MB).
const MAX_CACHED_VERSIONS: usize = 100_000;

impl Versions {
    fn get(&self, key: &StatKey) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    pub(super) fn insert(&self, key: StatKey, version: String) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CACHED_VERSIONS {
            map.clear();
        }
        map.insert(key, version);
    }

    /// The version of the open `file` whose metadata is `key`: cached, else its content's
    /// hash. `None` when the file changed while it was read.
    pub(super) fn of_open(&self, file: &mut File, key: &StatKey) -> io::Result<Option<String>> {
        if let Some(v) = self.get(key) {
            return Ok(Some(v));
        }
        let Some(version) = hash_exactly(file, key.size)? else {
            return Ok(None);
        };
        if !StatKey::of(&file.metadata()?).same_bytes(key) {
            return Ok(None);
        }
        self.insert(*key, version.clone());
        Ok(Some(version))
    }

    /// The version of the regular file at `path` (links not followed), with its metadata;
    /// `None` when there is no regular file there (or it changed while it was read).
    pub(super) fn at(&self, path: &Path) -> io::Result<Option<(StatKey, String)>> {
        let mut file = match open_nofollow(path) {
            Ok(f) => f,
            Err(e) if is_not_a_file(&e) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                // Unreadable: its metadata stands for its version (reading it will fail with
                // the reason, and it goes to failed/).
                let meta = std::fs::symlink_metadata(path)?;
                return Ok(meta.is_file().then(|| (StatKey::of(&meta), etag_of(&meta))));
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        let key = StatKey::of(&meta);
        Ok(self.of_open(&mut file, &key)?.map(|v| (key, v)))
    }
}

/// Feeds exactly `size` bytes of `file` to `each`, in chunks; `false` when the file is shorter.
pub(super) fn read_exactly(
    file: &mut File,
    size: u64,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<bool> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        each(&buf[..n])?;
        left -= n as u64;
    }
    Ok(true)
}

/// A version as text: the xxh3-128 as 32 hex digits (no `-`: see [`crate::source::same_version`]).
pub(super) fn version_text(hasher: &xxhash_rust::xxh3::Xxh3) -> String {
    format!("{:032x}", hasher.digest128())
}

/// The version of exactly `size` bytes of `file`; `None` when the file is shorter.
pub(super) fn hash_exactly(file: &mut File, size: u64) -> io::Result<Option<String>> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let whole = read_exactly(file, size, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok(whole.then(|| version_text(&hasher)))
}

/// Opens for reading without following a final symbolic link, and without blocking on a FIFO
/// swapped in after listing.
pub(super) fn open_nofollow(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// The open failed because no regular file is there: gone, or a link (`ELOOP`).
pub(super) fn is_not_a_file(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP)
}

/// A listed file's provisional version, made of its metadata, until [`super::LocalSource::identify`]
/// reads its content. (No `-` in it: see [`crate::source::same_version`].)
pub(super) fn etag_of(meta: &std::fs::Metadata) -> String {
    let nanos = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("m{:x}.{:x}.{:x}", meta.ino(), meta.len(), nanos)
}

/// `link` is impossible here: another filesystem (`EXDEV`), or links refused (`EPERM`,
/// `EOPNOTSUPP`, too many links).
pub(super) fn links_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
    )
}

/// Copies exactly the `listed` bytes of `from` into a new file `to` and fsyncs it; `false`
/// when `from` is no longer that version.
pub(super) fn copy_verified(from: &Path, to: &Path, listed: StatKey, etag: &str) -> io::Result<bool> {
    let mut src = match open_nofollow(from) {
        Ok(f) => f,
        Err(e) if is_not_a_file(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    if !StatKey::of(&src.metadata()?).same_bytes(&listed) {
        return Ok(false);
    }
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let whole = read_exactly(&mut src, listed.size, |chunk| {
        hasher.update(chunk);
        io::Write::write_all(&mut out, chunk)
    })?;
    if !whole || version_text(&hasher) != etag || !StatKey::of(&src.metadata()?).same_bytes(&listed) {
        return Ok(false);
    }
    out.sync_all()?;
    Ok(true)
}

/// A local file read to exactly its listed length, checked at the end: if its metadata moved
/// while it was read (appended, rewritten in place), the stream ends in an error instead of
/// EOF, so nothing read from it is committed.
pub(super) struct Verified {
    pub(super) inner: tokio::io::Take<tokio::fs::File>,
    pub(super) watch: File,
    pub(super) key: StatKey,
    pub(super) path: PathBuf,
}

impl AsyncRead for Verified {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                // EOF of the listed length (or earlier): is it still the listed file?
                let now = this.watch.metadata().map(|m| StatKey::of(&m));
                // Same inode, size and mtime: not appended to or rewritten. (Not ctime: a link
                // made or removed elsewhere, such as the move of another name of this very
                // file, moves it without touching a byte.)
                let unchanged = now.as_ref().is_ok_and(|k| k.same_bytes(&this.key)) && this.inner.limit() == 0;
                Poll::Ready(if unchanged {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "{} changed while it was read; it will be read again once it settles",
                        this.path.display()
                    )))
                })
            }
            other => other,
        }
    }
}
