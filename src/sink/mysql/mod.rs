//! MySQL and MariaDB: multi-row prepared INSERTs (upserts with ON DUPLICATE KEY UPDATE) inside
//! one transaction with the ledger row; claims are ledger row locks taken with
//! `FOR UPDATE SKIP LOCKED` (MySQL 8.0, MariaDB 10.6 and later).
//!
//! MySQL commits implicitly around DDL, so creating a table or adding columns happens on a
//! connection of its own before the rows are written (a failed file can leave a created table
//! or an added column behind, never rows). Sessions use `ANSI_QUOTES` (identifiers are
//! double-quoted, as elsewhere in the loader), strict mode and UTC.
//!
//! Claims: a named lock (`GET_LOCK`, tried without waiting) held by the connection that runs
//! the load's transaction, released after it ends. A loader that dies releases its claims when
//! its connections close; a frozen loader's claims are taken over when their lease runs out
//! (see [`lease`]).

mod lease;

use std::str::FromStr;

use sqlx::mysql::{MySql, MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Transaction};

use super::insert::{self, Insert};
use super::lease::Heartbeat;
use super::protocol::{Dialect, FileSink, Ledger};
use super::{FileRef, Lineage, SinkOptions, db_error, open_rows, plan_load, quote_ident};
use crate::config::Config;
use crate::error::{FileErrorKind, LoadError, Stage};
use crate::reader::FileReader;
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::{ColumnType, INFERENCE_SAMPLE_ROWS, Value, decimal_scale};

/// The ledger's SQL in MySQL and MariaDB.
const DIALECT: Dialect = Dialect {
    numbered: false,
    now: "CURRENT_TIMESTAMP(6)",
    attempts: "CAST(attempts AS SIGNED)",
    lock_row: " FOR UPDATE",
    begin: None,
    upsert_returning: false,
    insert_ignore: ("INSERT IGNORE INTO", ""),
    text: "CHAR",
};

/// A claim: the connection holding the file's named lock. Dropped without
/// its release (a panic, a cancelled load), the connection is closed rather than
/// returned to the pool, so the server frees the lock and rolls back what it had open.
pub struct MySqlClaim {
    conn: Option<PoolConnection<MySql>>,
    name: String,
    /// The server's id of that connection (`CONNECTION_ID()`), as the lease records it.
    connection: u64,
    heartbeat: Option<Heartbeat>,
}

impl Drop for MySqlClaim {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// The named lock of a file (names are server-wide and at most 64 characters).
fn lock_name(id: &str) -> String {
    format!("s3-sql-loader:{}", &id[..id.len().min(48)])
}

/// MySQL's limit on placeholders in one statement.
const MAX_PARAMS: usize = 65_535;
/// Rows per INSERT statement at most.
const MAX_ROWS_PER_INSERT: usize = 500;

pub struct MySqlSink {
    pool: MySqlPool,
    options: SinkOptions,
    ledger: Ledger<MySql>,
    /// Quoted name of the claims table: which connection holds which file, until when.
    claims: String,
}

impl MySqlSink {
    pub fn connect_lazy(url: &str, config: &Config, options: SinkOptions) -> anyhow::Result<MySqlSink> {
        let connect = MySqlConnectOptions::from_str(&url.replacen("mariadb://", "mysql://", 1))
            .map_err(|e| anyhow::anyhow!("database.url: {}", crate::redact::scrub(&e.to_string(), &[url])))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.database.connect_timeout)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query(
                        "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',ANSI_QUOTES,STRICT_ALL_TABLES'), time_zone = '+00:00'",
                    )
                    .execute(&mut *conn)
                    .await?;
                    // See super::nodelay. The server sees our address as HOST:PORT.
                    let ports: Option<(Option<String>, i64)> = sqlx::query_as(
                        "SELECT CAST(HOST AS CHAR), CAST(@@port AS SIGNED) FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
                    )
                    .fetch_optional(&mut *conn)
                    .await?;
                    let client = ports.as_ref().and_then(|(host, _)| host.as_deref()?.rsplit_once(':')?.1.parse::<u16>().ok());
                    if let (Some(client), Some((_, server))) = (client, ports) {
                        super::nodelay::set_nodelay(client, server as u16);
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(connect);
        let ledger = Ledger::new(pool.clone(), &options, DIALECT, None);
        let claims = quote_ident(&format!("{}_claims", options.ledger.trim_matches('"')));
        Ok(MySqlSink {
            pool,
            options,
            ledger,
            claims,
        })
    }

    pub(crate) fn ledger(&self) -> &Ledger<MySql> {
        &self.ledger
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        )
        .bind(table)
        .fetch_one(&self.pool)
        .await?;
        Ok(n > 0)
    }

    pub async fn ensure_ledger(&self) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        // IF NOT EXISTS is atomic enough here: MySQL DDL takes its own metadata lock.
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {ledger} (
                file_id       CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
                source        VARCHAR(1024) NOT NULL,
                object_key    VARCHAR(1024) NOT NULL,
                etag          VARCHAR(255) NOT NULL,
                state         VARCHAR(16) NOT NULL,
                target_table  VARCHAR(64),
                row_count     BIGINT,
                byte_count    BIGINT NOT NULL,
                attempts      INT NOT NULL DEFAULT 0,
                error         LONGTEXT,
                history       LONGTEXT,
                claimed_by    VARCHAR(255),
                first_seen_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                loaded_at     DATETIME(6),
                updated_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
                KEY source_key (source(191), object_key(191))
            ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4"
        )))
        .execute(&self.pool)
        .await?;
        // Leases: see `lease`. Times are the server's, in UTC (the sessions' time zone).
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} (
                file_id       CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,
                owner         VARCHAR(255) NOT NULL,
                connection_id BIGINT UNSIGNED NOT NULL,
                claimed_at    DATETIME(6) NOT NULL,
                expires_at    DATETIME(6) NOT NULL
            ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
            self.claims
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// See [`super::Database::table_shape`]: a DECIMAL column's scale is its limit.
    pub(crate) async fn table_shape(&self, table: &str) -> Result<Option<super::TableShape>, LoadError> {
        let (columns, scales) = self.table_columns(table).await?;
        let limits = scales
            .into_iter()
            .map(|(name, (_, scale))| {
                let limit = crate::schema::Limits {
                    scale: Some(scale as u32),
                    ..Default::default()
                };
                (name, limit)
            })
            .collect();
        Ok(columns.map(|c| (c, limits)))
    }

    /// The table's columns, read on a connection of its own: in MySQL a transaction that looked
    /// at a table holds a metadata lock on it, which the DDL below would wait for.
    /// With the precision and scale of each DECIMAL column.
    async fn table_columns(
        &self,
        table: &str,
    ) -> Result<(Option<Vec<(String, ColumnType)>>, DecimalScales), LoadError> {
        let rows: Vec<(String, String, Option<u64>, Option<u64>)> = sqlx::query_as(
            "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(NUMERIC_PRECISION AS UNSIGNED),
                    CAST(NUMERIC_SCALE AS UNSIGNED)
             FROM information_schema.COLUMNS
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        let mut scales = DecimalScales::new();
        let columns = rows
            .into_iter()
            .map(|(n, t, precision, scale)| {
                let (name, ty) = (n.to_ascii_lowercase(), type_of(&t));
                if let (ColumnType::Numeric, Some(p), Some(s)) = (ty, precision, scale) {
                    scales.insert(name.clone(), (p as usize, s as usize));
                }
                (name, ty)
            })
            .collect::<Vec<_>>();
        Ok(((!columns.is_empty()).then_some(columns), scales))
    }
}

impl FileSink for MySqlSink {
    type Db = MySql;
    type Claim = MySqlClaim;

    /// The file's named lock, tried without waiting, on the connection the load will use.
    async fn claim(&self, id: &str) -> Result<Option<MySqlClaim>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let name = lock_name(id);
        let (got, connection): (Option<i64>, u64) =
            sqlx::query_as("SELECT CAST(GET_LOCK(?, 0) AS SIGNED), CAST(CONNECTION_ID() AS UNSIGNED)")
                .bind(&name)
                .fetch_one(&mut *conn)
                .await?;
        if got != Some(1) {
            drop(conn);
            self.take_over_if_expired(id, &name).await?;
            return Ok(None);
        }
        Ok(Some(MySqlClaim {
            conn: Some(conn),
            name,
            connection,
            heartbeat: None,
        }))
    }

    /// One file per transaction here (no groups: see [`super::Database::loads_groups`]).
    async fn hold(&self, claim: &mut MySqlClaim, ids: &[String]) -> Result<(), sqlx::Error> {
        let [id] = ids else {
            return Err(sqlx::Error::Protocol("MySQL loads one file per transaction".into()));
        };
        claim.heartbeat = Some(self.hold_claim(id, claim.connection).await?);
        Ok(())
    }

    async fn begin<'c>(&'c self, claim: &'c mut MySqlClaim) -> Result<Transaction<'c, MySql>, sqlx::Error> {
        match claim.conn.as_mut() {
            Some(conn) => sqlx::Connection::begin(&mut **conn).await,
            None => Err(sqlx::Error::Protocol("the claim was released already".into())),
        }
    }

    async fn write_rows(
        &self,
        conn: &mut MySqlConnection,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
        // DDL commits implicitly in MySQL, outside the load: nothing is widened here.
        _new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<u64, LoadError> {
        let db = |e| db_error(e, Stage::Database);
        let table = spec.table.clone()?;
        let Some(super::Opened {
            mut decoded,
            columns: file_cols,
            first,
        }) = open_rows(reader).await?
        else {
            return Ok(0);
        };
        let (existing, mut scales) = self.table_columns(&table).await?;
        if first.is_none() && existing.is_none() {
            return Ok(0); // header only: no rows, and no sample to create the table from
        }
        let plan = plan_load(&table, &file_cols, &decoded.types, existing, spec, first.as_ref())?;
        // MySQL stores every value of a DECIMAL at its column's scale (`2.5` in DECIMAL(65,2)
        // reads `2.50`) and rounds what has more digits. A new decimal column is DECIMAL only
        // when the sample's values share one scale (at most 30); otherwise text keeps each
        // value's own digits.
        let created = plan.create.iter().flat_map(|types| plan.columns.iter().zip(types));
        for (column, ty) in created.chain(plan.add.iter().map(|(c, t)| (c, t))) {
            if *ty == ColumnType::Numeric {
                let i = plan.columns.iter().position(|c| c == column).unwrap_or(0);
                // The rows inference looked at, and no more.
                let mut sample_scales = first
                    .iter()
                    .flat_map(|b| (0..b.len().min(INFERENCE_SAMPLE_ROWS)).filter_map(move |r| b.get(r, i)))
                    .map(decimal_scale);
                let Some(scale) = sample_scales.next() else {
                    continue; // no value to take a scale from (a declared type): text keeps any
                };
                if sample_scales.all(|s| s == scale) && scale <= 30 {
                    scales.insert(column.clone(), (65, scale));
                }
            }
        }
        let column_type = |c: &String, t: ColumnType| match (t, scales.get(c)) {
            (ColumnType::Numeric, Some((p, s))) => format!("DECIMAL({p},{s})"),
            (ColumnType::Numeric, None) => sql_type(ColumnType::Text, spec.key_columns.contains(c)).to_string(),
            _ => sql_type(t, spec.key_columns.contains(c)).to_string(),
        };
        let upsert = spec.write_mode == WriteMode::Upsert;
        if let Some(types) = &plan.create {
            let keys = upsert.then_some(spec.key_columns.as_slice());
            let sql = insert::create_table(
                &table,
                &plan.columns,
                types,
                keys,
                |c, t| column_type(&c.to_string(), t),
                " ENGINE = InnoDB DEFAULT CHARSET = utf8mb4",
            );
            sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await.map_err(db)?;
            tracing::info!(db.table = %table, "created table");
        }
        // The columns to add are the ones `information_schema` did not list just now. Plain
        // `ADD COLUMN` (`IF NOT EXISTS` there is MariaDB's only: MySQL 8 refuses the syntax); a
        // column another load added meanwhile answers "duplicate column" (1060, SQLSTATE
        // 42S21), which is what this load wanted.
        for (column, ty) in &plan.add {
            let sql = insert::add_column(&table, column, &column_type(column, *ty), false);
            match sqlx::query(AssertSqlSafe(sql)).execute(&self.pool).await {
                Ok(_) => tracing::info!(db.table = %table, db.column = %column, "added a column"),
                Err(e) if is_duplicate_column(&e) => {
                    tracing::info!(db.table = %table, db.column = %column, "the column was added meanwhile by another load")
                }
                Err(e) => return Err(db(e)),
            }
        }
        // Another load may have created the table or added a column first (IF NOT EXISTS or the
        // duplicate then did nothing): write with the types the table has, not the ones this
        // load planned.
        let plan = if plan.create.is_some() || !plan.add.is_empty() {
            let (existing, actual) = self.table_columns(&table).await?;
            scales = actual;
            plan_load(&table, &file_cols, &decoded.types, existing, spec, first.as_ref())?
        } else {
            plan
        };
        let on_duplicate = if upsert {
            let updates: Vec<String> = plan
                .columns
                .iter()
                .filter(|c| !spec.key_columns.contains(c))
                .map(|c| format!("{0} = VALUES({0})", quote_ident(c)))
                .collect();
            let first_key = quote_ident(&spec.key_columns[0]);
            // Rows go in file order, so the file's last row for a key wins.
            match updates.is_empty() {
                true => format!(" ON DUPLICATE KEY UPDATE {first_key} = {first_key}"),
                false => format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", ")),
            }
        } else {
            String::new()
        };
        let insert = Insert::new(&table, &plan.columns, on_duplicate, MAX_PARAMS, MAX_ROWS_PER_INSERT);
        let lineage = spec.metadata_columns.then(|| Lineage::new(&file));
        let lineage_time = lineage.as_ref().map(|l| utc_datetime(&l.loaded_at).unwrap_or_default());
        let limits: Vec<Option<(usize, usize)>> = plan.columns.iter().map(|c| scales.get(c).copied()).collect();
        insert
            .write_all::<MySql, _>(conn, first, &mut decoded, |mut query, b, r| {
                for (((value, ty), column), limit) in b.row(r).zip(&plan.types).zip(&plan.columns).zip(&limits) {
                    let type_error = |m: String| b.error_at(r, column, FileErrorKind::Type, m);
                    // A DATETIME column also takes timestamps with an offset, in UTC (a
                    // table created for them has DATETIME(6) columns, read back as such).
                    let ty = match (ty, value) {
                        (ColumnType::Timestamp, Some(v)) if ColumnType::TimestampTz.accepts(v) => {
                            &ColumnType::TimestampTz
                        }
                        _ => ty,
                    };
                    let value = ty.convert(value).map_err(type_error)?;
                    if let (Value::Text(t), Some((precision, scale))) = (value, limit) {
                        check_decimal(t, *precision, *scale).map_err(type_error)?;
                    }
                    query = match (value, ty) {
                        (Value::Text(t), ColumnType::TimestampTz) => query.bind(
                            utc_datetime(t).ok_or_else(|| type_error(format!("{t:?} is not a valid timestamp")))?,
                        ),
                        (Value::Null, _) => query.bind(None::<&str>),
                        (Value::Integer(i), _) => query.bind(i),
                        (Value::Float(f), _) => query.bind(f),
                        (Value::Boolean(v), _) => query.bind(v),
                        (Value::Text(t), _) => query.bind(t),
                    };
                }
                if let (Some(l), Some(at)) = (&lineage, &lineage_time) {
                    query = query
                        .bind(l.source_key.clone())
                        .bind(l.etag.clone())
                        .bind(at.clone())
                        .bind(b.line(r) as i64);
                }
                Ok(query)
            })
            .await
    }

    /// After the transaction ended (a rollback still pending runs first, on the same connection).
    async fn release(&self, mut claim: MySqlClaim, id: &str) {
        if let Some(heartbeat) = claim.heartbeat.take() {
            drop(heartbeat);
            self.release_claim(id, claim.connection).await;
        }
        let Some(mut conn) = claim.conn.take() else { return };
        let released = sqlx::query("DO RELEASE_LOCK(?)")
            .bind(&claim.name)
            .execute(&mut *conn)
            .await;
        if let Err(e) = released {
            // The connection is closed instead; the server frees the lock with it.
            tracing::debug!(error.message = %e, "could not release the claim's lock");
            drop(conn.detach());
        }
    }
}

/// Per DECIMAL column: its precision and scale.
type DecimalScales = std::collections::HashMap<String, (usize, usize)>;

/// A decimal (bound as text, so no binary floating point) must fit its column's precision and
/// scale: MySQL would round extra fractional digits without an error.
fn check_decimal(value: &str, precision: usize, scale: usize) -> Result<(), String> {
    let digits = value
        .trim_start_matches('-')
        .split_once('.')
        .map_or(value.trim_start_matches('-'), |(i, _)| i);
    if decimal_scale(value) > scale || digits.trim_start_matches('0').len() > precision.saturating_sub(scale) {
        return Err(format!(
            "{value:?} does not fit the column's DECIMAL({precision},{scale}) without rounding"
        ));
    }
    Ok(())
}

/// An RFC 3339 timestamp as MySQL's DATETIME text, in UTC (sessions run in UTC).
fn utc_datetime(value: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(value).ok().map(|t| {
        t.with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%S%.6f")
            .to_string()
    })
}

fn sql_type(t: ColumnType, key: bool) -> &'static str {
    match t {
        ColumnType::Integer => "BIGINT",
        ColumnType::Float => "DOUBLE",
        ColumnType::Numeric => "DECIMAL(65,30)",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Date => "DATE",
        ColumnType::Timestamp | ColumnType::TimestampTz => "DATETIME(6)",
        // A key must have a bounded length in MySQL, and compare byte for byte: the default
        // collation would take `abc` and `ABC` (or `a` and `a `) for one key and merge them.
        ColumnType::Text if key => "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        ColumnType::Text => "LONGTEXT",
        ColumnType::Json => "JSON",
    }
}

fn type_of(data_type: &str) -> ColumnType {
    match data_type.to_ascii_lowercase().as_str() {
        "bigint" | "int" | "integer" | "mediumint" | "smallint" => ColumnType::Integer,
        "tinyint" => ColumnType::Boolean,
        "double" | "float" | "real" => ColumnType::Float,
        "decimal" | "numeric" => ColumnType::Numeric,
        "date" => ColumnType::Date,
        "datetime" | "timestamp" => ColumnType::Timestamp,
        "json" => ColumnType::Json,
        _ => ColumnType::Text,
    }
}

/// MySQL's and MariaDB's "Duplicate column name" (error 1060).
fn is_duplicate_column(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "42S21")
}

#[cfg(test)]
mod tests {
    /// The "column added meanwhile" answer, as the real server gives it: an `ADD COLUMN` (no
    /// `IF NOT EXISTS`, which MySQL 8 lacks) of a column that exists. Needs `TEST_MYSQL_URL`
    /// (`scripts/test` sets it, and runs the MariaDB suites only where the server answers).
    #[tokio::test]
    async fn a_column_added_twice_is_recognised_as_a_duplicate() {
        let Ok(url) = std::env::var("TEST_MYSQL_URL") else {
            eprintln!("TEST_MYSQL_URL not set: not run");
            return;
        };
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let table = format!("dup_column_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE `{table}` (id BIGINT)")))
            .execute(&pool)
            .await
            .unwrap();
        let sql = super::insert::add_column(&table, "c", "TEXT", false).replace('"', "`");
        let first = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).execute(&pool).await;
        let second = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE `{table}`")))
            .execute(&pool)
            .await
            .unwrap();
        assert!(first.is_ok(), "{first:?}");
        let e = second.expect_err("the second ADD COLUMN must fail");
        assert!(super::is_duplicate_column(&e), "{e}");
        // Another error is not taken for one.
        let other = sqlx::query("SELECT * FROM no_such_table_here")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(!super::is_duplicate_column(&other), "{other}");
    }

    #[test]
    fn offsets_become_utc_datetimes() {
        assert_eq!(
            super::utc_datetime("2026-11-01T10:00:00+02:00").as_deref(),
            Some("2026-11-01 08:00:00.000000")
        );
        assert_eq!(super::utc_datetime("yesterday"), None);
    }

    #[test]
    fn decimals_that_mysql_would_round_are_refused() {
        assert!(super::check_decimal("129.90", 65, 2).is_ok());
        assert!(super::check_decimal("-129.9", 65, 2).is_ok());
        assert!(super::check_decimal("129.901", 65, 2).is_err());
        assert!(super::check_decimal("12345", 6, 2).is_err());
        assert!(super::check_decimal("1234", 6, 2).is_ok());
    }
}
