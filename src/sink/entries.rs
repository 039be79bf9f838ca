//! The ledger in the operator's hands: its rows as [`Entry`]s (`ledger list`, `ledger show`),
//! and `reload`, which lets loaded or failed versions of a key load again.

use serde::Serialize;
use sqlx::{AssertSqlSafe, Database, Encode, Executor, FromRow, IntoArguments, Type};

use super::protocol::{Ledger, RowsAffected};

/// One ledger row: one version of one key, what became of it and when.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Relative to `incoming/`.
    pub key: String,
    pub etag: String,
    pub state: String,
    pub table: Option<String>,
    pub rows: Option<i64>,
    pub bytes: i64,
    pub attempts: i64,
    /// The failure, as its report has it.
    pub error: Option<serde_json::Value>,
    /// The transient errors of earlier attempts.
    pub history: Option<serde_json::Value>,
    /// The process that last held it.
    pub claimed_by: Option<String>,
    pub first_seen_at: Option<String>,
    pub loaded_at: Option<String>,
    pub updated_at: Option<String>,
}

/// Which states [`Ledger::reopen`] takes a version from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// `retry-failed`.
    Failed,
    /// `reload`: loaded or failed.
    Done,
}

impl Reopen {
    pub(crate) fn states(self) -> &'static str {
        match self {
            Reopen::Failed => "('failed')",
            Reopen::Done => "('loaded', 'failed')",
        }
    }
}

/// Which rows `ledger list` shows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<String>,
    pub table: Option<String>,
    /// Relative to `incoming/`: one key's versions.
    pub key: Option<String>,
    pub limit: u32,
}

type EntryRow = (
    String,
    String,
    String,
    Option<String>,
    Option<i64>,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn entry(row: EntryRow) -> Entry {
    let json = |text: Option<String>| text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)));
    let (key, etag, state, table, rows, bytes, attempts, error, history, claimed_by, first, loaded, updated) = row;
    Entry {
        key,
        etag,
        state,
        table,
        rows,
        bytes,
        attempts,
        error: json(error),
        history: json(history),
        claimed_by,
        first_seen_at: first,
        loaded_at: loaded,
        updated_at: updated,
    }
}

impl<DB> Ledger<DB>
where
    DB: Database,
    DB::QueryResult: RowsAffected,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'r> EntryRow: FromRow<'r, DB::Row>,
{
    /// The rows of `source` that `filter` picks, the latest changed first (one key's versions:
    /// the first seen first).
    pub async fn entries(&self, source: &str, filter: &Filter) -> Result<Vec<Entry>, sqlx::Error> {
        let text = self.dialect.text;
        let order = match filter.key {
            Some(_) => "first_seen_at, updated_at",
            None => "updated_at DESC, object_key",
        };
        let sql = self.sql(&format!(
            "SELECT object_key, etag, state, target_table, row_count, byte_count, {{ATTEMPTS}}, error, history,
                    claimed_by, CAST(first_seen_at AS {text}), CAST(loaded_at AS {text}), CAST(updated_at AS {text})
             FROM {{L}} WHERE source = ? AND (? = '' OR state = ?) AND (? = '' OR target_table = ?)
                 AND (? = '' OR object_key = ?)
             ORDER BY {order} LIMIT {}",
            filter.limit.max(1)
        ));
        let state = filter.state.clone().unwrap_or_default();
        let table = filter.table.clone().unwrap_or_default();
        let key = filter.key.clone().unwrap_or_default();
        let rows: Vec<EntryRow> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(source.to_string())
            .bind(state.clone())
            .bind(state)
            .bind(table.clone())
            .bind(table)
            .bind(key.clone())
            .bind(key)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(entry).collect())
    }

    /// The version `etag` of `key`, if it is in one of the states `from` names, becomes pending
    /// with fresh attempts, so that it loads again from `incoming/` (`retry-failed`, `reload`:
    /// the operator asks, so a file that ran out of attempts gets new ones). Other versions
    /// stay as they are: they are not coming back. Returns how many rows changed.
    pub async fn reopen(&self, source: &str, key: &str, etag: &str, from: Reopen) -> Result<u64, sqlx::Error> {
        let _writer = self.writer().await;
        let done = sqlx::query(AssertSqlSafe(self.sql(&format!(
            "UPDATE {{L}} SET state = 'pending', attempts = 0, error = NULL, row_count = NULL, loaded_at = NULL,
                 updated_at = {{NOW}}
             WHERE source = ? AND object_key = ? AND etag = ? AND state IN {}",
            from.states()
        ))))
        .bind(source.to_string())
        .bind(key.to_string())
        .bind(etag.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows())
    }
}
