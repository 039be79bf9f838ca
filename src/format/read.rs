//! Reading an object on a blocking thread: its bytes through the decompressor and the CSV or
//! JSON lines reader, handed to the sink as batches of rows ([`decode`]) or as raw CSV bytes
//! ([`pass_through`]) over bounded channels.

use std::io::{self, BufRead, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use super::compression::{decompress, limit_exceeded};
use super::{Batch, DecodeFailure, Decoded, Format, FormatOptions, RawChunk, RawDecoded, csv, jsonl, raw};
use crate::error::{FileError, FileErrorKind};
use crate::schema::{ColumnCheck, ColumnType};

/// A batch is handed over once it holds this many rows ...
const BATCH_ROWS: usize = 4096;
/// ... or this many bytes of field text, whichever comes first.
const BATCH_BYTES: usize = 1 << 20;
/// Batches buffered between the decoder and the sink.
const CHANNEL_BATCHES: usize = 4;

/// A file's error for a limit it went over, at `line` and `record` when known.
fn limit_error(message: impl Into<String>, line: Option<u64>, record: Option<u64>) -> DecodeFailure {
    DecodeFailure::Format(
        FileError::new(FileErrorKind::Limit, message)
            .at_line(line)
            .at_record(record),
    )
}

type HeaderTx = tokio::sync::oneshot::Sender<Result<(Vec<String>, Vec<Option<ColumnType>>), DecodeFailure>>;
type BatchTx = mpsc::Sender<Result<Batch, DecodeFailure>>;

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
            rows_read: None,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DecodeFailure::Source(io::Error::other(
            "the decoder stopped unexpectedly",
        ))),
    }
}

/// Starts passing `reader` (CSV or TSV, see [`passthrough_possible`](super::passthrough_possible)) through as raw bytes,
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
            rows_read: None,
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
    let content_encoding = content_encoding.map(str::to_owned);
    let key = key.to_owned();
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
        let input = decompress(source, compressed, content_encoding.as_deref(), &key, &options.limits)
            .map_err(|e| classify(e, "reading the object"));
        work(input, &options, &classify);
    });
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
    let flush = |scanner: &mut raw::Scanner, records: u64, all: bool| -> Result<bool, &'static str> {
        let mut out = consumed.borrow_mut();
        if out.is_empty() || (!all && out.len() < raw::CHUNK_BYTES) {
            return Ok(true);
        }
        let chunk = std::mem::replace(&mut *out, Vec::with_capacity(2 * raw::CHUNK_BYTES));
        scanner.feed(&chunk)?;
        Ok(tx.blocking_send(Ok(RawChunk::Bytes(chunk, records))).is_ok())
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
        match flush(&mut scanner, records, false) {
            Ok(true) => {}
            Ok(false) => return, // the load was abandoned
            Err(why) => return unsuitable(why),
        }
    }
    match flush(&mut scanner, records, true) {
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
/// read (the compressed size so far, for the decompressor's checks).
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
