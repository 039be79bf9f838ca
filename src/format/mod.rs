//! Turns an object's bytes into rows: detects compression (Content-Encoding, then extension,
//! then magic bytes) and the format (the route's, else by extension), decompresses and decodes,
//! all streamed. Decoding runs on a blocking thread and hands [`Batch`]es to the sink over a
//! bounded channel, so download and decode overlap with the database write while memory stays
//! bounded by `CHANNEL_BATCHES × BATCH_BYTES`.

mod batch;
pub mod csv;
pub mod jsonl;
pub mod raw;

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
#[derive(Debug, Clone)]
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

/// How the sink wants the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decoded rows.
    Rows,
    /// CSV passed through as raw bytes, with the header and a sample (see [`raw`]).
    Raw,
}

/// A file being read, as the sink asked for it.
pub enum Stream {
    Rows(Decoded),
    Raw(RawDecoded),
}

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

/// Starts reading `reader`, the object's raw bytes, in `mode` (`Raw` only for CSV and TSV).
/// `key` and `content_encoding` pick the compression, `options` (or `key`) the format.
/// Returns once the columns are known.
pub async fn open(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    key: &str,
    content_encoding: Option<&str>,
    options: FormatOptions,
    mode: Mode,
) -> Result<Stream, DecodeFailure> {
    let options = options.resolved(key);
    let (header_tx, header_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    let (raw_tx, raw_rx) = mpsc::channel(CHANNEL_BATCHES);
    let (prefix_tx, prefix_rx) = tokio::sync::oneshot::channel();
    let (types_tx, types_rx) = tokio::sync::oneshot::channel();
    let declared = content_encoding
        .and_then(Compression::from_content_encoding)
        .or_else(|| Compression::from_key(key));
    let format = options.format.unwrap_or(Format::Csv);
    let source = SourceRead {
        inner: SyncIoBridge::new(reader),
        failed: Arc::new(AtomicBool::new(false)),
    };
    let raw_options = options.clone();
    let has_header = options.header;
    tokio::task::spawn_blocking(move || {
        let failed = source.failed.clone();
        let classify = |e: io::Error, what: &str| {
            if failed.load(Ordering::Relaxed) {
                DecodeFailure::Source(e)
            } else {
                DecodeFailure::Format(FileError::new(FileErrorKind::Decode, format!("{what}: {e}")))
            }
        };
        let decompressed = match decompress(source, declared) {
            Ok(d) => d,
            Err(e) => {
                let e = classify(e, "reading the object");
                match mode {
                    Mode::Rows => drop(header_tx.send(Err(e))),
                    Mode::Raw => drop(prefix_tx.send(Err(e))),
                }
                return;
            }
        };
        match (mode, format) {
            (Mode::Raw, _) => pass_raw(decompressed, &raw_options, prefix_tx, types_rx, raw_tx, &classify),
            (Mode::Rows, Format::Jsonl) => decode_jsonl(decompressed, header_tx, tx, &classify),
            (Mode::Rows, _) => decode_csv(decompressed, &options, header_tx, tx, &classify),
        }
    });
    match mode {
        Mode::Rows => match header_rx.await {
            Ok(Ok((header, types))) => Ok(Stream::Rows(Decoded {
                header,
                types,
                batches: rx,
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DecodeFailure::Source(io::Error::other(
                "the decoder stopped unexpectedly",
            ))),
        },
        Mode::Raw => match prefix_rx.await {
            Ok(Ok(prefix)) => Ok(Stream::Raw(RawDecoded {
                header: prefix.header,
                has_header,
                sample: prefix.sample,
                chunks: raw_rx,
                types: Some(types_tx),
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DecodeFailure::Source(io::Error::other(
                "the reader stopped unexpectedly",
            ))),
        },
    }
}

/// Decoded rows of `reader` (see [`open`]).
pub async fn decode(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    key: &str,
    content_encoding: Option<&str>,
    options: FormatOptions,
) -> Result<Decoded, DecodeFailure> {
    match open(reader, key, content_encoding, options, Mode::Rows).await? {
        Stream::Rows(decoded) => Ok(decoded),
        Stream::Raw(_) => unreachable!("asked for rows"),
    }
}

fn decompress<R: Read + 'static>(source: R, declared: Option<Compression>) -> io::Result<Box<dyn BufRead>> {
    let mut raw = BufReader::with_capacity(256 * 1024, source);
    let head = raw.fill_buf()?;
    Ok(match declared.unwrap_or_else(|| Compression::from_magic(head)) {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            256 * 1024,
            flate2::bufread::MultiGzDecoder::new(raw),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            256 * 1024,
            zstd::stream::read::Decoder::with_buffer(raw)?,
        )),
    })
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
    let mut reader = csv::CsvReader::new(tee, options.delimiter, options.quote);
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
    let mut reader = csv::CsvReader::new(input, options.delimiter, options.quote);
    let mut record = csv::Record::default();
    let fail = |e: Result<io::Error, csv::CsvError>, record: Option<u64>| match e {
        Ok(io) => classify(io, "decompressing or reading the file"),
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
    header_tx: HeaderTx,
    tx: BatchTx,
    classify: &dyn Fn(io::Error, &str) -> DecodeFailure,
) {
    let mut reader = jsonl::JsonlReader::new(input);
    let fail = |e: jsonl::ReadError| match e {
        jsonl::ReadError::Io(io) => classify(io, "decompressing or reading the file"),
        jsonl::ReadError::Bad(j) => jsonl_failure(j),
    };
    let mut sample = Vec::new();
    while sample.len() < jsonl::SAMPLE_LINES {
        match reader.next_object() {
            Ok(Some(object)) => sample.push(object),
            Ok(None) => break,
            Err(e) => {
                let _ = header_tx.send(Err(fail(e)));
                return;
            }
        }
    }
    let (columns, types) = jsonl::columns_of(&sample);
    let width = columns.len();
    if header_tx.send(Ok((columns.clone(), types.clone()))).is_err() || width == 0 {
        return;
    }
    let index = jsonl::column_index(&columns);
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
        if let Err(e) = jsonl::push_object(
            &mut batch,
            &columns,
            &index,
            &types,
            line,
            number,
            &object,
            &mut scratch,
        ) {
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
    let kind = if e.schema {
        FileErrorKind::Schema
    } else {
        FileErrorKind::Decode
    };
    let mut error = FileError::new(kind, e.message)
        .at_line(Some(e.line))
        .at_record(Some(e.record));
    error.column = e.column;
    DecodeFailure::Format(error)
}

/// The object's byte stream, remembering whether an error came from the source itself (so
/// that a dropped connection is retried, while a corrupt file is not).
struct SourceRead<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: Read> Read for SourceRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => Ok(n),
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
}
