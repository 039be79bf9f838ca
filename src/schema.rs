//! Table and column names, and the column types inferred from a file's first rows.
//! Names from files are never spliced into SQL unless [`is_safe_identifier`] accepts them; they
//! are then lowercased (as unquoted SQL would fold them) and quoted.

use chrono::{DateTime, NaiveDate, NaiveDateTime};

/// At most this many rows are looked at to infer the types of a new table.
pub const INFERENCE_SAMPLE_ROWS: usize = 1000;

/// Letters, digits and `_`, not starting with a digit, 1 to 63 bytes (PostgreSQL's limit).
pub fn is_safe_identifier(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// The name as stored: lowercased. Only call on names that passed [`is_safe_identifier`].
pub fn normalize(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// A column type the loader can create, in the order inference tries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Integer,
    Float,
    Boolean,
    Date,
    Timestamp,
    TimestampTz,
    Text,
    /// Nested JSON from a JSON lines file (never inferred from text).
    Json,
}

impl ColumnType {
    /// Does `value` (not NULL) fit this type?
    pub fn accepts(self, value: &str) -> bool {
        match self {
            ColumnType::Integer => value.parse::<i64>().is_ok(),
            ColumnType::Float => parse_float(value).is_some(),
            ColumnType::Boolean => parse_bool(value).is_some(),
            ColumnType::Date => NaiveDate::parse_from_str(value, "%Y-%m-%d").is_ok(),
            ColumnType::Timestamp => parse_naive_timestamp(value).is_some(),
            ColumnType::TimestampTz => DateTime::parse_from_rfc3339(value).is_ok(),
            ColumnType::Text | ColumnType::Json => true,
        }
    }
}

/// A value converted to its column's type, ready to bind (for databases that do not parse text
/// themselves, or would store anything in any column, like SQLite).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Null,
    Integer(i64),
    Float(f64),
    Boolean(bool),
    /// Text, and dates and timestamps in their checked text form.
    Text(&'a str),
}

impl ColumnType {
    /// Converts a field (`None` is NULL) to this type, or says why it does not fit.
    pub fn convert(self, value: Option<&str>) -> Result<Value<'_>, String> {
        let Some(value) = value else { return Ok(Value::Null) };
        let mismatch = || format!("{value:?} is not a valid {}", self.describe());
        Ok(match self {
            ColumnType::Integer => Value::Integer(value.parse().map_err(|_| mismatch())?),
            ColumnType::Float => Value::Float(parse_float(value).ok_or_else(mismatch)?),
            ColumnType::Boolean => Value::Boolean(
                match value {
                    "1" => Some(true),
                    "0" => Some(false),
                    v => parse_bool(v),
                }
                .ok_or_else(mismatch)?,
            ),
            ColumnType::Date | ColumnType::Timestamp | ColumnType::TimestampTz => {
                if !self.accepts(value) {
                    return Err(mismatch());
                }
                Value::Text(value)
            }
            ColumnType::Json => {
                if serde_json::from_str::<serde::de::IgnoredAny>(value).is_err() {
                    return Err(mismatch());
                }
                Value::Text(value)
            }
            ColumnType::Text => Value::Text(value),
        })
    }

    /// For messages: the type and the form it accepts.
    pub fn describe(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Float => "number",
            ColumnType::Boolean => "boolean (true/false)",
            ColumnType::Date => "date (YYYY-MM-DD)",
            ColumnType::Timestamp => "timestamp (YYYY-MM-DD HH:MM:SS)",
            ColumnType::TimestampTz => "timestamp with offset (RFC 3339)",
            ColumnType::Text => "text",
            ColumnType::Json => "JSON value",
        }
    }
}

pub fn parse_float(value: &str) -> Option<f64> {
    // Rust accepts "inf" and "NaN"; a column of such words is text, not numbers.
    if !value.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<f64>().ok().filter(|f| f.is_finite())
}

pub fn parse_bool(value: &str) -> Option<bool> {
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

pub fn parse_naive_timestamp(value: &str) -> Option<NaiveDateTime> {
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(value, f).ok())
}

/// Infers one type per column from sample rows: the first type of [`ColumnType`]'s order that
/// accepts every non-NULL value; a column with no value at all is text.
pub struct TypeInference {
    candidates: Vec<Vec<ColumnType>>,
    seen: Vec<bool>,
}

const ORDER: [ColumnType; 6] = [
    ColumnType::Integer,
    ColumnType::Float,
    ColumnType::Boolean,
    ColumnType::Date,
    ColumnType::Timestamp,
    ColumnType::TimestampTz,
];

impl TypeInference {
    pub fn new(columns: usize) -> Self {
        Self {
            candidates: vec![ORDER.to_vec(); columns],
            seen: vec![false; columns],
        }
    }

    /// Narrows the candidates with one value (`None` is NULL and says nothing).
    pub fn observe(&mut self, column: usize, value: Option<&str>) {
        if let Some(v) = value {
            self.seen[column] = true;
            self.candidates[column].retain(|t| t.accepts(v));
        }
    }

    pub fn finish(self) -> Vec<ColumnType> {
        self.candidates
            .into_iter()
            .zip(self.seen)
            .map(|(c, seen)| {
                if seen {
                    c.first().copied().unwrap_or(ColumnType::Text)
                } else {
                    ColumnType::Text
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_safe() {
        for ok in ["orders", "Order_2026", "_x", &"a".repeat(63)] {
            assert!(is_safe_identifier(ok), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "a b",
            "a;drop",
            "a\"b",
            "ä",
            "a-b",
            "a.b",
            &"a".repeat(64),
            "x'--",
        ] {
            assert!(!is_safe_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn inference_picks_the_narrowest_type_that_fits_every_value() {
        let rows: &[&[Option<&str>]] = &[
            &[
                Some("1"),
                Some("1.5"),
                Some("true"),
                Some("2026-11-01"),
                Some("2026-11-01 10:00:00"),
                Some("2026-11-01T10:00:00Z"),
                Some("x"),
                None,
            ],
            &[
                Some("-7"),
                Some("2"),
                Some("FALSE"),
                Some("2026-01-31"),
                Some("2026-11-01T10:00:00.5"),
                Some("2026-11-01T10:00:00+02:00"),
                Some("1"),
                None,
            ],
            &[None, Some("1e3"), None, None, None, None, Some("y"), None],
        ];
        let mut inf = TypeInference::new(8);
        for row in rows {
            for (i, v) in row.iter().enumerate() {
                inf.observe(i, *v);
            }
        }
        use ColumnType::*;
        assert_eq!(
            inf.finish(),
            [Integer, Float, Boolean, Date, Timestamp, TimestampTz, Text, Text]
        );
    }

    #[test]
    fn words_like_nan_and_inf_are_not_numbers() {
        assert!(!ColumnType::Float.accepts("NaN"));
        assert!(!ColumnType::Float.accepts("inf"));
        assert!(ColumnType::Float.accepts("-0.5e-3"));
        assert!(!ColumnType::Integer.accepts("99999999999999999999"));
    }
}
