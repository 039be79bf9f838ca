//! Compression: which one an object uses ([`Compression::detect`]) and its decompression, with
//! the output counted against the decompression limits of [`InputLimits`].

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::InputLimits;

/// The compression ratio is judged only once this much has come out of the decompressor.
const RATIO_CHECKED_AFTER: u64 = 1 << 20;

impl InputLimits {
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
/// up through the readers (which pass I/O errors on untouched) to the reading thread's
/// classification (`spawn_reader`).
#[derive(Debug)]
pub(super) struct LimitExceeded(String);

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitExceeded {}

/// The limit an I/O error reports, if it is one.
pub(super) fn limit_exceeded(e: &io::Error) -> Option<&LimitExceeded> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<LimitExceeded>())
}

/// How an object's bytes are compressed.
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

    /// How an object is compressed, by the first of these that says: its Content-Encoding (when
    /// it names a compression), the key's extension, the magic bytes at the start of `head`
    /// (whatever the object's first read gave).
    pub fn detect(content_encoding: Option<&str>, key: &str, head: &[u8]) -> Compression {
        content_encoding
            .and_then(Compression::from_content_encoding)
            .or_else(|| Compression::from_key(key))
            .unwrap_or_else(|| Compression::from_magic(head))
    }
}

/// The object's bytes, decompressed when [`Compression::detect`] finds them compressed (by
/// `content_encoding`, `key` or their first bytes). `compressed` counts the bytes read from the
/// object so far; the decompressed bytes are counted against it and against `limits`.
pub(super) fn decompress<R: Read + 'static>(
    source: R,
    compressed: Arc<AtomicU64>,
    content_encoding: Option<&str>,
    key: &str,
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
    Ok(match Compression::detect(content_encoding, key, head) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_comes_from_the_encoding_then_the_extension_then_the_magic_bytes() {
        const GZIP: &[u8] = &[0x1f, 0x8b, 0x08, 0x00];
        const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd, 0x00];
        use Compression::{Gzip, None as Plain, Zstd};
        #[rustfmt::skip]
        let cases: &[(Option<&str>, &str, &[u8], Compression)] = &[
            // The Content-Encoding, when it names a compression, wins over the rest.
            (Some("gzip"), "a.csv", b"xx", Gzip),
            (Some("x-gzip"), "a.csv", b"xx", Gzip),
            (Some("zstd"), "a.csv", b"xx", Zstd),
            (Some(" GZip "), "a.csv", b"xx", Gzip),
            (Some("gzip"), "a.csv.zst", ZSTD, Gzip),
            (Some("zstd"), "a.csv.gz", GZIP, Zstd),
            // One that does not (identity, br, anything else) is passed over.
            (Some("identity"), "a.csv", b"id", Plain),
            (Some("identity"), "a.csv.gz", b"id", Gzip),
            (Some("br"), "a.csv", ZSTD, Zstd),
            (Some(""), "a.csv", GZIP, Gzip),
            // Then the key's extension, in any case, over the magic bytes.
            (None, "a.csv.gz", b"xx", Gzip),
            (None, "a.csv.GZIP", b"xx", Gzip),
            (None, "a.jsonl.zst", b"xx", Zstd),
            (None, "a.jsonl.ZSTD", b"xx", Zstd),
            (None, "a.csv.gz", ZSTD, Gzip),
            (None, "a.csv.zst", GZIP, Zstd),
            (None, "a.gz.csv", b"xx", Plain),
            // Then the magic bytes, whole.
            (None, "a.csv", GZIP, Gzip),
            (None, "a.csv", &[0x1f, 0x8b], Gzip),
            (None, "a.csv", ZSTD, Zstd),
            (None, "a.csv", &[0x1f], Plain),
            (None, "a.csv", &[0x28, 0xb5, 0x2f], Plain),
            (None, "a.csv", b"a,b\n", Plain),
            (None, "a.csv", b"", Plain),
        ];
        for &(encoding, key, head, want) in cases {
            assert_eq!(
                Compression::detect(encoding, key, head),
                want,
                "{encoding:?} {key} {head:x?}"
            );
        }
    }
}
