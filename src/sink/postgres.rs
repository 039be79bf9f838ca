//! PostgreSQL: rows go in through `COPY ... FROM STDIN (FORMAT csv)`, streamed batch by batch;
//! claims are row locks on the ledger taken with `SKIP LOCKED`, so replicas never wait on, or
//! load, a file another one holds.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::{
    FileRef, LedgerRow, Lineage, LoadOutcome, Plan, SinkOptions, append_history, check_values, db_error, file_columns,
    outcome_of_state, plan_load, quote_ident, retries_exhausted, rows_of, state, widened_spec,
};
use crate::config::Config;
use crate::error::{FileError, LoadError, Stage};
use crate::format::{Batch, Mode, RawChunk, Stream, passthrough_possible};
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::{ColumnCheck, ColumnType, Limits};

pub struct PgSink {
    pool: PgPool,
    options: SinkOptions,
    /// Quoted name of the claims table: who holds which file, until when (the lease).
    claims: String,
    /// Columns of the tables seen so far, to spare a catalog query per file. Refreshed when a
    /// file needs a column the cache does not know, and dropped when a load fails.
    columns: std::sync::Mutex<std::collections::HashMap<String, TableInfo>>,
    /// `database.passthrough`.
    passthrough: bool,
}

/// A table's columns with their types, and the limits their declarations add.
type TableInfo = (Vec<(String, ColumnType)>, std::collections::HashMap<String, Limits>);

/// What each planned column must satisfy: its type, and the limits of an existing column.
fn checks_of(plan: &Plan, limits: &std::collections::HashMap<String, Limits>) -> Vec<ColumnCheck> {
    plan.columns
        .iter()
        .zip(&plan.types)
        .map(|(c, t)| ColumnCheck {
            ty: *t,
            limits: limits.get(c).copied().unwrap_or_default(),
        })
        .collect()
}

/// See [`super::nodelay`]: finds this connection's socket by its ports (none on a Unix socket).
pub(crate) async fn disable_nagle(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let (client, server): (Option<i32>, Option<i32>) = sqlx::query_as("SELECT inet_client_port(), inet_server_port()")
        .fetch_one(&mut *conn)
        .await?;
    if let (Some(client), Some(server)) = (client, server) {
        // The server's view: its port is our peer's, its client port is our local one.
        if !super::nodelay::set_nodelay(client as u16, server as u16) {
            tracing::debug!("could not find the database socket to set TCP_NODELAY");
        }
    }
    Ok(())
}

/// The advisory lock key of a file: the first 64 bits of its id.
fn lock_key(id: &str) -> i64 {
    u64::from_str_radix(&id[..16], 16).unwrap_or(0) as i64
}

/// Keeps a claim's lease alive while its load runs; stops (and releases nothing) when dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgSink {
    pub fn connect_lazy(url: &str, config: &Config, options: SinkOptions) -> anyhow::Result<PgSink> {
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("database.url: {}", crate::redact::scrub(&e.to_string(), &[url])))?
            .application_name("s3-sql-loader")
            // A host that dies or is cut off without closing its connections: the server notices
            // within about a minute and rolls their transactions back.
            .options([
                ("tcp_keepalives_idle", "30"),
                ("tcp_keepalives_interval", "10"),
                ("tcp_keepalives_count", "3"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.database.connect_timeout)
            .after_connect(|conn, _| Box::pin(async move { disable_nagle(conn).await }))
            .connect_lazy_with(connect);
        let claims = quote_ident(&format!("{}_claims", config.database.ledger_table));
        Ok(PgSink {
            pool,
            options,
            claims,
            columns: Default::default(),
            passthrough: config.database.passthrough,
        })
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(quote_ident(table))
            .fetch_one(&self.pool)
            .await
    }

    pub async fn close(&self) {
        self.pool.close().await
    }

    pub async fn ensure_ledger(&self) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let index = quote_ident(&format!("{}_key_idx", ledger.trim_matches('"')));
        // Look in the catalog first: DDL, even `IF NOT EXISTS`, waits for the table's locks,
        // which every load in flight holds until it commits.
        let (has_ledger, has_index, has_claims): (bool, bool, bool) = sqlx::query_as(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, to_regclass($3) IS NOT NULL",
        )
        .bind(ledger)
        .bind(&index)
        .bind(&self.claims)
        .fetch_one(&self.pool)
        .await?;
        if has_ledger && has_index && has_claims {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Replicas starting together would race on CREATE TABLE IF NOT EXISTS; serialize them.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("s3-sql-loader:{ledger}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {ledger} (
                file_id       text PRIMARY KEY,
                source        text NOT NULL,
                object_key    text NOT NULL,
                etag          text NOT NULL,
                state         text NOT NULL,
                target_table  text,
                row_count     bigint,
                byte_count    bigint NOT NULL,
                attempts      integer NOT NULL DEFAULT 0,
                error         text,
                history       text,
                claimed_by    text,
                first_seen_at timestamptz NOT NULL DEFAULT now(),
                loaded_at     timestamptz,
                updated_at    timestamptz NOT NULL DEFAULT now()
            )"
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "CREATE INDEX IF NOT EXISTS {index} ON {ledger} (source, object_key)"
        )))
        .execute(&mut *tx)
        .await?;
        // Unlogged: leases are worth nothing after a server crash (every claim is gone then).
        sqlx::query(AssertSqlSafe(format!(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} (
                file_id     text PRIMARY KEY,
                owner       text NOT NULL,
                backend_pid integer NOT NULL,
                claimed_at  timestamptz NOT NULL,
                expires_at  timestamptz NOT NULL
            )",
            self.claims
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Records who holds the file (the load transaction's server process) and until when, and
    /// renews that every third of the lease while the load runs.
    async fn hold_claim(&self, id: &str, pid: i32) -> Result<Heartbeat, sqlx::Error> {
        let lease = self.options.lease.as_secs_f64();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (file_id, owner, backend_pid, claimed_at, expires_at)
             VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4))
             ON CONFLICT (file_id) DO UPDATE SET owner = excluded.owner, backend_pid = excluded.backend_pid,
                 claimed_at = excluded.claimed_at, expires_at = excluded.expires_at",
            self.claims
        )))
        .bind(id)
        .bind(&self.options.owner)
        .bind(pid)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        let renew = format!(
            "UPDATE {} SET expires_at = now() + make_interval(secs => $3) WHERE file_id = $1 AND backend_pid = $2",
            self.claims
        );
        let (pool, id, period) = (self.pool.clone(), id.to_string(), self.options.lease / 3);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let renewed = sqlx::query(AssertSqlSafe(renew.as_str()))
                    .bind(&id)
                    .bind(pid)
                    .bind(lease)
                    .execute(&pool)
                    .await;
                if let Err(e) = renewed {
                    tracing::warn!(error.message = %e, "could not renew the claim's lease");
                }
            }
        });
        Ok(Heartbeat(task))
    }

    async fn release_claim(&self, id: &str, pid: i32) {
        let released = sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE file_id = $1 AND backend_pid = $2",
            self.claims
        )))
        .bind(id)
        .bind(pid)
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::debug!(error.message = %e, "could not release the claim (it expires by itself)");
        }
    }

    /// The file is locked by another load: if that load's lease ran out (its process is frozen
    /// or cut off), end its server session, which rolls its transaction back and frees the
    /// file for the next tick. Only the session that holds this file's lock right now is
    /// ended, and only if it started before the claim (so the process id is still its own).
    async fn take_over_if_expired(&self, id: &str) -> Result<(), sqlx::Error> {
        let key = lock_key(id);
        let ended: Vec<(bool,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT pg_terminate_backend(a.pid) FROM {} c
             JOIN pg_stat_activity a ON a.pid = c.backend_pid
             JOIN pg_locks l ON l.pid = c.backend_pid AND l.locktype = 'advisory' AND l.granted
                 AND l.classid = (($2 >> 32) & 4294967295)::oid AND l.objid = ($2 & 4294967295)::oid AND l.objsubid = 1
             WHERE c.file_id = $1 AND c.expires_at < now() AND a.backend_start <= c.claimed_at",
            self.claims
        )))
        .bind(id)
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        if ended.iter().any(|(done,)| *done) {
            tracing::warn!("the claim's lease expired: ended the holder's session; its transaction rolls back");
        }
        Ok(())
    }

    pub async fn reset_failed(&self, source: &str, key: &str) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET state = 'pending', error = NULL, updated_at = now() WHERE source = $1 AND object_key = $2 AND state = 'failed'",
            self.options.ledger
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(source)
            .bind(key)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn load<F, Fut>(&self, file: FileRef<'_>, spec: &LoadSpec, open: F) -> Result<LoadOutcome, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let ledger = &self.options.ledger;
        let id = file.id();
        let db = |e| db_error(e, Stage::Database);

        // The claim: a transaction-scoped advisory lock on the file, tried without waiting, so
        // a file another loader holds is skipped. Only the holder writes the ledger row, so
        // its INSERT never waits on another loader's uncommitted one.
        let mut tx = self.pool.begin().await.map_err(db)?;
        let (claimed, pid): (bool, i32) = sqlx::query_as("SELECT pg_try_advisory_xact_lock($1), pg_backend_pid()")
            .bind(lock_key(&id))
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        if !claimed {
            drop(tx);
            self.take_over_if_expired(&id).await.map_err(db)?;
            return Ok(LoadOutcome::Busy);
        }
        // The attempt counts now, committed on its own (not in the load's transaction): a load
        // that kills the process still counts, so a file that always does ends in failed/
        // instead of stopping the pipeline. Only the claim holder gets here, and the load's
        // transaction has not touched the ledger row, so this never waits on it.
        let counted: Option<LedgerRow> = sqlx::query_as(AssertSqlSafe(format!(
            "INSERT INTO {ledger} AS l (file_id, source, object_key, etag, state, byte_count, attempts, claimed_by)
             VALUES ($1, $2, $3, $4, 'pending', $5, 1, $7)
             ON CONFLICT (file_id) DO UPDATE SET attempts = l.attempts + 1, claimed_by = $7, updated_at = now()
                 WHERE l.state = 'pending' AND l.attempts < $6
             RETURNING state, row_count, error, attempts::bigint, history"
        )))
        .bind(&id)
        .bind(file.source)
        .bind(file.key)
        .bind(file.etag)
        .bind(file.size as i64)
        .bind(i64::from(self.options.max_attempts))
        .bind(&self.options.owner)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let counted_now = counted.is_some();
        let (current, rows, error, attempts, history) = match counted {
            Some(row) => row,
            // Loaded or failed already, or out of attempts: as the ledger says.
            None => sqlx::query_as(AssertSqlSafe(format!(
                "SELECT state, row_count, error, attempts::bigint, history FROM {ledger} WHERE file_id = $1"
            )))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?,
        };
        if let Some(done) = outcome_of_state(&current, rows, error) {
            return Ok(done);
        }
        if !counted_now {
            // Pending, and its attempts are used up (the last ones may have died mid-load).
            let error = retries_exhausted(attempts, history.as_deref());
            self.mark_failed(&mut tx, &id, &error, spec.table.as_ref().ok()).await?;
            tx.commit().await.map_err(db)?;
            return Ok(LoadOutcome::Failed(error));
        }
        let heartbeat = self.hold_claim(&id, pid).await.map_err(db)?;
        let outcome = self.load_claimed(tx, file, spec, open).await;
        drop(heartbeat);
        self.release_claim(&id, pid).await;
        outcome
    }

    /// Steps 4 and 5 of the module docs, on a claimed file.
    async fn load_claimed<F, Fut>(
        &self,
        mut tx: Transaction<'static, Postgres>,
        file: FileRef<'_>,
        spec: &LoadSpec,
        open: F,
    ) -> Result<LoadOutcome, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let ledger = &self.options.ledger;
        let db = |e| db_error(e, Stage::Database);
        sqlx::query("SAVEPOINT file_rows").execute(&mut *tx).await.map_err(db)?;
        let id = &file.id();
        let table = spec.table.as_ref().ok().cloned();
        let mut spec = std::borrow::Cow::Borrowed(spec);
        let copied = loop {
            let mut new_columns = Vec::new();
            let copied = self.copy_rows(&mut tx, file, &spec, &open, &mut new_columns).await;
            if let (Err(_), Some(t)) = (&copied, &table) {
                self.forget_columns(t);
            }
            // A value that does not fit a column this load created: undo the attempt (its
            // CREATE TABLE included) and load again with that column widened.
            match copied.as_ref().err().and_then(|e| widened_spec(e, &new_columns, &spec)) {
                Some(wider) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    spec = std::borrow::Cow::Owned(wider);
                }
                None => break copied,
            }
        };
        // The table changed under a cached view of it (dropped, a column renamed): retry.
        let copied = match copied {
            Err(LoadError::Permanent(e))
                if e.kind == crate::error::FileErrorKind::Schema && e.database_message.is_some() =>
            {
                Err(LoadError::transient(Stage::Database, e.message))
            }
            other => other,
        };
        match copied {
            Ok(rows) => {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {ledger} SET state = '{}', row_count = $2, target_table = $3, error = NULL,
                     claimed_by = $4, loaded_at = now(), updated_at = now()
                     WHERE file_id = $1",
                    state::LOADED
                )))
                .bind(id)
                .bind(rows as i64)
                .bind(table)
                .bind(&self.options.owner)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Loaded { rows })
            }
            Err(LoadError::Permanent(error)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                self.mark_failed(&mut tx, id, &error, table.as_ref()).await?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Failed(error))
            }
            // Dropping the transaction rolls it back: nothing of the file stays.
            Err(transient) => Err(transient),
        }
    }

    async fn mark_failed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        id: &str,
        error: &FileError,
        table: Option<&String>,
    ) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = '{}', error = $2, target_table = $3, claimed_by = $4,
             updated_at = now() WHERE file_id = $1",
            self.options.ledger,
            state::FAILED
        )))
        .bind(id)
        .bind(serde_json::to_string(error).unwrap_or_default())
        .bind(table)
        .bind(&self.options.owner)
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    pub async fn record_transient(&self, file: FileRef<'_>, stage: Stage, message: &str) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let mut tx = self.pool.begin().await?;
        // Every attempt counted itself when it started, so its outcome is added whoever holds
        // the file now (not under the file's claim: the failed load's transaction may still be
        // rolling back and holding it, and its outcome would be lost, the attempt then looking
        // like a crash). The row lock keeps concurrent additions from overwriting each other.
        // The row is missing only if the count itself never happened.
        let row: Option<(String, Option<String>)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT state, history FROM {ledger} WHERE file_id = $1 FOR UPDATE"
        )))
        .bind(file.id())
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {ledger} (file_id, source, object_key, etag, state, byte_count, attempts, history)
                     VALUES ($1, $2, $3, $4, 'pending', $5, 1, $6) ON CONFLICT (file_id) DO NOTHING"
                )))
                .bind(file.id())
                .bind(file.source)
                .bind(file.key)
                .bind(file.etag)
                .bind(file.size as i64)
                .bind(append_history(None, stage, message))
                .execute(&mut *tx)
                .await?;
            }
            // The attempt was counted when it started: only its outcome is added.
            Some((state, history)) if state == state::PENDING => {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE {ledger} SET history = $2, updated_at = now() WHERE file_id = $1"
                )))
                .bind(file.id())
                .bind(append_history(history.as_deref(), stage, message))
                .execute(&mut *tx)
                .await?;
            }
            Some(_) => {}
        }
        tx.commit().await
    }

    /// Checks, creates or widens the table and streams the file into it with COPY (through a
    /// staging table for upserts). Returns the row count. CSV goes through as raw bytes when
    /// it can (see [`crate::format::raw`]), else through the parser.
    async fn copy_rows<F, Fut>(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        file: FileRef<'_>,
        spec: &LoadSpec,
        open: &F,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<u64, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let table = spec.table.clone()?;
        let passthrough = self.passthrough && passthrough_possible(file.key, &spec.format) && !spec.metadata_columns;
        if passthrough && let Some(rows) = self.copy_raw(tx, &table, spec, open, new_columns).await? {
            return Ok(rows);
        }
        let mut decoded = rows_of(open(Mode::Rows).await?);
        if decoded.header.is_empty() {
            return Ok(0); // a 0-byte file: nothing to load, nothing to create
        }
        let file_cols = file_columns(&decoded.header)?;
        let first = decoded.next_batch().await?;
        let Some((plan, checks)) = self
            .plan(tx, &table, &file_cols, &decoded.types, spec, first.as_ref())
            .await?
        else {
            return Ok(0); // header only: no rows, and no sample to create the table from
        };
        *new_columns = plan.new_columns();
        self.prepare_table(tx, &table, &plan, spec).await?;
        let into = self.copy_target(tx, &table, spec).await?;
        let column_list = plan
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let lineage = spec.metadata_columns.then(|| Lineage::new(&file));
        let statement = format!("COPY {into} ({column_list}) FROM STDIN WITH (FORMAT csv)");
        let mut copy = tx
            .copy_in_raw(&statement)
            .await
            .map_err(|e| copy_error(e, &plan.columns, 0))?;
        let mut buffer = Vec::with_capacity(1 << 20);
        let mut batch = first;
        let sent: Result<(), LoadError> = async {
            while let Some(b) = batch {
                check_values(&b, &plan.columns, &checks)?;
                buffer.clear();
                encode_csv(&b, lineage.as_ref(), &mut buffer);
                copy.send(buffer.as_slice())
                    .await
                    .map_err(|e| copy_error(e, &plan.columns, 0))?;
                batch = decoded.next_batch().await?;
            }
            Ok(())
        }
        .await;
        let rows = match sent {
            Ok(()) => copy.finish().await.map_err(|e| copy_error(e, &plan.columns, 0))?,
            Err(e) => {
                // Abort ends COPY with an error: the server discards what it received.
                let _ = copy.abort(e.to_string()).await;
                return Err(e);
            }
        };
        self.merge_stage(tx, &table, &plan.columns, spec).await?;
        Ok(rows)
    }

    /// The passthrough: `Ok(None)` when the file must go through the parser after all
    /// (whatever was sent, and any column added, is rolled back to the load's savepoint first).
    async fn copy_raw<F, Fut>(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        spec: &LoadSpec,
        open: &F,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<Option<u64>, LoadError>
    where
        F: Fn(Mode) -> Fut,
        Fut: std::future::Future<Output = Result<Stream, LoadError>>,
    {
        let db = |e| db_error(e, Stage::Database);
        let mut raw = match open(Mode::Raw).await {
            Ok(Stream::Raw(raw)) => raw,
            Ok(Stream::Rows(_)) => unreachable!("opened in Mode::Raw"),
            Err(LoadError::Transient {
                stage: Stage::Decode, ..
            }) => return Ok(None), // unsuitable
            Err(e) => return Err(e),
        };
        if raw.header.is_empty() {
            return Ok(Some(0));
        }
        let file_cols = file_columns(&raw.header)?;
        let fixed = vec![None; file_cols.len()];
        let Some((plan, checks)) = self
            .plan(tx, table, &file_cols, &fixed, spec, raw.sample.as_ref())
            .await?
        else {
            return Ok(Some(0)); // header only
        };
        *new_columns = plan.new_columns();
        self.prepare_table(tx, table, &plan, spec).await?;
        raw.check_types(
            checks
                .iter()
                .take(file_cols.len())
                .map(|c| (!c.is_trivial()).then_some(*c))
                .collect(),
        );
        let into = self.copy_target(tx, table, spec).await?;
        let f = &spec.format;
        let statement = format!(
            "COPY {into} ({}) FROM STDIN WITH (FORMAT csv, HEADER {}, DELIMITER {}, QUOTE {}, NULL {})",
            plan.columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", "),
            raw.has_header,
            byte_literal(f.delimiter),
            byte_literal(f.quote),
            string_literal(&f.null),
        );
        let header_lines = u64::from(raw.has_header);
        let mut copy = tx
            .copy_in_raw(&statement)
            .await
            .map_err(|e| copy_error(e, &plan.columns, header_lines))?;
        let sent: Result<Option<u64>, LoadError> = async {
            loop {
                match raw.next().await {
                    Ok(RawChunk::Bytes(bytes)) => {
                        copy.send(bytes)
                            .await
                            .map_err(|e| copy_error(e, &plan.columns, header_lines))?;
                    }
                    Ok(RawChunk::End { records }) => return Ok(Some(records.saturating_sub(header_lines))),
                    Err(crate::format::DecodeFailure::Unsuitable(why)) => {
                        tracing::info!(reason = why, "passthrough refused; loading through the parser");
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        .await;
        let expected = match sent {
            Ok(Some(expected)) => expected,
            other => {
                let _ = copy.abort("not loaded by passthrough").await;
                sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                    .execute(&mut **tx)
                    .await
                    .map_err(db)?;
                return other.map(|_| None);
            }
        };
        let rows = copy
            .finish()
            .await
            .map_err(|e| copy_error(e, &plan.columns, header_lines))?;
        if rows != expected {
            // COPY read the bytes differently from the loader's own count: trust neither.
            tracing::warn!(
                copied = rows,
                counted = expected,
                "passthrough count differs; loading through the parser"
            );
            sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                .execute(&mut **tx)
                .await
                .map_err(db)?;
            return Ok(None);
        }
        self.merge_stage(tx, table, &plan.columns, spec).await?;
        Ok(Some(rows))
    }

    /// The load's plan and what each of its columns must satisfy, from the cached columns when
    /// they fit, else from the catalog; `None` for a file without rows into a table that does
    /// not exist.
    async fn plan(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        file_cols: &[String],
        fixed: &[Option<ColumnType>],
        spec: &LoadSpec,
        sample: Option<&Batch>,
    ) -> Result<Option<(Plan, Vec<ColumnCheck>)>, LoadError> {
        let cached = self
            .columns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(table)
            .cloned();
        if let Some((columns, limits)) = cached
            && let Ok(plan) = plan_load(table, file_cols, fixed, Some(columns), spec, sample)
            && plan.add.is_empty()
        {
            let checks = checks_of(&plan, &limits);
            return Ok(Some((plan, checks)));
        }
        let mut existing = self.table_columns(tx, table).await?;
        let needs_ddl = match &existing {
            None => sample.is_some(),
            Some((columns, _)) => plan_load(table, file_cols, fixed, Some(columns.clone()), spec, sample)
                .is_ok_and(|plan| !plan.add.is_empty()),
        };
        if needs_ddl {
            // Creating the table or adding columns: one load at a time (replicas included) per
            // table. The lock is the load transaction's, so a second load waits until the first
            // commits (or rolls back, its DDL with it) and then plans against the table as it is.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                .bind(format!("s3-sql-loader:table:{table}"))
                .execute(&mut **tx)
                .await
                .map_err(|e| db_error(e, Stage::Database))?;
            existing = self.table_columns(tx, table).await?;
        }
        {
            let mut cache = self.columns.lock().unwrap_or_else(|p| p.into_inner());
            match &existing {
                Some(info) => cache.insert(table.to_string(), info.clone()),
                None => cache.remove(table),
            };
        }
        if sample.is_none() && existing.is_none() {
            return Ok(None);
        }
        let (columns, limits) = existing.map_or((None, Default::default()), |(c, l)| (Some(c), l));
        let plan = plan_load(table, file_cols, fixed, columns, spec, sample)?;
        let checks = checks_of(&plan, &limits);
        Ok(Some((plan, checks)))
    }

    /// Forgets a table's cached columns (after DDL, or a failed load).
    fn forget_columns(&self, table: &str) {
        self.columns.lock().unwrap_or_else(|p| p.into_inner()).remove(table);
    }

    /// Creates the table or adds columns, as the plan says.
    async fn prepare_table(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        plan: &Plan,
        spec: &LoadSpec,
    ) -> Result<(), LoadError> {
        if plan.create.is_some() || !plan.add.is_empty() {
            self.forget_columns(table);
        }
        if let Some(types) = &plan.create {
            let keys = (spec.write_mode == WriteMode::Upsert).then_some(spec.key_columns.as_slice());
            self.create_table(tx, table, &plan.columns, types, keys).await?;
        }
        for (column, ty) in &plan.add {
            // In the load's transaction: if the load fails, the column is not added either.
            sqlx::query(AssertSqlSafe(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
                quote_ident(table),
                quote_ident(column),
                sql_type(*ty)
            )))
            .execute(&mut **tx)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
            tracing::info!(db.table = %table, db.column = %column, "added a column");
        }
        Ok(())
    }

    /// Where COPY writes: the table, or for an upsert a staging table of the same shape.
    async fn copy_target(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        spec: &LoadSpec,
    ) -> Result<String, LoadError> {
        if spec.write_mode != WriteMode::Upsert {
            return Ok(quote_ident(table));
        }
        let db = |e| db_error(e, Stage::Database);
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TEMP TABLE {STAGE} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
            quote_ident(table)
        )))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {STAGE} ADD COLUMN {STAGE_ORDER} bigserial"
        )))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(STAGE.to_string())
    }

    /// For an upsert, merges the staging table into the table: the file's last row per key wins.
    async fn merge_stage(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        columns: &[String],
        spec: &LoadSpec,
    ) -> Result<(), LoadError> {
        if spec.write_mode != WriteMode::Upsert {
            return Ok(());
        }
        let column_list = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        let keys = spec
            .key_columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !spec.key_columns.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let action = if updates.is_empty() {
            "NOTHING".to_string()
        } else {
            format!("UPDATE SET {}", updates.join(", "))
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} ({column_list}) SELECT DISTINCT ON ({keys}) {column_list} FROM {STAGE}
             ORDER BY {keys}, {STAGE_ORDER} DESC ON CONFLICT ({keys}) DO {action}",
            quote_ident(table)
        )))
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {STAGE}")))
            .execute(&mut **tx)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    async fn table_columns(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
    ) -> Result<Option<TableInfo>, LoadError> {
        type Row = (String, String, Option<i32>, Option<i32>, Option<i32>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT column_name::text, data_type::text, numeric_scale::int, datetime_precision::int,
                    character_maximum_length::int
             FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut limits = std::collections::HashMap::new();
        let mut columns = Vec::with_capacity(rows.len());
        for (name, data_type, scale, precision, chars) in rows {
            let ty = type_of(&data_type);
            let limit = Limits {
                scale: scale.filter(|_| ty == ColumnType::Numeric).map(|s| s as u32),
                fraction: precision
                    .filter(|_| matches!(ty, ColumnType::Timestamp | ColumnType::TimestampTz))
                    .map(|p| p as u32),
                chars: chars.map(|n| n as u32),
                exact_chars: data_type == "character",
            };
            if !limit.is_none() {
                limits.insert(name.clone(), limit);
            }
            columns.push((name, ty));
        }
        Ok(Some((columns, limits)))
    }

    /// Creates the table in the load's transaction (under the lock [`PgSink::plan`] took), so
    /// that a file that fails leaves no table behind, typed from its bad data.
    async fn create_table(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        columns: &[String],
        types: &[ColumnType],
        keys: Option<&[String]>,
    ) -> Result<(), LoadError> {
        let definition = columns
            .iter()
            .zip(types)
            .map(|(c, t)| format!("{} {}", quote_ident(c), sql_type(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        let key = keys
            .map(|k| {
                format!(
                    ", PRIMARY KEY ({})",
                    k.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
                )
            })
            .unwrap_or_default();
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} ({definition}{key})",
            quote_ident(table)
        )))
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        tracing::info!(db.table = %table, "creating table (commits with the load)");
        Ok(())
    }
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "bigint",
        ColumnType::Numeric => "numeric",
        ColumnType::Float => "double precision",
        ColumnType::Boolean => "boolean",
        ColumnType::Date => "date",
        ColumnType::Timestamp => "timestamp",
        ColumnType::TimestampTz => "timestamptz",
        ColumnType::Text => "text",
        // json, not jsonb: it keeps each value as the line wrote it (jsonb would merge
        // duplicate keys, reorder them and rewrite numbers such as 1E2).
        ColumnType::Json => "json",
    }
}

fn type_of(data_type: &str) -> ColumnType {
    match data_type {
        "bigint" | "integer" | "smallint" => ColumnType::Integer,
        "double precision" | "real" => ColumnType::Float,
        "numeric" => ColumnType::Numeric,
        "boolean" => ColumnType::Boolean,
        "date" => ColumnType::Date,
        "timestamp without time zone" => ColumnType::Timestamp,
        "timestamp with time zone" => ColumnType::TimestampTz,
        "json" | "jsonb" => ColumnType::Json,
        _ => ColumnType::Text,
    }
}

/// The staging table of an upsert, and its column keeping the file's row order.
const STAGE: &str = "\"_s3_sql_loader_stage\"";
const STAGE_ORDER: &str = "\"_s3_sql_loader_order\"";

/// Re-encodes rows as CSV for COPY: NULL as an empty unquoted field, every value quoted (so an
/// empty string stays an empty string and nothing in a value can end the data); with
/// `lineage`, the four lineage columns follow each row.
pub fn encode_csv(batch: &Batch, lineage: Option<&Lineage>, out: &mut Vec<u8>) {
    fn quoted(out: &mut Vec<u8>, bytes: &[u8]) {
        out.push(b'"');
        if bytes.contains(&b'"') {
            for &b in bytes {
                if b == b'"' {
                    out.push(b'"');
                }
                out.push(b);
            }
        } else {
            out.extend_from_slice(bytes);
        }
        out.push(b'"');
    }
    for r in 0..batch.len() {
        for (i, field) in batch.row(r).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if let Some(field) = field {
                quoted(out, field.as_bytes());
            }
        }
        if let Some(l) = lineage {
            for value in [&l.source_key, &l.etag, &l.loaded_at] {
                out.push(b',');
                quoted(out, value.as_bytes());
            }
            out.extend_from_slice(format!(",{}", batch.line(r)).as_bytes());
        }
        out.push(b'\n');
    }
}

/// A COPY error with the record and column from PostgreSQL's context when it gives them.
/// COPY's "line" counts records, including `header_lines` header lines.
fn copy_error(e: sqlx::Error, columns: &[String], header_lines: u64) -> LoadError {
    let context = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
        .and_then(|pg| pg.r#where().map(str::to_string));
    match db_error(e, Stage::Database) {
        LoadError::Permanent(mut fe) => {
            if let Some(context) = context {
                fe.record = number_after(&context, "line ").map(|n| n.saturating_sub(header_lines));
                fe.column = text_after(&context, ", column ").filter(|c| columns.contains(c));
            }
            LoadError::Permanent(fe)
        }
        transient => transient,
    }
}

/// A one-byte COPY option as an escaped string literal.
fn byte_literal(b: u8) -> String {
    format!("E'\\x{b:02x}'")
}

/// Text as a standard SQL string literal.
fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn number_after(text: &str, marker: &str) -> Option<u64> {
    let start = text.find(marker)? + marker.len();
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn text_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    Some(rest[..rest.find(':').unwrap_or(rest.len())].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_encoding_quotes_values_and_leaves_nulls_empty() {
        let batch = Batch::from_rows(4, &[&[Some("1"), None, Some(""), Some("a \"b\",\nc")]]);
        let mut out = Vec::new();
        encode_csv(&batch, None, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "\"1\",,\"\",\"a \"\"b\"\",\nc\"\n");
    }

    #[test]
    fn the_copy_context_gives_line_and_column() {
        let ctx = "COPY orders, line 3, column qty: \"abc\"";
        assert_eq!(number_after(ctx, "line "), Some(3));
        assert_eq!(text_after(ctx, ", column ").as_deref(), Some("qty"));
    }
}
