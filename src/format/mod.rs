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

mod batch;
pub mod csv;
pub mod jsonl;
pub mod raw;

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

pub use self::batch::Batch;
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::schema::{ColumnCheck, ColumnType};

/// A batch is handed over once it holds this many rows ...
const BATCH_ROWS: usize = 4096;
/// ... or this many bytes of field text, whichever comes first.
const BATCH_BYTES: usize = 1 << 20;
/// Batches buffered between the decoder and the sink.
const CHANNEL_BATCHES: usize = 4;
/// The compression ratio is judged only once this much has come out of the decompressor.
const RATIO_CHECKED_AFTER: u64 = 1 << 20;

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

    /// Why `out` decompressed bytes from `compressed` compressed bytes are too many, if they are.
    fn expansion_problem(&self, out: u64, compressed: u64) -> Option<String> {
        if self.decompressed_bytes > 0 && out > self.decompressed_bytes {
            return Some(format!(
                "decompressed size over limits.decompressed_bytes = {} bytes",
                self.decompressed_bytes
            ));
        }
        if self.compression_ratio > 0 && out >= RATIO_CHECKED_AFTER && out / self.compression_ratio > compressed {
            return Some(format!(
                "decompressed size over limits.compression_ratio = {} times the compressed size ({out} bytes from {compressed})",
                self.compression_ratio
            ));
        }
        None
    }
}

/// A file over one of the [`InputLimits`], carried inside an `io::Error` from the decompressor
/// up through the readers (which pass I/O errors on untouched) to [`open`]'s classification.
#[derive(Debug)]
struct LimitExceeded(String);

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitExceeded {}

/// The limit an I/O error reports, if it is one.
fn limit_exceeded(e: &io::Error) -> Option<&LimitExceeded> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<LimitExceeded>())
}

/// A file's error for a limit it went over, at `line` and `record` when known.
fn limit_error(message: impl Into<String>, line: Option<u64>, record: Option<u64>) -> DecodeFailure {
    DecodeFailure::Format(
        FileError::new(FileErrorKind::Limit, message)
            .at_line(line)
            .at_record(record),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// By an HTTP Content-Encoding (`gzip`, `x-gzip`, `zstd`).
    pub fn from_content_encoding(encoding: &str) -> Option<Compression> {
        match encoding.trim().to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Compression::Gzip),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// By the key's extension (`.gz`, `.gzip`, `.zst`, `.zstd`).
    pub fn from_key(key: &str) -> Option<Compression> {
        let lower = key.to_ascii_lowercase();
        if lower.ends_with(".gz") || lower.ends_with(".gzip") {
            Some(Compression::Gzip)
        } else if lower.ends_with(".zst") || lower.ends_with(".zstd") {
            Some(Compression::Zstd)
        } else {
            None
        }
    }

    /// By the first bytes of the object.
    pub fn from_magic(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
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
}

impl Decoded {
    /// The next batch; `None` once the file is fully and successfully read.
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, DecodeFailure> {
        match self.batches.recv().await {
            Some(Ok(batch)) => Ok(Some(batch)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

type HeaderTx = tokio::sync::oneshot::Sender<Result<(Vec<String>, Vec<Option<ColumnType>>), DecodeFailure>>;
type BatchTx = mpsc::Sender<Result<Batch, DecodeFailure>>;

/// One piece of a raw stream.
pub enum RawChunk {
    Bytes(Vec<u8>),
    /// The end, with the number of records the scanner counted (the header included).
    End {
        records: u64,
    },
}

/// A CSV file passed through as bytes.
pub struct RawDecoded {
    pub header: Vec<String>,
    /// Whether the file has a header line (which COPY must skip).
    pub has_header: bool,
    pub sample: Option<Batch>,
    chunks: mpsc::Receiver<Result<RawChunk, DecodeFailure>>,
    types: Option<tokio::sync::oneshot::Sender<Vec<Option<ColumnCheck>>>>,
}

impl RawDecoded {
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
            Some(result) => result,
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

/// Starts decoding `reader`, the object's raw bytes, into rows. `key` and `content_encoding`
/// pick the compression, `options` (or `key`) the format. Returns once the columns are known.
pub async fn decode(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    key: &str,
    content_encoding: Option<&str>,
    options: FormatOptions,
) -> Result<Decoded, DecodeFailure> {
    let options = options.resolved(key);
    let (header_tx, header_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    let jsonl = options.format == Some(Format::Jsonl);
    spawn_reader(
        reader,
        key,
        content_encoding,
        options,
        move |input, options, classify| match input {
            Err(e) => drop(header_tx.send(Err(e))),
            Ok(bytes) if jsonl => decode_jsonl(bytes, options, header_tx, tx, classify),
            Ok(bytes) => decode_csv(bytes, options, header_tx, tx, classify),
        },
    );
    match header_rx.await {
        Ok(Ok((header, types))) => Ok(Decoded {
            header,
            types,
            batches: rx,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DecodeFailure::Source(io::Error::other(
            "the decoder stopped unexpectedly",
        ))),
    }
}

/// Starts passing `reader` (CSV or TSV, see [`passthrough_possible`]) through as raw bytes,
/// with its header and a sample read first (see [`raw`]).
pub async fn pass_through(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    key: &str,
    content_encoding: Option<&str>,
    options: FormatOptions,
) -> Result<RawDecoded, DecodeFailure> {
    let options = options.resolved(key);
    let (raw_tx, raw_rx) = mpsc::channel(CHANNEL_BATCHES);
    let (prefix_tx, prefix_rx) = tokio::sync::oneshot::channel();
    let (types_tx, types_rx) = tokio::sync::oneshot::channel();
    let has_header = options.header;
    spawn_reader(
        reader,
        key,
        content_encoding,
        options,
        move |input, options, classify| match input {
            Err(e) => drop(prefix_tx.send(Err(e))),
            Ok(bytes) => pass_raw(bytes, options, prefix_tx, types_rx, raw_tx, classify),
        },
    );
    match prefix_rx.await {
        Ok(Ok(prefix)) => Ok(RawDecoded {
            header: prefix.header,
            has_header,
            sample: prefix.sample,
            chunks: raw_rx,
            types: Some(types_tx),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DecodeFailure::Source(io::Error::other(
            "the reader stopped unexpectedly",
        ))),
    }
}

/// Runs `work` on a blocking thread with the object's decompressed bytes (or why there are
/// none) and the function that tells a failure of the source from one of the file.
fn spawn_reader<W>(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    key: &str,
    content_encoding: Option<&str>,
    options: FormatOptions,
    work: W,
) where
    W: FnOnce(Result<Box<dyn BufRead>, DecodeFailure>, &FormatOptions, &dyn Fn(io::Error, &str) -> DecodeFailure)
        + Send
        + 'static,
{
    let declared = content_encoding
        .and_then(Compression::from_content_encoding)
        .or_else(|| Compression::from_key(key));
    let source = SourceRead {
        inner: SyncIoBridge::new(reader),
        failed: Arc::new(AtomicBool::new(false)),
        read: Arc::new(AtomicU64::new(0)),
    };
    tokio::task::spawn_blocking(move || {
        let failed = source.failed.clone();
        let compressed = source.read.clone();
        let classify = |e: io::Error, what: &str| {
            if let Some(limit) = limit_exceeded(&e) {
                limit_error(limit.to_string(), None, None)
            } else if failed.load(Ordering::Relaxed) {
                DecodeFailure::Source(e)
            } else {
                DecodeFailure::Format(FileError::new(FileErrorKind::Decode, format!("{what}: {e}")))
            }
        };
        let input =
            decompress(source, compressed, declared, &options.limits).map_err(|e| classify(e, "reading the object"));
        work(input, &options, &classify);
    });
}

/// The object's bytes, decompressed when `declared` (or the magic bytes) says so. `compressed`
/// counts the bytes read from the object so far; the decompressed bytes are counted against it
/// and against `limits`.
fn decompress<R: Read + 'static>(
    source: R,
    compressed: Arc<AtomicU64>,
    declared: Option<Compression>,
    limits: &InputLimits,
) -> io::Result<Box<dyn BufRead>> {
    let mut raw = BufReader::with_capacity(256 * 1024, source);
    let head = raw.fill_buf()?;
    let checked = |decoder: Box<dyn Read>| {
        BufReader::with_capacity(
            256 * 1024,
            ExpansionCheck {
                inner: decoder,
                compressed,
                out: 0,
                limits: *limits,
            },
        )
    };
    Ok(match declared.unwrap_or_else(|| Compression::from_magic(head)) {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(checked(Box::new(flate2::bufread::MultiGzDecoder::new(raw)))),
        Compression::Zstd => Box::new(checked(Box::new(zstd::stream::read::Decoder::with_buffer(raw)?))),
    })
}

/// A decompressor's output, counted: past `limits.decompressed_bytes`, or past
/// `limits.compression_ratio` times the compressed bytes read so far (once 1 MiB has come
/// out), reading fails with [`LimitExceeded`]. The compressed count includes what the input's
/// buffer has read ahead, so the ratio is judged, if anything, leniently.
struct ExpansionCheck {
    inner: Box<dyn Read>,
    compressed: Arc<AtomicU64>,
    out: u64,
    limits: InputLimits,
}

impl Read for ExpansionCheck {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        match self
            .limits
            .expansion_problem(self.out, self.compressed.load(Ordering::Relaxed))
        {
            Some(problem) => Err(io::Error::new(io::ErrorKind::InvalidData, LimitExceeded(problem))),
            None => Ok(n),
        }
    }
}

type PrefixTx = tokio::sync::oneshot::Sender<Result<raw::Prefix, DecodeFailure>>;
type RawTx = mpsc::Sender<Result<RawChunk, DecodeFailure>>;

fn pass_raw(
    mut input: Box<dyn BufRead>,
    options: &FormatOptions,
    prefix_tx: PrefixTx,
    types_rx: tokio::sync::oneshot::Receiver<Vec<Option<ColumnCheck>>>,
    tx: RawTx,
    classify: &dyn Fn(io::Error, &str) -> DecodeFailure,
) {
    let mut prefix = match raw::read_prefix(&mut *input, raw::PREFIX_BYTES) {
        Ok(p) => p,
        Err(e) => {
            let _ = prefix_tx.send(Err(classify(e, "decompressing or reading the file")));
            return;
        }
    };
    // Whether the prefix is the whole file: decided before a BOM is taken off it.
    let complete = prefix.len() < raw::PREFIX_BYTES;
    if prefix.starts_with(&[0xEF, 0xBB, 0xBF]) {
        prefix.drain(..3);
        if prefix.starts_with(&[0xEF, 0xBB, 0xBF]) {
            // The reader skips a second one too; COPY would read it as text.
            let _ = prefix_tx.send(Err(DecodeFailure::Unsuitable("a second byte order mark")));
            return;
        }
    }
    if complete && prefix.is_empty() {
        let _ = prefix_tx.send(Ok(raw::Prefix {
            header: Vec::new(),
            sample: None,
        }));
        return; // an empty file
    }
    let parsed = match raw::parse_prefix(&prefix, complete, options, crate::schema::INFERENCE_SAMPLE_ROWS) {
        // No row in a prefix that is not the whole file: the first record is longer than the
        // prefix, and "no sample" would read as "header only".
        Ok(Some(p)) if complete || p.sample.is_some() => p,
        // No whole header in the first megabyte, or a problem: the parser will say what.
        _ => {
            let _ = prefix_tx.send(Err(DecodeFailure::Unsuitable(
                "the header and first rows could not be read up front",
            )));
            return;
        }
    };
    let width = parsed.header.len();
    if prefix_tx.send(Ok(parsed)).is_err() || width == 0 {
        return;
    }
    // The sink plans the load (and may decide not to send anything) before rows are checked.
    let Ok(types) = types_rx.blocking_recv() else { return };
    let unsuitable = |why| {
        let _ = tx.blocking_send(Err(DecodeFailure::Unsuitable(why)));
    };
    // One reading: the loader's CSV reader reads every record, checked as the parser checks
    // it, and COPY gets exactly the bytes that reader consumed. The scanner watches the same
    // bytes for anything COPY would read otherwise; a final count compares the two.
    let consumed = std::rc::Rc::new(std::cell::RefCell::new(Vec::with_capacity(2 * raw::CHUNK_BYTES)));
    let tee = raw::Tee::new(io::Cursor::new(prefix).chain(input), consumed.clone());
    let mut reader = csv::CsvReader::new(tee, options.delimiter, options.quote, &options.limits);
    let mut record = csv::Record::default();
    let mut scanner = raw::Scanner::new(options.quote, options.delimiter);
    let null = options.null.as_bytes();
    let mut records = 0u64;
    let flush = |scanner: &mut raw::Scanner, all: bool| -> Result<bool, &'static str> {
        let mut out = consumed.borrow_mut();
        if out.is_empty() || (!all && out.len() < raw::CHUNK_BYTES) {
            return Ok(true);
        }
        let chunk = std::mem::replace(&mut *out, Vec::with_capacity(2 * raw::CHUNK_BYTES));
        scanner.feed(&chunk)?;
        Ok(tx.blocking_send(Ok(RawChunk::Bytes(chunk))).is_ok())
    };
    loop {
        match reader.read(&mut record) {
            Ok(true) => {
                records += 1;
                let is_header = records == 1 && options.header;
                if !is_header && let Err(why) = raw::check_record(&record, &types, null) {
                    return unsuitable(why);
                }
            }
            Ok(false) => break,
            Err(Ok(e)) => {
                let _ = tx.blocking_send(Err(classify(e, "decompressing or reading the file")));
                return;
            }
            // Over a limit: the parser would stop at the same place; fail the file here.
            Err(Err(e)) if e.limit => {
                let record = (records + 1).checked_sub(u64::from(options.header)).filter(|&r| r > 0);
                let _ = tx.blocking_send(Err(limit_error(e.message, Some(e.line), record)));
                return;
            }
            Err(Err(_)) => return unsuitable("malformed CSV"),
        }
        match flush(&mut scanner, false) {
            Ok(true) => {}
            Ok(false) => return, // the load was abandoned
            Err(why) => return unsuitable(why),
        }
    }
    match flush(&mut scanner, true) {
        Ok(true) => {}
        Ok(false) => return,
        Err(why) => return unsuitable(why),
    }
    let _ = tx.blocking_send(match scanner.finish() {
        Ok(scanned) if scanned == records => Ok(RawChunk::End { records }),
        Ok(_) => Err(DecodeFailure::Unsuitable(
            "the scanner and the reader count records differently",
        )),
        Err(why) => Err(DecodeFailure::Unsuitable(why)),
    });
}

fn decode_error(message: impl Into<String>, line: u64, record: Option<u64>) -> DecodeFailure {
    DecodeFailure::Format(
        FileError::new(FileErrorKind::Decode, message)
            .at_line(Some(line))
            .at_record(record),
    )
}

fn decode_csv(
    input: Box<dyn BufRead>,
    options: &FormatOptions,
    header_tx: HeaderTx,
    tx: BatchTx,
    classify: &dyn Fn(io::Error, &str) -> DecodeFailure,
) {
    let mut reader = csv::CsvReader::new(input, options.delimiter, options.quote, &options.limits);
    let mut record = csv::Record::default();
    let fail = |e: Result<io::Error, csv::CsvError>, record: Option<u64>| match e {
        Ok(io) => classify(io, "decompressing or reading the file"),
        Err(c) if c.limit => limit_error(c.message, Some(c.line), record),
        Err(c) => decode_error(format!("malformed CSV: {}", c.message), c.line, record),
    };
    let header: Vec<String> = if options.header {
        match reader.read(&mut record) {
            Ok(true) => match (0..record.len())
                .map(|i| String::from_utf8(record.field(i).to_vec()))
                .collect()
            {
                Ok(h) => h,
                Err(_) => {
                    let _ = header_tx.send(Err(decode_error("invalid UTF-8 in the header", record.line, None)));
                    return;
                }
            },
            Ok(false) => Vec::new(),
            Err(e) => {
                let _ = header_tx.send(Err(fail(e, None)));
                return;
            }
        }
    } else {
        options.columns.clone()
    };
    let width = header.len();
    if header_tx.send(Ok((header, vec![None; width]))).is_err() || width == 0 {
        return;
    }
    let null = options.null.as_bytes();
    let mut number = 1u64;
    let mut batch = Batch::new(width, number);
    // A blank line in a file of one column is a record of one empty field, as COPY reads it
    // (PostgreSQL's own CSV export writes a NULL that way); in a wider file it holds no value
    // and is skipped. Blank lines before the header are skipped either way.
    let blank_is_a_row = width == 1;
    let blank_value = (!null.is_empty()).then_some(&b""[..]);
    let mut next_line = reader.line();
    let push_blanks = |batch: &mut Batch, number: &mut u64, from: u64, to: u64| {
        if blank_is_a_row {
            for line in from..to {
                let pushed = batch.push_row(line, std::iter::once(blank_value));
                debug_assert!(pushed.is_ok(), "an empty field is UTF-8");
                *number += 1;
            }
        }
    };
    loop {
        let read = reader.read(&mut record);
        let blanks_to = match &read {
            Ok(true) => record.line,
            Ok(false) => reader.line(),
            Err(_) => next_line,
        };
        push_blanks(&mut batch, &mut number, next_line, blanks_to);
        next_line = reader.line();
        match read {
            Ok(true) => {
                let problem = if record.len() != width {
                    Some(format!("row has {} fields but the header has {width}", record.len()))
                } else if let Some(field) = (0..width).find(|&i| record.field(i).contains(&0)) {
                    Some(format!("NUL byte in field {}", field + 1))
                } else {
                    let fields = (0..width).map(|i| {
                        let f = record.field(i);
                        (record.quoted(i) || f != null).then_some(f)
                    });
                    batch
                        .push_row(record.line, fields)
                        .err()
                        .map(|field| format!("invalid UTF-8 in field {}", field + 1))
                };
                if let Some(message) = problem {
                    let _ = tx.blocking_send(Err(decode_error(message, record.line, Some(number))));
                    return;
                }
                number += 1;
                let full = batch.len() >= BATCH_ROWS || batch.text_len() >= BATCH_BYTES;
                if full
                    && tx
                        .blocking_send(Ok(std::mem::replace(&mut batch, Batch::new(width, number))))
                        .is_err()
                {
                    return; // the load was abandoned
                }
            }
            Ok(false) => break,
            Err(e) => {
                let _ = tx.blocking_send(Err(fail(e, Some(number))));
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

fn decode_jsonl(
    input: Box<dyn BufRead>,
    options: &FormatOptions,
    header_tx: HeaderTx,
    tx: BatchTx,
    classify: &dyn Fn(io::Error, &str) -> DecodeFailure,
) {
    let mut reader = jsonl::JsonlReader::new(input, &options.limits);
    let fail = |e: jsonl::ReadError| match e {
        jsonl::ReadError::Io(io) => classify(io, "decompressing or reading the file"),
        jsonl::ReadError::Bad(j) => jsonl_failure(j),
    };
    // The sample is held whole until the columns are known: bounded in lines and in bytes.
    let mut sample = Vec::new();
    let mut sample_bytes = 0;
    while sample.len() < jsonl::SAMPLE_LINES && sample_bytes < jsonl::SAMPLE_BYTES {
        match reader.next_object() {
            Ok(Some(object)) => {
                sample_bytes += reader.line_len();
                sample.push(object);
            }
            Ok(None) => break,
            Err(e) => {
                let _ = header_tx.send(Err(fail(e)));
                return;
            }
        }
    }
    let columns = match jsonl::columns_of(&sample, options.limits.columns) {
        Ok(columns) => columns,
        Err(e) => {
            let _ = header_tx.send(Err(jsonl_failure(e)));
            return;
        }
    };
    let width = columns.names.len();
    if header_tx
        .send(Ok((columns.names.clone(), columns.types.clone())))
        .is_err()
        || width == 0
    {
        return;
    }
    let mut scratch = Vec::new();
    let mut number = 1u64;
    let mut batch = Batch::new(width, number);
    let mut rest = sample.into_iter();
    loop {
        let next = match rest.next() {
            Some(object) => Some(object),
            None => match reader.next_object() {
                Ok(o) => o,
                Err(e) => {
                    let _ = tx.blocking_send(Err(fail(e)));
                    return;
                }
            },
        };
        let Some((line, object)) = next else { break };
        if let Err(e) = jsonl::push_object(&mut batch, &columns, line, number, &object, &mut scratch) {
            let _ = tx.blocking_send(Err(jsonl_failure(e)));
            return;
        }
        number += 1;
        if (batch.len() >= BATCH_ROWS || batch.text_len() >= BATCH_BYTES)
            && tx
                .blocking_send(Ok(std::mem::replace(&mut batch, Batch::new(width, number))))
                .is_err()
        {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

fn jsonl_failure(e: jsonl::JsonlError) -> DecodeFailure {
    let mut error = FileError::new(e.kind, e.message)
        .at_line(Some(e.line))
        .at_record(Some(e.record));
    error.column = e.column;
    DecodeFailure::Format(error)
}

/// The object's byte stream, remembering whether an error came from the source itself (so
/// that a dropped connection is retried, while a corrupt file is not), and counting the bytes
/// read (the compressed size so far, for [`ExpansionCheck`]).
struct SourceRead<R> {
    inner: R,
    failed: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for SourceRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    type Rows = Vec<Vec<Option<String>>>;

    async fn decode_with(
        bytes: Vec<u8>,
        key: &str,
        options: FormatOptions,
    ) -> Result<(Vec<String>, Rows), DecodeFailure> {
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(bytes));
        let mut d = super::decode(reader, key, None, options).await?;
        let mut rows = Vec::new();
        while let Some(b) = d.next_batch().await? {
            rows.extend(b.into_strings());
        }
        Ok((d.header, rows))
    }

    async fn decode(bytes: Vec<u8>, key: &str) -> Result<(Vec<String>, Rows), DecodeFailure> {
        decode_with(bytes, key, FormatOptions::default()).await
    }

    fn row(fields: &[Option<&str>]) -> Vec<Option<String>> {
        fields.iter().map(|f| f.map(str::to_string)).collect()
    }

    #[tokio::test]
    async fn rfc4180_quotes_newlines_crlf_bom_and_nulls_decode() {
        let csv = "\u{feff}id,note,empty\r\n1,\"a, \"\"quoted\"\"\r\nline\",\r\n2,plain,\"\"\r\n";
        let (header, rows) = decode(csv.as_bytes().to_vec(), "x.csv").await.unwrap();
        assert_eq!(header, ["id", "note", "empty"]);
        assert_eq!(
            rows,
            [
                row(&[Some("1"), Some("a, \"quoted\"\r\nline"), None]),
                row(&[Some("2"), Some("plain"), Some("")])
            ]
        );
    }

    #[test]
    fn compression_and_format_come_from_encoding_extension_or_magic() {
        let cases = [
            (Some("gzip"), "a.csv", b"xx".as_slice(), Compression::Gzip),
            (None, "a.csv.gz", b"xx", Compression::Gzip),
            (None, "a.jsonl.zst", b"xx", Compression::Zstd),
            (None, "a.csv", &[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (None, "a.csv", &[0x1f, 0x8b], Compression::Gzip),
            (Some("identity"), "a.csv", b"id", Compression::None),
        ];
        for (encoding, key, head, want) in cases {
            let got = encoding
                .and_then(Compression::from_content_encoding)
                .or_else(|| Compression::from_key(key))
                .unwrap_or_else(|| Compression::from_magic(head));
            assert_eq!(got, want, "{encoding:?} {key}");
        }
        assert_eq!(Format::from_key("e/x.ndjson.gz"), Format::Jsonl);
        assert_eq!(Format::from_key("e/x.TSV"), Format::Tsv);
        assert_eq!(Format::from_key("e/x.txt"), Format::Csv);
    }

    #[tokio::test]
    async fn gzip_and_zstd_decode_by_extension_or_magic_bytes() {
        let csv = b"a,b\n1,2\n3,4\n";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(csv).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&csv[..], 1).unwrap();
        for (bytes, key) in [
            (gz.clone(), "f.csv.gz"),
            (gz, "f.csv"),
            (zst.clone(), "f.csv.zst"),
            (zst, "f.csv"),
        ] {
            let (header, rows) = decode(bytes, key).await.unwrap();
            assert_eq!(header, ["a", "b"], "{key}");
            assert_eq!(rows.len(), 2, "{key}");
        }
    }

    #[tokio::test]
    async fn tsv_and_headerless_csv_with_declared_columns() {
        let (header, rows) = decode(b"a\tb\n1\t\"x\"\n".to_vec(), "f.tsv").await.unwrap();
        assert_eq!(
            (header, rows),
            (vec!["a".to_string(), "b".into()], vec![row(&[Some("1"), Some("x")])])
        );
        let options = FormatOptions {
            header: false,
            columns: vec!["x".into(), "y".into()],
            null: "\\N".into(),
            ..Default::default()
        };
        let (header, rows) = decode_with(b"1,\\N\n2,\n".to_vec(), "f.csv", options).await.unwrap();
        assert_eq!(header, ["x", "y"]);
        assert_eq!(rows, [row(&[Some("1"), None]), row(&[Some("2"), Some("")])]);
    }

    #[tokio::test]
    async fn json_lines_decode_with_nested_values_and_nulls() {
        let jsonl = b"{\"id\": 1, \"name\": \"a\", \"tags\": [\"x\"]}\n\n{\"id\": 2.5, \"ok\": true, \"name\": null}\n";
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(jsonl.to_vec()));
        let mut d = super::decode(reader, "e.jsonl", None, FormatOptions::default())
            .await
            .unwrap();
        assert_eq!(d.header, ["id", "name", "tags", "ok"]);
        assert_eq!(d.types, [None, Some(ColumnType::Text), Some(ColumnType::Json), None]);
        let b = d.next_batch().await.unwrap().unwrap();
        assert_eq!(b.line(1), 3);
        assert_eq!(
            b.into_strings(),
            [
                row(&[Some("1"), Some("a"), Some("[\"x\"]"), None]),
                row(&[Some("2.5"), None, None, Some("true")])
            ]
        );
    }

    #[tokio::test]
    async fn a_blank_line_in_a_one_column_file_is_a_row_as_copy_reads_it() {
        // What PostgreSQL's own `COPY ... TO ... (FORMAT csv, HEADER)` writes for a NULL.
        let (_, rows) = decode(b"\r\nemail\r\na@x\r\n\r\nb@y\r\n\r\n".to_vec(), "x.csv")
            .await
            .unwrap();
        assert_eq!(
            rows,
            [row(&[Some("a@x")]), row(&[None]), row(&[Some("b@y")]), row(&[None])]
        );
        let options = FormatOptions {
            null: "\\N".into(),
            ..Default::default()
        };
        let (_, rows) = decode_with(b"e\na\n\nb\n".to_vec(), "x.csv", options).await.unwrap();
        assert_eq!(rows, [row(&[Some("a")]), row(&[Some("")]), row(&[Some("b")])]);
        // Wider files: a blank line holds no value and is skipped.
        let (_, rows) = decode(b"a,b\n1,2\n\n3,4\n\n".to_vec(), "x.csv").await.unwrap();
        assert_eq!(rows, [row(&[Some("1"), Some("2")]), row(&[Some("3"), Some("4")])]);
    }

    #[tokio::test]
    async fn json_values_arrive_as_written_never_through_a_float() {
        let jsonl = concat!(
            "{\"zip\": \"08123\", \"n\": 18446744073709551615, \"x\": 1.10, \"e\": 1E2, \"j\": {\"a\": 9007199254740993}}\n",
            "{\"zip\": \"007\", \"n\": 12345678901234567890123456789012.34, \"x\": 2, \"e\": -0.0, \"j\": \"{\\\"a\\\": 2}\"}\n",
            "{\"zip\": null, \"j\": \"5\"}\n",
        );
        let (header, rows) = decode(jsonl.as_bytes().to_vec(), "e.jsonl").await.unwrap();
        assert_eq!(header, ["zip", "n", "x", "e", "j"]);
        assert_eq!(
            rows,
            [
                row(&[
                    Some("08123"),
                    Some("18446744073709551615"),
                    Some("1.10"),
                    Some("1E2"),
                    Some("{\"a\": 9007199254740993}")
                ]),
                row(&[
                    Some("007"),
                    Some("12345678901234567890123456789012.34"),
                    Some("2"),
                    Some("-0.0"),
                    Some("\"{\\\"a\\\": 2}\"")
                ]),
                row(&[None, None, None, None, Some("\"5\"")]),
            ]
        );
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(jsonl.as_bytes().to_vec()));
        let d = super::decode(reader, "e.jsonl", None, FormatOptions::default())
            .await
            .unwrap();
        assert_eq!(
            d.types,
            [Some(ColumnType::Text), None, None, None, Some(ColumnType::Json)]
        );
    }

    #[tokio::test]
    async fn a_json_line_of_only_a_byte_order_mark_or_a_repeated_key_fails() {
        for bad in [&b"{\"a\":1}\n\xef\xbb\xbf\n{\"a\":2}\n"[..], b"{\"a\":1,\"a\":2}\n"] {
            let err = decode(bad.to_vec(), "e.jsonl").await.unwrap_err();
            assert!(matches!(err, DecodeFailure::Format(_)), "{err:?}");
        }
        let (_, rows) = decode(b"\xef\xbb\xbf{\"a\":1}\n".to_vec(), "e.jsonl").await.unwrap();
        assert_eq!(rows, [row(&[Some("1")])], "a byte order mark at the start is fine");
    }

    #[tokio::test]
    async fn a_bad_json_line_is_a_decode_error_with_its_line() {
        let err = decode(b"{\"a\":1}\n{\"a\":\n".to_vec(), "e.jsonl").await.unwrap_err();
        let DecodeFailure::Format(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!((e.kind, e.line), (FileErrorKind::Decode, Some(2)));
    }

    #[tokio::test]
    async fn a_short_row_is_a_decode_error_with_its_line() {
        let err = decode(b"a,b\n1,2\n3\n".to_vec(), "x.csv").await.unwrap_err();
        let DecodeFailure::Format(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e.kind, FileErrorKind::Decode);
        assert_eq!((e.line, e.record), (Some(3), Some(2)));
        assert!(e.message.contains("1 fields but the header has 2"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_truncated_gzip_is_a_decode_error_not_a_retry() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b"a,b\n1,2\n".repeat(1000)).unwrap();
        let mut gz = gz.finish().unwrap();
        gz.truncate(gz.len() / 2);
        let err = decode(gz, "x.csv.gz").await.unwrap_err();
        assert!(
            matches!(err, DecodeFailure::Format(ref e) if e.kind == FileErrorKind::Decode),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn invalid_utf8_and_nul_bytes_are_decode_errors() {
        let err = decode(b"a,b\n1,\xff\xfe\n".to_vec(), "x.csv").await.unwrap_err();
        assert!(
            matches!(err, DecodeFailure::Format(ref e) if e.line == Some(2)),
            "{err:?}"
        );
        // Each field on its own: `\xc3` and `\xa9` are one character only when joined.
        let err = decode(b"a,b\n\xc3,\xa9\n".to_vec(), "x.csv").await.unwrap_err();
        let DecodeFailure::Format(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!((e.line, e.message.as_str()), (Some(2), "invalid UTF-8 in field 1"));
        let err = decode(b"a,b\n1,2\n3,x\x00y\n".to_vec(), "x.csv").await.unwrap_err();
        let DecodeFailure::Format(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!((e.line, e.message.as_str()), (Some(3), "NUL byte in field 2"));
    }

    #[tokio::test]
    async fn an_empty_file_has_no_columns_and_no_rows() {
        let (header, rows) = decode(Vec::new(), "x.csv").await.unwrap();
        assert!(header.is_empty() && rows.is_empty());
    }

    fn with_limits(limits: InputLimits) -> FormatOptions {
        FormatOptions {
            limits,
            ..Default::default()
        }
    }

    /// The limit error a decode ended with (panics on anything else).
    fn limit_hit(result: Result<(Vec<String>, Rows), DecodeFailure>) -> FileError {
        match result {
            Err(DecodeFailure::Format(e)) if e.kind == FileErrorKind::Limit => e,
            other => panic!("expected a limit error, got {:?}", other.map(|(h, r)| (h, r.len()))),
        }
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[tokio::test]
    async fn a_file_that_decompresses_too_far_fails_as_a_limit_never_a_retry() {
        // About 5 MB of numbered rows: they compress a few times over.
        let csv: String = std::iter::once("n\n".to_string())
            .chain((0..700_000).map(|i| format!("{i}\n")))
            .collect();
        let (gz, zst) = (gzip(csv.as_bytes()), zstd::encode_all(csv.as_bytes(), 1).unwrap());
        for (bytes, key) in [(gz.clone(), "x.csv.gz"), (zst.clone(), "x.csv.zst")] {
            let (_, rows) = decode(bytes.clone(), key).await.unwrap();
            assert_eq!(rows.len(), 700_000, "{key} loads within the default limits");
            let ratio = InputLimits {
                compression_ratio: 1,
                ..InputLimits::default()
            };
            let e = limit_hit(decode_with(bytes.clone(), key, with_limits(ratio)).await);
            assert!(e.message.contains("limits.compression_ratio = 1 times"), "{key}: {e}");
            let size = InputLimits {
                decompressed_bytes: 100_000,
                ..InputLimits::default()
            };
            let e = limit_hit(decode_with(bytes, key, with_limits(size)).await);
            assert!(
                e.message.contains("limits.decompressed_bytes = 100000 bytes"),
                "{key}: {e}"
            );
        }
        // Under 1 MiB out, the ratio is not judged: 200 KB from a few hundred bytes loads.
        let small = gzip(format!("n\n{}", "1\n".repeat(100_000)).as_bytes());
        let ratio = InputLimits {
            compression_ratio: 1,
            ..InputLimits::default()
        };
        let (_, rows) = decode_with(small, "x.csv.gz", with_limits(ratio)).await.unwrap();
        assert_eq!(rows.len(), 100_000);
        // The passthrough reads through the same decompressor.
        let e = match open_raw(gz, "x.csv.gz", with_limits(ratio)).await {
            Err(DecodeFailure::Format(e)) => e,
            other => panic!("{:?}", other.err()),
        };
        assert_eq!(e.kind, FileErrorKind::Limit, "{e}");
    }

    #[tokio::test]
    async fn csv_and_json_lines_over_their_limits_fail_with_a_report_naming_the_key() {
        let limits = InputLimits {
            record_bytes: 300,
            field_bytes: 100,
            columns: 5,
            json_keys: 3,
            ..InputLimits::default()
        };
        let csv = |s: &str| decode_with(s.as_bytes().to_vec(), "x.csv", with_limits(limits));
        let e = limit_hit(csv("a,b,c,d,e,f\n1,2,3,4,5,6\n").await);
        assert_eq!((e.line, e.record), (Some(1), None));
        assert_eq!(e.message, "record with more than limits.columns = 5 fields");
        let e = limit_hit(csv(&format!("a,b\n1,2\n3,{}\n", "x".repeat(101))).await);
        assert_eq!((e.line, e.record), (Some(3), Some(2)));
        assert_eq!(e.message, "field 2 longer than limits.field_bytes = 100 bytes");
        // 5 fields of 59 bytes, 4 commas and a LF: exactly 300 bytes.
        let row = |n: usize| vec!["x".repeat(n); 5].join(",");
        let (_, rows) = csv(&format!("a,b,c,d,e\n{}\n", row(59))).await.unwrap();
        assert_eq!(rows.len(), 1, "exactly at the limits loads");
        let e = limit_hit(csv(&format!("a,b,c,d,e\n{}\n{}\n", row(59), row(60))).await);
        assert_eq!((e.line, e.record), (Some(3), Some(2)));
        assert_eq!(e.message, "record longer than limits.record_bytes = 300 bytes");

        let jsonl = |s: String| decode_with(s.into_bytes(), "x.jsonl", with_limits(limits));
        let e = limit_hit(jsonl("{\"a\":1}\n{\"a\":1,\"b\":2,\"c\":3,\"d\":4}\n".into()).await);
        assert_eq!((e.line, e.record), (Some(2), Some(2)));
        assert_eq!(e.message, "JSON object with more than limits.json_keys = 3 keys");
        let e = limit_hit(jsonl(format!("{{\"a\":1}}\n{{\"a\":\"{}\"}}\n", "x".repeat(1000))).await);
        assert_eq!(e.line, Some(2));
        assert_eq!(e.message, "JSON line longer than limits.record_bytes = 300 bytes");
        let keys: String = (0..6).map(|i| format!("{{\"k{i}\":1}}\n")).collect();
        let e = limit_hit(jsonl(keys).await);
        assert_eq!(
            (e.line, e.message.as_str()),
            (Some(6), "more than limits.columns = 5 distinct keys")
        );
    }

    #[tokio::test]
    async fn a_json_sample_of_long_lines_stops_at_sample_bytes() {
        // 20 KB lines: the sample ends after about 420 of them, so a key first seen on line 500
        // is not a column.
        let pad = "x".repeat(20_000);
        let lines: String = (1..=600)
            .map(|i| match i {
                500 => format!("{{\"a\":\"{pad}\",\"late\":1}}\n"),
                _ => format!("{{\"a\":\"{pad}\"}}\n"),
            })
            .collect();
        let err = decode(lines.into_bytes(), "x.jsonl").await.unwrap_err();
        let DecodeFailure::Format(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!((e.kind, e.line), (FileErrorKind::Schema, Some(500)));
        let sampled = jsonl::SAMPLE_BYTES.div_ceil(20_009);
        assert!(
            e.message.contains(&format!("found in the first {sampled} lines")),
            "{}",
            e.message
        );
    }

    /// Reads `bytes` as the passthrough does, to its end or its first failure.
    async fn open_raw(bytes: Vec<u8>, key: &str, options: FormatOptions) -> Result<u64, DecodeFailure> {
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(bytes));
        let mut raw = super::pass_through(reader, key, None, options).await?;
        raw.check_types(vec![None; raw.header.len()]);
        loop {
            if let RawChunk::End { records } = raw.next().await? {
                return Ok(records);
            }
        }
    }

    #[tokio::test]
    async fn a_limit_hit_on_the_passthrough_fails_the_file_as_the_parser_would() {
        let limits = InputLimits {
            field_bytes: 100_000,
            columns: 2,
            ..InputLimits::default()
        };
        // Past the first megabyte, read up front: the passthrough itself stops and reports.
        let mut csv = String::from("a,b\n");
        csv.extend((0..200_000).map(|i| format!("{i},{i}\n")));
        let line = 200_002;
        let long = format!("{csv}1,{}\n2,2\n", "x".repeat(200_000));
        let raw = open_raw(long.clone().into_bytes(), "x.csv", with_limits(limits)).await;
        let Err(DecodeFailure::Format(e)) = raw else {
            panic!("{:?}", raw)
        };
        assert_eq!((e.kind, e.line), (FileErrorKind::Limit, Some(line)));
        assert_eq!(e.message, "field 2 longer than limits.field_bytes = 100000 bytes");
        let parsed = limit_hit(decode_with(long.into_bytes(), "x.csv", with_limits(limits)).await);
        assert_eq!(parsed, e, "the same report either way");
        // Within the first megabyte the passthrough declines, and the parser reports it.
        let wide = "a,b,c\n1,2,3\n".to_string();
        let raw = open_raw(wide.clone().into_bytes(), "x.csv", with_limits(limits)).await;
        assert!(matches!(raw, Err(DecodeFailure::Unsuitable(_))), "{:?}", raw);
        let e = limit_hit(decode_with(wide.into_bytes(), "x.csv", with_limits(limits)).await);
        assert_eq!(e.message, "record with more than limits.columns = 2 fields");
        // Within the limits, the passthrough reads the file whole.
        assert_eq!(
            open_raw(csv.into_bytes(), "x.csv", with_limits(limits)).await.unwrap(),
            200_001
        );
    }
}
