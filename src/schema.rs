//! Table and column names, and the column types inferred from a file's first rows.
//! Names from files are never spliced into SQL unless [`is_safe_identifier`] accepts them; they
//! are then lowercased (as unquoted SQL would fold them) and quoted.

/// The most columns a file may have (PostgreSQL's limit per table; others allow more).
pub const MAX_COLUMNS: usize = 1600;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, TimeZone};

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
    /// An exact decimal (PostgreSQL `numeric`, MySQL `DECIMAL`, text in SQLite): never binary
    /// floating point, so `129.90` stays `129.90`.
    Numeric,
    /// Binary floating point: only for columns a user declared so (never inferred).
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
    /// Does `value` (not NULL) fit this type without losing anything? This one rule decides
    /// both what inference may choose and which values a typed column takes: an integer is
    /// written as the database would print it back (`007`, `+7`, `-0` are not integers), a
    /// decimal likewise (`1E2`, `.5`, `00.5` are not), a date is `YYYY-MM-DD`, a timestamp
    /// ISO 8601 with at most 6 fractional digits (the databases keep microseconds), years
    /// 0001 to 9999.
    pub fn accepts(self, value: &str) -> bool {
        match self {
            ColumnType::Integer => is_canonical_integer(value),
            ColumnType::Numeric => is_canonical_decimal(value),
            ColumnType::Float => parse_float(value).is_some(),
            ColumnType::Boolean => parse_bool(value).is_some(),
            ColumnType::Date => parse_iso_date(value).is_some(),
            ColumnType::Timestamp => parse_naive_timestamp(value).is_some(),
            ColumnType::TimestampTz => parse_timestamptz(value).is_some(),
            ColumnType::Text | ColumnType::Json => true,
        }
    }

    /// The type to widen to when a value of a column this load created does not fit:
    /// integers to exact decimals (and, should a value not fit those either, on to text),
    /// everything else to text. `None` for text itself.
    pub fn widened(self) -> Option<ColumnType> {
        match self {
            ColumnType::Text | ColumnType::Json => None,
            ColumnType::Integer => Some(ColumnType::Numeric),
            _ => Some(ColumnType::Text),
        }
    }

    /// The type a route declares (`[routes.column_types]`): the loader's own names, plus the
    /// common SQL spellings.
    pub fn from_declared(name: &str) -> Option<ColumnType> {
        let n = name.trim().to_ascii_lowercase();
        let base = n.split('(').next().unwrap_or("").trim();
        Some(match base {
            "integer" | "int" | "bigint" | "int8" => ColumnType::Integer,
            "numeric" | "decimal" => ColumnType::Numeric,
            "float" | "double" | "double precision" | "real" | "float8" => ColumnType::Float,
            "boolean" | "bool" => ColumnType::Boolean,
            "date" => ColumnType::Date,
            "timestamp" => ColumnType::Timestamp,
            "timestamptz" | "timestamp with time zone" => ColumnType::TimestampTz,
            "text" | "string" | "varchar" => ColumnType::Text,
            "json" | "jsonb" => ColumnType::Json,
            _ => return None,
        })
    }
}

/// What a column's declaration adds to its type: digits after the point (`numeric(p,s)`),
/// fractional seconds (`timestamp(p)`), characters (`varchar(n)`; exactly n for `char(n)`,
/// which pads). The database would round, cut or pad a value beyond them, so such a value
/// fails the file instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub scale: Option<u32>,
    pub fraction: Option<u32>,
    pub chars: Option<u32>,
    pub exact_chars: bool,
}

impl Limits {
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }

    /// `Err` says what the database would do to `value`.
    pub fn check(&self, value: &str) -> Result<(), String> {
        if let Some(scale) = self.scale
            && decimal_scale(value) > scale as usize
        {
            return Err(format!(
                "{value:?} has more than {scale} digits after the point: the column would round it"
            ));
        }
        if let Some(fraction) = self.fraction {
            let digits = value
                .get(19..)
                .and_then(|rest| rest.strip_prefix('.'))
                .map_or(0, |f| f.bytes().take_while(u8::is_ascii_digit).count());
            if digits > fraction as usize {
                return Err(format!(
                    "{value:?} has more than {fraction} fractional digits: the column would round it"
                ));
            }
        }
        if let Some(chars) = self.chars {
            let n = value.chars().count();
            if n > chars as usize || (self.exact_chars && n != chars as usize) {
                let what = if self.exact_chars { "exactly" } else { "at most" };
                return Err(format!(
                    "{value:?} is not {what} {chars} characters long: the column would cut or pad it"
                ));
            }
        }
        Ok(())
    }
}

/// A column's type and limits: what a value must satisfy to be stored exactly as written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColumnCheck {
    pub ty: ColumnType,
    pub limits: Limits,
}

impl ColumnCheck {
    pub fn new(ty: ColumnType) -> ColumnCheck {
        ColumnCheck {
            ty,
            limits: Limits::default(),
        }
    }

    /// Nothing to check: any text fits (the database validates JSON itself).
    pub fn is_trivial(&self) -> bool {
        matches!(self.ty, ColumnType::Text | ColumnType::Json) && self.limits.is_none()
    }

    pub fn check(&self, value: &str) -> Result<(), String> {
        if !self.ty.accepts(value) {
            return Err(format!("{value:?} is not a valid {}", self.ty.describe()));
        }
        self.limits.check(value)
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
    /// Text, and decimals, dates and timestamps in their checked text form.
    Text(&'a str),
}

impl ColumnType {
    /// Converts a field (`None` is NULL) to this type, or says why it does not fit.
    pub fn convert(self, value: Option<&str>) -> Result<Value<'_>, String> {
        let Some(value) = value else { return Ok(Value::Null) };
        let mismatch = || format!("{value:?} is not a valid {}", self.describe());
        Ok(match self {
            // Canonical digits, then one parse (which also checks the 64-bit range).
            ColumnType::Integer if canonical_digits(value.strip_prefix('-').unwrap_or(value)) && value != "-0" => {
                Value::Integer(value.parse().map_err(|_| mismatch())?)
            }
            ColumnType::Float => Value::Float(parse_float(value).ok_or_else(mismatch)?),
            ColumnType::Boolean => Value::Boolean(parse_bool(value).ok_or_else(mismatch)?),
            ColumnType::Json => {
                if serde_json::from_str::<serde::de::IgnoredAny>(value).is_err() {
                    return Err(mismatch());
                }
                Value::Text(value)
            }
            ColumnType::Text => Value::Text(value),
            _ if self.accepts(value) => Value::Text(value),
            _ => return Err(mismatch()),
        })
    }

    /// For messages: the type and the form it accepts.
    /// The loader's name for the type, as `[routes.column_types]` takes it.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "numeric",
            ColumnType::Float => "float",
            ColumnType::Boolean => "boolean",
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamp",
            ColumnType::TimestampTz => "timestamptz",
            ColumnType::Text => "text",
            ColumnType::Json => "json",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Numeric => "decimal",
            ColumnType::Float => "number",
            ColumnType::Boolean => "boolean (true/false)",
            ColumnType::Date => "date (YYYY-MM-DD)",
            ColumnType::Timestamp => "timestamp (YYYY-MM-DD HH:MM:SS[.ffffff])",
            ColumnType::TimestampTz => "timestamp with offset (RFC 3339, at most 6 fractional digits)",
            ColumnType::Text => "text",
            ColumnType::Json => "JSON value",
        }
    }
}

/// `-?(0|[1-9][0-9]*)` within i64, and not `-0`.
pub fn is_canonical_integer(value: &str) -> bool {
    let digits = value.strip_prefix('-').unwrap_or(value);
    canonical_digits(digits) && value != "-0" && value.parse::<i64>().is_ok()
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, at most 1000 digits, and not a negative zero (which the
/// databases print without its sign).
pub fn is_canonical_decimal(value: &str) -> bool {
    let unsigned = value.strip_prefix('-').unwrap_or(value);
    let (int, frac) = match unsigned.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (unsigned, None),
    };
    let frac_ok = frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    let negative_zero = value.starts_with('-') && unsigned.bytes().all(|b| b == b'0' || b == b'.');
    canonical_digits(int) && frac_ok && !negative_zero && unsigned.len() <= 1000
}

fn canonical_digits(d: &str) -> bool {
    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && (d == "0" || !d.starts_with('0'))
}

/// The number of digits after the decimal point of a canonical decimal.
pub fn decimal_scale(value: &str) -> usize {
    value.split_once('.').map_or(0, |(_, f)| f.len())
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

/// Exactly `YYYY-MM-DD`, a real date, year 0001 to 9999.
pub fn parse_iso_date(value: &str) -> Option<NaiveDate> {
    let b = value.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    // Digits only, checked above: no format parser needed (this runs for every value).
    let year = digits(&b[..4]) as i32;
    if year == 0 {
        return None;
    }
    NaiveDate::from_ymd_opt(year, digits(&b[5..7]), digits(&b[8..10]))
}

/// The number ASCII digits spell (callers check they are digits).
fn digits(b: &[u8]) -> u32 {
    b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'))
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,6}]`, the rest of the text after the seconds returned.
fn split_timestamp(value: &str) -> Option<(NaiveDateTime, &str)> {
    let b = value.as_bytes();
    if b.len() < 19 || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let date = parse_iso_date(value.get(..10)?)?;
    let time = value.get(11..19)?;
    let t = time.as_bytes();
    if !(t[2] == b':'
        && t[5] == b':'
        && t.iter()
            .enumerate()
            .all(|(i, c)| i == 2 || i == 5 || c.is_ascii_digit()))
    {
        return None;
    }
    if &time[6..] == "60" {
        return None; // a leap second: PostgreSQL would read it as the next minute
    }
    let mut rest = &value[19..];
    let mut micros = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = frac[..n].parse::<u32>().ok()? * 10u32.pow(6 - n as u32);
        rest = &frac[n..];
    }
    let time = chrono::NaiveTime::from_hms_micro_opt(digits(&t[..2]), digits(&t[3..5]), digits(&t[6..8]), micros)?;
    Some((date.and_time(time), rest))
}

pub fn parse_naive_timestamp(value: &str) -> Option<NaiveDateTime> {
    split_timestamp(value)
        .filter(|(_, rest)| rest.is_empty())
        .map(|(t, _)| t)
}

/// An ISO 8601 timestamp with `Z` or a `±HH:MM` offset; its UTC instant within years 0001-9999.
pub fn parse_timestamptz(value: &str) -> Option<DateTime<chrono::FixedOffset>> {
    let (local, offset) = split_timestamp(value)?;
    let o = offset.as_bytes();
    // PostgreSQL takes offsets up to ±15:59.
    let offset_ok = offset == "Z"
        || (o.len() == 6
            && (o[0] == b'+' || o[0] == b'-')
            && o[3] == b':'
            && [1, 2, 4, 5].iter().all(|&i| o[i].is_ascii_digit())
            && offset[1..3] <= *"15"
            && offset[4..6] <= *"59");
    if !offset_ok {
        return None;
    }
    let seconds = if offset == "Z" {
        0
    } else {
        let sign = if o[0] == b'-' { -1 } else { 1 };
        sign * (digits(&o[1..3]) * 3600 + digits(&o[4..6]) * 60) as i32
    };
    let parsed = chrono::FixedOffset::east_opt(seconds)?
        .from_local_datetime(&local)
        .single()?;
    let year = parsed.naive_utc().year();
    (1..=9999).contains(&year).then_some(parsed)
}

/// Infers one type per column from sample rows: the first type of [`ORDER`] that accepts every
/// non-NULL value; a column with no value at all is text.
pub struct TypeInference {
    candidates: Vec<Vec<ColumnType>>,
    seen: Vec<bool>,
}

/// What inference may choose, narrowest first. Never binary floating point.
const ORDER: [ColumnType; 6] = [
    ColumnType::Integer,
    ColumnType::Numeric,
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
            // A boolean is inferred only from its lowercase spelling, the one the databases
            // print back; a column of `TRUE` stays text (a declared boolean takes any case).
            let lowercase = v == "true" || v == "false";
            self.candidates[column].retain(|t| t.accepts(v) && (*t != ColumnType::Boolean || lowercase));
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
mod tests;
