//! Turns an object's bytes into rows: detects compression (Content-Encoding, then extension,
//! then magic bytes) and the format (the route's, else by extension), decompresses and decodes,
//! all streamed. Decoding runs on a blocking thread and hands [`Batch`]es to the sink over a
//! bounded channel, so download and decode overlap with the database write while memory stays
//! bounded by `CHANNEL_BATCHES × BATCH_BYTES` (or as many single rows, each at most
//! `limits.record_bytes`).
//!
//! Whatever the bytes, [`InputLimits`] (the `[limits]` section) bound what one file can make the
//! loader hold or do: the CSV reader stops a record, a field or a header that grows past its
//! limit while reading it, the JSON lines reader a line or an object, and the decompressor a
//! file that expands too far. Each fails the file with a report of kind `limit` naming the key.
//!
//! The types are here; `compression.rs` detects and undoes compression, `read.rs` runs the reading
//! thread and its channels, `csv.rs`, `jsonl.rs` and `raw.rs` read the formats.

mod batch;
mod compression;
pub mod csv;
pub mod jsonl;
pub mod raw;
mod read;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

pub use self::batch::Batch;
pub use self::compression::Compression;
pub use self::read::{decode, pass_through};
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::schema::{ColumnCheck, ColumnType};

/// Bounds on one file, from the `[limits]` configuration section (see
/// [`crate::config::LimitsConfig`], where each is documented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Bytes of one CSV record (with the blank lines before it) or one JSON line.
    pub record_bytes: usize,
    /// Bytes of one CSV field, unquoted.
    pub field_bytes: usize,
    /// Fields of one CSV record; columns of a JSON lines file.
    pub columns: usize,
    /// Keys of one JSON object.
    pub json_keys: usize,
    /// Bytes out of the decompressor; 0: no limit.
    pub decompressed_bytes: u64,
    /// Bytes out of the decompressor per compressed byte in; 0: no limit.
    pub compression_ratio: u64,
}

impl Default for InputLimits {
    /// The defaults of the `[limits]` configuration section.
    fn default() -> Self {
        InputLimits {
            // Why 16 MiB: a load holds a few records' worth (the reader's buffer, batches in
            // flight), and workers.concurrency loads run at once in a pod of 256 MiB.
            record_bytes: 16 << 20,
            // Room for an 8 MiB value (a document or a blob in a CSV field) and its quoting.
            field_bytes: 10 << 20,
            columns: crate::schema::MAX_COLUMNS,
            json_keys: crate::schema::MAX_COLUMNS,
            decompressed_bytes: 64 << 30,
            compression_ratio: 1000,
        }
    }
}

impl InputLimits {
    /// No limits at all (for tests of the readers' other rules).
    pub fn none() -> InputLimits {
        InputLimits {
            record_bytes: usize::MAX,
            field_bytes: usize::MAX,
            columns: usize::MAX,
            json_keys: usize::MAX,
            decompressed_bytes: 0,
            compression_ratio: 0,
        }
    }
}

/// The file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

impl Format {
    /// By the key's extension, once any compression extension is taken off: `.jsonl`,
    /// `.ndjson` and `.json` are JSON lines, `.tsv` and `.tab` TSV, anything else CSV.
    pub fn from_key(key: &str) -> Format {
        let lower = key.to_ascii_lowercase();
        let base = [".gz", ".gzip", ".zst", ".zstd"]
            .iter()
            .find_map(|e| lower.strip_suffix(e))
            .unwrap_or(&lower);
        if [".jsonl", ".ndjson", ".json"].iter().any(|e| base.ends_with(e)) {
            Format::Jsonl
        } else if base.ends_with(".tsv") || base.ends_with(".tab") {
            Format::Tsv
        } else {
            Format::Csv
        }
    }
}

/// How to read a file.
#[derive(Debug, Clone, PartialEq)]
pub struct FormatOptions {
    /// `None`: by the key's extension.
    pub format: Option<Format>,
    pub delimiter: u8,
    pub quote: u8,
    /// An unquoted CSV field equal to this is NULL.
    pub null: String,
    /// The first CSV line names the columns; otherwise `columns` does.
    pub header: bool,
    pub columns: Vec<String>,
    /// Bounds on what the file may make the reader hold or do.
    pub limits: InputLimits,
}

impl FormatOptions {
    /// Decides the format once, from the key's extension when not set, and gives TSV its tab
    /// delimiter: every reader of the file (parser, passthrough, COPY's options) then uses the
    /// same settings.
    pub fn resolved(mut self, key: &str) -> FormatOptions {
        if self.format.is_none() {
            let format = Format::from_key(key);
            if format == Format::Tsv {
                self.delimiter = b'\t';
            }
            self.format = Some(format);
        }
        self
    }
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            format: None,
            delimiter: b',',
            quote: b'"',
            null: String::new(),
            header: true,
            columns: Vec::new(),
            limits: InputLimits::default(),
        }
    }
}

/// Why decoding stopped early.
#[derive(Debug)]
pub enum DecodeFailure {
    /// Reading the object failed (network, store): transient.
    Source(io::Error),
    /// The bytes are not a valid file of the expected format: permanent.
    Format(FileError),
    /// Raw passthrough cannot be trusted with this file (see [`raw`]): load it through the
    /// parser instead. Never leaves the sink.
    Unsuitable(&'static str),
}

impl DecodeFailure {
    /// As a file's error, for reports that do not distinguish retries (`validate`).
    pub fn into_file_error(self) -> FileError {
        match self {
            DecodeFailure::Format(e) => e,
            DecodeFailure::Source(e) => FileError::new(FileErrorKind::Source, e.to_string()),
            DecodeFailure::Unsuitable(why) => FileError::new(FileErrorKind::Decode, why),
        }
    }
}

impl From<DecodeFailure> for LoadError {
    fn from(f: DecodeFailure) -> Self {
        match f {
            DecodeFailure::Source(e) => LoadError::transient(Stage::Get, format!("reading the object failed: {e}")),
            DecodeFailure::Format(e) => LoadError::Permanent(e),
            DecodeFailure::Unsuitable(why) => {
                LoadError::transient(Stage::Decode, format!("passthrough refused: {why}"))
            }
        }
    }
}

/// A file being decoded: its columns, then batches of rows from a background thread.
pub struct Decoded {
    /// Column names as the file gives them; empty for a 0-byte file.
    pub header: Vec<String>,
    /// Per column: a type the format itself fixes (JSON lines: `Json` for a column holding
    /// objects or arrays, `Text` for one holding strings), else `None`: inferred.
    pub types: Vec<Option<ColumnType>>,
    batches: mpsc::Receiver<Result<Batch, DecodeFailure>>,
    /// Advanced by the rows handed out (for `/status`).
    rows_read: Option<Arc<AtomicU64>>,
}

impl Decoded {
    /// Counts the rows handed out into `rows`.
    pub fn counting_rows(mut self, rows: Option<Arc<AtomicU64>>) -> Decoded {
        self.rows_read = rows;
        self
    }

    /// The next batch; `None` once the file is fully and successfully read.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, DecodeFailure> {
        match self.batches.recv().await {
            Some(Ok(batch)) => {
                if let Some(rows) = &self.rows_read {
                    rows.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Ok(Some(batch))
            }
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

/// One piece of a raw stream.
pub enum RawChunk {
    /// Bytes to pass on, and how many records (the header included) the reader had read when
    /// they were sent.
    Bytes(Vec<u8>, u64),
    /// The end, with the number of records the scanner counted (the header included).
    End { records: u64 },
}

/// A CSV file passed through as bytes.
pub struct RawDecoded {
    pub header: Vec<String>,
    /// Whether the file has a header line (which COPY must skip).
    pub has_header: bool,
    pub sample: Option<Batch>,
    chunks: mpsc::Receiver<Result<RawChunk, DecodeFailure>>,
    types: Option<tokio::sync::oneshot::Sender<Vec<Option<ColumnCheck>>>>,
    /// Set to the data rows passed so far (for `/status`).
    rows_read: Option<Arc<AtomicU64>>,
}

impl RawDecoded {
    /// Counts the data rows passed into `rows`.
    pub fn counting_rows(mut self, rows: Option<Arc<AtomicU64>>) -> RawDecoded {
        self.rows_read = rows;
        self
    }

    /// What each of the file's columns must satisfy in the table (`None`: nothing to check).
    /// Must be given before [`RawDecoded::next`]: every record is checked against it with the
    /// parser's rules while its bytes pass through.
    pub fn check_types(&mut self, types: Vec<Option<ColumnCheck>>) {
        if let Some(tx) = self.types.take() {
            let _ = tx.send(types);
        }
    }

    /// The next piece; `Err(DecodeFailure::Unsuitable)` means: load it through the parser.
    pub async fn next(&mut self) -> Result<RawChunk, DecodeFailure> {
        debug_assert!(self.types.is_none(), "check_types comes first");
        self.types.take(); // never given: the reader stops instead of waiting for it
        match self.chunks.recv().await {
            Some(result) => {
                if let (Ok(RawChunk::Bytes(_, records)), Some(rows)) = (&result, &self.rows_read) {
                    rows.store(records.saturating_sub(u64::from(self.has_header)), Ordering::Relaxed);
                }
                result
            }
            None => Err(DecodeFailure::Source(io::Error::other(
                "the reader stopped unexpectedly",
            ))),
        }
    }
}

/// Whether a file with these options can go to COPY as raw bytes (CSV or TSV).
pub fn passthrough_possible(key: &str, options: &FormatOptions) -> bool {
    matches!(
        options.format.unwrap_or_else(|| Format::from_key(key)),
        Format::Csv | Format::Tsv
    )
}

#[cfg(test)]
mod tests;
