//! Where files come from, behind one interface: a local folder ([`local`]) or an S3 bucket
//! ([`s3`]). Both hold `incoming/`, `processed/` and `failed/` under a root; a file is named by
//! its *relative key* `K` (`incoming/K` → `processed/K` or `failed/K`).

pub mod local;
pub mod s3;

use chrono::{DateTime, Utc};
use tokio::io::AsyncRead;

use crate::config::{SourceConfig, SourceUrl};
use crate::error::{FileError, FileErrorKind, LoadError, Stage};

pub const INCOMING: &str = "incoming/";
pub const PROCESSED: &str = "processed/";
pub const FAILED: &str = "failed/";

/// One file waiting in `incoming/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to `incoming/`.
    pub key: String,
    /// Version identity: the S3 ETag, or for a local file the hash of its content once
    /// [`Source::identify`] has read it.
    pub etag: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// An object being read.
pub struct Opened {
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    /// The object's Content-Encoding, when the store keeps one (S3).
    pub content_encoding: Option<String>,
}

/// The folders a file can end up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Processed,
    Failed,
}

impl Area {
    pub fn prefix(self) -> &'static str {
        match self {
            Area::Processed => PROCESSED,
            Area::Failed => FAILED,
        }
    }
}

/// What [`Source::read_small`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Small {
    Absent,
    /// Something larger than asked for, or not a regular file.
    TooLarge,
    Body(Vec<u8>),
}

/// What a move did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveOutcome {
    /// Now at `area/to` (`to` is the key, or [`alternative_name`] when the key was taken by
    /// another version).
    Moved { to: String },
    /// `incoming/K` no longer holds the version that was loaded (already moved by another
    /// replica, or overwritten by a producer); nothing was touched.
    SourceGone,
}

/// What one backend attempt to move under a given name did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveAs {
    Moved,
    SourceGone,
    /// The destination exists; `identical` when it holds this very version (an earlier move
    /// copied it and then stopped before deleting the source).
    Taken {
        identical: bool,
    },
}

/// Where a file goes when its key is already taken under the destination by another version:
/// the key plus a tag of the version (`orders/a.csv.3f2a9c...`), so nothing is overwritten and
/// the prefix is kept.
pub fn alternative_name(obj: &ObjectMeta) -> String {
    let tag: String = obj.etag.chars().filter(char::is_ascii_alphanumeric).take(16).collect();
    format!("{}.{tag}", obj.key)
}

/// Whether an object found at the destination is the same version as `etag`. A multipart ETag
/// (`...-N`) changes when copied, so it never matches: the copy then goes to the alternative
/// name instead, which wastes an object but never loses one.
pub fn same_version(found: &str, etag: &str) -> bool {
    found == etag && !etag.contains('-')
}

/// A failure talking to the store, classified.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Unreachable, 5xx, throttled, timed out: retry later.
    #[error("{0}")]
    Transient(String),
    /// This object cannot be read (for example access denied): the file fails.
    #[error("{0}")]
    Denied(String),
    /// The object (at this version) is no longer there.
    #[error("{0}")]
    Gone(String),
}

impl SourceError {
    pub fn into_load_error(self, stage: Stage) -> LoadError {
        match self {
            SourceError::Denied(m) => LoadError::Permanent(FileError::new(FileErrorKind::Source, m)),
            SourceError::Transient(m) | SourceError::Gone(m) => LoadError::transient(stage, m),
        }
    }
}

/// The store behind `source.url`.
pub enum Source {
    Local(local::LocalSource),
    S3(s3::S3Source),
}

impl Source {
    /// `create`: make a local folder and its areas when missing (not for `check`).
    pub async fn connect(config: &SourceConfig, create: bool) -> anyhow::Result<Source> {
        Ok(
            match crate::config::parse_source_url(&config.url).map_err(anyhow::Error::msg)? {
                SourceUrl::Local(path) => Source::Local(local::LocalSource::at(&path, config.settle_time, create)?),
                SourceUrl::S3 { bucket, root } => Source::S3(s3::S3Source::connect(config, bucket, root).await),
            },
        )
    }

    /// A stable name for the store (`s3://bucket/root`, `file:///abs/dir`): part of each file's
    /// identity in the ledger.
    pub fn id(&self) -> &str {
        match self {
            Source::Local(s) => s.id(),
            Source::S3(s) => s.id(),
        }
    }

    /// Where the file lives, for logs and reports (`s3://bucket/incoming/K`).
    pub fn location(&self, area_prefix: &str, key: &str) -> String {
        format!("{}/{area_prefix}{key}", self.id().trim_end_matches('/'))
    }

    /// Every file in `incoming/`, and how many list calls that took.
    pub async fn list_incoming(&self) -> Result<(Vec<ObjectMeta>, u64), SourceError> {
        match self {
            Source::Local(s) => s.list(INCOMING).await,
            Source::S3(s) => s.list(INCOMING).await,
        }
    }

    /// The listed files of `incoming/` as the versions to load: for a local folder, each
    /// file's content version is computed here (once per file; see [`local`]). Called by a
    /// worker when a file's turn comes, so only files about to be loaded are read, and in
    /// parallel. Files gone meanwhile are left out.
    pub async fn identify(&self, objs: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
        match self {
            Source::Local(s) => s.identify(INCOMING, objs).await,
            Source::S3(_) => objs,
        }
    }

    /// Every file in `failed/` (reports included), for `retry-failed`, with its version.
    pub async fn list_failed_versions(&self) -> Result<Vec<ObjectMeta>, SourceError> {
        let listed = self.list_failed().await?;
        Ok(match self {
            Source::Local(s) => s.identify(FAILED, listed).await,
            Source::S3(_) => listed,
        })
    }

    /// Every file in `failed/` (reports included), for `retry-failed`.
    pub async fn list_failed(&self) -> Result<Vec<ObjectMeta>, SourceError> {
        Ok(match self {
            Source::Local(s) => s.list(FAILED).await?.0,
            Source::S3(s) => s.list(FAILED).await?.0,
        })
    }

    /// Streams `incoming/K` at exactly the listed version.
    pub async fn open(&self, obj: &ObjectMeta) -> Result<Opened, SourceError> {
        match self {
            Source::Local(s) => s.open(obj).await,
            Source::S3(s) => s.open(obj).await,
        }
    }

    /// Moves `incoming/K` (the listed version only) to `area/K`, or to `area/`
    /// [`alternative_name`] when `area/K` holds another version: nothing is ever overwritten.
    pub async fn move_to(&self, obj: &ObjectMeta, area: Area) -> Result<MoveOutcome, SourceError> {
        self.move_between(INCOMING, area.prefix(), obj).await
    }

    /// Moves `failed/K` back to `incoming/K` (or its alternative name).
    pub async fn move_back(&self, obj: &ObjectMeta) -> Result<MoveOutcome, SourceError> {
        self.move_between(FAILED, INCOMING, obj).await
    }

    /// Moves `failed/K.<tag>` (a file stored under its alternative name) back to exactly
    /// `incoming/name`, its original key; `None` when that name holds another version.
    pub async fn move_back_as(&self, obj: &ObjectMeta, name: &str) -> Result<Option<MoveOutcome>, SourceError> {
        self.move_named(FAILED, INCOMING, obj, name).await
    }

    async fn move_between(&self, from: &str, to: &str, obj: &ObjectMeta) -> Result<MoveOutcome, SourceError> {
        for name in [obj.key.clone(), alternative_name(obj)] {
            if let Some(outcome) = self.move_named(from, to, obj, &name).await? {
                return Ok(outcome);
            }
        }
        Err(SourceError::Transient(format!(
            "{to}{} and {to}{} are both taken by other versions",
            obj.key,
            alternative_name(obj)
        )))
    }

    /// Moves `incoming/K` to exactly `area/name`; `None` when that name holds another version.
    pub async fn move_to_name(
        &self,
        obj: &ObjectMeta,
        area: Area,
        name: &str,
    ) -> Result<Option<MoveOutcome>, SourceError> {
        self.move_named(INCOMING, area.prefix(), obj, name).await
    }

    async fn move_named(
        &self,
        from: &str,
        to: &str,
        obj: &ObjectMeta,
        name: &str,
    ) -> Result<Option<MoveOutcome>, SourceError> {
        let attempt = match self {
            Source::Local(s) => s.move_as(from, to, obj, name).await?,
            Source::S3(s) => s.move_as(from, to, obj, name).await?,
        };
        Ok(match attempt {
            MoveAs::Moved => Some(MoveOutcome::Moved { to: name.to_string() }),
            MoveAs::SourceGone => Some(MoveOutcome::SourceGone),
            MoveAs::Taken { identical: true } => {
                // Copied earlier, source not deleted then: finish the move.
                match self {
                    Source::Local(s) => s.delete_version(from, obj).await?,
                    Source::S3(s) => s.delete_version(from, obj).await?,
                }
                Some(MoveOutcome::Moved { to: name.to_string() })
            }
            MoveAs::Taken { identical: false } => None,
        })
    }

    /// Writes a small object (a failure report) at `path` relative to the root.
    pub async fn put(&self, path: &str, body: Vec<u8>) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.put(path, body).await,
            Source::S3(s) => s.put(path, body).await,
        }
    }

    /// The object at `path` (relative to the root) if it is at most `max` bytes: a failure
    /// report, or whatever else holds its name (never read whole when large).
    pub async fn read_small(&self, path: &str, max: u64) -> Result<Small, SourceError> {
        match self {
            Source::Local(s) => s.read_small(path, max).await,
            Source::S3(s) => s.read_small(path, max).await,
        }
    }

    /// The version of the object at `path` relative to the root, if there is one.
    /// Files in `incoming/` that listings leave out for now: a local folder's files changed
    /// within `source.settle_time` (still being written, perhaps).
    pub async fn settling(&self) -> Result<u64, SourceError> {
        match self {
            Source::Local(s) => s.settling().await,
            Source::S3(_) => Ok(0),
        }
    }

    /// The file at `area` + `key` (`key` relative to the area), if there is one.
    pub async fn meta_at(&self, area: &str, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        match self {
            Source::Local(s) => s.meta_at(area, key).await,
            Source::S3(s) => s.meta_at(area, key).await,
        }
    }

    /// Moves `processed/K` back to exactly `incoming/K` (for `reload`); `None` when that name
    /// holds another version.
    pub async fn move_back_from_processed(&self, obj: &ObjectMeta) -> Result<Option<MoveOutcome>, SourceError> {
        self.move_named(PROCESSED, INCOMING, obj, &obj.key).await
    }

    pub async fn etag_at(&self, path: &str) -> Result<Option<String>, SourceError> {
        match self {
            Source::Local(s) => s.etag_at(path).await,
            Source::S3(s) => s.etag_at(path).await,
        }
    }

    /// Deletes a small object at `path` relative to the root, if present.
    pub async fn delete(&self, path: &str) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.delete(path).await,
            Source::S3(s) => s.delete(path).await,
        }
    }

    /// For `check`: how moves keep names in `processed/` and `failed/` from being replaced on
    /// this store (an S3 store is probed; see [`s3::S3Source::copy_guard`]).
    pub async fn copy_guard_note(&self) -> Result<String, SourceError> {
        Ok(match self {
            Source::Local(_) => "links and renames never replace a name".into(),
            Source::S3(s) => match s.copy_guard().await? {
                s3::CopyGuard::Honoured => {
                    "the store refuses copies onto existing keys (If-None-Match); moves rely on it".into()
                }
                s3::CopyGuard::Ignored => "the store ignores If-None-Match on CopyObject; each move checks the \
                                           destination before and after copying"
                    .into(),
                s3::CopyGuard::Off => "source.conditional_copy = false; each move checks the destination before \
                                       and after copying"
                    .into(),
            },
        })
    }

    /// Is the store reachable (and `incoming/` listable)?
    pub async fn check(&self) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.check().await,
            Source::S3(s) => s.check().await,
        }
    }
}
