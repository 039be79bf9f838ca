//! A batch of decoded rows in one flat buffer: no allocation per row or per field.

use crate::error::{FileError, FileErrorKind};

/// Rows of `width` fields each. Field text is stored back to back in one buffer; NULL is a
/// flag, distinct from the empty string.
#[derive(Debug, Default)]
pub struct Batch {
    /// Every field's text, each checked to be UTF-8 on its own when it was pushed.
    text: String,
    /// End offset in `text` of every field, row after row.
    ends: Vec<usize>,
    nulls: Vec<bool>,
    width: usize,
    /// Line (1-based, in the file) where each row starts.
    lines: Vec<u64>,
    /// Data record number (1-based, header excluded) of the first row.
    first_record: u64,
}

impl Batch {
    pub fn new(width: usize, first_record: u64) -> Batch {
        Batch {
            width,
            first_record,
            ..Batch::default()
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Fields per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of field text held.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// The field, or `None` for NULL.
    pub fn get(&self, row: usize, column: usize) -> Option<&str> {
        let i = row * self.width + column;
        if self.nulls[i] {
            return None;
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.text[start..self.ends[i]])
    }

    /// The row's fields in order.
    pub fn row(&self, row: usize) -> impl Iterator<Item = Option<&str>> + '_ {
        (0..self.width).map(move |c| self.get(row, c))
    }

    pub fn line(&self, row: usize) -> u64 {
        self.lines[row]
    }

    pub fn record(&self, row: usize) -> u64 {
        self.first_record + row as u64
    }

    /// An error about a value of `row` in `column`, placed at its line and record.
    pub fn error_at(&self, row: usize, column: &str, kind: FileErrorKind, message: String) -> FileError {
        FileError::new(kind, message)
            .at_line(Some(self.line(row)))
            .at_record(Some(self.record(row)))
            .in_column(column)
    }

    /// The rows as owned strings (for tests and small tools).
    pub fn into_strings(self) -> Vec<Vec<Option<String>>> {
        (0..self.len())
            .map(|r| self.row(r).map(|f| f.map(str::to_string)).collect())
            .collect()
    }

    /// A batch of the given rows (`None` is NULL), each of `width` fields.
    pub fn from_rows(width: usize, rows: &[&[Option<&str>]]) -> Batch {
        let mut batch = Batch::new(width, 1);
        for (i, row) in rows.iter().enumerate() {
            let pushed = batch.push_row(i as u64 + 2, row.iter().map(|f| f.map(str::as_bytes)));
            debug_assert!(pushed.is_ok(), "&str is UTF-8");
        }
        batch
    }

    /// Appends a row (decoders only): `fields` must yield `width` items, `None` for NULL.
    /// Each field is checked to be UTF-8 on its own (bytes that are valid only when joined
    /// with their neighbour are not); on the first that is not, nothing of the row is kept
    /// and its index is returned.
    pub(super) fn push_row<'a>(
        &mut self,
        line: u64,
        fields: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Result<(), usize> {
        let (text_len, fields_len) = (self.text.len(), self.ends.len());
        for (i, field) in fields.enumerate() {
            match field {
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => {
                        self.text.push_str(text);
                        self.nulls.push(false);
                    }
                    Err(_) => {
                        self.text.truncate(text_len);
                        self.ends.truncate(fields_len);
                        self.nulls.truncate(fields_len);
                        return Err(i);
                    }
                },
                None => self.nulls.push(true),
            }
            self.ends.push(self.text.len());
        }
        self.lines.push(line);
        debug_assert_eq!(self.ends.len(), self.lines.len() * self.width);
        Ok(())
    }
}
