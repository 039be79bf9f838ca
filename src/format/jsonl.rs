//! JSON lines (NDJSON): one object per line. The columns are the keys found in the first
//! [`SAMPLE_LINES`] lines, in order of first appearance; a key first seen later fails the file
//! (its column would not exist). Strings load as text, numbers and booleans as their JSON text
//! (so the column types still infer), null or a missing key as NULL, and nested objects and
//! arrays as compact JSON (their column becomes `jsonb` in PostgreSQL, `JSON` in MySQL).

use std::io::BufRead;

use serde_json::{Map, Value};

use super::batch::Batch;

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

/// One object and the line it is on.
pub type Object = (u64, Map<String, Value>);

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
            let text = self.text.trim_start_matches('\u{feff}').trim();
            if text.is_empty() {
                continue;
            }
            self.record += 1;
            if text.contains('\0') {
                return Err(ReadError::Bad(self.error("NUL byte in a value".into(), None, false)));
            }
            return match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(map)) => Ok(Some((self.line, map))),
                Ok(_) => Err(ReadError::Bad(self.error(
                    "the line is not a JSON object".into(),
                    None,
                    false,
                ))),
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

/// Columns of the sample, in order of first appearance, and whether each holds nested JSON.
pub fn columns_of(sample: &[Object]) -> (Vec<String>, Vec<bool>) {
    let mut columns: Vec<String> = Vec::new();
    let mut nested: Vec<bool> = Vec::new();
    for (_, object) in sample {
        for (key, value) in object {
            let i = match columns.iter().position(|c| c == key) {
                Some(i) => i,
                None => {
                    columns.push(key.clone());
                    nested.push(false);
                    columns.len() - 1
                }
            };
            nested[i] |= matches!(value, Value::Object(_) | Value::Array(_));
        }
    }
    (columns, nested)
}

/// Appends one object as a row of `columns`.
pub fn push_object(
    batch: &mut Batch,
    columns: &[String],
    line: u64,
    record: u64,
    object: &Map<String, Value>,
    scratch: &mut Vec<Vec<u8>>,
) -> Result<(), JsonlError> {
    if let Some(key) = object.keys().find(|k| !columns.contains(k)) {
        return Err(JsonlError {
            message: format!(
                "key {key:?} is not among the columns found in the first {SAMPLE_LINES} lines ({})",
                columns.join(", ")
            ),
            line,
            record,
            column: Some(key.clone()),
            schema: true,
        });
    }
    scratch.resize_with(columns.len(), Vec::new);
    let mut present = Vec::with_capacity(columns.len());
    for (i, column) in columns.iter().enumerate() {
        let buf = &mut scratch[i];
        buf.clear();
        let value = object.get(column);
        present.push(match value {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => {
                buf.extend_from_slice(s.as_bytes());
                true
            }
            Some(Value::Bool(b)) => {
                buf.extend_from_slice(if *b { b"true" } else { b"false" });
                true
            }
            Some(other) => {
                serde_json::to_writer(&mut *buf, other).expect("writing JSON to memory");
                true
            }
        });
    }
    batch.push_row(
        line,
        scratch.iter().zip(&present).map(|(b, p)| p.then_some(b.as_slice())),
    );
    Ok(())
}
