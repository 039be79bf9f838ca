//! A local folder as the store (the embedded default). Files that look like they are still
//! being written (hidden or temp names, modified within `source.settle_time`) are not listed.
//! Nothing outside the root is ever read or written: keys are joined component by component,
//! `..` and absolute components are refused, and symbolic links are neither listed nor opened
//! (`O_NOFOLLOW`, and the opened file must hold the identified version).
//!
//! A file's version is its content: the xxh3-128 hash of its bytes ([`LocalSource::identify`],
//! cached per device, inode, size, mtime and ctime, so an unchanged file is hashed once). A
//! producer that rewrites a file with the same size and mtime (`cp -p`, `rsync -t`) makes a new
//! version. A load reads exactly the listed length and fails (to be retried) when the file
//! changed while it was read. A move is a hard link then an unlink; across filesystems, or where
//! links are refused, a copy (fsync'd) under a temporary name, linked or renamed into place
//! without replacing anything, then the unlink.

mod version;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use self::version::{
    StatKey, Verified, Versions, copy_verified, etag_of, is_not_a_file, links_unavailable, open_nofollow,
};
use super::{FAILED, INCOMING, MoveAs, ObjectMeta, Opened, PROCESSED, Small, SourceError};

pub struct LocalSource {
    root: PathBuf,
    id: String,
    settle_time: Duration,
    versions: Arc<Versions>,
    /// Files the last listing of `incoming/` left out because they changed within the settle
    /// time (`None` before the first listing).
    settling_seen: std::sync::Mutex<Option<u64>>,
}

/// Names producers use while a file is still being written.
fn looks_temporary(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".temp", ".part", ".partial", ".crdownload", ".swp"]
            .iter()
            .any(|s| name.to_ascii_lowercase().ends_with(s))
}

impl LocalSource {
    /// Opens (and creates when missing) `root` with its `incoming/`, `processed/`, `failed/`.
    pub fn create(root: &Path, settle_time: Duration) -> anyhow::Result<LocalSource> {
        Self::at(root, settle_time, true)
    }

    /// Opens `root`, creating it and its folders only when `create` (`check` looks, and a
    /// mistyped path must not become a new empty folder).
    pub fn at(root: &Path, settle_time: Duration, create: bool) -> anyhow::Result<LocalSource> {
        if !create && !root.is_dir() {
            // Named as it is; `check` says it is missing.
            let root = std::path::absolute(root)?;
            return Ok(LocalSource {
                id: format!("file://{}", root.display()),
                root,
                settle_time,
                versions: Arc::default(),
                settling_seen: Default::default(),
            });
        }
        for dir in [INCOMING, PROCESSED, FAILED].iter().filter(|_| create) {
            std::fs::create_dir_all(root.join(dir))
                .map_err(|e| anyhow::anyhow!("source.url: cannot create {}: {e}", root.join(dir).display()))?;
        }
        let root = std::fs::canonicalize(root)?;
        Ok(LocalSource {
            id: format!("file://{}", root.display()),
            root,
            settle_time,
            versions: Arc::default(),
            settling_seen: Default::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `root/prefix/key`, refusing any key that would leave `root/prefix`.
    fn path(&self, prefix: &str, key: &str) -> Result<PathBuf, SourceError> {
        let mut path = self.root.join(prefix.trim_end_matches('/'));
        if key.is_empty() || key.contains('\0') {
            return Err(SourceError::Denied(format!("refusing key {key:?}")));
        }
        for part in key.split('/') {
            if part.is_empty() || part == "." || part == ".." {
                return Err(SourceError::Denied(format!(
                    "refusing key {key:?}: it leaves the source folder"
                )));
            }
            path.push(part);
        }
        Ok(path)
    }

    pub async fn list(&self, prefix: &str) -> Result<(Vec<ObjectMeta>, u64), SourceError> {
        let dir = self.root.join(prefix.trim_end_matches('/'));
        let settle = if prefix == INCOMING {
            self.settle_time
        } else {
            Duration::ZERO
        };
        let (found, settling) = tokio::task::spawn_blocking(move || {
            let (mut out, mut settling) = (Vec::new(), 0);
            walk(&dir, "", settle, SystemTime::now(), &mut out, &mut settling).map(|_| (out, settling))
        })
        .await
        .map_err(|e| SourceError::Transient(format!("listing task failed: {e}")))?
        .map_err(|e| SourceError::Transient(format!("listing {prefix}: {e}")))?;
        if prefix == INCOMING {
            *self.settling_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(settling);
        }
        Ok((found, 1))
    }

    /// Files in `incoming/` not listed yet because they changed within `source.settle_time`,
    /// as the last listing found them (one walk of the folder serves both); walked now when
    /// nothing was listed yet.
    pub async fn settling(&self) -> Result<u64, SourceError> {
        if let Some(seen) = *self.settling_seen.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(seen);
        }
        self.list(INCOMING).await?;
        Ok(self
            .settling_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(0))
    }

    /// The listed files with their content versions (see the module's doc). A file that is
    /// gone, or is no longer a regular file, is left out; one that cannot be read keeps a
    /// version made of its metadata, so that reading it fails with the reason and it goes to
    /// failed/ with a report.
    pub async fn identify(&self, prefix: &str, objs: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
        let paths: Vec<Result<PathBuf, SourceError>> = objs.iter().map(|o| self.path(prefix, &o.key)).collect();
        let versions = self.versions.clone();
        let identified = tokio::task::spawn_blocking(move || {
            objs.into_iter()
                .zip(paths)
                .filter_map(|(mut obj, path)| {
                    let Ok(path) = path else { return Some(obj) };
                    match versions.at(&path) {
                        Ok(Some((key, version))) => {
                            obj.etag = version;
                            obj.size = key.size;
                            Some(obj)
                        }
                        Ok(None) => None,
                        Err(e) => {
                            tracing::debug!(path = %path.display(), error.message = %e, "cannot read to identify");
                            Some(obj)
                        }
                    }
                })
                .collect::<Vec<_>>()
        })
        .await;
        identified.unwrap_or_default()
    }

    /// Streams exactly the listed bytes of `incoming/K` if it still is the listed version; the
    /// stream ends in an error if the file changes before it is read to the end.
    pub async fn open(&self, obj: &ObjectMeta) -> Result<Opened, SourceError> {
        let path = self.path(INCOMING, &obj.key)?;
        let versions = self.versions.clone();
        let (etag, listed) = (obj.etag.clone(), path.clone());
        let opened = tokio::task::spawn_blocking(move || -> io::Result<Option<(File, StatKey)>> {
            let mut file = open_nofollow(&listed)?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Ok(None);
            }
            let key = StatKey::of(&meta);
            if versions.of_open(&mut file, &key)? != Some(etag) {
                return Ok(None);
            }
            Ok(Some((file, key)))
        })
        .await
        .map_err(|e| SourceError::Transient(format!("opening task failed: {e}")))?;
        let (file, key) = match opened {
            Ok(Some(found)) => found,
            Ok(None) => {
                return Err(SourceError::Gone(format!(
                    "{} changed since it was listed",
                    path.display()
                )));
            }
            Err(e) if is_not_a_file(&e) => {
                return Err(SourceError::Gone(format!(
                    "{} is gone or is no longer a regular file",
                    path.display()
                )));
            }
            Err(e) => return Err(classify(e, &path)),
        };
        let watch = file.try_clone().map_err(|e| classify(e, &path))?;
        let mut reader = tokio::fs::File::from_std(file);
        tokio::io::AsyncSeekExt::rewind(&mut reader)
            .await
            .map_err(|e| classify(e, &path))?;
        Ok(Opened {
            reader: Box::new(Verified {
                inner: tokio::io::AsyncReadExt::take(reader, key.size),
                watch,
                key,
                path,
            }),
            content_encoding: None,
        })
    }

    /// Moves `from/K` to `to/name` unless `to/name` exists: a hard link (which fails when the
    /// name is taken, atomically) then removing the source. A crash between the two leaves
    /// both names on one file, which the next attempt recognizes as the same version. Across
    /// filesystems, see [`Self::copy_into`].
    pub async fn move_as(&self, from: &str, to: &str, obj: &ObjectMeta, name: &str) -> Result<MoveAs, SourceError> {
        let src = self.path(from, &obj.key)?;
        let dest = self.path(to, name)?;
        let before = match self.version_at(&src).await? {
            Some((key, version)) if version == obj.etag => key,
            _ => return Ok(MoveAs::SourceGone),
        };
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| classify(e, parent))?;
        }
        match tokio::fs::hard_link(&src, &dest).await {
            Ok(()) => {
                // The link moved ctime; the bytes are the ones identified.
                if let Ok(meta) = tokio::fs::symlink_metadata(&dest).await {
                    let after = StatKey::of(&meta);
                    if after.same_bytes(&before) {
                        self.versions.insert(after, obj.etag.clone());
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return self.taken(&dest, obj).await,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(MoveAs::SourceGone),
            Err(e) if links_unavailable(&e) => {
                if let Some(outcome) = self.copy_into(&src, &dest, before, obj).await? {
                    return Ok(outcome);
                }
            }
            Err(e) => return Err(classify(e, &src)),
        }
        self.delete_version(from, obj).await?;
        Ok(MoveAs::Moved)
    }

    /// `dest` exists: is it this very version (a move copied it and stopped before the unlink)?
    async fn taken(&self, dest: &Path, obj: &ObjectMeta) -> Result<MoveAs, SourceError> {
        let found = self.version_at(dest).await?;
        Ok(MoveAs::Taken {
            identical: found.is_some_and(|(_, v)| v == obj.etag),
        })
    }

    /// Where a hard link cannot be made (another filesystem, or links refused): copies the
    /// listed bytes to a temporary name beside `dest`, fsyncs it, puts it at `dest` without
    /// replacing anything there (a link, else a rename after checking) and fsyncs the folder.
    /// `None` when the copy is in place (the source is then removed by the caller); otherwise
    /// what the move found.
    async fn copy_into(
        &self,
        src: &Path,
        dest: &Path,
        listed: StatKey,
        obj: &ObjectMeta,
    ) -> Result<Option<MoveAs>, SourceError> {
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.{}.{}.tmp", std::process::id(), rand::random::<u32>()));
        let (from, to, etag) = (src.to_path_buf(), tmp.clone(), obj.etag.clone());
        let copied = tokio::task::spawn_blocking(move || copy_verified(&from, &to, listed, &etag))
            .await
            .map_err(|e| SourceError::Transient(format!("copying task failed: {e}")))?;
        match copied {
            Ok(true) => {}
            Ok(false) => {
                let _ = std::fs::remove_file(&tmp);
                return Ok(Some(MoveAs::SourceGone));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(classify(e, src));
            }
        }
        let placed = match tokio::fs::hard_link(&tmp, dest).await {
            Ok(()) => Ok(()),
            Err(e) if links_unavailable(&e) => match tokio::fs::symlink_metadata(dest).await {
                // No link possible here at all: check, then rename. (A producer writing
                // `dest` in between could be replaced; processed/ and failed/ are the loader's.)
                Err(missing) if missing.kind() == io::ErrorKind::NotFound => tokio::fs::rename(&tmp, dest).await,
                Err(other) => Err(other),
                Ok(_) => Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            },
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        match placed {
            Ok(()) => {
                let dir = parent.clone();
                let synced = tokio::task::spawn_blocking(move || File::open(&dir)?.sync_all()).await;
                match synced {
                    Ok(Ok(())) => Ok(None),
                    Ok(Err(e)) => Err(classify(e, &parent)),
                    Err(e) => Err(SourceError::Transient(format!("fsync task failed: {e}"))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Some(self.taken(dest, obj).await?)),
            Err(e) => Err(classify(e, dest)),
        }
    }

    /// Removes `from/K` if it still is this version.
    pub async fn delete_version(&self, from: &str, obj: &ObjectMeta) -> Result<(), SourceError> {
        let src = self.path(from, &obj.key)?;
        match self.version_at(&src).await? {
            Some((_, version)) if version == obj.etag => {}
            _ => return Ok(()),
        }
        match tokio::fs::remove_file(&src).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(classify(e, &src)),
        }
        prune_empty_dirs(&src, &self.root.join(from.trim_end_matches('/'))).await;
        Ok(())
    }

    /// The content version of the regular file at `path`, and its metadata.
    async fn version_at(&self, path: &Path) -> Result<Option<(StatKey, String)>, SourceError> {
        let versions = self.versions.clone();
        let at = path.to_path_buf();
        tokio::task::spawn_blocking(move || versions.at(&at))
            .await
            .map_err(|e| SourceError::Transient(format!("reading task failed: {e}")))?
            .map_err(|e| classify(e, path))
    }

    /// The version tag of the file at `path` (relative to the root), if there is one.
    pub async fn etag_at(&self, path: &str) -> Result<Option<String>, SourceError> {
        let (prefix, key) = path.split_once('/').unwrap_or(("", path));
        let target = self.path(prefix, key)?;
        if let Ok(meta) = tokio::fs::symlink_metadata(&target).await
            && !meta.is_file()
        {
            // Something else holds the name: never the same version.
            return Ok(Some(String::new()));
        }
        Ok(self.version_at(&target).await?.map(|(_, v)| v))
    }

    /// The file at `area` + `key`, identified, if there is one.
    pub async fn meta_at(&self, area: &str, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        let target = self.path(area, key)?;
        match tokio::fs::symlink_metadata(&target).await {
            Ok(meta) if meta.is_file() => {}
            _ => return Ok(None),
        }
        Ok(self.version_at(&target).await?.map(|(stat, etag)| ObjectMeta {
            key: key.to_string(),
            etag,
            size: stat.size,
            last_modified: stat.modified(),
        }))
    }

    /// Writes `path` atomically: a hidden temporary file, then a rename.
    pub async fn put(&self, path: &str, body: Vec<u8>) -> Result<(), SourceError> {
        let (prefix, key) = path.split_once('/').unwrap_or(("", path));
        let dest = self.path(prefix, key)?;
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(|e| classify(e, &parent))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        tokio::fs::write(&tmp, body).await.map_err(|e| classify(e, &tmp))?;
        tokio::fs::rename(&tmp, &dest).await.map_err(|e| classify(e, &dest))
    }

    /// The file at `path` if it is a regular file of at most `max` bytes.
    pub async fn read_small(&self, path: &str, max: u64) -> Result<Small, SourceError> {
        let (prefix, key) = path.split_once('/').unwrap_or(("", path));
        let target = self.path(prefix, key)?;
        let found = tokio::task::spawn_blocking(move || -> io::Result<Small> {
            let mut file = match open_nofollow(&target) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Small::Absent),
                Err(e) if is_not_a_file(&e) => return Ok(Small::TooLarge),
                Err(e) => return Err(e),
            };
            let meta = file.metadata()?;
            if !meta.is_file() || meta.len() > max {
                return Ok(Small::TooLarge);
            }
            let mut body = Vec::with_capacity(meta.len() as usize);
            io::Read::read_to_end(&mut io::Read::take(&mut file, max + 1), &mut body)?;
            Ok(if body.len() as u64 > max {
                Small::TooLarge
            } else {
                Small::Body(body)
            })
        })
        .await
        .map_err(|e| SourceError::Transient(format!("reading task failed: {e}")))?;
        found.map_err(|e| classify(e, Path::new(path)))
    }

    pub async fn delete(&self, path: &str) -> Result<(), SourceError> {
        let (prefix, key) = path.split_once('/').unwrap_or(("", path));
        let target = self.path(prefix, key)?;
        match tokio::fs::remove_file(&target).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(classify(e, &target)),
        }
    }

    pub async fn check(&self) -> Result<(), SourceError> {
        if !self.root.is_dir() {
            let cwd = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            return Err(SourceError::Gone(format!(
                "there is no folder {} (a relative source.url is taken from the working directory, {cwd}; \
                 `run` and `once` create it)",
                self.root.display()
            )));
        }
        let dir = self.root.join(INCOMING.trim_end_matches('/'));
        match tokio::fs::metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(SourceError::Transient(format!("{} is not a folder", dir.display()))),
            // A fresh folder (an empty volume): `run` and `once` create incoming/ in it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(classify(e, &dir)),
        }
    }
}

fn classify(e: io::Error, path: &Path) -> SourceError {
    let message = format!("{}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::PermissionDenied => SourceError::Denied(message),
        io::ErrorKind::NotFound => SourceError::Gone(message),
        _ => SourceError::Transient(message),
    }
}

/// Lists the files under `dir` into `out`, counting in `settling` those left out because they
/// changed within `settle`.
fn walk(
    dir: &Path,
    rel: &str,
    settle: Duration,
    now: SystemTime,
    out: &mut Vec<ObjectMeta>,
    settling: &mut u64,
) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            tracing::warn!(path = %entry.path().display(), "skipping a file whose name is not UTF-8");
            continue;
        };
        if looks_temporary(&name) {
            continue;
        }
        // symlink_metadata: a link is neither followed nor listed.
        let meta = match entry.path().symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // moved meanwhile
            Err(e) => return Err(e),
        };
        let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        if meta.is_dir() {
            walk(&entry.path(), &key, settle, now, out, settling)?;
        } else if meta.is_file() {
            let modified = meta.modified()?;
            if now.duration_since(modified).unwrap_or(Duration::ZERO) < settle {
                *settling += 1;
                continue;
            }
            out.push(ObjectMeta {
                etag: etag_of(&meta),
                size: meta.len(),
                last_modified: DateTime::<Utc>::from(modified),
                key,
            });
        }
    }
    Ok(())
}

/// Removes folders left empty by a move, up to (not including) `stop` and the folders right
/// under it (producers expect `incoming/<table>/` to stay).
async fn prune_empty_dirs(moved: &Path, stop: &Path) {
    let mut dir = moved.parent();
    while let Some(d) = dir {
        if d == stop || d.parent() == Some(stop) || !d.starts_with(stop) || tokio::fs::remove_dir(d).await.is_err() {
            break;
        }
        dir = d.parent();
    }
}

#[cfg(test)]
mod tests;
