//! Passthrough for CSV into PostgreSQL: the decompressed bytes go to `COPY ... (FORMAT csv)`
//! as they are, so the loader adds next to no work to the database's own parsing. The loader
//! still reads the header and a sample of rows (for the column list and, for a new table, the
//! types), and runs a light scanner over every byte that counts records and watches for what
//! COPY would read differently from the loader's own CSV reader: blank lines, a lone `\.`
//! line (COPY's end-of-data marker), bare CR line ends or mixed line ends. On any of those the
//! sink aborts the COPY and loads the file through the full parser instead.
//!
//! The loader's reader runs with the file's [`super::InputLimits`] here too: a record over one
//! fails the file with the limit's report, exactly where the parser would stop. (Over a limit
//! within the first bytes, read up front, the passthrough declines instead, and the parser
//! reports it.)

use std::io::{BufRead, Read};

use super::batch::Batch;
use super::csv::{CsvReader, Record};
use crate::schema::ColumnCheck;

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
/// `Ok(None)`: no whole header in the prefix. `Err`: a record of the sample that is certainly
/// whole is bad (its width, a NUL byte, invalid UTF-8, malformed quoting): the parser must
/// read the file and report it, never a sample that silently stops short of it.
pub fn parse_prefix(
    prefix: &[u8],
    complete: bool,
    options: &super::FormatOptions,
    rows: usize,
) -> Result<Option<Prefix>, String> {
    let mut reader = CsvReader::new(prefix, options.delimiter, options.quote, &options.limits);
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
    let keep = |batch: &mut Batch, (line, fields): (u64, Vec<Option<Vec<u8>>>)| -> Result<(), String> {
        if fields.len() != width {
            return Err(format!("line {line}: a row of {} fields", fields.len()));
        }
        if fields.iter().flatten().any(|f| f.contains(&0)) {
            return Err(format!("line {line}: a NUL byte"));
        }
        batch
            .push_row(line, fields.iter().map(|f| f.as_deref()))
            .map_err(|i| format!("line {line}: invalid UTF-8 in field {}", i + 1))
    };
    while batch.len() < rows {
        let next = reader.read(&mut record);
        let whole = match &next {
            Ok(true) => true,
            Ok(false) => ends_cleanly,
            Err(_) => true, // a record started after it
        };
        if let Some(p) = pending.take().filter(|_| whole) {
            keep(&mut batch, p)?;
        }
        match next {
            Ok(true) => {}
            Ok(false) => break,
            Err(_) if !complete => break, // cut inside quotes by the end of the prefix
            Err(Err(e)) => return Err(e.message),
            Err(Ok(e)) => return Err(e.to_string()),
        }
        if batch.len() >= rows {
            break;
        }
        let fields =
            (0..record.len()).map(|i| (record.quoted(i) || record.field(i) != null).then(|| record.field(i).to_vec()));
        pending = Some((record.line, fields.collect()));
    }
    Ok(Some(Prefix {
        header,
        sample: (!batch.is_empty()).then_some(batch),
    }))
}

/// Checks one record of a passthrough with the rules the parser applies: the header's width,
/// no NUL byte, every field UTF-8 on its own, and every value of a typed column (`types`,
/// `None` for text) in a form that type keeps exactly. `Err` names the first problem; the
/// parser then reads the file and reports it with its line.
pub fn check_record(record: &Record, checks: &[Option<ColumnCheck>], null: &[u8]) -> Result<(), &'static str> {
    if record.len() != checks.len() {
        return Err("a row of another width than the header");
    }
    for (i, check) in checks.iter().enumerate() {
        let field = record.field(i);
        if memchr::memchr(0, field).is_some() {
            return Err("a NUL byte");
        }
        let Ok(text) = std::str::from_utf8(field) else {
            return Err("invalid UTF-8 in a field");
        };
        if let Some(check) = check
            && (record.quoted(i) || field != null)
            && check.check(text).is_err()
        {
            return Err("a value that does not fit its column's type");
        }
    }
    Ok(())
}

/// A reader that keeps a copy of every byte its reader consumes: the passthrough sends exactly
/// the bytes its own CSV reader has read.
pub struct Tee<R> {
    inner: R,
    out: std::rc::Rc<std::cell::RefCell<Vec<u8>>>,
}

impl<R: BufRead> Tee<R> {
    pub fn new(inner: R, out: std::rc::Rc<std::cell::RefCell<Vec<u8>>>) -> Tee<R> {
        Tee { inner, out }
    }
}

impl<R: BufRead> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(buf.len());
            buf[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Tee<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        if n > 0 {
            // The buffer the caller just saw: not empty, so this does no I/O.
            if let Ok(buffered) = self.inner.fill_buf() {
                self.out.borrow_mut().extend_from_slice(&buffered[..n]);
            }
        }
        self.inner.consume(n);
    }
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
            if self.line_len == 0 {
                // Even the first: COPY's HEADER would skip it and read the header as data.
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
        Ok(())
    }

    /// Records in the whole input (header included), once it has all been fed.
    pub fn finish(&self) -> Result<u64, &'static str> {
        if self.after_cr {
            return Err("a bare CR line end"); // the last byte: COPY reads it as data
        }
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
        assert_eq!(scan(b"\na,b\nx,y\n"), Err("a blank line"));
        assert_eq!(scan(b"\r\na\r\n"), Err("a blank line"));
        assert_eq!(scan(b"a\n\\.\n2\n"), Err("a line holding only \\."));
        assert_eq!(scan(b"a\n\\."), Err("a line holding only \\."));
        assert_eq!(scan(b"a\r1\r"), Err("a bare CR line end"));
        assert_eq!(scan(b"a\r\n1\r"), Err("a bare CR line end"));
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// What the passthrough relies on: wherever the scanner lets bytes through, the
        /// loader's reader reads them without error and counts the same records, however the
        /// bytes are split into chunks.
        #[test]
        fn where_the_scanner_passes_bytes_the_reader_reads_the_same_records(
            input in proptest::collection::vec(proptest::sample::select(b"ab,\"\n\r\\.x;".to_vec()), 0..80),
            cuts in proptest::collection::vec(1usize..9, 1..20),
        ) {
            let mut scanner = Scanner::new(b'"', b',');
            let mut rest = &input[..];
            let mut scanned = Ok(());
            for cut in cuts.iter().cycle() {
                if rest.is_empty() || scanned.is_err() {
                    break;
                }
                let n = (*cut).min(rest.len());
                scanned = scanner.feed(&rest[..n]);
                rest = &rest[n..];
            }
            if scanned.is_ok() && !scanner.in_quotes && let Ok(count) = scanner.finish() {
                let mut reader = CsvReader::new(&input[..], b',', b'"', &super::super::InputLimits::none());
                let mut record = Record::default();
                let mut records = 0u64;
                loop {
                    match reader.read(&mut record) {
                        Ok(true) => records += 1,
                        Ok(false) => break,
                        Err(e) => proptest::prop_assert!(false, "the reader failed where the scanner passed: {:?} on {:?}", e.err(), String::from_utf8_lossy(&input)),
                    }
                }
                proptest::prop_assert_eq!(records, count, "{:?}", String::from_utf8_lossy(&input));
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
        // A bad first row is an error, not an empty sample (which would read as "header only").
        for bad in [
            &b"a,b\n1,2,3\n4,5\n"[..],
            b"a,b,c\n,\n",
            b"a,b\n\"x,1\n",
            b"a,b\n1,\xff\n",
            b"a,b\n1,\x00\n",
        ] {
            assert!(
                parse_prefix(bad, true, &options, 1000).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A record cut by the end of the prefix is dropped, not judged.
        let p = parse_prefix(b"a,b\n1,2\n3", false, &options, 1000).unwrap().unwrap();
        assert_eq!(p.sample.unwrap().len(), 1);
    }
}
