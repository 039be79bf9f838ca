//! Redshift's COPY: the manifest of a batch, the statement, and (with the
//! `redshift-emulation` feature, for the tests) the same COPY done against PostgreSQL.

#[cfg(feature = "redshift-emulation")]
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
#[cfg(feature = "redshift-emulation")]
use sqlx::postgres::PgConnection;

use crate::config::redshift::RedshiftConfig;
use crate::error::LoadError;
use crate::format::{self, Compression, Format, FormatOptions};
use crate::reader::FileReader;
use crate::routes::LoadSpec;
use crate::schema::ColumnType;
use crate::sink::quote_ident;
use crate::source::{ObjectMeta, Source};
#[cfg(feature = "redshift-emulation")]
use crate::{
    error::{FileError, Stage},
    sink::db_error,
    source::INCOMING,
};

/// A Redshift COPY manifest.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    pub url: String,
    pub mandatory: bool,
    pub meta: ManifestMeta,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestMeta {
    pub content_length: u64,
}

impl Manifest {
    /// Every file, mandatory (a file missing at COPY time fails the COPY, so nothing is
    /// recorded as loaded that was not).
    pub fn of(files: &[(String, u64)]) -> Manifest {
        Manifest {
            entries: files
                .iter()
                .map(|(url, size)| ManifestEntry {
                    url: url.clone(),
                    mandatory: true,
                    meta: ManifestMeta { content_length: *size },
                })
                .collect(),
        }
    }
}

/// A Redshift string literal.
pub(super) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// What one COPY reads: the manifest, and how its files are written.
pub struct CopyInput<'a> {
    pub manifest_url: &'a str,
    /// For JSON: the JSONPaths file mapping keys to the columns, by position (see
    /// [`json_paths`]); without it, `'auto ignorecase'` (keys matched to column names in any
    /// case).
    pub json_paths_url: Option<&'a str>,
    pub format: Format,
    pub options: &'a FormatOptions,
    pub compression: Compression,
}

/// The COPY statement for one manifest.
pub fn copy_statement(table: &str, columns: &[String], input: &CopyInput, config: &RedshiftConfig) -> String {
    let CopyInput {
        manifest_url,
        json_paths_url,
        format,
        options,
        compression,
    } = *input;
    let mut sql = format!(
        "COPY {} ({}) FROM {} IAM_ROLE {} MANIFEST",
        quote_ident(table),
        columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
        literal(manifest_url),
        literal(&config.iam_role)
    );
    match format {
        Format::Jsonl => match json_paths_url {
            Some(url) => sql.push_str(&format!(" FORMAT AS JSON {}", literal(url))),
            None => sql.push_str(" FORMAT AS JSON 'auto ignorecase'"),
        },
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Tsv && options.format.is_none() {
                b'\t'
            } else {
                options.delimiter
            };
            sql.push_str(&format!(
                " FORMAT AS CSV DELIMITER {} QUOTE AS {}",
                literal(&(delimiter as char).to_string()),
                literal(&(options.quote as char).to_string())
            ));
            if options.header {
                sql.push_str(" IGNOREHEADER 1");
            }
            // An unquoted empty field is NULL, as everywhere in the loader.
            if options.null.is_empty() {
                sql.push_str(" EMPTYASNULL");
            } else {
                sql.push_str(&format!(" NULL AS {}", literal(&options.null)));
            }
        }
    }
    match compression {
        Compression::Gzip => sql.push_str(" GZIP"),
        Compression::Zstd => sql.push_str(" ZSTD"),
        Compression::None => {}
    }
    if let Some(region) = &config.region {
        sql.push_str(&format!(" REGION {}", literal(region)));
    }
    sql.push_str(" DATEFORMAT 'auto' TIMEFORMAT 'auto' COMPUPDATE OFF STATUPDATE OFF");
    sql
}

/// A JSONPaths file: the value of each key, in order, for the columns of the COPY in the same
/// order. Bracket notation, so that a key is taken exactly as written.
pub fn json_paths(keys: &[String]) -> String {
    let paths: Vec<String> = keys.iter().map(|k| format!("$['{k}']")).collect();
    serde_json::json!({ "jsonpaths": paths }).to_string()
}

/// Redshift column types.
pub fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "BIGINT",
        // Redshift DECIMAL needs a fixed scale; text keeps every digit as written.
        ColumnType::Numeric => "VARCHAR(65535)",
        ColumnType::Float => "DOUBLE PRECISION",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Date => "DATE",
        ColumnType::Timestamp => "TIMESTAMP",
        ColumnType::TimestampTz => "TIMESTAMPTZ",
        ColumnType::Text => "VARCHAR(65535)",
        ColumnType::Json => "SUPER",
    }
}

/// The header, the types the format fixes and a sample of the first file.
pub(super) async fn read_header(
    source: &Source,
    file: &ObjectMeta,
    spec: &LoadSpec,
) -> Result<(Vec<String>, Vec<Option<ColumnType>>, Option<format::Batch>), LoadError> {
    let mut decoded = FileReader::new(source, file, &spec.format).rows().await?;
    let sample = decoded.next_batch().await.map_err(LoadError::from)?;
    Ok((decoded.header, decoded.types, sample))
}

/// Tests only: what `COPY … FROM 's3://…manifest'` does, done with PostgreSQL's COPY FROM STDIN
/// for each file the manifest lists, in the same transaction. As Redshift: each key is read as
/// it is now (whatever version was listed), CSV fields go to the columns by position, JSON
/// values by the JSONPaths keys, and a rejected file is written to `stl_load_errors` under the
/// COPY's session, outside its transaction (so it survives the rollback), before the COPY
/// fails.
#[cfg(feature = "redshift-emulation")]
pub(super) struct Emulated<'a> {
    /// Where `stl_load_errors` is written, outside the COPY's transaction.
    pub pool: &'a sqlx::PgPool,
    /// The COPY's session (`pg_backend_pid()` of its connection).
    pub session: i32,
    pub table: &'a str,
    pub columns: &'a [String],
    /// The JSONPaths keys of a JSON COPY.
    pub json_paths: Option<&'a [String]>,
}

#[cfg(feature = "redshift-emulation")]
impl Emulated<'_> {
    /// The emulated system table, created with the ledger.
    pub(super) async fn create_log(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('s3-sql-loader:stl_load_errors'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS stl_load_errors (
                query bigserial, session integer NOT NULL, starttime timestamp NOT NULL DEFAULT now(),
                filename char(256) NOT NULL, line_number bigint, colname char(127), err_reason char(100)
            )",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    pub(super) async fn run(
        &self,
        tx: &mut PgConnection,
        source: &Source,
        manifest: &Manifest,
        spec: &LoadSpec,
        files: &[&ObjectMeta],
    ) -> Result<HashMap<String, u64>, LoadError> {
        let mut rows = HashMap::new();
        for entry in &manifest.entries {
            let Some(listed) = files.iter().find(|f| source.location(INCOMING, &f.key) == entry.url) else {
                return Err(LoadError::transient(
                    Stage::Database,
                    format!("manifest entry {} is not in the batch", entry.url),
                ));
            };
            let current = source
                .etag_at(&format!("{INCOMING}{}", listed.key))
                .await
                .map_err(|e| e.into_load_error(Stage::Get))?;
            let Some(etag) = current else {
                return Err(LoadError::transient(
                    Stage::Database,
                    format!("the manifest's mandatory file {} does not exist", entry.url),
                ));
            };
            let file = ObjectMeta {
                etag,
                ..(*listed).clone()
            };
            match self.copy_file(tx, source, &file, spec).await {
                Ok(n) => {
                    rows.insert(entry.url.clone(), n);
                }
                Err(LoadError::Permanent(e)) => {
                    self.log_error(&entry.url, &e).await?;
                    return Err(LoadError::Permanent(e));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(rows)
    }

    async fn copy_file(
        &self,
        tx: &mut PgConnection,
        source: &Source,
        file: &ObjectMeta,
        spec: &LoadSpec,
    ) -> Result<u64, LoadError> {
        let mut decoded = FileReader::new(source, file, &spec.format).rows().await?;
        // Where each column's value is in the file's rows: JSON by key, CSV by position.
        let map: Option<Vec<Option<usize>>> = self.json_paths.map(|keys| {
            keys.iter()
                .map(|k| decoded.header.iter().position(|h| h == k))
                .collect()
        });
        let statement = format!(
            "COPY {} ({}) FROM STDIN WITH (FORMAT csv)",
            quote_ident(self.table),
            self.columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let copy_error = |e| crate::sink::postgres::copy_error(e, self.columns, 0);
        let mut copy = tx.copy_in_raw(&statement).await.map_err(copy_error)?;
        let mut buffer = Vec::new();
        // The file line of each row sent, to report PostgreSQL's "line N" (the Nth row) as
        // Redshift reports `line_number`.
        let mut lines = Vec::new();
        let failed = loop {
            match decoded.next_batch().await {
                Ok(Some(b)) => {
                    buffer.clear();
                    match &map {
                        None => crate::sink::postgres::encode_csv(&b, None, &mut buffer),
                        Some(map) => encode_mapped(&b, map, &mut buffer),
                    }
                    lines.extend((0..b.len()).map(|r| b.line(r)));
                    if let Err(e) = copy.send(buffer.as_slice()).await {
                        break Some(copy_error(e));
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(LoadError::from(e)),
            }
        };
        let result = match failed {
            Some(e) => {
                let _ = copy.abort("rejected").await;
                Err(e)
            }
            None => copy.finish().await.map_err(copy_error),
        };
        result.map_err(|e| match e {
            LoadError::Permanent(mut fe) if fe.line.is_none() => {
                fe.line = fe.record.and_then(|n| lines.get((n as usize).checked_sub(1)?)).copied();
                LoadError::Permanent(fe)
            }
            other => other,
        })
    }

    async fn log_error(&self, url: &str, e: &FileError) -> Result<(), LoadError> {
        let reason: String = e
            .database_message
            .as_deref()
            .unwrap_or(&e.message)
            .chars()
            .take(100)
            .collect();
        sqlx::query(
            "INSERT INTO stl_load_errors (session, filename, line_number, colname, err_reason) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(self.session)
        .bind(url)
        .bind(e.line.unwrap_or(0) as i64)
        .bind(e.column.clone().unwrap_or_default())
        .bind(reason)
        .execute(self.pool)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }
}

/// Rows as COPY CSV, each column's value taken from the field `map` names (NULL where none).
#[cfg(feature = "redshift-emulation")]
fn encode_mapped(batch: &format::Batch, map: &[Option<usize>], out: &mut Vec<u8>) {
    for r in 0..batch.len() {
        let fields: Vec<Option<&str>> = batch.row(r).collect();
        for (i, source) in map.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if let Some(value) = source.and_then(|s| fields.get(s).copied().flatten()) {
                out.push(b'"');
                out.extend_from_slice(value.replace('"', "\"\"").as_bytes());
                out.push(b'"');
            }
        }
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RedshiftConfig {
        crate::config::redshift::test_config()
    }

    fn input<'a>(format: Format, options: &'a FormatOptions, compression: Compression) -> CopyInput<'a> {
        CopyInput {
            manifest_url: "s3://b/manifests/orders/x.manifest",
            json_paths_url: None,
            format,
            options,
            compression,
        }
    }

    #[test]
    fn the_copy_statement_follows_format_compression_and_options() {
        let cols = vec!["id".to_string(), "name".to_string()];
        let csv = FormatOptions::default();
        assert_eq!(
            copy_statement("orders", &cols, &input(Format::Csv, &csv, Compression::None), &config()),
            "COPY \"orders\" (\"id\", \"name\") FROM 's3://b/manifests/orders/x.manifest' IAM_ROLE \
             'arn:aws:iam::123456789012:role/loader' MANIFEST FORMAT AS CSV DELIMITER ',' QUOTE AS '\"' IGNOREHEADER 1 \
             EMPTYASNULL DATEFORMAT 'auto' TIMEFORMAT 'auto' COMPUPDATE OFF STATUPDATE OFF"
        );
        let tsv = FormatOptions {
            null: "\\N".into(),
            ..FormatOptions::default()
        };
        let sql = copy_statement("t", &cols, &input(Format::Tsv, &tsv, Compression::Gzip), &config());
        assert!(
            sql.contains("DELIMITER '\t' QUOTE AS '\"' IGNOREHEADER 1 NULL AS '\\\\N' GZIP"),
            "{sql}"
        );
        let headerless = FormatOptions {
            header: false,
            quote: b'\'',
            ..FormatOptions::default()
        };
        let sql = copy_statement(
            "t",
            &cols,
            &input(Format::Csv, &headerless, Compression::Zstd),
            &config(),
        );
        assert!(
            sql.contains("QUOTE AS '''' EMPTYASNULL ZSTD") && !sql.contains("IGNOREHEADER"),
            "{sql}"
        );
        let mut regional = config();
        regional.region = Some("eu-west-1".into());
        let sql = copy_statement("t", &cols, &input(Format::Jsonl, &csv, Compression::None), &regional);
        assert!(
            sql.contains("MANIFEST FORMAT AS JSON 'auto ignorecase' REGION 'eu-west-1'"),
            "{sql}"
        );
        let with_paths = CopyInput {
            json_paths_url: Some("s3://b/manifests/orders/x.jsonpaths"),
            ..input(Format::Jsonl, &csv, Compression::Gzip)
        };
        let sql = copy_statement("t", &cols, &with_paths, &config());
        assert!(
            sql.contains("MANIFEST FORMAT AS JSON 's3://b/manifests/orders/x.jsonpaths' GZIP"),
            "{sql}"
        );
    }

    #[test]
    fn json_paths_take_each_key_as_written_in_column_order() {
        let keys = ["Amount".to_string(), "id".to_string(), " note ".to_string()];
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json_paths(&keys)).unwrap(),
            serde_json::json!({"jsonpaths": ["$['Amount']", "$['id']", "$[' note ']"]})
        );
    }

    #[test]
    fn the_manifest_lists_every_file_as_mandatory_with_its_size() {
        let m = Manifest::of(&[
            ("s3://b/incoming/t/a.csv".into(), 10),
            ("s3://b/incoming/t/b.csv.gz".into(), 20),
        ]);
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"entries": [
                {"url": "s3://b/incoming/t/a.csv", "mandatory": true, "meta": {"content_length": 10}},
                {"url": "s3://b/incoming/t/b.csv.gz", "mandatory": true, "meta": {"content_length": 20}}
            ]})
        );
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal("it's \\ here"), "'it''s \\\\ here'");
    }
}
