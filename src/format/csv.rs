//! A streaming CSV reader (RFC 4180): quoted fields with `""` escapes and embedded newlines,
//! CRLF or LF or CR line ends, a UTF-8 BOM, any one-byte delimiter and quote. It reports whether
//! each field was quoted, so that an unquoted field equal to the NULL string is NULL while a
//! quoted one never is (`""` is an empty string), as PostgreSQL's COPY reads CSV.

use std::io::BufRead;

/// One record's fields, reused from record to record.
#[derive(Debug, Default)]
pub struct Record {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    quoted: Vec<bool>,
    /// Line (1-based) where the record starts.
    pub line: u64,
}

impl Record {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    pub fn quoted(&self, i: usize) -> bool {
        self.quoted[i]
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
        self.quoted.clear();
    }

    fn end_field(&mut self, quoted: bool) {
        self.ends.push(self.bytes.len());
        self.quoted.push(quoted);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    FieldStart,
    Unquoted,
    Quoted,
    /// Just read a quote inside a quoted field: `""` or the end of the quotes.
    QuoteInQuoted,
}

pub struct CsvReader<R> {
    input: R,
    delimiter: u8,
    quote: u8,
    /// Lines started so far (the line the next byte is on).
    line: u64,
    /// A CR ended the last record: swallow an LF right after it.
    after_cr: bool,
    started: bool,
}

/// A malformed file: what and where.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvError {
    pub message: String,
    pub line: u64,
}

impl<R: BufRead> CsvReader<R> {
    pub fn new(input: R, delimiter: u8, quote: u8) -> CsvReader<R> {
        CsvReader {
            input,
            delimiter,
            quote,
            line: 1,
            after_cr: false,
            started: false,
        }
    }

    /// Reads the next non-blank record into `record`; `false` at the end of the input.
    /// I/O errors come back as `Err(Ok(io))`, format errors as `Err(Err(csv))`.
    pub fn read(&mut self, record: &mut Record) -> Result<bool, Result<std::io::Error, CsvError>> {
        loop {
            record.clear();
            record.line = self.line;
            let mut state = State::FieldStart;
            let mut quote_line = self.line;
            let ended = self.read_into(record, &mut state, &mut quote_line)?;
            if !ended && record.bytes.is_empty() && record.ends.is_empty() && state == State::FieldStart {
                return Ok(false); // end of input
            }
            if state == State::Quoted {
                return Err(Err(CsvError {
                    message: format!("a quoted field opened on line {quote_line} is never closed"),
                    line: quote_line,
                }));
            }
            // The last field of the record (or of a file without a final line end).
            record.end_field(matches!(state, State::QuoteInQuoted));
            if record.ends.len() == 1 && record.ends[0] == 0 && !record.quoted[0] {
                if ended {
                    continue; // a blank line
                }
                return Ok(false);
            }
            return Ok(true);
        }
    }

    /// Consumes bytes up to and including the record's line end. Returns whether a line end
    /// was found (false: end of input). Leaves the last field open.
    fn read_into(
        &mut self,
        record: &mut Record,
        state: &mut State,
        quote_line: &mut u64,
    ) -> Result<bool, Result<std::io::Error, CsvError>> {
        loop {
            let buf = match self.input.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Ok(e)),
            };
            if buf.is_empty() {
                return Ok(false);
            }
            let mut i = 0;
            if !self.started {
                self.started = true;
                if buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
                    i = 3;
                }
            }
            if self.after_cr && i < buf.len() {
                self.after_cr = false;
                if buf[i] == b'\n' {
                    i += 1;
                }
            }
            while i < buf.len() {
                let b = buf[i];
                i += 1;
                match *state {
                    State::FieldStart | State::Unquoted => {
                        if b == self.delimiter {
                            record.end_field(false);
                            *state = State::FieldStart;
                        } else if b == b'\n' || b == b'\r' {
                            self.line += 1;
                            let (end, after_cr) = past_line_end(b, buf, i);
                            self.after_cr = after_cr;
                            self.input.consume(end);
                            return Ok(true);
                        } else if b == self.quote && *state == State::FieldStart {
                            *state = State::Quoted;
                            *quote_line = self.line;
                        } else {
                            record.bytes.push(b);
                            *state = State::Unquoted;
                        }
                    }
                    State::Quoted => {
                        if b == self.quote {
                            *state = State::QuoteInQuoted;
                        } else {
                            if b == b'\n' {
                                self.line += 1;
                            }
                            record.bytes.push(b);
                        }
                    }
                    State::QuoteInQuoted => {
                        if b == self.quote {
                            record.bytes.push(b); // "" inside quotes
                            *state = State::Quoted;
                        } else if b == self.delimiter {
                            record.end_field(true);
                            *state = State::FieldStart;
                        } else if b == b'\n' || b == b'\r' {
                            self.line += 1;
                            let (end, after_cr) = past_line_end(b, buf, i);
                            self.after_cr = after_cr;
                            self.input.consume(end);
                            return Ok(true);
                        } else {
                            return Err(Err(CsvError {
                                message: format!(
                                    "unexpected {:?} after a closing quote (quotes inside a quoted field must be doubled)",
                                    b as char
                                ),
                                line: self.line,
                            }));
                        }
                    }
                }
            }
            let n = buf.len();
            self.input.consume(n);
        }
    }
}

/// Where a line end `b` (just read, `i` is the next index) ends in `buf`: a CR swallows the LF
/// after it. Also says whether a CR ended the buffer, so that the next one's LF is swallowed.
fn past_line_end(b: u8, buf: &[u8], i: usize) -> (usize, bool) {
    match (b, buf.get(i)) {
        (b'\r', Some(b'\n')) => (i + 1, false),
        (b'\r', None) => (i, true),
        _ => (i, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each record's line and fields (text, quoted).
    type Records = Vec<(u64, Vec<(String, bool)>)>;

    fn records(input: &[u8]) -> Result<Records, CsvError> {
        let mut reader = CsvReader::new(std::io::BufReader::with_capacity(3, input), b',', b'"');
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
}
