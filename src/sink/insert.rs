//! Rows written by multi-row prepared INSERTs (SQLite, MySQL and MariaDB): up to
//! `rows_per_insert` rows per statement, one statement text reused for every full one.

use std::borrow::Cow;

use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Database, Executor, IntoArguments};

use super::quote_ident;
use crate::error::{LoadError, Stage};
use crate::format::{Batch, Decoded};

/// The INSERT statement of one load.
pub(crate) struct Insert {
    head: String,
    /// `(?, ?, ...)`: one row's placeholders.
    row: String,
    /// Appended after the rows (an upsert's conflict clause).
    tail: String,
    pub rows_per_insert: usize,
    full: String,
}

impl Insert {
    /// `INSERT INTO table (columns) VALUES ...{tail}`, with as many rows per statement as
    /// `max_params` placeholders allow, and at most `max_rows`.
    pub fn new(table: &str, columns: &[String], tail: String, max_params: usize, max_rows: usize) -> Insert {
        let width = columns.len().max(1);
        let head = format!("INSERT INTO {} ({}) VALUES ", quote_ident(table), column_list(columns));
        let row = format!("({})", vec!["?"; width].join(", "));
        let rows_per_insert = (max_params / width).clamp(1, max_rows);
        let mut insert = Insert {
            head,
            row,
            tail,
            rows_per_insert,
            full: String::new(),
        };
        insert.full = insert.build(rows_per_insert);
        insert
    }

    fn build(&self, rows: usize) -> String {
        format!("{}{}{}", self.head, vec![self.row.as_str(); rows].join(", "), self.tail)
    }

    fn sql(&self, rows: usize) -> Cow<'_, str> {
        match rows == self.rows_per_insert {
            true => Cow::Borrowed(&self.full),
            false => Cow::Owned(self.build(rows)),
        }
    }

    /// Writes `first` and every batch after it; `bind` binds the values of row `r` of a batch.
    pub async fn write_all<DB, B>(
        &self,
        conn: &mut DB::Connection,
        first: Option<Batch>,
        decoded: &mut Decoded,
        mut bind: B,
    ) -> Result<u64, LoadError>
    where
        DB: Database,
        DB::Arguments: IntoArguments<DB>,
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
        B: for<'b> FnMut(
            Query<'static, DB, DB::Arguments>,
            &'b Batch,
            usize,
        ) -> Result<Query<'static, DB, DB::Arguments>, LoadError>,
    {
        let mut total = 0u64;
        let mut batch = first;
        while let Some(b) = batch {
            let mut start = 0;
            while start < b.len() {
                let end = (start + self.rows_per_insert).min(b.len());
                let mut query = sqlx::query(AssertSqlSafe(self.sql(end - start).into_owned()));
                for r in start..end {
                    query = bind(query, &b, r)?;
                }
                query
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| super::db_error(e, Stage::Database))?;
                total += (end - start) as u64;
                start = end;
            }
            batch = decoded.next_batch().await?;
        }
        Ok(total)
    }
}

/// The quoted column names, comma-separated.
pub(crate) fn column_list(columns: &[String]) -> String {
    columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
}

/// `CREATE TABLE IF NOT EXISTS` with each column's type from `sql_type`, the primary key of an
/// upsert (`keys`) and what the dialect appends (`suffix`).
pub(crate) fn create_table(
    table: &str,
    columns: &[String],
    types: &[crate::schema::ColumnType],
    keys: Option<&[String]>,
    sql_type: impl Fn(&str, crate::schema::ColumnType) -> String,
    suffix: &str,
) -> String {
    let definition = columns
        .iter()
        .zip(types)
        .map(|(c, t)| format!("{} {}", quote_ident(c), sql_type(c, *t)))
        .collect::<Vec<_>>()
        .join(", ");
    let key = keys
        .map(|k| format!(", PRIMARY KEY ({})", column_list(k)))
        .unwrap_or_default();
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({definition}{key}){suffix}",
        quote_ident(table)
    )
}

/// `ALTER TABLE ... ADD COLUMN` (`IF NOT EXISTS` where the dialect has it).
pub(crate) fn add_column(table: &str, column: &str, sql_type: &str, if_not_exists: bool) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN {}{} {sql_type}",
        quote_ident(table),
        if if_not_exists { "IF NOT EXISTS " } else { "" },
        quote_ident(column)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_statements_are_reused_and_the_rest_sized_to_fit() {
        let columns = vec!["a".to_string(), "b".to_string()];
        let insert = Insert::new("t", &columns, " ON CONFLICT DO NOTHING".into(), 5, 100);
        assert_eq!(insert.rows_per_insert, 2);
        assert_eq!(
            insert.sql(2),
            "INSERT INTO \"t\" (\"a\", \"b\") VALUES (?, ?), (?, ?) ON CONFLICT DO NOTHING"
        );
        assert!(matches!(insert.sql(2), Cow::Borrowed(_)));
        assert_eq!(
            insert.sql(1),
            "INSERT INTO \"t\" (\"a\", \"b\") VALUES (?, ?) ON CONFLICT DO NOTHING"
        );
        let wide = Insert::new("t", &columns, String::new(), 65_535, 500);
        assert_eq!(wide.rows_per_insert, 500);
    }

    #[test]
    fn tables_and_columns_are_declared_with_the_dialects_types() {
        use crate::schema::ColumnType;
        let sql = create_table(
            "t",
            &["id".to_string(), "v".to_string()],
            &[ColumnType::Integer, ColumnType::Text],
            Some(&["id".to_string()]),
            |_, t| format!("{t:?}"),
            " ENGINE = InnoDB",
        );
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS \"t\" (\"id\" Integer, \"v\" Text, PRIMARY KEY (\"id\")) ENGINE = InnoDB"
        );
        assert_eq!(
            add_column("t", "c", "TEXT", true),
            "ALTER TABLE \"t\" ADD COLUMN IF NOT EXISTS \"c\" TEXT"
        );
    }
}
