//! Turns an object's bytes into rows: detects compression (extension, then magic bytes),
//! decompresses and decodes CSV, all streamed. Decoding runs on a blocking thread and hands
//! batches of rows to the sink over a bounded channel, so download and decode overlap with the
//! database write while memory stays bounded by `CHANNEL_BATCHES × BATCH_BYTES`.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use crate::error::{FileError, FileErrorKind, LoadError, Stage};

/// A batch is handed over once it holds this many rows ...
const BATCH_ROWS: usize = 4096;
/// ... or this many bytes of field data, whichever comes first.
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

/// How to read CSV.
#[derive(Debug, Clone)]
pub struct CsvOptions {
    pub delimiter: u8,
    pub quote: u8,
    /// A field equal to this loads as NULL.
    pub null: String,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            delimiter: b',',
            quote: b'"',
            null: String::new(),
        }
    }
}

/// Rows decoded from a file, in order.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<csv::StringRecord>,
}

/// One data row's position, for error reports.
pub fn record_line(record: &csv::StringRecord) -> Option<u64> {
    record.position().map(|p| p.line())
}

/// Data record number (1-based, header excluded).
pub fn record_number(record: &csv::StringRecord) -> Option<u64> {
    record.position().map(|p| p.record())
}

/// Why decoding stopped early.
#[derive(Debug)]
pub enum DecodeFailure {
    /// Reading the object failed (network, store): transient.
    Source(io::Error),
    /// The bytes are not a valid file of the expected format: permanent.
    Format(FileError),
}

impl From<DecodeFailure> for LoadError {
    fn from(f: DecodeFailure) -> Self {
        match f {
            DecodeFailure::Source(e) => LoadError::transient(Stage::Get, format!("reading the object failed: {e}")),
            DecodeFailure::Format(e) => LoadError::Permanent(e),
        }
    }
}

/// A file being decoded: its header, then batches of rows from a background thread.
pub struct Decoded {
    /// Column names as written in the file's header; empty for a 0-byte file.
    pub header: Vec<String>,
    batches: mpsc::Receiver<Result<Batch, DecodeFailure>>,
    /// Compressed bytes read from the source so far.
    pub bytes_read: Arc<AtomicU64>,
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

/// Starts decoding `reader` (the object's raw bytes; `key` picks the compression) as CSV.
/// Returns once the header is read.
pub async fn decode_csv(
    reader: Box<dyn AsyncRead + Send + Unpin>,
    key: &str,
    options: CsvOptions,
) -> Result<Decoded, DecodeFailure> {
    let (header_tx, header_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let by_extension = Compression::from_key(key);
    let source = SourceRead {
        inner: SyncIoBridge::new(reader),
        failed: Arc::new(AtomicBool::new(false)),
        bytes: bytes_read.clone(),
    };
    tokio::task::spawn_blocking(move || {
        let failed = source.failed.clone();
        let classify = |e: io::Error, what: &str| {
            if failed.load(Ordering::Relaxed) {
                DecodeFailure::Source(e)
            } else {
                DecodeFailure::Format(FileError::new(FileErrorKind::Decode, format!("{what}: {e}")))
            }
        };
        let mut raw = BufReader::with_capacity(256 * 1024, source);
        let decompressed: Box<dyn Read> = match raw.fill_buf() {
            Err(e) => {
                let _ = header_tx.send(Err(classify(e, "reading the object")));
                return;
            }
            Ok(head) => match by_extension.unwrap_or_else(|| Compression::from_magic(head)) {
                Compression::None => Box::new(raw),
                Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
                Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(raw) {
                    Ok(d) => Box::new(d),
                    Err(e) => {
                        let _ = header_tx.send(Err(classify(e, "zstd")));
                        return;
                    }
                },
            },
        };
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(options.delimiter)
            .quote(options.quote)
            .has_headers(true)
            .flexible(false)
            .buffer_capacity(256 * 1024)
            .from_reader(decompressed);
        let header = match reader.headers() {
            Ok(h) => h.iter().map(str::to_string).collect::<Vec<_>>(),
            Err(e) => {
                let _ = header_tx.send(Err(csv_failure(e, &classify)));
                return;
            }
        };
        let empty = header.is_empty() || (header.len() == 1 && header[0].is_empty());
        if header_tx.send(Ok(if empty { Vec::new() } else { header })).is_err() || empty {
            return;
        }
        let mut batch = Batch::default();
        let mut batch_bytes = 0usize;
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {
                    if memchr_nul(record.as_slice().as_bytes()) {
                        let field = record.iter().position(|f| f.contains('\0')).unwrap_or(0);
                        let error = FileError::new(FileErrorKind::Decode, format!("NUL byte in field {}", field + 1))
                            .at_line(record_line(&record))
                            .at_record(record_number(&record));
                        let _ = tx.blocking_send(Err(DecodeFailure::Format(error)));
                        return;
                    }
                    batch_bytes += record.as_slice().len();
                    batch.records.push(std::mem::take(&mut record));
                    if batch.records.len() >= BATCH_ROWS || batch_bytes >= BATCH_BYTES {
                        batch_bytes = 0;
                        if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                            return; // the load was abandoned
                        }
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    let _ = tx.blocking_send(Err(csv_failure(e, &classify)));
                    return;
                }
            }
        }
        if !batch.records.is_empty() {
            let _ = tx.blocking_send(Ok(batch));
        }
    });
    match header_rx.await {
        Ok(Ok(header)) => Ok(Decoded {
            header,
            batches: rx,
            bytes_read,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(DecodeFailure::Source(io::Error::other(
            "the decoder stopped unexpectedly",
        ))),
    }
}

/// Text columns cannot hold NUL in PostgreSQL, and a NUL in a CSV file means it is not text:
/// refused everywhere alike.
fn memchr_nul(bytes: &[u8]) -> bool {
    bytes.contains(&0)
}

fn csv_failure(e: csv::Error, classify: &dyn Fn(io::Error, &str) -> DecodeFailure) -> DecodeFailure {
    let line = e.position().map(|p| p.line());
    let record = e.position().map(|p| p.record());
    match e.into_kind() {
        csv::ErrorKind::Io(io) => classify(io, "decompressing or reading the file"),
        csv::ErrorKind::Utf8 { err, .. } => DecodeFailure::Format(
            FileError::new(
                FileErrorKind::Decode,
                format!("invalid UTF-8 in field {} ", err.field() + 1)
                    .trim_end()
                    .to_string(),
            )
            .at_line(line)
            .at_record(record),
        ),
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => DecodeFailure::Format(
            FileError::new(
                FileErrorKind::Decode,
                format!("row has {len} fields but the header has {expected_len}"),
            )
            .at_line(line)
            .at_record(record),
        ),
        other => DecodeFailure::Format(
            FileError::new(FileErrorKind::Decode, format!("malformed CSV: {other:?}"))
                .at_line(line)
                .at_record(record),
        ),
    }
}

/// The object's byte stream, remembering whether an error came from the source itself (so
/// that a dropped connection is retried, while a corrupt file is not).
struct SourceRead<R> {
    inner: R,
    failed: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
}

impl<R: Read> Read for SourceRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.bytes.fetch_add(n as u64, Ordering::Relaxed);
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
    use super::*;
    use std::io::Write;

    async fn decode(bytes: Vec<u8>, key: &str) -> Result<(Vec<String>, Vec<Vec<String>>), DecodeFailure> {
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(bytes));
        let mut d = decode_csv(reader, key, CsvOptions::default()).await?;
        let mut rows = Vec::new();
        while let Some(b) = d.next_batch().await? {
            rows.extend(b.records.iter().map(|r| r.iter().map(str::to_string).collect()));
        }
        Ok((d.header, rows))
    }

    #[tokio::test]
    async fn rfc4180_quotes_newlines_crlf_and_bom_decode() {
        let csv = "\u{feff}id,note\r\n1,\"a, \"\"quoted\"\"\r\nline\"\r\n2,plain\r\n";
        let (header, rows) = decode(csv.as_bytes().to_vec(), "x.csv").await.unwrap();
        assert_eq!(header, ["id", "note"]);
        assert_eq!(rows, [vec!["1", "a, \"quoted\"\r\nline"], vec!["2", "plain"]]);
    }

    #[tokio::test]
    async fn gzip_and_zstd_are_detected_by_extension_or_magic_bytes() {
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
    async fn a_short_row_is_a_decode_error_with_its_line() {
        let err = decode(b"a,b\n1,2\n3\n".to_vec(), "x.csv").await.unwrap_err();
        let DecodeFailure::Format(e) = err else {
            panic!("{err:?}")
        };
        assert_eq!(e.kind, FileErrorKind::Decode);
        assert_eq!(e.line, Some(3));
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
    async fn invalid_utf8_is_a_decode_error() {
        let err = decode(b"a,b\n1,\xff\xfe\n".to_vec(), "x.csv").await.unwrap_err();
        assert!(
            matches!(err, DecodeFailure::Format(ref e) if e.line == Some(2)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_nul_byte_is_a_decode_error() {
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
