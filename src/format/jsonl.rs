//! JSON lines (NDJSON): one object per line. The columns are the keys found in the first
//! [`SAMPLE_LINES`] lines (or, when those are long, in the lines up to the first
//! [`SAMPLE_BYTES`]), in order of first appearance; a key first seen later fails the file (its
//! column would not exist), and so does a key twice in one object.
//!
//! Every value is taken as written, never through a float: a number keeps its spelling
//! (`1.10`, `1E2`, `18446744073709551615`), a string loads as its text and makes its column text
//! (`"08123"` is never the number 8123), `true`/`false` as those words, null or a missing key as
//! NULL. A column that holds an object or an array in the sample is JSON (`json` in
//! PostgreSQL, `JSON` in MySQL, text in SQLite), and each of its values is stored as the JSON
//! the line wrote (a string there stays a JSON string, `"5"`, not the number 5).
//!
//! Bounded whatever the bytes: a line is read up to `limits.record_bytes` (never a whole
//! unending line), an object's keys are counted while it is parsed (`limits.json_keys`), the
//! sample's distinct keys against `limits.columns`, and nesting is limited by serde_json (128
//! levels).

use std::cell::Cell;
use std::collections::HashMap;
use std::io::BufRead;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::InputLimits;
use super::batch::Batch;
use crate::error::FileErrorKind;
use crate::schema::ColumnType;

/// Lines read before the columns are fixed ...
pub const SAMPLE_LINES: usize = 1000;
/// ... or bytes of lines, whichever comes first: the sample is held whole until then.
pub const SAMPLE_BYTES: usize = 8 << 20;

/// A bad line: what and where.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonlError {
    pub message: String,
    pub line: u64,
    pub record: u64,
    pub column: Option<String>,
    /// `Decode` (not JSON, not an object), `Schema` (fine data that does not fit the columns: a
    /// new key) or `Limit`.
    pub kind: FileErrorKind,
}

/// One object's keys and values (as written), in the line's order.
#[derive(Debug, Default)]
pub struct Fields(pub Vec<(String, Box<RawValue>)>);

/// Parses one object, refusing it at its `max_keys + 1`th key (and saying so in `over`).
struct FieldsSeed<'a> {
    max_keys: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8).min(self.max_keys));
        while let Some(key) = map.next_key::<String>()? {
            if fields.len() == self.max_keys {
                self.over.set(true);
                return Err(A::Error::custom("too many keys"));
            }
            fields.push((key, map.next_value::<Box<RawValue>>()?));
        }
        Ok(Fields(fields))
    }
}

/// One object and the line it is on.
pub type Object = (u64, Fields);

/// What a raw JSON value is, by its first byte.
fn kind(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b'n')
}

/// Why the next object could not be read.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    Bad(JsonlError),
}

pub struct JsonlReader<R> {
    input: R,
    line: u64,
    record: u64,
    /// The current line's bytes, its line end included; never more than `max_line + 1`.
    text: Vec<u8>,
    max_line: usize,
    max_keys: usize,
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(input: R, limits: &InputLimits) -> JsonlReader<R> {
        JsonlReader {
            input,
            line: 0,
            record: 0,
            text: Vec::new(),
            max_line: limits.record_bytes,
            max_keys: limits.json_keys,
        }
    }

    /// Bytes of the last line read, its line end included.
    pub fn line_len(&self) -> usize {
        self.text.len()
    }

    /// The next object and its line; `None` at the end.
    pub fn next_object(&mut self) -> Result<Option<Object>, ReadError> {
        loop {
            if !self.read_line()? {
                return Ok(None);
            }
            self.line += 1;
            let Ok(text) = std::str::from_utf8(&self.text) else {
                return Err(ReadError::Bad(
                    self.error("invalid UTF-8".into(), FileErrorKind::Decode),
                ));
            };
            // A byte order mark only at the very start of the file; anything else that is not
            // JSON (U+FEFF alone on a later line included) fails the file.
            let line = if self.line == 1 {
                text.strip_prefix('\u{feff}').unwrap_or(text)
            } else {
                text
            };
            let text = line.trim_matches(|c| c == ' ' || c == '\t' || c == '\r' || c == '\n');
            if text.is_empty() {
                continue;
            }
            self.record += 1;
            let bad = |message: String| Err(ReadError::Bad(self.error(message, FileErrorKind::Decode)));
            if text.contains('\0') {
                return bad("NUL byte in a value".into());
            }
            if !text.starts_with('{') {
                return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Ok(_) => bad("the line is not a JSON object".into()),
                    Err(e) => bad(format!("invalid JSON: {e}")),
                };
            }
            let over = Cell::new(false);
            let seed = FieldsSeed {
                max_keys: self.max_keys,
                over: &over,
            };
            let mut parser = serde_json::Deserializer::from_str(text);
            return match seed.deserialize(&mut parser).and_then(|f| parser.end().map(|()| f)) {
                Ok(fields) => Ok(Some((self.line, fields))),
                Err(_) if over.get() => Err(ReadError::Bad(self.error(
                    format!("JSON object with more than limits.json_keys = {} keys", self.max_keys),
                    FileErrorKind::Limit,
                ))),
                Err(e) => bad(format!("invalid JSON: {e}")),
            };
        }
    }

    /// Reads the next line, through its LF or to the end of the input, into `text`; `false` at
    /// the end. Never holds more than `max_line` bytes (the LF aside): a longer line fails.
    fn read_line(&mut self) -> Result<bool, ReadError> {
        self.text.clear();
        loop {
            let buf = match self.input.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReadError::Io(e)),
            };
            if buf.is_empty() {
                return Ok(!self.text.is_empty());
            }
            let (take, ended) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            if self.text.len() + take - usize::from(ended) > self.max_line {
                self.line += 1;
                self.record += 1;
                return Err(ReadError::Bad(self.error(
                    format!("JSON line longer than limits.record_bytes = {} bytes", self.max_line),
                    FileErrorKind::Limit,
                )));
            }
            self.text.extend_from_slice(&buf[..take]);
            self.input.consume(take);
            if ended {
                return Ok(true);
            }
        }
    }

    fn error(&self, message: String, kind: FileErrorKind) -> JsonlError {
        JsonlError {
            message,
            line: self.line,
            record: self.record,
            column: None,
            kind,
        }
    }
}

/// The columns of a JSON lines file, fixed by its sample.
#[derive(Debug)]
pub struct Columns {
    /// In order of first appearance.
    pub names: Vec<String>,
    /// The type the data fixes for each (see [`columns_of`]).
    pub types: Vec<Option<ColumnType>>,
    index: HashMap<String, usize>,
    /// Lines the sample spans (for the message about a key first seen later).
    sampled_lines: u64,
}

/// Columns of the sample, in order of first appearance, and the type the data fixes for each:
/// `Json` where an object or array appears, else `Text` where a string appears, else `None`
/// (numbers and booleans: inferred from their text). More than `max_columns` distinct keys
/// fail the file (at the object that brings the first one too many).
pub fn columns_of(sample: &[Object], max_columns: usize) -> Result<Columns, JsonlError> {
    let mut names: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut types: Vec<Option<ColumnType>> = Vec::new();
    for (record, (line, Fields(fields))) in sample.iter().enumerate() {
        for (key, value) in fields {
            let i = match index.get(key.as_str()) {
                Some(&i) => i,
                None if names.len() == max_columns => {
                    return Err(JsonlError {
                        message: format!("more than limits.columns = {max_columns} distinct keys"),
                        line: *line,
                        record: record as u64 + 1,
                        column: None,
                        kind: FileErrorKind::Limit,
                    });
                }
                None => {
                    index.insert(key.clone(), names.len());
                    names.push(key.clone());
                    types.push(None);
                    names.len() - 1
                }
            };
            types[i] = match (types[i], kind(value)) {
                (_, b'{' | b'[') | (Some(ColumnType::Json), _) => Some(ColumnType::Json),
                (_, b'"') => Some(ColumnType::Text),
                (t, _) => t,
            };
        }
    }
    Ok(Columns {
        names,
        types,
        index,
        sampled_lines: sample.last().map_or(0, |(line, _)| *line),
    })
}

/// Appends one object as a row of `columns`: a JSON column gets each value's JSON text as
/// written, any other column a string's text, or a number's or boolean's spelling.
pub fn push_object(
    batch: &mut Batch,
    columns: &Columns,
    line: u64,
    record: u64,
    object: &Fields,
    scratch: &mut Vec<(bool, Option<Vec<u8>>)>,
) -> Result<(), JsonlError> {
    let error = |message: String, column: &str, kind: FileErrorKind| JsonlError {
        message,
        line,
        record,
        column: Some(column.to_string()),
        kind,
    };
    let decode = FileErrorKind::Decode;
    scratch.clear();
    scratch.resize(columns.names.len(), (false, None));
    for (key, value) in &object.0 {
        let Some(&i) = columns.index.get(key.as_str()) else {
            return Err(error(
                format!(
                    "key {key:?} is not among the columns found in the first {} lines ({})",
                    columns.sampled_lines,
                    columns.names.join(", ")
                ),
                key,
                FileErrorKind::Schema,
            ));
        };
        if scratch[i].0 {
            return Err(error(format!("key {key:?} appears twice in the object"), key, decode));
        }
        let raw = value.get();
        scratch[i].0 = true;
        scratch[i].1 = match (columns.types[i], kind(value)) {
            (_, b'n') => None, // null: NULL
            (Some(ColumnType::Json), _) => Some(raw.as_bytes().to_vec()),
            (_, b'"') => {
                let text: String =
                    serde_json::from_str(raw).map_err(|e| error(format!("invalid JSON string: {e}"), key, decode))?;
                if text.contains('\0') {
                    return Err(error("NUL character in a value".into(), key, decode));
                }
                Some(text.into_bytes())
            }
            _ => Some(raw.as_bytes().to_vec()),
        };
    }
    batch
        .push_row(line, scratch.iter().map(|(_, f)| f.as_deref()))
        .map_err(|i| error("invalid UTF-8".into(), &columns.names[i], decode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(record_bytes: usize, json_keys: usize) -> InputLimits {
        InputLimits {
            record_bytes,
            json_keys,
            ..InputLimits::none()
        }
    }

    /// Every object of `input` (as its keys), or the first error.
    fn objects(input: &[u8], limits: &InputLimits) -> Result<Vec<(u64, Vec<String>)>, JsonlError> {
        let mut reader = JsonlReader::new(std::io::BufReader::with_capacity(7, input), limits);
        let mut out = Vec::new();
        loop {
            match reader.next_object() {
                Ok(Some((line, Fields(fields)))) => out.push((line, fields.into_iter().map(|(k, _)| k).collect())),
                Ok(None) => return Ok(out),
                Err(ReadError::Bad(e)) => return Err(e),
                Err(ReadError::Io(e)) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_line_longer_than_record_bytes_fails_without_being_held_whole() {
        let long = format!("{{\"a\": \"{}\"}}", "x".repeat(100));
        let input = format!("{{\"a\": 1}}\n{long}\n{{\"a\": 2}}");
        // The limit counts the line without its LF.
        assert_eq!(objects(input.as_bytes(), &limits(long.len() + 1, 10)).unwrap().len(), 3);
        assert_eq!(objects(input.as_bytes(), &limits(long.len(), 10)).unwrap().len(), 3);
        let e = objects(input.as_bytes(), &limits(long.len() - 1, 10)).unwrap_err();
        assert_eq!((e.kind, e.line, e.record), (FileErrorKind::Limit, 2, 2));
        assert!(
            e.message.contains(&format!("limits.record_bytes = {}", long.len() - 1)),
            "{e:?}"
        );
        // A line without any line end, as long as the whole input: stopped at the limit.
        let mut reader = JsonlReader::new(std::io::Cursor::new(vec![b' '; 1 << 20]), &limits(1000, 10));
        assert!(matches!(reader.next_object(), Err(ReadError::Bad(e)) if e.kind == FileErrorKind::Limit));
        assert!(reader.text.capacity() < 4096, "held {} bytes", reader.text.capacity());
    }

    #[test]
    fn an_object_with_more_than_json_keys_keys_fails_as_a_limit() {
        let keys = |n: usize| (0..n).map(|i| format!("\"k{i}\": {i}")).collect::<Vec<_>>().join(", ");
        let input = format!("{{{}}}\n{{{}}}\n", keys(3), keys(4));
        assert_eq!(objects(input.as_bytes(), &limits(1 << 20, 4)).unwrap().len(), 2);
        let e = objects(input.as_bytes(), &limits(1 << 20, 3)).unwrap_err();
        assert_eq!((e.kind, e.line), (FileErrorKind::Limit, 2));
        assert_eq!(e.message, "JSON object with more than limits.json_keys = 3 keys");
        // Other errors keep their kind.
        let e = objects(b"{\"a\": }\n", &limits(1 << 20, 3)).unwrap_err();
        assert_eq!(e.kind, FileErrorKind::Decode);
    }

    #[test]
    fn more_distinct_keys_in_the_sample_than_columns_fails_as_a_limit() {
        let sample: Vec<Object> = (0..4u64)
            .map(|i| {
                let line = format!("{{\"a\": 1, \"k{i}\": 2}}");
                let fields = serde_json::from_str::<std::collections::BTreeMap<String, Box<RawValue>>>(&line).unwrap();
                (i + 1, Fields(fields.into_iter().collect()))
            })
            .collect();
        assert_eq!(columns_of(&sample, 5).unwrap().names, ["a", "k0", "k1", "k2", "k3"]);
        let e = columns_of(&sample, 4).unwrap_err();
        assert_eq!((e.kind, e.line, e.record), (FileErrorKind::Limit, 4, 4));
        assert!(e.message.contains("limits.columns = 4"), "{e:?}");
    }
}
