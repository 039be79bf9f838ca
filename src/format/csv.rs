//! The streaming CSV reader behind the CSV parser (`decode_csv` in `format/mod.rs`) and the
//! passthrough (`format/raw.rs`): RFC 4180 quoting with `""` escapes and embedded newlines, CRLF
//! or LF or CR line ends, any one-byte delimiter and quote. It reports whether each field was
//! quoted, so that an unquoted field equal to the NULL string is NULL while a quoted one never is
//! (`""` is an empty string), as PostgreSQL's `COPY ... (FORMAT csv)` reads CSV.
//!
//! The tokenizing (field and record splitting, unescaping) is `csv-core`'s, driven a record at
//! a time with `read_record`. `csv-core` never fails and does not say whether a field was
//! quoted, so the reader follows the bytes it consumed: the first byte of each field tells
//! whether it is quoted; an unquoted field's bytes are its text, so it is stepped over in one
//! move once `csv-core` has given its end; inside a quoted field only the quotes are looked at
//! (with `memchr`), to count lines and to reject what `csv-core` would silently accept. Memory
//! is the input's buffer plus room for the largest record (at most twice its size), and the
//! input is never read ahead further; [`Record`]'s buffers are reused from record to record.
//!
//! The record being read is bounded by [`InputLimits`], checked after every step of `csv-core`
//! (at most one input buffer or 64 KiB of output), so a runaway field, record or header fails
//! while it is read and the reader never holds much more than `record_bytes` of it (its buffer
//! stops doubling there) or `columns` field ends: `field_bytes` (a field's unquoted bytes),
//! `record_bytes` (the input bytes the record spans, from the end of the one before, so blank
//! lines before it count too) and `columns` (fields of any record, the header included).
//!
//! What the reader does with the inputs where readers disagree (`csv-core` alone, this reader,
//! and PostgreSQL's COPY, which the passthrough (`format/raw.rs`) feeds directly and which the
//! differential tests use as the oracle):
//! - Text after a closing quote (`"x"y`): an error naming the line. `csv-core` reads `xy`;
//!   COPY reads `xy` too but `"x"y"z"` as `xyz` where `csv-core` reads `xy"z"`, so no lenient
//!   reading matches COPY in general: the file fails whole instead (invariant 7).
//! - A quote inside an unquoted field (`5" disk`): kept as text, as `csv-core` does. COPY would
//!   open a quoted section there (usually failing with "unterminated CSV quoted field"); the
//!   passthrough's scanner sees it and falls back to this reader.
//! - A quoted field never closed: an error naming the line where its quote opened. `csv-core`
//!   would end the field at the end of the input.
//! - A lone CR: a line end, like LF and CRLF (`csv-core` agrees; COPY accepts CR line ends but
//!   not mixed with LF, and the passthrough falls back on either). Inside quotes CR, LF and
//!   CRLF are field text.
//! - A blank line (nothing between two line ends): skipped, and counted as a line. `csv-core`
//!   agrees; COPY reads it as a record of one NULL field (the passthrough falls back). A line
//!   holding only spaces is a record.
//! - A final record without a line end: a record like any other (everyone agrees).
//! - A UTF-8 BOM: skipped once, at the very start, even when the input hands it over in pieces;
//!   a second BOM is text. A file holding only a BOM has no records. `csv-core` strips a BOM
//!   only if its first input holds all three bytes (and would strip a second one after the
//!   reader took the first), so it is never shown one. COPY keeps a BOM as text (the passthrough
//!   takes it off first).
//!
//! Line numbers (for error reports) are 1-based: outside quotes each line end (LF, CR or CRLF)
//! starts a line, inside quotes each LF does (so a CRLF counts once and a lone CR not at all).

use std::io::{self, BufRead};

use csv_core::{ReadRecordResult, Terminator};

use super::InputLimits;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// Output room reserved at a time: `csv-core` unescapes into it, and never writes more bytes
/// than it consumes, so `min(input, OUTPUT_STEP)` bytes of room rarely leave it short (and
/// when they do it says so, and the reader makes more room).
const OUTPUT_STEP: usize = 64 * 1024;

/// One record's fields, reused from record to record.
#[derive(Debug, Default)]
pub struct Record {
    /// The fields' unescaped bytes back to back in `buf[..used]`; the rest is room the reader
    /// writes into, kept from record to record so that it is zeroed only when it grows.
    buf: Vec<u8>,
    used: usize,
    /// Where each field ends in `buf`: the first `fields` entries; the rest is room.
    ends: Vec<usize>,
    fields: usize,
    quoted: Vec<bool>,
    /// Line (1-based) where the record starts.
    pub line: u64,
}

impl Record {
    /// The number of fields.
    pub fn len(&self) -> usize {
        self.fields
    }

    pub fn is_empty(&self) -> bool {
        self.fields == 0
    }

    /// Field `i`'s text, unescaped.
    pub fn field(&self, i: usize) -> &[u8] {
        let ends = &self.ends[..self.fields];
        let start = if i == 0 { 0 } else { ends[i - 1] };
        &self.buf[start..ends[i]]
    }

    /// Whether field `i` was quoted (a quoted field is never NULL).
    pub fn quoted(&self, i: usize) -> bool {
        self.quoted[i]
    }

    /// All the fields' bytes, back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    fn clear(&mut self) {
        self.used = 0;
        self.fields = 0;
        self.quoted.clear();
    }

    /// Makes room after the record's bytes (at least `at_least` bytes) and after its field
    /// ends (at least one). Room doubles, but not past `max_bytes` (plus a step) and
    /// `max_fields` (plus one): the reader stops a record that gets there.
    fn make_room(&mut self, at_least: usize, max_bytes: usize, max_fields: usize) {
        if self.buf.len() - self.used < at_least {
            let cap = max_bytes.saturating_add(OUTPUT_STEP);
            let size = (self.used + at_least).max((2 * self.buf.len()).min(cap));
            self.buf.resize(size, 0);
        }
        if self.ends.len() == self.fields {
            let cap = max_fields.saturating_add(1);
            let size = (self.fields + 1).max((2 * self.ends.len()).max(16).min(cap));
            self.ends.resize(size, 0);
        }
    }
}

/// A malformed file, or one over a limit: what and where.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvError {
    pub message: String,
    pub line: u64,
    /// Over one of the [`InputLimits`] (the message names it), rather than malformed.
    pub limit: bool,
}

/// Where the reader is in the record being read, as followed from the bytes `csv-core` consumed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// Before the record's first byte: `csv-core` skips line ends here (blank lines, and the LF
    /// of a CRLF that ended the previous record).
    BeforeRecord,
    /// Before a field's first byte.
    FieldStart,
    /// In an unquoted field, `walked` bytes into it. Its bytes are its text: once `csv-core`
    /// has given its end, the rest of it is skipped at once.
    Unquoted { walked: usize },
    /// Between a quoted field's quotes.
    InQuotes,
    /// Just after a quote in a quoted field: a second quote (`""`) or the end of the field.
    AfterQuote,
}

/// Follows the bytes `csv-core` consumed: says which fields were quoted, counts lines, and
/// rejects what `csv-core` would silently accept.
#[derive(Debug)]
struct Follower {
    delimiter: u8,
    quote: u8,
    place: Place,
    /// Line of the next byte (1-based).
    line: u64,
    /// The last byte was a CR line end: an LF right after it ends the same line.
    after_cr: bool,
    /// Line of the current quoted field's opening quote.
    quote_line: u64,
}

impl Follower {
    /// Follows the bytes one `read_record` call consumed, given the ends of the record's fields
    /// known so far. `input_ended`: the call was told that the input has ended, which ends the
    /// field being read (if any).
    fn follow(
        &mut self,
        bytes: &[u8],
        ends: &[usize],
        input_ended: bool,
        quoted: &mut Vec<bool>,
        record_line: &mut u64,
    ) -> Result<(), CsvError> {
        let mut i = 0;
        while i < bytes.len() {
            match self.place {
                Place::BeforeRecord => {
                    if matches!(bytes[i], b'\n' | b'\r') {
                        self.line_end(bytes[i]);
                        i += 1;
                    } else {
                        self.after_cr = false;
                        *record_line = self.line;
                        self.place = Place::FieldStart;
                    }
                }
                Place::FieldStart => {
                    if bytes[i] == self.quote {
                        self.quote_line = self.line;
                        self.place = Place::InQuotes;
                        i += 1;
                    } else {
                        self.place = Place::Unquoted { walked: 0 };
                    }
                }
                Place::Unquoted { walked } => {
                    let k = quoted.len();
                    let Some(&end) = ends.get(k) else {
                        // The bytes ran out inside the field.
                        self.place = Place::Unquoted {
                            walked: walked + bytes.len() - i,
                        };
                        break;
                    };
                    // csv-core gives a field's end when it consumes the byte after the field
                    // (a delimiter or a line end), so that byte is among these.
                    let start = if k == 0 { 0 } else { ends[k - 1] };
                    let at = end.checked_sub(start + walked).map(|left| i + left);
                    let Some(at) = at.filter(|&at| at < bytes.len()) else {
                        return Err(self.lost());
                    };
                    i = at + 1;
                    self.end_field(false, bytes[at], quoted);
                }
                Place::InQuotes => {
                    let text = &bytes[i..];
                    let k = memchr::memchr(self.quote, text).unwrap_or(text.len());
                    self.line += text[..k].iter().filter(|&&b| b == b'\n').count() as u64;
                    i += k;
                    if i < bytes.len() {
                        self.place = Place::AfterQuote;
                        i += 1;
                    }
                }
                Place::AfterQuote => {
                    let b = bytes[i];
                    i += 1;
                    if b == self.quote {
                        self.place = Place::InQuotes; // `""`: a quote in the text
                    } else if b == self.delimiter || b == b'\n' || b == b'\r' {
                        self.end_field(true, b, quoted);
                    } else {
                        return Err(CsvError {
                            message: format!(
                                "unexpected {:?} after a closing quote (quotes inside a quoted field must be doubled)",
                                b as char
                            ),
                            line: self.line,
                            limit: false,
                        });
                    }
                }
            }
        }
        if input_ended {
            match self.place {
                Place::BeforeRecord => {}
                Place::FieldStart | Place::Unquoted { .. } => quoted.push(false),
                Place::AfterQuote => quoted.push(true),
                Place::InQuotes => {
                    return Err(CsvError {
                        message: format!("a quoted field opened on line {} is never closed", self.quote_line),
                        line: self.quote_line,
                        limit: false,
                    });
                }
            }
            self.place = Place::BeforeRecord;
        }
        if quoted.len() != ends.len() {
            return Err(self.lost());
        }
        Ok(())
    }

    /// The end of a field, and of the record if `ender` is a line end.
    fn end_field(&mut self, was_quoted: bool, ender: u8, quoted: &mut Vec<bool>) {
        quoted.push(was_quoted);
        if ender == self.delimiter {
            self.place = Place::FieldStart;
        } else {
            self.line_end(ender);
            self.place = Place::BeforeRecord;
        }
    }

    /// A line end outside quotes.
    fn line_end(&mut self, b: u8) {
        if b == b'\n' && self.after_cr {
            self.after_cr = false;
        } else {
            self.line += 1;
            self.after_cr = b == b'\r';
        }
    }

    /// The follower and csv-core disagree on where a field ends: a bug, reported rather than
    /// read past.
    fn lost(&self) -> CsvError {
        CsvError {
            message: "internal error: the CSV reader lost track of the fields".into(),
            line: self.line,
            limit: false,
        }
    }
}

/// Reads a CSV input record by record (see the module's documentation).
pub struct CsvReader<R> {
    input: R,
    core: csv_core::Reader,
    follower: Follower,
    /// The start of the input has been checked for a BOM.
    bom_checked: bool,
    /// The first bytes of the input when they began like a BOM but were not one: they are read
    /// (`head[head_start..head_end]`) before the rest of the input.
    head: [u8; 3],
    head_start: usize,
    head_end: usize,
    /// `csv-core` has been given input.
    core_fed: bool,
    limits: InputLimits,
}

impl<R: BufRead> CsvReader<R> {
    /// A reader of `input`, within `limits`. `delimiter` and `quote` must differ, and neither
    /// be CR or LF (otherwise `read` reports an error).
    pub fn new(input: R, delimiter: u8, quote: u8, limits: &InputLimits) -> CsvReader<R> {
        let core = csv_core::ReaderBuilder::new()
            .delimiter(delimiter)
            .quote(quote)
            .double_quote(true)
            .escape(None)
            .comment(None)
            .terminator(Terminator::CRLF)
            .build();
        CsvReader {
            input,
            core,
            follower: Follower {
                delimiter,
                quote,
                place: Place::BeforeRecord,
                line: 1,
                after_cr: false,
                quote_line: 1,
            },
            bom_checked: false,
            head: [0; 3],
            head_start: 0,
            head_end: 0,
            core_fed: false,
            limits: *limits,
        }
    }

    /// The line (1-based) the next byte is on: after a record, the line after it; at the end
    /// of the input, one past the last line end. Lines between one record's end and the next
    /// record's `line` are blank.
    pub fn line(&self) -> u64 {
        self.follower.line
    }

    /// Reads the next non-blank record into `record`; `false` at the end of the input.
    /// I/O errors come back as `Err(Ok(io))`, format errors as `Err(Err(csv))`; after an error
    /// the reader is not to be read further.
    pub fn read(&mut self, record: &mut Record) -> Result<bool, Result<io::Error, CsvError>> {
        let Follower { delimiter, quote, .. } = self.follower;
        if delimiter == quote || [delimiter, quote].iter().any(|b| matches!(b, b'\r' | b'\n')) {
            return Err(Err(CsvError {
                message: "the delimiter and the quote must be two different bytes, neither CR nor LF".into(),
                line: self.follower.line,
                limit: false,
            }));
        }
        if !self.bom_checked {
            self.skip_bom().map_err(Ok)?;
        }
        record.clear();
        record.line = self.follower.line;
        // Input bytes consumed for this record (blank lines before it included), and how many
        // of its fields have had their length checked.
        let mut consumed = 0usize;
        let mut checked = 0usize;
        loop {
            let from_head = self.head_start < self.head_end;
            let mut input: &[u8] = if from_head {
                &self.head[self.head_start..self.head_end]
            } else {
                match self.input.fill_buf() {
                    Ok(buf) => buf,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Ok(e)),
                }
            };
            if !self.core_fed {
                // Why: csv-core strips a BOM from its first input (if it holds all of it); the
                // reader has already taken the one it skips, and a second one is text.
                input = &input[..input.len().min(1)];
                self.core_fed = !input.is_empty();
            }
            record.make_room(
                input.len().min(OUTPUT_STEP),
                self.limits.record_bytes,
                self.limits.columns,
            );
            let (result, nin, nout, nend) =
                self.core
                    .read_record(input, &mut record.buf[record.used..], &mut record.ends[record.fields..]);
            record.used += nout;
            record.fields += nend;
            consumed += nin;
            self.follower
                .follow(
                    &input[..nin],
                    &record.ends[..record.fields],
                    input.is_empty(),
                    &mut record.quoted,
                    &mut record.line,
                )
                .map_err(Err)?;
            if from_head {
                self.head_start += nin;
            } else {
                self.input.consume(nin);
            }
            self.check_limits(record, consumed, &mut checked).map_err(Err)?;
            match result {
                ReadRecordResult::Record => return Ok(true),
                ReadRecordResult::End => return Ok(false),
                ReadRecordResult::InputEmpty | ReadRecordResult::OutputFull | ReadRecordResult::OutputEndsFull => {}
            }
        }
    }

    /// Checks the record read so far against the limits: its fields (`checked` of them already
    /// passed), the field being read, and the input bytes `consumed` for it.
    fn check_limits(&self, record: &Record, consumed: usize, checked: &mut usize) -> Result<(), CsvError> {
        let InputLimits {
            record_bytes,
            field_bytes,
            columns,
            ..
        } = self.limits;
        let over = |message: String| CsvError {
            message,
            line: record.line,
            limit: true,
        };
        if record.fields > columns {
            return Err(over(format!("record with more than limits.columns = {columns} fields")));
        }
        let ends = &record.ends[..record.fields];
        let start = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
        let field_over = |i: usize| {
            over(format!(
                "field {} longer than limits.field_bytes = {field_bytes} bytes",
                i + 1
            ))
        };
        if let Some(i) = (*checked..record.fields).find(|&i| ends[i] - start(i) > field_bytes) {
            return Err(field_over(i));
        }
        *checked = record.fields;
        if record.used - start(record.fields) > field_bytes {
            return Err(field_over(record.fields)); // the field being read
        }
        if consumed > record_bytes {
            let what = if record.fields == 0 && self.follower.place == Place::BeforeRecord {
                "blank lines"
            } else {
                "record"
            };
            return Err(over(format!(
                "{what} longer than limits.record_bytes = {record_bytes} bytes"
            )));
        }
        Ok(())
    }

    /// Takes a UTF-8 BOM off the start of the input, however the input splits it.
    fn skip_bom(&mut self) -> io::Result<()> {
        while self.head_end < BOM.len() {
            let buf = match self.input.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let n = buf.len().min(BOM.len() - self.head_end);
            if n == 0 || buf[..n] != BOM[self.head_end..self.head_end + n] {
                break;
            }
            self.head[self.head_end..self.head_end + n].copy_from_slice(&buf[..n]);
            self.head_end += n;
            self.input.consume(n);
        }
        if self.head_end == BOM.len() {
            self.head_end = 0;
        }
        self.bom_checked = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, BufRead, Read};

    use proptest::prelude::*;

    use super::*;

    /// Each record's line and fields (text, quoted).
    type Records = Vec<(u64, Vec<(String, bool)>)>;

    fn records(input: &[u8]) -> Result<Records, CsvError> {
        let mut reader = CsvReader::new(
            std::io::BufReader::with_capacity(3, input),
            b',',
            b'"',
            &InputLimits::none(),
        );
        let mut rec = Record::default();
        let mut out = Vec::new();
        loop {
            match reader.read(&mut rec) {
                Ok(true) => out.push((
                    rec.line,
                    (0..rec.len())
                        .map(|i| (String::from_utf8_lossy(rec.field(i)).into_owned(), rec.quoted(i)))
                        .collect(),
                )),
                Ok(false) => return Ok(out),
                Err(Err(e)) => return Err(e),
                Err(Ok(io)) => panic!("{io}"),
            }
        }
    }

    fn f(s: &str, q: bool) -> (String, bool) {
        (s.to_string(), q)
    }

    #[test]
    fn quotes_escapes_newlines_and_line_ends() {
        let got = records(b"\xEF\xBB\xBFa,b\r\n\"x, \"\"y\"\"\r\nz\",\r\n\r\n3,\"\"\rlast,\"q\"").unwrap();
        assert_eq!(
            got,
            vec![
                (1, vec![f("a", false), f("b", false)]),
                (2, vec![f("x, \"y\"\r\nz", true), f("", false)]),
                (5, vec![f("3", false), f("", true)]),
                (6, vec![f("last", false), f("q", true)]),
            ]
        );
    }

    #[test]
    fn an_unclosed_quote_and_junk_after_a_quote_are_errors_with_lines() {
        let e = records(b"a\n\"open\nstill open\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = records(b"a,b\n1,\"x\"y\n").unwrap_err();
        assert_eq!(e.line, 2);
    }

    #[test]
    fn a_quote_inside_an_unquoted_field_is_kept() {
        assert_eq!(
            records(b"5\" disk,x\n").unwrap(),
            vec![(1, vec![f("5\" disk", false), f("x", false)])]
        );
    }

    #[test]
    fn text_after_a_closing_quote_is_an_error_on_the_line_of_the_text() {
        let e = records(b"a\n\"x\ny\"z,1\n").unwrap_err();
        assert_eq!((e.line, e.message.contains("'z'")), (3, true), "{e:?}");
        let e = records(b"\"x\" ,1\n").unwrap_err();
        assert_eq!((e.line, e.message.contains("' '")), (1, true), "{e:?}");
        let e = records(b"\"x\"y\"z\"").unwrap_err();
        assert_eq!(e.line, 1);
    }

    #[test]
    fn a_quoted_field_never_closed_is_an_error_on_the_line_where_it_opened() {
        // `""` is an escaped quote, not a closing one.
        let e = records(b"a\n1,\"x\"\"\n\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("never closed"), "{e:?}");
        assert_eq!(records(b"\"").unwrap_err().line, 1);
    }

    #[test]
    fn a_lone_cr_ends_a_line_outside_quotes_and_is_text_inside() {
        assert_eq!(
            records(b"a\rb\r\"x\ry\",\"p\r\nq\"\rc").unwrap(),
            vec![
                (1, vec![f("a", false)]),
                (2, vec![f("b", false)]),
                (3, vec![f("x\ry", true), f("p\r\nq", true)]),
                (5, vec![f("c", false)]),
            ]
        );
    }

    #[test]
    fn blank_lines_are_skipped_and_counted_but_a_line_of_spaces_is_a_record() {
        assert_eq!(
            records(b"\n\r\n\ra\n\n\r\nb\n \n").unwrap(),
            vec![
                (4, vec![f("a", false)]),
                (7, vec![f("b", false)]),
                (8, vec![f(" ", false)])
            ]
        );
        assert_eq!(records(b"\r\n\n\r").unwrap(), vec![]);
    }

    #[test]
    fn a_final_record_without_a_line_end_is_read() {
        assert_eq!(
            records(b"a,b\nc,").unwrap(),
            vec![
                (1, vec![f("a", false), f("b", false)]),
                (2, vec![f("c", false), f("", false)])
            ]
        );
        assert_eq!(records(b"\"q\"").unwrap(), vec![(1, vec![f("q", true)])]);
        assert_eq!(records(b"\"\"").unwrap(), vec![(1, vec![f("", true)])]);
    }

    #[test]
    fn a_bom_is_skipped_once_even_when_it_arrives_in_pieces() {
        assert_eq!(records(b"\xEF\xBB\xBF").unwrap(), vec![]);
        assert_eq!(records(b"").unwrap(), vec![]);
        for sizes in [vec![1], vec![2, 1], vec![1, 0, 3], vec![3], vec![4], vec![64]] {
            let got = read_all(Chunked::new(b"\xEF\xBB\xBFa\n", sizes.clone()), b',', b'"');
            assert_eq!(got.records, vec![(1, vec![(b"a".to_vec(), false)])], "{sizes:?}");
            let got = read_all(Chunked::new(b"\xEF\xBB\xBF\xEF\xBB\xBFa", sizes.clone()), b',', b'"');
            assert_eq!(
                got.records,
                vec![(1, vec![(b"\xEF\xBB\xBFa".to_vec(), false)])],
                "{sizes:?}"
            );
            let got = read_all(Chunked::new(b"\xEF\xBBa", sizes.clone()), b',', b'"');
            assert_eq!(
                got.records,
                vec![(1, vec![(b"\xEF\xBBa".to_vec(), false)])],
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn records_reuse_their_buffers_and_long_fields_and_records_are_whole() {
        let long = "x".repeat(3 * OUTPUT_STEP);
        let many = vec!["\"y\""; 1000].join(",");
        let input = format!("\"{long}\",a\n{many}\nb,c\n");
        let mut reader = CsvReader::new(input.as_bytes(), b',', b'"', &InputLimits::none());
        let mut rec = Record::default();
        assert!(matches!(reader.read(&mut rec), Ok(true)));
        assert_eq!(
            (rec.field(0), rec.quoted(0), rec.field(1)),
            (long.as_bytes(), true, &b"a"[..])
        );
        assert!(matches!(reader.read(&mut rec), Ok(true)));
        assert_eq!(rec.len(), 1000);
        assert!((0..1000).all(|i| rec.field(i) == b"y" && rec.quoted(i)));
        let room = (rec.buf.capacity(), rec.ends.capacity());
        assert!(matches!(reader.read(&mut rec), Ok(true)));
        assert_eq!((rec.bytes(), rec.len(), rec.line), (&b"bc"[..], 2, 3));
        assert_eq!((rec.buf.capacity(), rec.ends.capacity()), room);
        assert!(matches!(reader.read(&mut rec), Ok(false)));
    }

    fn within(record_bytes: usize, field_bytes: usize, columns: usize) -> InputLimits {
        InputLimits {
            record_bytes,
            field_bytes,
            columns,
            ..InputLimits::none()
        }
    }

    /// The error reading `input` within `limits` stops at (after `records` records), and how
    /// much room the record holds then.
    fn stopped(input: impl BufRead, limits: &InputLimits) -> (CsvError, usize, usize, usize) {
        let mut reader = CsvReader::new(input, b',', b'"', limits);
        let mut rec = Record::default();
        let mut records = 0;
        loop {
            match reader.read(&mut rec) {
                Ok(true) => records += 1,
                Ok(false) => panic!("read to the end"),
                Err(Err(e)) => return (e, records, rec.buf.len(), rec.ends.len()),
                Err(Ok(io)) => panic!("{io}"),
            }
        }
    }

    #[test]
    fn a_header_wider_than_columns_stops_while_it_is_read() {
        // An endless header of commas: only the limit ends it.
        let endless = io::BufReader::new(io::repeat(b','));
        let (e, records, _, ends) = stopped(endless, &within(1 << 20, 1 << 20, 1600));
        assert_eq!((e.limit, e.line, records), (true, 1, 0));
        assert_eq!(e.message, "record with more than limits.columns = 1600 fields");
        assert!(ends <= 1601, "room for {ends} field ends");
        // Exactly the limit is fine, for the header and the rows.
        let input = b"a,b,c\n1,2,3\n4,5,6,7\n";
        let got = read_all_within(&input[..], b',', b'"', &within(100, 100, 3));
        assert_eq!(got.records.len(), 2);
        assert_eq!(got.error.map(|e| (e.line, e.limit)), Some((3, true)));
    }

    #[test]
    fn a_field_longer_than_field_bytes_stops_while_it_is_read() {
        let endless = io::BufReader::new(io::repeat(b'x'));
        let (e, _, buf, _) = stopped(endless, &within(1 << 30, 1000, 1600));
        assert_eq!((e.limit, e.line), (true, 1));
        assert_eq!(e.message, "field 1 longer than limits.field_bytes = 1000 bytes");
        assert!(buf <= 2 * OUTPUT_STEP, "holds {buf} bytes");
        // Quoted, with escapes, in the second field of a later record: the unquoted length counts.
        let input = b"a,b\n1,\"\"\"\"\"\"\"\"\n2,\"\"\"\"\"\"\"\"\"\"\n";
        let (e, records, _, _) = stopped(io::BufReader::with_capacity(2, &input[..]), &within(100, 3, 10));
        assert_eq!((e.line, records, e.limit), (3, 2, true));
        assert_eq!(e.message, "field 2 longer than limits.field_bytes = 3 bytes");
    }

    #[test]
    fn a_record_longer_than_record_bytes_stops_while_it_is_read() {
        // Endless one-byte fields: the record limit, not the field or column one, stops them;
        // the buffer stops doubling near the limit.
        let many = io::BufReader::new(ManyFields(io::repeat(0)));
        let (e, _, buf, _) = stopped(many, &within(200_000, 10, usize::MAX));
        assert_eq!((e.limit, e.line), (true, 1));
        assert_eq!(e.message, "record longer than limits.record_bytes = 200000 bytes");
        assert!(buf <= 200_000 + OUTPUT_STEP, "holds {buf} bytes");
        // The record's bytes include its line end; blank lines before it count too.
        let ok = read_all_within(&b"ab,c\nd\n"[..], b',', b'"', &within(5, 5, 5));
        assert_eq!((ok.records.len(), ok.error), (2, None));
        let e = read_all_within(&b"ab,c\nd\n"[..], b',', b'"', &within(4, 5, 5))
            .error
            .unwrap();
        assert_eq!((e.line, e.limit), (1, true));
        let blanks = [&b"a\n"[..], &[b'\n'; 100], b"b\n"].concat();
        let e = read_all_within(&blanks[..], b',', b'"', &within(50, 5, 5))
            .error
            .unwrap();
        assert_eq!(e.message, "record longer than limits.record_bytes = 50 bytes");
        // Stopped before the record starts, the message says what it held.
        let few_at_a_time = io::BufReader::with_capacity(8, &blanks[..]);
        let e = read_all_within(few_at_a_time, b',', b'"', &within(50, 5, 5))
            .error
            .unwrap();
        assert_eq!(e.message, "blank lines longer than limits.record_bytes = 50 bytes");
    }

    /// `x,` endlessly: a record of endless one-byte fields.
    struct ManyFields<R>(R);

    impl<R: Read> Read for ManyFields<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = if i % 2 == 0 { b'x' } else { b',' };
            }
            Ok(n)
        }
    }

    #[test]
    fn a_delimiter_or_quote_that_is_a_line_end_or_the_same_byte_is_refused() {
        for (delimiter, quote) in [(b'\n', b'"'), (b',', b'\r'), (b',', b',')] {
            let mut reader = CsvReader::new(&b"a,b\n"[..], delimiter, quote, &InputLimits::none());
            assert!(matches!(reader.read(&mut Record::default()), Err(Err(_))));
        }
    }

    #[test]
    fn an_io_error_is_reported_as_one() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut reader = CsvReader::new(io::BufReader::new(Failing), b',', b'"', &InputLimits::none());
        let got = reader.read(&mut Record::default());
        assert!(matches!(got, Err(Ok(e)) if e.to_string() == "disk on fire"));
    }

    /// A record as read: its line and its fields (text, quoted).
    type ReadRecord = (u64, Vec<(Vec<u8>, bool)>);

    /// Everything a reader made of an input: its records (line, fields) and the error that
    /// stopped it, if any.
    #[derive(Debug, Default, PartialEq)]
    struct Outcome {
        records: Vec<ReadRecord>,
        error: Option<CsvError>,
    }

    fn read_all(input: impl BufRead, delimiter: u8, quote: u8) -> Outcome {
        read_all_within(input, delimiter, quote, &InputLimits::none())
    }

    fn read_all_within(input: impl BufRead, delimiter: u8, quote: u8, limits: &InputLimits) -> Outcome {
        let mut reader = CsvReader::new(input, delimiter, quote, limits);
        let mut rec = Record::default();
        let mut out = Outcome::default();
        loop {
            match reader.read(&mut rec) {
                Ok(true) => out.records.push((
                    rec.line,
                    (0..rec.len()).map(|i| (rec.field(i).to_vec(), rec.quoted(i))).collect(),
                )),
                Ok(false) => return out,
                Err(Err(e)) => {
                    out.error = Some(e);
                    return out;
                }
                Err(Ok(io)) => panic!("unexpected I/O error: {io}"),
            }
        }
    }

    /// A `BufRead` handing `data` over in chunks of `sizes` bytes in turn; a size of 0 is an
    /// `Interrupted` error instead of a chunk.
    struct Chunked<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        turn: usize,
        pos: usize,
        end: usize,
    }

    impl<'a> Chunked<'a> {
        fn new(data: &'a [u8], sizes: Vec<usize>) -> Chunked<'a> {
            assert!(sizes.iter().any(|&s| s > 0));
            Chunked {
                data,
                sizes,
                turn: 0,
                pos: 0,
                end: 0,
            }
        }
    }

    impl Read for Chunked<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let buf = self.fill_buf()?;
            let n = buf.len().min(out.len());
            out[..n].copy_from_slice(&buf[..n]);
            self.consume(n);
            Ok(n)
        }
    }

    impl BufRead for Chunked<'_> {
        fn fill_buf(&mut self) -> io::Result<&[u8]> {
            if self.pos == self.end && self.pos < self.data.len() {
                let size = self.sizes[self.turn % self.sizes.len()];
                self.turn += 1;
                if size == 0 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                self.end = (self.pos + size).min(self.data.len());
            }
            Ok(&self.data[self.pos..self.end])
        }

        fn consume(&mut self, n: usize) {
            assert!(self.pos + n <= self.end, "consumed more than was handed over");
            self.pos += n;
        }
    }

    /// The reader's rules written plainly, byte by byte over the whole input: the oracle of the
    /// property tests.
    fn reference(input: &[u8], delimiter: u8, quote: u8) -> Outcome {
        // The length of the line end at `i`, if there is one.
        let line_end = |i: usize| match (input.get(i), input.get(i + 1)) {
            (Some(b'\r'), Some(b'\n')) => Some(2),
            (Some(b'\r' | b'\n'), _) => Some(1),
            _ => None,
        };
        let mut out = Outcome::default();
        let mut i = if input.starts_with(&BOM) { BOM.len() } else { 0 };
        let mut line = 1;
        loop {
            while let Some(k) = line_end(i) {
                i += k; // a blank line
                line += 1;
            }
            if i == input.len() {
                return out;
            }
            let record_line = line;
            let mut fields = Vec::new();
            loop {
                let mut text = Vec::new();
                let quoted = input.get(i) == Some(&quote);
                if quoted {
                    let opened = line;
                    i += 1;
                    loop {
                        match input.get(i) {
                            None => {
                                out.error = Some(CsvError {
                                    message: format!("a quoted field opened on line {opened} is never closed"),
                                    line: opened,
                                    limit: false,
                                });
                                return out;
                            }
                            Some(&b) if b == quote && input.get(i + 1) == Some(&quote) => {
                                text.push(quote);
                                i += 2;
                            }
                            Some(&b) if b == quote => {
                                i += 1;
                                break;
                            }
                            Some(&b) => {
                                if b == b'\n' {
                                    line += 1;
                                }
                                text.push(b);
                                i += 1;
                            }
                        }
                    }
                    if let Some(&b) = input.get(i).filter(|&&b| b != delimiter && line_end(i).is_none()) {
                        out.error = Some(CsvError {
                            message: format!(
                                "unexpected {:?} after a closing quote (quotes inside a quoted field must be doubled)",
                                b as char
                            ),
                            line,
                            limit: false,
                        });
                        return out;
                    }
                } else {
                    while let Some(&b) = input.get(i).filter(|&&b| b != delimiter && line_end(i).is_none()) {
                        text.push(b);
                        i += 1;
                    }
                }
                fields.push((text, quoted));
                if input.get(i) == Some(&delimiter) {
                    i += 1;
                    continue;
                }
                if let Some(k) = line_end(i) {
                    i += k;
                    line += 1;
                }
                break;
            }
            out.records.push((record_line, fields));
        }
    }

    const BOMS: &[&[u8]] = &[b"", b"", b"\xEF\xBB\xBF", b"\xEF\xBB", b"\xEF\xBB\xBF\xEF\xBB\xBF"];
    const ALPHABET: &[&str] = &["a", "a", "a", ",", "\"", "\n", "\r", ";", "é", "\t"];

    /// (delimiter, quote) pairs; with `;` as the quote, `"` is an ordinary byte.
    fn separators() -> impl Strategy<Value = (u8, u8)> {
        prop::sample::select(vec![(b',', b'"'), (b';', b'"'), (b'\t', b'"'), (b',', b';')])
    }

    fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(0usize..8, 1..6).prop_filter("some chunk must be non-empty", |s| s.iter().any(|&n| n > 0))
    }

    fn text() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(ALPHABET), 0..12).prop_map(|t| t.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_input_reads_as_the_reference_reads_it_however_it_is_split(
            bom in prop::sample::select(BOMS),
            body in prop::collection::vec(prop::sample::select(ALPHABET), 0..48),
            (delimiter, quote) in separators(),
            a in chunk_sizes(),
            b in chunk_sizes(),
        ) {
            let input = [bom, body.concat().as_bytes()].concat();
            let expected = reference(&input, delimiter, quote);
            prop_assert_eq!(&read_all(Chunked::new(&input, a), delimiter, quote), &expected);
            prop_assert_eq!(&read_all(Chunked::new(&input, b), delimiter, quote), &expected);
            prop_assert_eq!(&read_all(&input[..], delimiter, quote), &expected);
        }

        #[test]
        fn limits_only_ever_stop_the_reading_never_change_it(
            body in prop::collection::vec(prop::sample::select(ALPHABET), 0..48),
            (delimiter, quote) in separators(),
            columns in 1usize..5,
            field_bytes in 0usize..6,
            sizes in chunk_sizes(),
        ) {
            let input = body.concat().into_bytes();
            let full = read_all(&input[..], delimiter, quote);
            let limits = within(usize::MAX, field_bytes, columns);
            let limited = read_all_within(Chunked::new(&input, sizes), delimiter, quote, &limits);
            let fits = |(_, fields): &ReadRecord| fields.len() <= columns && fields.iter().all(|(f, _)| f.len() <= field_bytes);
            match &limited.error {
                Some(e) if e.limit => {
                    // The records before the stop are read as without limits, and the record
                    // it stopped at is over a limit indeed (or, cut by a format error, would be
                    // over one before that error).
                    prop_assert_eq!(&limited.records[..], &full.records[..limited.records.len()]);
                    let next = full.records.get(limited.records.len());
                    prop_assert!(next.is_none_or(|r| !fits(r)) , "{:?} stopped at a record within the limits", e);
                    if next.is_none() {
                        prop_assert!(full.error.is_some());
                    }
                }
                _ => {
                    prop_assert_eq!(&limited, &full);
                    prop_assert!(full.records.iter().all(fits));
                }
            }
        }

        #[test]
        fn a_written_file_reads_back_as_the_records_it_was_written_from(
            bom in prop::sample::select(&BOMS[..3]),
            rows in prop::collection::vec(
                (
                    prop::collection::vec((text(), any::<bool>()), 1..5),
                    prop::sample::select(vec!["\n", "\r\n", "\r"]),
                    0usize..3,
                ),
                0..8,
            ),
            last_line_end in any::<bool>(),
            (delimiter, quote) in separators(),
            sizes in chunk_sizes(),
        ) {
            // Writes the rows as CSV (and what the reader should make of it) by the rules.
            let mut input = bom.to_vec();
            let mut expected = Outcome::default();
            let mut line = 1;
            let rows_len = rows.len();
            for (n, (fields, line_end, blank_lines)) in rows.into_iter().enumerate() {
                let mut fields: Vec<(Vec<u8>, bool)> = fields
                    .into_iter()
                    .map(|(text, quoted)| match quoted {
                        true => (text, true),
                        false => (text.into_iter().filter(|b| ![delimiter, quote, b'\r', b'\n'].contains(b)).collect(), false),
                    })
                    .collect();
                if fields.len() == 1 && fields[0].0.is_empty() {
                    fields[0].1 = true; // otherwise a blank line
                }
                expected.records.push((line, fields.clone()));
                for (k, (text, quoted)) in fields.iter().enumerate() {
                    if k > 0 {
                        input.push(delimiter);
                    }
                    if *quoted {
                        input.push(quote);
                        for &b in text {
                            if b == quote {
                                input.push(quote); // doubled
                            }
                            input.push(b);
                            line += u64::from(b == b'\n');
                        }
                        input.push(quote);
                    } else {
                        input.extend_from_slice(text);
                    }
                }
                if n + 1 < rows_len || last_line_end {
                    for _ in 0..=blank_lines {
                        input.extend_from_slice(line_end.as_bytes());
                        line += 1;
                    }
                }
            }
            prop_assert_eq!(&reference(&input, delimiter, quote), &expected);
            prop_assert_eq!(&read_all(Chunked::new(&input, sizes), delimiter, quote), &expected);
        }
    }
}
