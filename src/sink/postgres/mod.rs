//! PostgreSQL: rows go in through `COPY` ([`copy`]), streamed batch by batch; a claim is an
//! advisory lock of the load's transaction, tried without waiting, so replicas never wait on,
//! or load, a file another one holds; its lease ([`lease`]) lets a frozen holder be ended.
//! Tables are created and columns added in the load's transaction, under a per-table lock.

mod copy;
pub use copy::{copy_error, encode_csv};
mod lease;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, Transaction};

use self::lease::lock_key;
use super::insert::{add_column, create_table};
use super::lease::Heartbeat;
use super::protocol::{Dialect, FileSink, Ledger};
use super::{FileRef, Plan, SinkOptions, db_error, plan_load, quote_ident};
use crate::config::Config;
use crate::error::{FileErrorKind, LoadError, Stage};
use crate::format::Batch;
use crate::reader::FileReader;
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::{ColumnCheck, ColumnType, Limits};

/// The ledger's SQL in PostgreSQL.
pub(crate) const DIALECT: Dialect = Dialect {
    numbered: true,
    now: "now()",
    attempts: "attempts::bigint",
    lock_row: " FOR UPDATE",
    begin: None,
    upsert_returning: true,
    insert_ignore: ("INSERT INTO", " ON CONFLICT (file_id) DO NOTHING"),
    // (Redshift reads its ledger with this dialect too: VARCHAR is common to both.)
    text: "VARCHAR",
};

/// A claim: the load's transaction holding the file's advisory lock, its server process, and
/// the lease's heartbeat once the load runs.
pub struct PgClaim {
    tx: Option<Transaction<'static, Postgres>>,
    pid: i32,
    /// The files whose leases are held, and the heartbeats renewing them.
    held: Vec<String>,
    heartbeats: Vec<Heartbeat>,
}

pub struct PgSink {
    pool: PgPool,
    options: SinkOptions,
    ledger: Ledger<Postgres>,
    /// Quoted name of the claims table: who holds which file, until when (the lease).
    claims: String,
    /// Columns of the tables seen so far, to spare a catalog query per file. Refreshed when a
    /// file needs a column the cache does not know, and dropped when a load fails.
    columns: std::sync::Mutex<std::collections::HashMap<String, TableInfo>>,
    /// `database.passthrough`.
    passthrough: bool,
}

use super::TableShape as TableInfo;

/// The columns of `table` in the current schema, with their limits; `None` when it does not
/// exist (also Redshift's, for `validate`).
pub(crate) async fn table_info(conn: &mut PgConnection, table: &str) -> Result<Option<TableInfo>, LoadError> {
    type Row = (String, String, Option<i32>, Option<i32>, Option<i32>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, numeric_scale::int, datetime_precision::int,
                character_maximum_length::int
         FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut *conn)
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
        let ledger = Ledger::new(pool.clone(), &options, DIALECT, None);
        Ok(PgSink {
            pool,
            options,
            ledger,
            claims,
            columns: Default::default(),
            passthrough: config.database.passthrough,
        })
    }

    pub(crate) fn ledger(&self) -> &Ledger<Postgres> {
        &self.ledger
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(quote_ident(table))
            .fetch_one(&self.pool)
            .await
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

    /// The load's plan and what each of its columns must satisfy, from the cached columns when
    /// they fit, else from the catalog; `None` for a file without rows into a table that does
    /// not exist.
    async fn plan(
        &self,
        conn: &mut PgConnection,
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
            let checks = plan.checks(&limits);
            return Ok(Some((plan, checks)));
        }
        let mut existing = table_info(conn, table).await?;
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
                .execute(&mut *conn)
                .await
                .map_err(|e| db_error(e, Stage::Database))?;
            existing = table_info(conn, table).await?;
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
        let checks = plan.checks(&limits);
        Ok(Some((plan, checks)))
    }

    /// Forgets a table's cached columns (after DDL, or a failed load).
    fn forget_columns(&self, table: &str) {
        self.columns.lock().unwrap_or_else(|p| p.into_inner()).remove(table);
    }

    /// Creates the table or adds columns, as the plan says.
    async fn prepare_table(
        &self,
        conn: &mut PgConnection,
        table: &str,
        plan: &Plan,
        spec: &LoadSpec,
    ) -> Result<(), LoadError> {
        if plan.create.is_some() || !plan.add.is_empty() {
            self.forget_columns(table);
        }
        if let Some(types) = &plan.create {
            let keys = (spec.write_mode == WriteMode::Upsert).then_some(spec.key_columns.as_slice());
            self.create_table(conn, table, &plan.columns, types, keys).await?;
        }
        for (column, ty) in &plan.add {
            // In the load's transaction: if the load fails, the column is not added either.
            sqlx::query(AssertSqlSafe(add_column(table, column, sql_type(*ty), true)))
                .execute(&mut *conn)
                .await
                .map_err(|e| db_error(e, Stage::Database))?;
            tracing::info!(db.table = %table, db.column = %column, "added a column");
        }
        Ok(())
    }

    /// Creates the table in the load's transaction (under the lock [`PgSink::plan`] took), so
    /// that a file that fails leaves no table behind, typed from its bad data.
    async fn create_table(
        &self,
        conn: &mut PgConnection,
        table: &str,
        columns: &[String],
        types: &[ColumnType],
        keys: Option<&[String]>,
    ) -> Result<(), LoadError> {
        let sql = create_table(table, columns, types, keys, |_, t| sql_type(t).into(), "");
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        tracing::info!(db.table = %table, "creating table (commits with the load)");
        Ok(())
    }
}

impl FileSink for PgSink {
    type Db = Postgres;
    type Claim = PgClaim;

    /// A transaction-scoped advisory lock on the file, tried without waiting. Only its holder
    /// writes the ledger row, so counting an attempt never waits on another loader. When the
    /// file is held, a holder whose lease ran out is ended (see [`lease`]).
    async fn claim(&self, id: &str) -> Result<Option<PgClaim>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let (claimed, pid): (bool, i32) = sqlx::query_as("SELECT pg_try_advisory_xact_lock($1), pg_backend_pid()")
            .bind(lock_key(id))
            .fetch_one(&mut *tx)
            .await?;
        if !claimed {
            drop(tx);
            self.take_over_if_expired(id).await?;
            return Ok(None);
        }
        Ok(Some(PgClaim {
            tx: Some(tx),
            pid,
            held: Vec::new(),
            heartbeats: Vec::new(),
        }))
    }

    /// Another file's advisory lock in the same transaction (a group's).
    async fn claim_also(&self, claim: &mut PgClaim, id: &str) -> Result<bool, sqlx::Error> {
        let tx = claim
            .tx
            .as_mut()
            .ok_or_else(|| sqlx::Error::Protocol("the claim's transaction was used already".into()))?;
        let claimed: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(lock_key(id))
            .fetch_one(&mut **tx)
            .await?;
        if !claimed {
            self.take_over_if_expired(id).await?;
        }
        Ok(claimed)
    }

    async fn hold(&self, claim: &mut PgClaim, ids: &[String]) -> Result<(), sqlx::Error> {
        let heartbeat = self.hold_claims(ids, claim.pid).await?;
        claim.held.extend_from_slice(ids);
        claim.heartbeats.push(heartbeat);
        Ok(())
    }

    async fn begin<'c>(&'c self, claim: &'c mut PgClaim) -> Result<Transaction<'c, Postgres>, sqlx::Error> {
        claim
            .tx
            .take()
            .ok_or_else(|| sqlx::Error::Protocol("the claim's transaction was used already".into()))
    }

    async fn write_rows(
        &self,
        conn: &mut PgConnection,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<u64, LoadError> {
        self.copy_rows(conn, file, spec, reader, new_columns).await
    }

    fn attempt_failed(&self, table: Option<&str>, error: LoadError) -> LoadError {
        if let Some(table) = table {
            self.forget_columns(table);
        }
        match error {
            // The table changed under a cached view of it (dropped, a column renamed): retry.
            LoadError::Permanent(e) if e.kind == FileErrorKind::Schema && e.database_message.is_some() => {
                LoadError::transient(Stage::Database, e.message)
            }
            other => other,
        }
    }

    async fn release(&self, claim: PgClaim, _id: &str) {
        drop(claim.heartbeats);
        if !claim.held.is_empty() {
            self.release_claims(&claim.held, claim.pid).await;
        }
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
