//! Passthrough for CSV into PostgreSQL: the decompressed bytes go to `COPY ... (FORMAT csv)`
//! as they are, so the loader adds next to no work to the database's own parsing. The loader
//! still reads the header and a sample of rows (for the column list and, for a new table, the
//! types), and runs a light scanner over every byte that counts records and watches for what
//! COPY would read differently from the loader's own CSV reader: blank lines, a lone `\.`
//! line (COPY's end-of-data marker), bare CR line ends or mixed line ends. On any of those the
//! sink aborts the COPY and loads the file through the full parser instead.

use std::io::{BufRead, Read};

use super::batch::Batch;
use super::csv::{CsvReader, Record};

/// How much of the file is read up front for the header and the sample.
pub const PREFIX_BYTES: usize = 1 << 20;
/// Raw bytes per chunk handed to the sink.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Header and sample parsed from the file's first bytes.
pub struct Prefix {
    pub header: Vec<String>,
    pub sample: Option<Batch>,
}

/// Parses the header (or takes `columns`) and up to `rows` rows from `prefix`; `complete` says
/// whether `prefix` is the whole file (otherwise its last record may be cut and is dropped).
/// `Err` only for a real problem in a complete prefix or an unreadable header.
pub fn parse_prefix(
    prefix: &[u8],
    complete: bool,
    options: &super::FormatOptions,
    rows: usize,
) -> Result<Option<Prefix>, String> {
    let mut reader = CsvReader::new(prefix, options.delimiter, options.quote);
    let mut record = Record::default();
    let header = if options.header {
        match reader.read(&mut record) {
            Ok(true) => (0..record.len())
                .map(|i| String::from_utf8(record.field(i).to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "invalid UTF-8 in the header".to_string())?,
            Ok(false) => return Ok(None),
            Err(_) if !complete => return Ok(None),
            Err(Err(e)) => return Err(e.message),
            Err(Ok(e)) => return Err(e.to_string()),
        }
    } else {
        options.columns.clone()
    };
    let width = header.len();
    let null = options.null.as_bytes();
    let mut batch = Batch::new(width, 1);
    // A record is kept once something follows it: the last one may have been cut by the end
    // of the prefix (unless the prefix is the whole file or ends with a line end).
    let ends_cleanly = complete || prefix.ends_with(b"\n") || prefix.ends_with(b"\r");
    let mut pending: Option<(u64, Vec<Option<Vec<u8>>>)> = None;
    while batch.len() < rows {
        let next = reader.read(&mut record);
        let whole = match next {
            Ok(true) | Err(_) => true,
            Ok(false) => ends_cleanly,
        };
        if let Some((line, fields)) = pending.take().filter(|_| whole) {
            batch.push_row(line, fields.iter().map(|f| f.as_deref()));
        }
        if !matches!(next, Ok(true)) || batch.len() >= rows {
            break;
        }
        if record.len() != width || std::str::from_utf8(record.bytes()).is_err() || record.bytes().contains(&0) {
            break; // the full parser (or COPY) reports it with its line
        }
        let fields =
            (0..width).map(|i| (record.quoted(i) || record.field(i) != null).then(|| record.field(i).to_vec()));
        pending = Some((record.line, fields.collect()));
    }
    Ok(Some(Prefix {
        header,
        sample: (!batch.is_empty()).then_some(batch),
    }))
}

/// Counts records and spots what COPY would read otherwise, chunk by chunk.
#[derive(Debug, Default)]
pub struct Scanner {
    quote: u8,
    delimiter: u8,
    in_quotes: bool,
    /// A quote just closed a quoted field: only a delimiter, a line end or `""` may follow.
    just_closed: bool,
    at_field_start: bool,
    /// Bytes of the current line so far (outside quotes), up to 3.
    line_len: usize,
    line_is_marker: bool,
    /// `Some(true)` once the file is known to end lines with CRLF, `Some(false)` with LF.
    crlf: Option<bool>,
    after_cr: bool,
    /// Line ends outside quotes.
    pub lines: u64,
    started: bool,
}

impl Scanner {
    pub fn new(quote: u8, delimiter: u8) -> Scanner {
        Scanner {
            quote,
            delimiter,
            at_field_start: true,
            ..Scanner::default()
        }
    }

    /// Feeds bytes; `Err` names the first thing COPY would read differently. Runs of ordinary
    /// bytes are skipped with `memchr`: only quotes and line ends (and the first bytes of a
    /// line, and the byte after a closing quote or a CR) are looked at one by one.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            if self.after_cr || self.just_closed || (!self.in_quotes && self.line_len < 2) {
                self.step(bytes[i])?;
                i += 1;
            } else if self.in_quotes {
                match memchr::memchr(self.quote, &bytes[i..]) {
                    Some(k) => {
                        self.step(self.quote)?;
                        i += k + 1;
                    }
                    None => return Ok(()),
                }
            } else {
                let rest = &bytes[i..];
                let found = memchr::memchr3(self.quote, b'\n', b'\r', rest);
                let ordinary = found.unwrap_or(rest.len());
                if ordinary > 0 {
                    // Ordinary bytes past the line's first two: only the field start moves.
                    self.at_field_start = rest[ordinary - 1] == self.delimiter;
                    self.line_len = 3;
                    self.line_is_marker = false;
                }
                match found {
                    Some(k) => {
                        self.step(rest[k])?;
                        i += k + 1;
                    }
                    None => return Ok(()),
                }
            }
        }
        Ok(())
    }

    /// One byte, exactly.
    fn step(&mut self, b: u8) -> Result<(), &'static str> {
        if self.after_cr {
            self.after_cr = false;
            if b != b'\n' {
                return Err("a bare CR line end");
            }
            return Ok(());
        }
        if self.in_quotes {
            if b == self.quote {
                self.in_quotes = false;
                self.just_closed = true;
            }
            return Ok(());
        }
        if self.just_closed {
            self.just_closed = false;
            if b == self.quote {
                self.in_quotes = true; // a doubled quote inside the field
                return Ok(());
            }
            if b != self.delimiter && b != b'\n' && b != b'\r' {
                return Err("text after a closing quote");
            }
        }
        if b == b'\n' || b == b'\r' {
            let crlf = b == b'\r';
            if *self.crlf.get_or_insert(crlf) != crlf {
                return Err("mixed line ends");
            }
            if self.line_len == 0 && self.started {
                return Err("a blank line");
            }
            if self.line_is_marker && self.line_len == 2 {
                return Err("a line holding only \\.");
            }
            self.after_cr = crlf;
            self.lines += 1;
            self.line_len = 0;
            self.line_is_marker = false;
            self.at_field_start = true;
        } else {
            if b == self.quote {
                // COPY would start quoting here; the loader's reader keeps the quote as text.
                if !self.at_field_start {
                    return Err("a quote inside an unquoted field");
                }
                self.in_quotes = true;
            }
            self.at_field_start = b == self.delimiter;
            self.line_is_marker = match self.line_len {
                0 => b == b'\\',
                1 => self.line_is_marker && b == b'.',
                _ => false,
            };
            self.line_len = (self.line_len + 1).min(3);
        }
        self.started = true;
        Ok(())
    }

    /// Records in the whole input (header included), once it has all been fed.
    pub fn finish(&self) -> Result<u64, &'static str> {
        if self.line_is_marker && self.line_len == 2 {
            return Err("a line holding only \\.");
        }
        Ok(self.lines + u64::from(self.line_len > 0 || self.in_quotes))
    }
}

/// Reads up to `limit` bytes (fewer only at the end of the input).
pub fn read_prefix(input: &mut dyn BufRead, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut prefix = Vec::with_capacity(limit.min(1 << 20));
    input.take(limit as u64).read_to_end(&mut prefix)?;
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(input: &[u8]) -> Result<u64, &'static str> {
        let mut s = Scanner::new(b'"', b',');
        for chunk in input.chunks(3) {
            s.feed(chunk)?;
        }
        s.finish()
    }

    #[test]
    fn the_scanner_counts_records_across_quoted_newlines() {
        assert_eq!(scan(b"a,b\n1,\"x\ny\"\n2,\"\"\"\"\n"), Ok(3));
        assert_eq!(scan(b"a,b\r\n1,2\r\n3,4"), Ok(3));
        assert_eq!(scan(b""), Ok(0));
    }

    #[test]
    fn the_scanner_spots_what_copy_reads_differently() {
        assert_eq!(scan(b"a\n1\n\n2\n"), Err("a blank line"));
        assert_eq!(scan(b"a\n\\.\n2\n"), Err("a line holding only \\."));
        assert_eq!(scan(b"a\n\\."), Err("a line holding only \\."));
        assert_eq!(scan(b"a\r1\r"), Err("a bare CR line end"));
        assert_eq!(scan(b"a\r\n1\n"), Err("mixed line ends"));
        assert_eq!(scan(b"a\n\"\\.\"\n"), Ok(2), "a quoted \\. is data");
        assert_eq!(scan(b"a\n\\.x\n"), Ok(2));
        assert_eq!(scan(b"a,b\n5\" disk,x\n"), Err("a quote inside an unquoted field"));
        assert_eq!(scan(b"a,b\n\"x\"y,z\n"), Err("text after a closing quote"));
    }

    #[test]
    fn the_fast_scanner_agrees_with_a_byte_by_byte_one_on_random_input() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"ab,,\"\"\n\r\\.x";
        for _ in 0..20_000 {
            let len = rng.random_range(0..60);
            let input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let mut fast = Scanner::new(b'"', b',');
            let mut fast_result = Ok(());
            let mut rest = &input[..];
            while !rest.is_empty() && fast_result.is_ok() {
                let cut = rng.random_range(1..=rest.len());
                fast_result = fast.feed(&rest[..cut]);
                rest = &rest[cut..];
            }
            let mut slow = Scanner::new(b'"', b',');
            let slow_result = input.iter().try_for_each(|b| slow.step(*b));
            assert_eq!(fast_result, slow_result, "{:?}", String::from_utf8_lossy(&input));
            if fast_result.is_ok() {
                assert_eq!(fast.finish(), slow.finish(), "{:?}", String::from_utf8_lossy(&input));
            }
        }
    }

    #[test]
    fn the_prefix_gives_the_header_and_whole_rows_only() {
        let options = super::super::FormatOptions::default();
        let p = parse_prefix(b"id,name\n1,a\n2,\"b", false, &options, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(p.header, ["id", "name"]);
        assert_eq!(
            p.sample.unwrap().into_strings(),
            [vec![Some("1".to_string()), Some("a".into())]]
        );
        let p = parse_prefix(b"id,name\n1,a\n2,b", true, &options, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(p.sample.unwrap().len(), 2);
    }
}
