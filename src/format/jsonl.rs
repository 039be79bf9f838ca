//! JSON lines (NDJSON): one object per line. The columns are the keys found in the first
//! [`SAMPLE_LINES`] lines, in order of first appearance; a key first seen later fails the file
//! (its column would not exist), and so does a key twice in one object.
//!
//! Every value is taken as written, never through a float: a number keeps its spelling
//! (`1.10`, `1E2`, `18446744073709551615`), a string loads as its text and makes its column text
//! (`"08123"` is never the number 8123), `true`/`false` as those words, null or a missing key as
//! NULL. A column that holds an object or an array in the sample is JSON (`json` in
//! PostgreSQL, `JSON` in MySQL, text in SQLite), and each of its values is stored as the JSON
//! the line wrote (a string there stays a JSON string, `"5"`, not the number 5).

use std::collections::HashMap;
use std::io::BufRead;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::batch::Batch;
use crate::schema::ColumnType;

/// Lines read before the columns are fixed.
pub const SAMPLE_LINES: usize = 1000;

/// A bad line: what and where.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonlError {
    pub message: String,
    pub line: u64,
    pub record: u64,
    pub column: Option<String>,
    /// The data is fine but does not fit the columns (a new key): a schema problem.
    pub schema: bool,
}

/// One object's keys and values (as written), in the line's order.
#[derive(Debug, Default)]
pub struct Fields(pub Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Entries)
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
    text: String,
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(input: R) -> JsonlReader<R> {
        JsonlReader {
            input,
            line: 0,
            record: 0,
            text: String::new(),
        }
    }

    /// The next object and its line; `None` at the end.
    pub fn next_object(&mut self) -> Result<Option<Object>, ReadError> {
        loop {
            self.text.clear();
            let n = match self.input.read_line(&mut self.text) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.line += 1;
                    return Err(ReadError::Bad(self.error("invalid UTF-8".into(), None, false)));
                }
                Err(e) => return Err(ReadError::Io(e)),
            };
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            // A byte order mark only at the very start of the file; anything else that is not
            // JSON (U+FEFF alone on a later line included) fails the file.
            let line = if self.line == 1 {
                self.text.strip_prefix('\u{feff}').unwrap_or(&self.text)
            } else {
                &self.text
            };
            let text = line.trim_matches(|c| c == ' ' || c == '\t' || c == '\r' || c == '\n');
            if text.is_empty() {
                continue;
            }
            self.record += 1;
            if text.contains('\0') {
                return Err(ReadError::Bad(self.error("NUL byte in a value".into(), None, false)));
            }
            if !text.starts_with('{') {
                let what = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Ok(_) => "the line is not a JSON object".to_string(),
                    Err(e) => format!("invalid JSON: {e}"),
                };
                return Err(ReadError::Bad(self.error(what, None, false)));
            }
            return match serde_json::from_str::<Fields>(text) {
                Ok(fields) => Ok(Some((self.line, fields))),
                Err(e) => Err(ReadError::Bad(self.error(format!("invalid JSON: {e}"), None, false))),
            };
        }
    }

    fn error(&self, message: String, column: Option<String>, schema: bool) -> JsonlError {
        JsonlError {
            message,
            line: self.line,
            record: self.record,
            column,
            schema,
        }
    }
}

/// Columns of the sample, in order of first appearance, and the type the data fixes for each:
/// `Json` where an object or array appears, else `Text` where a string appears, else `None`
/// (numbers and booleans: inferred from their text).
pub fn columns_of(sample: &[Object]) -> (Vec<String>, Vec<Option<ColumnType>>) {
    let mut columns: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut types: Vec<Option<ColumnType>> = Vec::new();
    for (_, Fields(fields)) in sample {
        for (key, value) in fields {
            let i = *index.entry(key.clone()).or_insert_with(|| {
                columns.push(key.clone());
                types.push(None);
                columns.len() - 1
            });
            types[i] = match (types[i], kind(value)) {
                (_, b'{' | b'[') | (Some(ColumnType::Json), _) => Some(ColumnType::Json),
                (_, b'"') => Some(ColumnType::Text),
                (t, _) => t,
            };
        }
    }
    (columns, types)
}

/// Maps each column name to its position, for [`push_object`].
pub fn column_index(columns: &[String]) -> HashMap<&str, usize> {
    columns.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect()
}

/// Appends one object as a row of `columns` (`index` from [`column_index`], `types` from
/// [`columns_of`]): a JSON column gets each value's JSON text as written, any other column a
/// string's text, or a number's or boolean's spelling.
#[allow(clippy::too_many_arguments)]
pub fn push_object(
    batch: &mut Batch,
    columns: &[String],
    index: &HashMap<&str, usize>,
    types: &[Option<ColumnType>],
    line: u64,
    record: u64,
    object: &Fields,
    scratch: &mut Vec<(bool, Option<Vec<u8>>)>,
) -> Result<(), JsonlError> {
    let error = |message: String, column: &str, schema: bool| JsonlError {
        message,
        line,
        record,
        column: Some(column.to_string()),
        schema,
    };
    scratch.clear();
    scratch.resize(columns.len(), (false, None));
    for (key, value) in &object.0 {
        let Some(&i) = index.get(key.as_str()) else {
            return Err(error(
                format!(
                    "key {key:?} is not among the columns found in the first {SAMPLE_LINES} lines ({})",
                    columns.join(", ")
                ),
                key,
                true,
            ));
        };
        if scratch[i].0 {
            return Err(error(format!("key {key:?} appears twice in the object"), key, false));
        }
        let raw = value.get();
        scratch[i].0 = true;
        scratch[i].1 = match (types[i], kind(value)) {
            (_, b'n') => None, // null: NULL
            (Some(ColumnType::Json), _) => Some(raw.as_bytes().to_vec()),
            (_, b'"') => {
                let text: String =
                    serde_json::from_str(raw).map_err(|e| error(format!("invalid JSON string: {e}"), key, false))?;
                if text.contains('\0') {
                    return Err(error("NUL character in a value".into(), key, false));
                }
                Some(text.into_bytes())
            }
            _ => Some(raw.as_bytes().to_vec()),
        };
    }
    batch
        .push_row(line, scratch.iter().map(|(_, f)| f.as_deref()))
        .map_err(|i| error("invalid UTF-8".into(), &columns[i], false))
}
