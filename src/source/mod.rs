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
    /// Version identity: the S3 ETag, or size and modification time for a local file.
    pub etag: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
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

/// What a move did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    Moved,
    /// `incoming/K` no longer holds the version that was loaded (already moved by another
    /// replica, or overwritten by a producer); nothing was touched.
    SourceGone,
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
    pub async fn connect(config: &SourceConfig) -> anyhow::Result<Source> {
        Ok(
            match crate::config::parse_source_url(&config.url).map_err(anyhow::Error::msg)? {
                SourceUrl::Local(path) => Source::Local(local::LocalSource::create(&path, config.settle_time)?),
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

    /// Every file in `failed/` (reports included), for `retry-failed`.
    pub async fn list_failed(&self) -> Result<Vec<ObjectMeta>, SourceError> {
        Ok(match self {
            Source::Local(s) => s.list(FAILED).await?.0,
            Source::S3(s) => s.list(FAILED).await?.0,
        })
    }

    /// Streams `incoming/K` at exactly the listed version.
    pub async fn open(&self, obj: &ObjectMeta) -> Result<Box<dyn AsyncRead + Send + Unpin>, SourceError> {
        match self {
            Source::Local(s) => s.open(obj).await,
            Source::S3(s) => s.open(obj).await,
        }
    }

    /// Moves `incoming/K` (the listed version only) to `area/K`.
    pub async fn move_to(&self, obj: &ObjectMeta, area: Area) -> Result<MoveOutcome, SourceError> {
        match self {
            Source::Local(s) => s.rename(INCOMING, area.prefix(), obj).await,
            Source::S3(s) => s.rename(INCOMING, area.prefix(), obj).await,
        }
    }

    /// Moves `failed/K` back to `incoming/K`.
    pub async fn move_back(&self, obj: &ObjectMeta) -> Result<MoveOutcome, SourceError> {
        match self {
            Source::Local(s) => s.rename(FAILED, INCOMING, obj).await,
            Source::S3(s) => s.rename(FAILED, INCOMING, obj).await,
        }
    }

    /// Writes a small object (a failure report) at `path` relative to the root.
    pub async fn put(&self, path: &str, body: Vec<u8>) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.put(path, body).await,
            Source::S3(s) => s.put(path, body).await,
        }
    }

    /// Deletes a small object at `path` relative to the root, if present.
    pub async fn delete(&self, path: &str) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.delete(path).await,
            Source::S3(s) => s.delete(path).await,
        }
    }

    /// Is the store reachable (and `incoming/` listable)?
    pub async fn check(&self) -> Result<(), SourceError> {
        match self {
            Source::Local(s) => s.check().await,
            Source::S3(s) => s.check().await,
        }
    }
}
