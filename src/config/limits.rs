//! The `[limits]` section: bounds on what one file may make the loader read or hold.

use serde::Deserialize;

/// Bounds on one file, checked while it is read, so that no file can make the loader hold
/// more than a known amount of memory or decompress without end. A file over a limit goes to
/// `failed/` with a report of kind `limit` naming the key and its value; it is never retried.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of one CSV record (from the end of the previous one, so blank lines before it
    /// count) or of one JSON line. The reader holds about this much of a record at most.
    pub record_bytes: u64,
    /// Bytes of one CSV field (after unquoting). At most `record_bytes`.
    pub field_bytes: u64,
    /// Fields of one CSV record, the header included (checked while it is read); columns of a
    /// JSON lines file. At most 1600, the most columns a table gets.
    pub columns: u64,
    /// Keys of one JSON object (checked while it is parsed).
    pub json_keys: u64,
    /// Bytes a gzip or zstd file may decompress to; 0: no limit.
    pub decompressed_bytes: u64,
    /// Decompressed bytes per compressed byte read, checked once 1 MiB has come out (so a tiny
    /// file is not judged on noise); 0: no limit. gzip cannot exceed about 1032.
    pub compression_ratio: u64,
}

impl Default for LimitsConfig {
    /// See [`crate::format::InputLimits::default`], where each default is explained.
    fn default() -> Self {
        let d = crate::format::InputLimits::default();
        Self {
            record_bytes: d.record_bytes as u64,
            field_bytes: d.field_bytes as u64,
            columns: d.columns as u64,
            json_keys: d.json_keys as u64,
            decompressed_bytes: d.decompressed_bytes,
            compression_ratio: d.compression_ratio,
        }
    }
}

impl LimitsConfig {
    /// The limits as the readers take them (see [`crate::format::InputLimits`]).
    pub fn input_limits(&self) -> crate::format::InputLimits {
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        crate::format::InputLimits {
            record_bytes: size(self.record_bytes),
            field_bytes: size(self.field_bytes),
            columns: size(self.columns),
            json_keys: size(self.json_keys),
            decompressed_bytes: self.decompressed_bytes,
            compression_ratio: self.compression_ratio,
        }
    }

    /// Every value out of range, as "limits.KEY: what is accepted, got VALUE".
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1 << 10..=1 << 30).contains(&self.record_bytes) {
            problems.push(format!(
                "limits.record_bytes: must be between 1024 (1 KiB) and 1073741824 (1 GiB), got {}",
                self.record_bytes
            ));
        }
        if self.field_bytes == 0 || self.field_bytes > self.record_bytes {
            problems.push(format!(
                "limits.field_bytes: must be between 1 and limits.record_bytes ({}), got {}",
                self.record_bytes, self.field_bytes
            ));
        }
        let max_columns = crate::schema::MAX_COLUMNS as u64;
        if !(1..=max_columns).contains(&self.columns) {
            problems.push(format!(
                "limits.columns: must be between 1 and {max_columns} (the most columns a table gets), got {}",
                self.columns
            ));
        }
        if self.json_keys == 0 {
            problems.push("limits.json_keys: must be at least 1".into());
        }
        problems
    }
}
