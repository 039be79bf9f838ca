//! The exactly-once protocol of one file, written once for every database that loads file by
//! file ([`Ledger::load`]), and the ledger's statements it is made of:
//!
//! 1. claim the file without waiting ([`FileSink::claim`]: PostgreSQL's transaction-scoped
//!    advisory lock, MySQL's named lock, SQLite's single writer); another loader holds it:
//!    `Busy`;
//! 2. count the attempt and commit that on its own ([`Ledger::count_attempt`]), so a load that
//!    kills the process still counts; a file loaded or failed already needs only its move, one
//!    out of attempts is failed (`retries_exhausted` or `crashed_loader`);
//! 3. in the load's transaction, under a savepoint: the sink writes the rows
//!    ([`FileSink::write_rows`]); a value that does not fit a column this attempt created
//!    rolls back to the savepoint and tries again with that column widened;
//! 4. rows written: mark the ledger row `loaded` and commit; the file's fault: roll back to
//!    the savepoint, mark it `failed` with the error, commit; a transient error: roll back;
//! 5. release the claim. A process that dies mid-load loses its connection, so the database
//!    rolls back the rows and releases the claim.
//!
//! Each database differs only in the small table of SQL in [`Dialect`] and in what
//! [`FileSink`] leaves to it.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, Database, Encode, Executor, FromRow, IntoArguments, Pool, Transaction, Type};

use super::{
    FileRef, LedgerRow, LoadOutcome, append_history, outcome_of_state, retries_exhausted, state, widened_spec,
};
use crate::error::{FileError, LoadError, Stage};
use crate::reader::FileReader;
use crate::routes::LoadSpec;
use crate::schema::ColumnType;

/// What a database does its own way in the protocol; the rest is [`Ledger::load`].
pub(crate) trait FileSink: Sync {
    type Db: Database;
    /// A held claim on one file.
    type Claim: Send;

    /// Takes the file's claim without waiting; `None` when another load holds it.
    fn claim(&self, id: &str) -> impl Future<Output = Result<Option<Self::Claim>, sqlx::Error>> + Send;

    /// Adds another file's claim to a held one, for a group of files loaded in one transaction
    /// ([`Ledger::load_group`]), without waiting; `false` when another load holds it.
    fn claim_also(
        &self,
        _claim: &mut Self::Claim,
        _id: &str,
    ) -> impl Future<Output = Result<bool, sqlx::Error>> + Send {
        async {
            Err(sqlx::Error::Protocol(
                "this database loads one file per transaction".into(),
            ))
        }
    }

    /// The attempts are counted and the rows of these files are about to be written
    /// (PostgreSQL and MySQL start their leases here).
    fn hold(&self, _claim: &mut Self::Claim, _ids: &[String]) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        async { Ok(()) }
    }

    /// The load's transaction, under the claim.
    fn begin<'c>(
        &'c self,
        claim: &'c mut Self::Claim,
    ) -> impl Future<Output = Result<Transaction<'c, Self::Db>, sqlx::Error>> + Send;

    /// Writes the file's rows into its table, creating the table or adding columns as the
    /// route allows; returns how many. `new_columns` gets the columns this attempt created or
    /// added in the transaction: the ones a value that does not fit may widen.
    fn write_rows(
        &self,
        conn: &mut <Self::Db as Database>::Connection,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> impl Future<Output = Result<u64, LoadError>> + Send;

    /// An attempt's error as the protocol should take it (by default, as it is).
    fn attempt_failed(&self, _table: Option<&str>, error: LoadError) -> LoadError {
        error
    }

    /// Gives the claim back (every file of a group's); the load's transaction has ended.
    fn release(&self, claim: Self::Claim, id: &str) -> impl Future<Output = ()> + Send;
}

/// A ledger row as counting a group's attempts returns it: the file's id first.
pub(crate) type CountedRow = (String, String, Option<i64>, Option<String>, i64, Option<String>);

/// One file of a group loaded in one transaction ([`Ledger::load_group`]).
pub struct GroupMember<'a> {
    pub file: FileRef<'a>,
    pub spec: &'a LoadSpec,
    pub reader: &'a FileReader<'a>,
}

/// How one database spells the few things the ledger's statements need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialect {
    /// `$1, $2, ...` (PostgreSQL) rather than `?`.
    pub numbered: bool,
    /// The current time.
    pub now: &'static str,
    /// `attempts` read as a 64-bit integer.
    pub attempts: &'static str,
    /// Appended to a SELECT to lock the row until the transaction ends ("" where the
    /// transaction itself is the single writer).
    pub lock_row: &'static str,
    /// The statement that begins a writing transaction (`None`: the driver's own `BEGIN`).
    pub begin: Option<&'static str>,
    /// Whether `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` exists: counting an attempt is
    /// then one statement instead of three in a transaction.
    pub upsert_returning: bool,
    /// `INSERT` that does nothing on a duplicate key: prefix and suffix around the rest.
    pub insert_ignore: (&'static str, &'static str),
    /// The text type a `CAST` reads a time as.
    pub text: &'static str,
}

/// The ledger's statements on one database. `writer` serializes writers where the database
/// has a single one (SQLite): waiting here is cheaper than waiting on its busy timeout.
pub(crate) struct Ledger<DB: Database> {
    pub pool: Pool<DB>,
    /// Quoted table name.
    pub table: String,
    pub dialect: Dialect,
    /// Written into `claimed_by`: which process loaded the file.
    pub owner: String,
    /// A file with this many recorded attempts is failed instead of tried again.
    pub max_attempts: u32,
    pub writer: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<DB: Database> Ledger<DB> {
    pub fn new(
        pool: Pool<DB>,
        options: &super::SinkOptions,
        dialect: Dialect,
        writer: Option<Arc<tokio::sync::Mutex<()>>>,
    ) -> Ledger<DB> {
        Ledger {
            pool,
            table: options.ledger.clone(),
            dialect,
            owner: options.owner.clone(),
            max_attempts: options.max_attempts,
            writer,
        }
    }

    /// The SQL with the ledger's name, its time function and its placeholders filled in:
    /// `{L}` is the table, `{NOW}` the time, `{ATTEMPTS}` the attempts read as 64 bits, and each
    /// `?` a parameter, in the order they are bound.
    pub(super) fn sql(&self, template: &str) -> String {
        let sql = template
            .replace("{L}", &self.table)
            .replace("{NOW}", self.dialect.now)
            .replace("{ATTEMPTS}", self.dialect.attempts);
        if !self.dialect.numbered {
            return sql;
        }
        let mut out = String::with_capacity(sql.len() + 8);
        let mut n = 0;
        for c in sql.chars() {
            if c == '?' {
                n += 1;
                out.push_str(&format!("${n}"));
            } else {
                out.push(c);
            }
        }
        out
    }

    pub(super) async fn writer(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.writer {
            Some(lock) => Some(lock.lock().await),
            None => None,
        }
    }
}

/// What counting an attempt found.
pub(crate) struct Counted {
    /// The ledger row after counting.
    pub row: LedgerRow,
    /// Whether this attempt was counted (false: the file is done, or out of attempts).
    pub now: bool,
}

impl<DB> Ledger<DB>
where
    DB: Database,
    DB::QueryResult: RowsAffected,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'r> LedgerRow: FromRow<'r, DB::Row>,
    for<'r> (String, Option<String>): FromRow<'r, DB::Row>,
{
    async fn begin(&self) -> Result<Transaction<'static, DB>, sqlx::Error> {
        match self.dialect.begin {
            Some(statement) => self.pool.begin_with(statement).await,
            None => self.pool.begin().await,
        }
    }

    /// Counts an attempt at `file` and commits that on its own, before the load starts, so a
    /// load that kills the process still counts. Only the claim's holder calls this. The file
    /// is counted unless it is loaded or failed already, or out of attempts.
    pub async fn count_attempt(&self, file: FileRef<'_>, id: &str) -> Result<Counted, sqlx::Error> {
        let max = i64::from(self.max_attempts);
        if self.dialect.upsert_returning {
            let counted: Option<LedgerRow> = sqlx::query_as(AssertSqlSafe(self.sql(
                "INSERT INTO {L} (file_id, source, object_key, etag, state, byte_count, attempts, claimed_by)
                 VALUES (?, ?, ?, ?, 'pending', ?, 1, ?)
                 ON CONFLICT (file_id) DO UPDATE SET attempts = {L}.attempts + 1,
                     claimed_by = excluded.claimed_by, updated_at = {NOW}
                     WHERE {L}.state = 'pending' AND {L}.attempts < ?
                 RETURNING state, row_count, error, {ATTEMPTS}, history",
            )))
            .bind(id.to_string())
            .bind(file.source.to_string())
            .bind(file.key.to_string())
            .bind(file.etag.to_string())
            .bind(file.size as i64)
            .bind(self.owner.clone())
            .bind(max)
            .fetch_optional(&self.pool)
            .await?;
            return match counted {
                Some(row) => Ok(Counted { row, now: true }),
                None => Ok(Counted {
                    row: self.read(&self.pool, id).await?,
                    now: false,
                }),
            };
        }
        let mut tx = self.begin().await?;
        let (prefix, suffix) = self.dialect.insert_ignore;
        sqlx::query(AssertSqlSafe(self.sql(&format!(
            "{prefix} {{L}} (file_id, source, object_key, etag, state, byte_count, attempts)
             VALUES (?, ?, ?, ?, 'pending', ?, 0){suffix}"
        ))))
        .bind(id.to_string())
        .bind(file.source.to_string())
        .bind(file.key.to_string())
        .bind(file.etag.to_string())
        .bind(file.size as i64)
        .execute(&mut *tx)
        .await?;
        let updated = sqlx::query(AssertSqlSafe(self.sql(
            "UPDATE {L} SET attempts = attempts + 1, claimed_by = ?, updated_at = {NOW}
             WHERE file_id = ? AND state = 'pending' AND attempts < ?",
        )))
        .bind(self.owner.clone())
        .bind(id.to_string())
        .bind(max)
        .execute(&mut *tx)
        .await?;
        let now = updated.rows() == 1;
        let row = self.read(&mut *tx, id).await?;
        tx.commit().await?;
        Ok(Counted { row, now })
    }

    /// The file's ledger row.
    pub async fn read<'c, E>(&self, executor: E, id: &str) -> Result<LedgerRow, sqlx::Error>
    where
        E: Executor<'c, Database = DB>,
    {
        sqlx::query_as(AssertSqlSafe(self.sql(
            "SELECT state, row_count, error, {ATTEMPTS}, history FROM {L} WHERE file_id = ?",
        )))
        .bind(id.to_string())
        .fetch_one(executor)
        .await
    }

    /// Marks the file loaded, in the load's transaction (with its rows).
    pub async fn mark_loaded(
        &self,
        conn: &mut DB::Connection,
        id: &str,
        rows: u64,
        table: Option<&String>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.sql(&format!(
            "UPDATE {{L}} SET state = '{}', row_count = ?, target_table = ?, error = NULL, claimed_by = ?,
             loaded_at = {{NOW}}, updated_at = {{NOW}} WHERE file_id = ?",
            state::LOADED
        ))))
        .bind(rows as i64)
        .bind(table.cloned())
        .bind(self.owner.clone())
        .bind(id.to_string())
        .execute(conn)
        .await
        .map(|_| ())
    }

    /// Marks the file failed with its error, in the load's transaction.
    pub async fn mark_failed(
        &self,
        conn: &mut DB::Connection,
        id: &str,
        error: &FileError,
        table: Option<&String>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.sql(&format!(
            "UPDATE {{L}} SET state = '{}', error = ?, target_table = ?, claimed_by = ?, updated_at = {{NOW}}
             WHERE file_id = ?",
            state::FAILED
        ))))
        .bind(serde_json::to_string(error).unwrap_or_default())
        .bind(table.cloned())
        .bind(self.owner.clone())
        .bind(id.to_string())
        .execute(conn)
        .await
        .map(|_| ())
    }

    /// Adds an attempt's transient error to the file's history. Every attempt counted itself
    /// when it started, so the outcome is added whoever holds the file now (the failed load's
    /// transaction may still be rolling back and holding the claim; skipping then would make
    /// the attempt look like a crash). The row lock keeps concurrent additions from
    /// overwriting each other. The row is missing only if the count itself never happened.
    pub async fn record_transient(&self, file: FileRef<'_>, stage: Stage, message: &str) -> Result<(), sqlx::Error> {
        let _writer = self.writer().await;
        let id = file.id();
        let mut tx = self.begin().await?;
        let row: Option<(String, Option<String>)> = sqlx::query_as(AssertSqlSafe(self.sql(&format!(
            "SELECT state, history FROM {{L}} WHERE file_id = ?{}",
            self.dialect.lock_row
        ))))
        .bind(id.clone())
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            None => {
                let (prefix, suffix) = self.dialect.insert_ignore;
                sqlx::query(AssertSqlSafe(self.sql(&format!(
                    "{prefix} {{L}} (file_id, source, object_key, etag, state, byte_count, attempts, history)
                     VALUES (?, ?, ?, ?, 'pending', ?, 1, ?){suffix}"
                ))))
                .bind(id)
                .bind(file.source.to_string())
                .bind(file.key.to_string())
                .bind(file.etag.to_string())
                .bind(file.size as i64)
                .bind(append_history(None, stage, message))
                .execute(&mut *tx)
                .await?;
            }
            Some((current, history)) if current == state::PENDING => {
                sqlx::query(AssertSqlSafe(
                    self.sql("UPDATE {L} SET history = ?, updated_at = {NOW} WHERE file_id = ?"),
                ))
                .bind(append_history(history.as_deref(), stage, message))
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            Some(_) => {}
        }
        tx.commit().await
    }

    /// Loads one file exactly once: see the module docs for the steps.
    pub async fn load<S>(
        &self,
        sink: &S,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
    ) -> Result<LoadOutcome, LoadError>
    where
        S: FileSink<Db = DB>,
    {
        let id = file.id();
        let Some(mut claim) = sink.claim(&id).await.map_err(db)? else {
            return Ok(LoadOutcome::Busy);
        };
        let outcome = self.load_claimed(sink, &mut claim, &id, file, spec, reader).await;
        sink.release(claim, &id).await;
        outcome
    }

    async fn load_claimed<S>(
        &self,
        sink: &S,
        claim: &mut S::Claim,
        id: &str,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
    ) -> Result<LoadOutcome, LoadError>
    where
        S: FileSink<Db = DB>,
    {
        let counted = self.count_attempt(file, id).await.map_err(db)?;
        let (current, rows, error, attempts, history) = counted.row;
        if let Some(done) = outcome_of_state(&current, rows, error) {
            return Ok(done);
        }
        let table = spec.table.as_ref().ok().cloned();
        if !counted.now {
            // Pending, and its attempts are used up (the last ones may have died mid-load).
            let error = retries_exhausted(attempts, history.as_deref());
            let mut tx = sink.begin(claim).await.map_err(db)?;
            self.mark_failed(&mut tx, id, &error, table.as_ref())
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            return Ok(LoadOutcome::Failed(error));
        }
        sink.hold(claim, &[id.to_string()]).await.map_err(db)?;
        let mut tx = sink.begin(claim).await.map_err(db)?;
        let written = self.write_file(sink, &mut tx, file, spec, reader).await?;
        match written {
            Ok(rows) => {
                self.mark_loaded(&mut tx, id, rows, table.as_ref()).await.map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Loaded { rows })
            }
            Err(LoadError::Permanent(error)) => {
                sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                self.mark_failed(&mut tx, id, &error, table.as_ref())
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(LoadOutcome::Failed(error))
            }
            // Dropping the transaction rolls it back: nothing of the file stays.
            Err(transient) => Err(transient),
        }
    }

    /// Writes one file's rows in the load's transaction, under the savepoint `file_rows` (left
    /// in place for the caller to roll back to): a value that does not fit a column this
    /// attempt created undoes the attempt (its DDL included) and loads again with that column
    /// widened. The inner result is the file's; `Err` outside it: the transaction failed.
    async fn write_file<S>(
        &self,
        sink: &S,
        tx: &mut DB::Connection,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
    ) -> Result<Result<u64, LoadError>, LoadError>
    where
        S: FileSink<Db = DB>,
    {
        let table = spec.table.as_ref().ok().cloned();
        sqlx::query("SAVEPOINT file_rows").execute(&mut *tx).await.map_err(db)?;
        let mut spec = Cow::Borrowed(spec);
        loop {
            let mut new_columns = Vec::new();
            let written = match sink.write_rows(&mut *tx, file, &spec, reader, &mut new_columns).await {
                Err(e) => Err(sink.attempt_failed(table.as_deref(), e)),
                ok => ok,
            };
            match written
                .as_ref()
                .err()
                .and_then(|e| widened_spec(e, &new_columns, &spec))
            {
                Some(wider) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    spec = Cow::Owned(wider);
                }
                None => return Ok(written),
            }
        }
    }

    /// Loads several files in ONE transaction, each exactly once, under its own savepoint: the
    /// same steps as [`Ledger::load`] per file (claim, attempt counted and committed first,
    /// rows, ledger row), but one commit for all. A file with a permanent problem is rolled
    /// back to its savepoint and recorded failed while the others commit; a transient problem
    /// of one file leaves it for a later attempt (nothing of it commits) unless the transaction
    /// itself broke, when nothing of the group commits. Outcomes are in `members`' order;
    /// `None`: the file was tried before without an outcome and must load alone (a file whose
    /// load kills the process must not take its group's attempts with it).
    pub async fn load_group<S>(
        &self,
        sink: &S,
        members: &[GroupMember<'_>],
    ) -> Vec<Option<Result<LoadOutcome, LoadError>>>
    where
        S: FileSink<Db = DB>,
        for<'r> (String, i64): FromRow<'r, DB::Row>,
        for<'r> CountedRow: FromRow<'r, DB::Row>,
    {
        let ids: Vec<String> = members.iter().map(|m| m.file.id()).collect();
        let mut results: Vec<Option<Result<LoadOutcome, LoadError>>> = members.iter().map(|_| None).collect();
        let tried = match self.tried_before(&ids).await {
            Ok(tried) => tried,
            Err(e) => return ids.iter().map(|_| Some(Err(db_error_copy(&e)))).collect(),
        };
        // The first file's claim starts the group's; the others join it.
        let mut claim: Option<S::Claim> = None;
        let mut claimed = Vec::with_capacity(members.len());
        for (i, id) in ids.iter().enumerate() {
            if tried.contains(id) {
                continue; // loads alone
            }
            let got = match claim.as_mut() {
                None => match sink.claim(id).await {
                    Ok(Some(c)) => {
                        claim = Some(c);
                        Ok(true)
                    }
                    Ok(None) => Ok(false),
                    Err(e) => Err(e),
                },
                Some(c) => sink.claim_also(c, id).await,
            };
            match got {
                Ok(true) => claimed.push(i),
                Ok(false) => results[i] = Some(Ok(LoadOutcome::Busy)),
                Err(e) => results[i] = Some(Err(db(e))),
            }
        }
        if let Some(mut held) = claim {
            let loaded = self
                .load_claimed_group(sink, &mut held, &ids, members, &claimed, &mut results)
                .await;
            sink.release(held, &ids[claimed[0]]).await;
            if let Err(e) = loaded {
                // Nothing of the group committed: each of its files without an outcome retries.
                for &i in &claimed {
                    if results[i].is_none() {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
    }

    /// [`Ledger::count_attempt`] for the files of a group, in one statement and one commit
    /// where the database has `INSERT ... ON CONFLICT ... RETURNING`, else one by one. In
    /// `files`' order.
    async fn count_attempts(&self, files: &[(FileRef<'_>, &str)]) -> Result<Vec<Counted>, sqlx::Error>
    where
        for<'r> CountedRow: FromRow<'r, DB::Row>,
    {
        if !self.dialect.upsert_returning || files.len() < 2 {
            let mut counted = Vec::with_capacity(files.len());
            for (file, id) in files {
                counted.push(self.count_attempt(*file, id).await?);
            }
            return Ok(counted);
        }
        let values = vec!["(?, ?, ?, ?, 'pending', ?, 1, ?)"; files.len()].join(", ");
        let sql = self.sql(&format!(
            "INSERT INTO {{L}} (file_id, source, object_key, etag, state, byte_count, attempts, claimed_by)
             VALUES {values}
             ON CONFLICT (file_id) DO UPDATE SET attempts = {{L}}.attempts + 1,
                 claimed_by = excluded.claimed_by, updated_at = {{NOW}}
                 WHERE {{L}}.state = 'pending' AND {{L}}.attempts < ?
             RETURNING file_id, state, row_count, error, {{ATTEMPTS}}, history"
        ));
        let mut query = sqlx::query_as::<_, CountedRow>(AssertSqlSafe(sql));
        for (file, id) in files {
            query = query
                .bind(id.to_string())
                .bind(file.source.to_string())
                .bind(file.key.to_string())
                .bind(file.etag.to_string())
                .bind(file.size as i64)
                .bind(self.owner.clone());
        }
        let rows = query.bind(i64::from(self.max_attempts)).fetch_all(&self.pool).await?;
        let mut now: std::collections::HashMap<String, LedgerRow> = rows
            .into_iter()
            .map(|(id, state, rows, error, attempts, history)| (id, (state, rows, error, attempts, history)))
            .collect();
        let mut counted = Vec::with_capacity(files.len());
        for (_, id) in files {
            counted.push(match now.remove(*id) {
                Some(row) => Counted { row, now: true },
                // Loaded or failed already, or out of attempts: as it is.
                None => Counted {
                    row: self.read(&self.pool, id).await?,
                    now: false,
                },
            });
        }
        Ok(counted)
    }

    /// Which of `ids` are pending with an attempt counted already (tried without an outcome:
    /// a transient error, or a load that ended the process). One query for a whole group.
    async fn tried_before(&self, ids: &[String]) -> Result<std::collections::HashSet<String>, sqlx::Error>
    where
        for<'r> (String, i64): FromRow<'r, DB::Row>,
    {
        let marks = vec!["?"; ids.len()].join(", ");
        let sql = self.sql(&format!(
            "SELECT file_id, {{ATTEMPTS}} FROM {{L}} WHERE state = 'pending' AND attempts > 0 AND file_id IN ({marks})"
        ));
        let mut query = sqlx::query_as::<_, (String, i64)>(AssertSqlSafe(sql));
        for id in ids {
            query = query.bind(id.clone());
        }
        Ok(query
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// [`Ledger::load_group`] once the claims are held: outcomes go into `results` only once
    /// they are committed (or need no commit).
    async fn load_claimed_group<S>(
        &self,
        sink: &S,
        claim: &mut S::Claim,
        ids: &[String],
        members: &[GroupMember<'_>],
        claimed: &[usize],
        results: &mut [Option<Result<LoadOutcome, LoadError>>],
    ) -> Result<(), LoadError>
    where
        S: FileSink<Db = DB>,
        for<'r> CountedRow: FromRow<'r, DB::Row>,
    {
        let table = |i: usize| members[i].spec.table.as_ref().ok().cloned();
        let mut exhausted = Vec::new();
        let mut to_load = Vec::new();
        let files: Vec<(FileRef<'_>, &str)> = claimed.iter().map(|&i| (members[i].file, ids[i].as_str())).collect();
        let counts = self.count_attempts(&files).await.map_err(db)?;
        for (&i, counted) in claimed.iter().zip(counts) {
            let (current, rows, error, attempts, history) = counted.row;
            if let Some(done) = outcome_of_state(&current, rows, error) {
                results[i] = Some(Ok(done));
            } else if !counted.now {
                exhausted.push((i, retries_exhausted(attempts, history.as_deref())));
            } else {
                to_load.push(i);
            }
        }
        if exhausted.is_empty() && to_load.is_empty() {
            return Ok(());
        }
        let holding: Vec<String> = to_load.iter().map(|&i| ids[i].clone()).collect();
        if !holding.is_empty() {
            sink.hold(claim, &holding).await.map_err(db)?;
        }
        let mut tx = sink.begin(claim).await.map_err(db)?;
        // Outcomes that hold once the transaction commits.
        let mut staged = Vec::with_capacity(exhausted.len() + to_load.len());
        for (i, error) in exhausted {
            self.mark_failed(&mut tx, &ids[i], &error, table(i).as_ref())
                .await
                .map_err(db)?;
            staged.push((i, LoadOutcome::Failed(error)));
        }
        for i in to_load {
            let m = &members[i];
            match self.write_file(sink, &mut tx, m.file, m.spec, m.reader).await? {
                Ok(rows) => {
                    self.mark_loaded(&mut tx, &ids[i], rows, table(i).as_ref())
                        .await
                        .map_err(db)?;
                    staged.push((i, LoadOutcome::Loaded { rows }));
                }
                Err(LoadError::Permanent(error)) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                    self.mark_failed(&mut tx, &ids[i], &error, table(i).as_ref())
                        .await
                        .map_err(db)?;
                    staged.push((i, LoadOutcome::Failed(error)));
                }
                Err(transient) => {
                    // Undo this file's part; if the transaction itself is broken, the group's.
                    sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                        .execute(&mut *tx)
                        .await
                        .map_err(|_| transient.clone())?;
                    results[i] = Some(Err(transient));
                }
            }
            sqlx::query("RELEASE SAVEPOINT file_rows")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        for (i, outcome) in staged {
            results[i] = Some(Ok(outcome));
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }
}

fn db(e: sqlx::Error) -> LoadError {
    super::db_error(e, Stage::Database)
}

/// [`db`] for an error that is only borrowed.
fn db_error_copy(e: &sqlx::Error) -> LoadError {
    LoadError::transient(Stage::Database, super::db_message(e))
}

/// Rows a statement changed: each driver has its own result type with no common trait.
pub(crate) trait RowsAffected {
    fn rows(&self) -> u64;
}

macro_rules! rows_affected {
    ($($t:ty),*) => {$(
        impl RowsAffected for $t {
            fn rows(&self) -> u64 {
                self.rows_affected()
            }
        }
    )*};
}
rows_affected!(
    sqlx::postgres::PgQueryResult,
    sqlx::mysql::MySqlQueryResult,
    sqlx::sqlite::SqliteQueryResult
);
