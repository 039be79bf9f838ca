//! Tests of the CSV reader: each rule, the limits, and property tests against a reference reader.

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
