//! A local folder as the store (the embedded default). A move is a rename. Files that look like
//! they are still being written (hidden or temp names, modified within `source.settle_time`) are
//! not listed. Nothing outside the root is ever read or written: keys are joined component by
//! component, `..` and absolute components are refused, and symbolic links are not followed.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use super::{FAILED, INCOMING, MoveAs, ObjectMeta, Opened, PROCESSED, SourceError};

pub struct LocalSource {
    root: PathBuf,
    id: String,
    settle_time: Duration,
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
        for dir in [INCOMING, PROCESSED, FAILED] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(|e| anyhow::anyhow!("source.url: cannot create {}: {e}", root.join(dir).display()))?;
        }
        let root = std::fs::canonicalize(root)?;
        Ok(LocalSource {
            id: format!("file://{}", root.display()),
            root,
            settle_time,
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
        let found = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            walk(&dir, "", settle, SystemTime::now(), &mut out).map(|_| out)
        })
        .await
        .map_err(|e| SourceError::Transient(format!("listing task failed: {e}")))?
        .map_err(|e| SourceError::Transient(format!("listing {prefix}: {e}")))?;
        Ok((found, 1))
    }

    pub async fn open(&self, obj: &ObjectMeta) -> Result<Opened, SourceError> {
        let path = self.path(INCOMING, &obj.key)?;
        let file = tokio::fs::File::open(&path).await.map_err(|e| classify(e, &path))?;
        let meta = file.metadata().await.map_err(|e| classify(e, &path))?;
        if etag_of(&meta) != obj.etag {
            return Err(SourceError::Gone(format!(
                "{} changed since it was listed",
                path.display()
            )));
        }
        Ok(Opened {
            reader: Box::new(file),
            content_encoding: None,
        })
    }

    /// Moves `from/K` to `to/name` unless `to/name` exists: a hard link (which fails when the
    /// name is taken, atomically) then removing the source. A crash between the two leaves
    /// both names on one file, which the next attempt recognizes as the same version.
    pub async fn move_as(&self, from: &str, to: &str, obj: &ObjectMeta, name: &str) -> Result<MoveAs, SourceError> {
        let src = self.path(from, &obj.key)?;
        let dest = self.path(to, name)?;
        match tokio::fs::symlink_metadata(&src).await {
            Ok(meta) if etag_of(&meta) == obj.etag => {}
            Ok(_) => return Ok(MoveAs::SourceGone),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(MoveAs::SourceGone),
            Err(e) => return Err(classify(e, &src)),
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| classify(e, parent))?;
        }
        match tokio::fs::hard_link(&src, &dest).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let found = tokio::fs::symlink_metadata(&dest)
                    .await
                    .map_err(|e| classify(e, &dest))?;
                return Ok(MoveAs::Taken {
                    identical: etag_of(&found) == obj.etag,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(MoveAs::SourceGone),
            Err(e) => return Err(classify(e, &src)),
        }
        self.delete_version(from, obj).await?;
        Ok(MoveAs::Moved)
    }

    /// Removes `from/K` if it still is this version.
    pub async fn delete_version(&self, from: &str, obj: &ObjectMeta) -> Result<(), SourceError> {
        let src = self.path(from, &obj.key)?;
        match tokio::fs::symlink_metadata(&src).await {
            Ok(meta) if etag_of(&meta) == obj.etag => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(classify(e, &src)),
        }
        match tokio::fs::remove_file(&src).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(classify(e, &src)),
        }
        prune_empty_dirs(&src, &self.root.join(from.trim_end_matches('/'))).await;
        Ok(())
    }

    /// The version tag of the file at `path` (relative to the root), if there is one.
    pub async fn etag_at(&self, path: &str) -> Result<Option<String>, SourceError> {
        let (prefix, key) = path.split_once('/').unwrap_or(("", path));
        let target = self.path(prefix, key)?;
        match tokio::fs::symlink_metadata(&target).await {
            Ok(meta) => Ok(Some(etag_of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(classify(e, &target)),
        }
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

    pub async fn read(&self, path: &str) -> Result<Vec<u8>, SourceError> {
        let (prefix, key) = path.split_once('/').unwrap_or(("", path));
        let target = self.path(prefix, key)?;
        tokio::fs::read(&target).await.map_err(|e| classify(e, &target))
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
        let dir = self.root.join(INCOMING.trim_end_matches('/'));
        match tokio::fs::metadata(&dir).await {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(SourceError::Transient(format!("{} is not a folder", dir.display()))),
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

/// Size and modification time: changes whenever a producer rewrites the file. (No `-` in it:
/// see [`super::same_version`].)
fn etag_of(meta: &std::fs::Metadata) -> String {
    let nanos = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}.{:x}", meta.len(), nanos)
}

fn walk(dir: &Path, rel: &str, settle: Duration, now: SystemTime, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
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
            walk(&entry.path(), &key, settle, now, out)?;
        } else if meta.is_file() {
            let modified = meta.modified()?;
            if now.duration_since(modified).unwrap_or(Duration::ZERO) < settle {
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
mod tests {
    use super::*;
    use crate::source::MoveOutcome;

    #[test]
    fn keys_that_leave_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalSource::create(dir.path(), Duration::ZERO).unwrap();
        for bad in ["../x", "a/../../x", "/etc/passwd", "", "a/./b"] {
            assert!(src.path(INCOMING, bad).is_err(), "{bad}");
        }
        assert_eq!(
            src.path(INCOMING, "a/b c.csv").unwrap(),
            src.root.join("incoming/a/b c.csv")
        );
    }

    #[test]
    fn temp_and_hidden_names_are_not_listed() {
        for name in [".hidden.csv", "a.csv.tmp", "a.csv.part", "a.csv~", "x.PARTIAL"] {
            assert!(looks_temporary(name), "{name}");
        }
        assert!(!looks_temporary("orders.csv.gz"));
    }

    #[tokio::test]
    async fn a_move_interrupted_after_the_link_is_finished_not_duplicated() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalSource::create(dir.path(), Duration::ZERO).unwrap();
        std::fs::create_dir_all(dir.path().join("incoming/t")).unwrap();
        std::fs::write(dir.path().join("incoming/t/a.csv"), "x\n1\n").unwrap();
        let (found, _) = src.list(INCOMING).await.unwrap();
        // The process died between linking processed/t/a.csv and removing incoming/t/a.csv.
        std::fs::create_dir_all(dir.path().join("processed/t")).unwrap();
        std::fs::hard_link(
            dir.path().join("incoming/t/a.csv"),
            dir.path().join("processed/t/a.csv"),
        )
        .unwrap();
        let outcome = crate::source::Source::Local(src)
            .move_to(&found[0], crate::source::Area::Processed)
            .await;
        assert_eq!(outcome.unwrap(), MoveOutcome::Moved { to: "t/a.csv".into() });
        assert!(!dir.path().join("incoming/t/a.csv").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("processed/t")).unwrap().count(),
            1,
            "no second copy"
        );
    }

    #[tokio::test]
    async fn recent_files_wait_for_the_settle_time() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalSource::create(dir.path(), Duration::from_secs(3600)).unwrap();
        std::fs::create_dir_all(dir.path().join("incoming/t")).unwrap();
        std::fs::write(dir.path().join("incoming/t/a.csv"), "x\n1\n").unwrap();
        assert!(src.list(INCOMING).await.unwrap().0.is_empty());
        let src = LocalSource::create(dir.path(), Duration::ZERO).unwrap();
        let (found, _) = src.list(INCOMING).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].key, "t/a.csv");
    }
}
