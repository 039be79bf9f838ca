//! The `[reports]` section: what failure reports and status pages may show of a file's data.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Error texts in failure reports (`failed/K.error.json`), `/status`, the status page and
    /// the log line of a failed file may quote values of the file (`invalid value "x" for
    /// column amount`, the database's own message). false: they carry the error's kind, line,
    /// record and column only. (Keys are always shown; the ledger keeps the full text.)
    pub include_values: bool,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        Self { include_values: true }
    }
}
