//! Errors at the worker boundary. Every failure of a file is either *transient* (the file stays in
//! `incoming/` and is retried on a later tick) or *permanent* (the file goes to `failed/` with a
//! report). Leaf modules classify their own errors; nothing else decides.

use serde::{Deserialize, Serialize};

/// Why a file cannot be loaded, as written to `failed/K.error.json` and the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileError {
    pub kind: FileErrorKind,
    pub message: String,
    /// Line of the file (1-based, counting the header) where the problem is, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// Data record (1-based, not counting the header) where the problem is, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The database's own message, when the database refused the data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_message: Option<String>,
    /// Earlier attempts that ended in transient errors, oldest first. (Boxed: errors travel in
    /// `Result`s and should stay small.)
    #[serde(default, skip_serializing_if = "no_history")]
    pub history: Box<Vec<Attempt>>,
}

fn no_history(history: &[Attempt]) -> bool {
    history.is_empty()
}

/// One attempt that hit a transient error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub at: chrono::DateTime<chrono::Utc>,
    pub stage: Stage,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileErrorKind {
    /// Not decodable: malformed CSV, bad compression, invalid UTF-8.
    Decode,
    /// A table or column name that is not a safe SQL identifier.
    UnsafeName,
    /// Columns that do not match the table, or no table to load into.
    Schema,
    /// A value that does not fit its column's type.
    Type,
    /// The database refused the data for another reason.
    Database,
    /// The object itself cannot be read (for example access denied).
    Source,
    /// Transient errors every time, `retry.max_attempts` times.
    RetriesExhausted,
    /// `retry.max_attempts` attempts, some of which ended without any outcome: the loading
    /// process died (out of memory, a crash, a kill) while loading this file.
    CrashedLoader,
    /// Over one of the `[limits]` (a record, field or JSON line too long, too many columns or
    /// keys, a file that decompresses too far); the message names the key and its value.
    Limit,
}

impl FileErrorKind {
    /// The snake_case name, as in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FileErrorKind::Decode => "decode",
            FileErrorKind::UnsafeName => "unsafe_name",
            FileErrorKind::Schema => "schema",
            FileErrorKind::Type => "type",
            FileErrorKind::Database => "database",
            FileErrorKind::Source => "source",
            FileErrorKind::RetriesExhausted => "retries_exhausted",
            FileErrorKind::CrashedLoader => "crashed_loader",
            FileErrorKind::Limit => "limit",
        }
    }

    /// Where in a file's journey this kind of error shows up.
    pub fn stage(self) -> Stage {
        match self {
            FileErrorKind::Decode | FileErrorKind::Limit => Stage::Decode,
            FileErrorKind::Source | FileErrorKind::RetriesExhausted => Stage::Get,
            FileErrorKind::CrashedLoader => Stage::Database,
            _ => Stage::Database,
        }
    }
}

impl FileError {
    pub fn new(kind: FileErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            line: None,
            record: None,
            column: None,
            database_message: None,
            history: Box::default(),
        }
    }

    pub fn at_line(mut self, line: Option<u64>) -> Self {
        self.line = line;
        self
    }

    pub fn at_record(mut self, record: Option<u64>) -> Self {
        self.record = record;
        self
    }

    pub fn in_column(mut self, column: impl Into<String>) -> Self {
        self.column = Some(column.into());
        self
    }

    /// The same error with nothing that can quote the file's data: its kind, line, record and
    /// column stay; the message becomes a fixed sentence (a limit's message, which names only
    /// the limit, stays), the database's message goes, and so do the texts of earlier attempts
    /// (`reports.include_values = false`).
    pub fn without_values(&self) -> FileError {
        let what = match self.kind {
            FileErrorKind::Decode => "the file cannot be decoded",
            FileErrorKind::UnsafeName => "a table or column name is not a safe SQL identifier",
            FileErrorKind::Schema => "the file's columns do not match the table",
            FileErrorKind::Type => "a value does not fit its column's type",
            FileErrorKind::Database => "the database refused the data",
            FileErrorKind::Source => "the object cannot be read",
            FileErrorKind::RetriesExhausted => "every attempt ended in a transient error",
            FileErrorKind::CrashedLoader => "the loader stopped while loading this file, every attempt",
            // Names a `[limits]` key and its value, never the file's data: kept as it is.
            FileErrorKind::Limit => "",
        };
        FileError {
            message: match what {
                "" => self.message.clone(),
                what => format!("{what} (values left out: reports.include_values = false)"),
            },
            database_message: None,
            history: Box::new(
                self.history
                    .iter()
                    .map(|a| Attempt {
                        message: String::new(),
                        ..a.clone()
                    })
                    .collect(),
            ),
            ..self.clone()
        }
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        } else if let Some(record) = self.record {
            write!(f, " (record {record})")?;
        }
        if let Some(column) = &self.column {
            write!(f, " (column {column})")?;
        }
        Ok(())
    }
}

/// The step of a file's journey where something failed; a log and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    List,
    Get,
    Decode,
    Database,
    Move,
    Report,
    /// The load itself ended abnormally (a panic caught at the worker boundary).
    Load,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::List => "list",
            Stage::Get => "get",
            Stage::Decode => "decode",
            Stage::Database => "database",
            Stage::Move => "move",
            Stage::Report => "report",
            Stage::Load => "load",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure to process one file, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// Worth retrying later: the store or database is unreachable, slow or busy.
    #[error("{stage}: {message} (transient; will retry)")]
    Transient { stage: Stage, message: String },
    /// The file itself is at fault; retrying cannot help.
    #[error("{0}")]
    Permanent(FileError),
}

impl LoadError {
    pub fn transient(stage: Stage, message: impl std::fmt::Display) -> Self {
        LoadError::Transient {
            stage,
            message: message.to_string(),
        }
    }

    pub fn stage(&self) -> Stage {
        match self {
            LoadError::Transient { stage, .. } => *stage,
            LoadError::Permanent(e) => e.kind.stage(),
        }
    }
}

impl From<FileError> for LoadError {
    fn from(e: FileError) -> Self {
        LoadError::Permanent(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind, for the consistency checks below (a new kind must be added here).
    const KINDS: [FileErrorKind; 9] = [
        FileErrorKind::Decode,
        FileErrorKind::UnsafeName,
        FileErrorKind::Schema,
        FileErrorKind::Type,
        FileErrorKind::Database,
        FileErrorKind::Source,
        FileErrorKind::RetriesExhausted,
        FileErrorKind::CrashedLoader,
        FileErrorKind::Limit,
    ];

    #[test]
    fn every_kind_has_one_name_in_reports_metrics_and_the_readme() {
        let readme = include_str!("../README.md");
        let metric = readme
            .lines()
            .find(|l| l.contains("s3_sql_loader_errors_total{kind,stage}"))
            .expect("the README documents s3_sql_loader_errors_total");
        for kind in KINDS {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
            assert!(
                metric.contains(&format!("`{}`", kind.as_str())),
                "README's errors_total row lacks `{}`",
                kind.as_str()
            );
        }
    }
}
