//! Failure reports: `failed/N.error.json` beside each failed file `failed/N`, what they hold,
//! and how a report is told apart from a producer's own file of such a name. A report never
//! replaces anything: a failed file takes a name under `failed/` only when no other version
//! holds it and no other object holds its report's name.

use serde::{Deserialize, Serialize};

use crate::error::FileError;
use crate::source::{FAILED, INCOMING, ObjectMeta, Small, Source, SourceError, alternative_name, same_version};

/// What a report's name adds to its file's name.
pub const SUFFIX: &str = ".error.json";

/// Reports are small; anything larger under a report's name is not one, and is never read
/// whole.
pub const MAX_REPORT_BYTES: u64 = 1 << 20;

/// The report written beside a failed file.
#[derive(Debug, Serialize)]
pub struct FailureReportFile<'a> {
    pub source: &'a str,
    pub key: String,
    pub etag: &'a str,
    pub size: u64,
    pub failed_at: chrono::DateTime<chrono::Utc>,
    pub error: &'a FileError,
    pub loader_version: &'static str,
}

/// The fields that make an object a report of this loader, and whose.
#[derive(Debug, Clone, Deserialize)]
pub struct ReportHead {
    pub source: String,
    /// `incoming/K`: the key the file came from.
    pub key: String,
    pub etag: String,
    pub loader_version: String,
    pub error: serde_json::Value,
}

impl ReportHead {
    pub fn parse(body: &[u8]) -> Option<ReportHead> {
        serde_json::from_slice(body).ok()
    }

    /// The key relative to `incoming/` that the failed file came from.
    pub fn original_key(&self) -> Option<&str> {
        self.key.strip_prefix(INCOMING).filter(|k| !k.is_empty())
    }

    /// Written for this very version of `incoming/K`?
    fn is_for(&self, source: &str, obj: &ObjectMeta) -> bool {
        self.source == source && self.original_key() == Some(obj.key.as_str()) && self.etag == obj.etag
    }
}

/// The report at `failed/name.error.json`, if a report of this loader is there.
pub async fn read(source: &Source, name: &str) -> Result<Option<ReportHead>, SourceError> {
    Ok(
        match source
            .read_small(&format!("{FAILED}{name}{SUFFIX}"), MAX_REPORT_BYTES)
            .await?
        {
            Small::Body(body) => ReportHead::parse(&body),
            Small::Absent | Small::TooLarge => None,
        },
    )
}

/// The name under `failed/` for this version and its report: the key, or its
/// [`alternative_name`], whichever no other version holds and whose report name is free (or
/// holds this version's own report, from an attempt that stopped before its move). `None`
/// when both are taken.
pub async fn failed_name(source: &Source, obj: &ObjectMeta) -> Result<Option<String>, SourceError> {
    for name in [obj.key.clone(), alternative_name(obj)] {
        if let Some(found) = source.etag_at(&format!("{FAILED}{name}")).await?
            && !same_version(&found, &obj.etag)
        {
            continue;
        }
        match source
            .read_small(&format!("{FAILED}{name}{SUFFIX}"), MAX_REPORT_BYTES)
            .await?
        {
            Small::Absent => return Ok(Some(name)),
            Small::Body(body) if ReportHead::parse(&body).is_some_and(|r| r.is_for(source.id(), obj)) => {
                return Ok(Some(name));
            }
            Small::Body(_) | Small::TooLarge => continue,
        }
    }
    Ok(None)
}

/// The failed files among a listing of `failed/`, without the reports: an object named
/// `N.error.json` is a report when `N` is listed too, or when it reads as one (a report whose
/// file has not been moved yet). A producer's own `x.error.json` that failed is a failed file.
pub async fn failed_files(source: &Source, listed: Vec<ObjectMeta>) -> Result<Vec<ObjectMeta>, SourceError> {
    let names: std::collections::HashSet<String> = listed.iter().map(|o| o.key.clone()).collect();
    let mut files = Vec::with_capacity(listed.len());
    for obj in listed {
        if let Some(stem) = obj.key.strip_suffix(SUFFIX) {
            if names.contains(stem) {
                continue;
            }
            if read(source, stem).await?.is_some() {
                continue;
            }
        }
        files.push(obj);
    }
    Ok(files)
}
