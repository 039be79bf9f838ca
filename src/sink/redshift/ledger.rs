//! The Redshift ledger: its table, and the statements of the batch protocol. Redshift has no
//! `SKIP LOCKED` and no `ON CONFLICT`: a `LOCK` on the ledger makes replicas take turns, and
//! times are bound by the loader (no function common to Redshift and the PostgreSQL the tests
//! use stands in).

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::{BatchOutcome, RedshiftSink, db};
use crate::error::{FileError, LoadError, Stage};
use crate::sink::entries::Reopen;
use crate::sink::protocol::Ledger;
use crate::sink::{LedgerRow, LoadOutcome, append_history, db_error, file_id, outcome_of_state, retries_exhausted};
use crate::source::{ObjectMeta, Source};

impl RedshiftSink {
    pub async fn ensure_ledger(&self) -> Result<(), sqlx::Error> {
        // No defaults that only one of Redshift and PostgreSQL knows: the loader sets times.
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} (
                file_id VARCHAR(64) NOT NULL PRIMARY KEY, source VARCHAR(1024) NOT NULL,
                object_key VARCHAR(1024) NOT NULL, etag VARCHAR(256) NOT NULL, state VARCHAR(16) NOT NULL,
                target_table VARCHAR(64), row_count BIGINT, byte_count BIGINT NOT NULL, attempts INTEGER NOT NULL,
                error VARCHAR(65535), history VARCHAR(65535), claimed_by VARCHAR(256),
                first_seen_at TIMESTAMPTZ NOT NULL, loaded_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL
            )",
            self.options.ledger
        )))
        .execute(&self.pool)
        .await?;
        #[cfg(feature = "redshift-emulation")]
        if self.config.copy == crate::config::redshift::CopyMode::PostgresEmulation {
            super::copy::Emulated::create_log(&self.pool).await?;
        }
        Ok(())
    }

    /// See [`Ledger::reopen`]; times are bound (see the module docs).
    pub async fn reopen(&self, source: &str, key: &str, etag: &str, from: Reopen) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET state = 'pending', attempts = 0, error = NULL, row_count = NULL, loaded_at = NULL,
                 updated_at = $3
             WHERE source = $1 AND object_key = $2 AND etag = $4 AND state IN {}",
            self.options.ledger,
            from.states()
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(source)
            .bind(key)
            .bind(chrono::Utc::now())
            .bind(etag)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// The ledger's generic statements, for reading it (its SQL there is common to Redshift
    /// and PostgreSQL).
    pub(crate) fn reader(&self) -> Ledger<Postgres> {
        Ledger::new(self.pool.clone(), &self.options, crate::sink::postgres::DIALECT, None)
    }

    pub async fn record_transient(&self, id: &str, stage: Stage, message: &str) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!("LOCK {ledger}")))
            .execute(&mut *tx)
            .await?;
        let history: Option<(Option<String>,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT history FROM {ledger} WHERE file_id = $1 AND state = 'pending'"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((history,)) = history {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {ledger} SET history = $2, updated_at = $3 WHERE file_id = $1"
            )))
            .bind(id)
            .bind(append_history(history.as_deref(), stage, message))
            .bind(chrono::Utc::now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Records each file in the ledger and settles those it already knows (loaded, failed, out
    /// of attempts); returns their outcomes and the files left to load.
    pub(super) async fn pending<'f>(
        &self,
        tx: &mut PgConnection,
        source: &Source,
        files: &'f [ObjectMeta],
        table: &String,
    ) -> Result<(BatchOutcome, Vec<&'f ObjectMeta>), LoadError> {
        let ledger = &self.options.ledger;
        let mut out: BatchOutcome = Vec::new();
        let mut todo = Vec::new();
        for f in files {
            self.ensure_row(tx, source, f).await?;
            let id = file_id(source.id(), f);
            let (state, rows, error, attempts, history): LedgerRow = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT state, row_count, error, CAST(attempts AS BIGINT), history FROM {ledger} WHERE file_id = $1"
            )))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            if let Some(done) = outcome_of_state(&state, rows, error) {
                out.push((f.clone(), Ok(done)));
            } else if attempts >= i64::from(self.options.max_attempts) {
                let error = retries_exhausted(attempts, history.as_deref());
                self.set_failed(tx, &id, &error, Some(table)).await?;
                out.push((f.clone(), Ok(LoadOutcome::Failed(error))));
            } else {
                todo.push(f);
            }
        }
        Ok((out, todo))
    }

    /// Counts an attempt at a pending file.
    pub(super) async fn count_attempt(&self, tx: &mut PgConnection, id: &str) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET attempts = attempts + 1, claimed_by = $2, updated_at = $3 WHERE file_id = $1 AND state = 'pending'",
            self.options.ledger
        )))
        .bind(id)
        .bind(&self.options.owner)
        .bind(chrono::Utc::now())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Of `todo` (counted already), the files still pending; the outcomes of the others.
    pub(super) async fn still_pending<'f>(
        &self,
        tx: &mut PgConnection,
        source: &Source,
        todo: Vec<&'f ObjectMeta>,
    ) -> Result<(BatchOutcome, Vec<&'f ObjectMeta>), LoadError> {
        let mut out: BatchOutcome = Vec::new();
        let mut pending = Vec::new();
        for f in todo {
            let (state, rows, error): (String, Option<i64>, Option<String>) = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT state, row_count, error FROM {} WHERE file_id = $1",
                self.options.ledger
            )))
            .bind(file_id(source.id(), f))
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            match outcome_of_state(&state, rows, error) {
                Some(done) => out.push((f.clone(), Ok(done))),
                None => pending.push(f),
            }
        }
        Ok((out, pending))
    }

    pub(super) async fn set_loaded(
        &self,
        tx: &mut PgConnection,
        id: &str,
        rows: u64,
        table: &str,
    ) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = 'loaded', row_count = $2, target_table = $3, error = NULL,
             claimed_by = $4, loaded_at = $5, updated_at = $5 WHERE file_id = $1",
            self.options.ledger
        )))
        .bind(id)
        .bind(rows as i64)
        .bind(table)
        .bind(&self.options.owner)
        .bind(chrono::Utc::now())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// A transaction holding the ledger's lock: replicas take turns.
    pub(super) async fn lock(&self) -> Result<Transaction<'static, Postgres>, LoadError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        self.lock_ledger(&mut tx).await?;
        Ok(tx)
    }

    /// Takes the ledger's lock in the transaction open on `tx`.
    pub(super) async fn lock_ledger(&self, tx: &mut PgConnection) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!("LOCK {}", self.options.ledger)))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        Ok(())
    }

    pub(super) async fn ensure_row(
        &self,
        tx: &mut PgConnection,
        source: &Source,
        f: &ObjectMeta,
    ) -> Result<(), LoadError> {
        let ledger = &self.options.ledger;
        let now = chrono::Utc::now();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {ledger} (file_id, source, object_key, etag, state, byte_count, attempts, first_seen_at, updated_at)
             SELECT $1, $2, $3, $4, 'pending', $5, 0, $6, $6 WHERE NOT EXISTS (SELECT 1 FROM {ledger} WHERE file_id = $1)"
        )))
        .bind(file_id(source.id(), f))
        .bind(source.id())
        .bind(&f.key)
        .bind(&f.etag)
        .bind(f.size as i64)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    pub(super) async fn set_failed(
        &self,
        tx: &mut PgConnection,
        id: &str,
        error: &FileError,
        table: Option<&String>,
    ) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = 'failed', error = $2, target_table = $3, claimed_by = $4,
             updated_at = $5 WHERE file_id = $1",
            self.options.ledger
        )))
        .bind(id)
        .bind(serde_json::to_string(error).unwrap_or_default())
        .bind(table)
        .bind(&self.options.owner)
        .bind(chrono::Utc::now())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }
}
