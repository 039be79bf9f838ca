//! The streaming CSV reader behind the CSV parser (`decode_csv` in `format/read.rs`) and the
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
mod tests;
