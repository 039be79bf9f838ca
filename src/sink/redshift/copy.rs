//! Redshift's COPY: the manifest of a batch, the statement, and (with the
//! `redshift-emulation` feature, for the tests) the same COPY done against PostgreSQL.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
#[cfg(feature = "redshift-emulation")]
use sqlx::{Postgres, Transaction};

use crate::config::redshift::RedshiftConfig;
use crate::error::{FileError, LoadError};
use crate::format::{self, Compression, Format, FormatOptions};
use crate::reader::FileReader;
use crate::routes::LoadSpec;
use crate::schema::ColumnType;
use crate::sink::quote_ident;
use crate::source::{ObjectMeta, Source};
#[cfg(feature = "redshift-emulation")]
use crate::{error::Stage, sink::db_error, source::INCOMING};

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

/// The COPY statement for one manifest.
pub fn copy_statement(
    table: &str,
    columns: &[String],
    manifest_url: &str,
    config: &RedshiftConfig,
    format: Format,
    options: &FormatOptions,
    compression: Compression,
) -> String {
    let mut sql = format!(
        "COPY {} ({}) FROM {} IAM_ROLE {} MANIFEST",
        quote_ident(table),
        columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
        literal(manifest_url),
        literal(&config.iam_role)
    );
    match format {
        Format::Jsonl => sql.push_str(" FORMAT AS JSON 'auto'"),
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

/// What a COPY did: rows per file URL, or the files it rejected.
pub(super) enum Copied {
    Rows(HashMap<String, u64>),
    Rejected(HashMap<String, FileError>),
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

#[cfg(feature = "redshift-emulation")]
/// Tests only: what `COPY … FROM 's3://…manifest'` does, done with PostgreSQL's COPY FROM STDIN
/// for each file the manifest lists (read back from the store), in the same transaction.
pub(super) async fn emulate_copy(
    tx: &mut Transaction<'static, Postgres>,
    source: &Source,
    table: &str,
    columns: &[String],
    manifest: &Manifest,
    spec: &LoadSpec,
    files: &[&ObjectMeta],
) -> Result<Copied, LoadError> {
    let mut rows = HashMap::new();
    for entry in &manifest.entries {
        let Some(file) = files.iter().find(|f| source.location(INCOMING, &f.key) == entry.url) else {
            return Err(LoadError::transient(
                Stage::Database,
                format!("manifest entry {} is not in the batch", entry.url),
            ));
        };
        sqlx::query("SAVEPOINT emulated_copy")
            .execute(&mut **tx)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        let mut decoded = match FileReader::new(source, file, &spec.format).rows().await {
            Ok(d) => d,
            Err(LoadError::Permanent(fe)) => return Ok(Copied::Rejected(HashMap::from([(entry.url.clone(), fe)]))),
            Err(t) => return Err(t),
        };
        let statement = format!(
            "COPY {} ({}) FROM STDIN WITH (FORMAT csv)",
            quote_ident(table),
            columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
        );
        let mut copy = tx
            .copy_in_raw(&statement)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        let mut buffer = Vec::new();
        let mut failed = None;
        loop {
            match decoded.next_batch().await {
                Ok(Some(b)) => {
                    buffer.clear();
                    crate::sink::postgres::encode_csv(&b, None, &mut buffer);
                    if let Err(e) = copy.send(buffer.as_slice()).await {
                        failed = Some(db_error(e, Stage::Database));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(LoadError::from(e));
                    break;
                }
            }
        }
        let result = match failed {
            Some(e) => {
                let _ = copy.abort("rejected").await;
                Err(e)
            }
            None => copy.finish().await.map_err(|e| db_error(e, Stage::Database)),
        };
        match result {
            Ok(n) => {
                rows.insert(entry.url.clone(), n);
            }
            Err(LoadError::Permanent(fe)) => return Ok(Copied::Rejected(HashMap::from([(entry.url.clone(), fe)]))),
            Err(t) => return Err(t),
        }
    }
    Ok(Copied::Rows(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RedshiftConfig {
        crate::config::redshift::test_config()
    }

    #[test]
    fn the_copy_statement_follows_format_compression_and_options() {
        let cols = vec!["id".to_string(), "name".to_string()];
        let url = "s3://b/manifests/orders/x.manifest";
        let csv = FormatOptions::default();
        assert_eq!(
            copy_statement("orders", &cols, url, &config(), Format::Csv, &csv, Compression::None),
            "COPY \"orders\" (\"id\", \"name\") FROM 's3://b/manifests/orders/x.manifest' IAM_ROLE \
             'arn:aws:iam::123456789012:role/loader' MANIFEST FORMAT AS CSV DELIMITER ',' QUOTE AS '\"' IGNOREHEADER 1 \
             EMPTYASNULL DATEFORMAT 'auto' TIMEFORMAT 'auto' COMPUPDATE OFF STATUPDATE OFF"
        );
        let tsv = FormatOptions {
            null: "\\N".into(),
            ..FormatOptions::default()
        };
        let sql = copy_statement("t", &cols, url, &config(), Format::Tsv, &tsv, Compression::Gzip);
        assert!(
            sql.contains("DELIMITER '\t' QUOTE AS '\"' IGNOREHEADER 1 NULL AS '\\\\N' GZIP"),
            "{sql}"
        );
        let headerless = FormatOptions {
            header: false,
            quote: b'\'',
            ..FormatOptions::default()
        };
        let sql = copy_statement("t", &cols, url, &config(), Format::Csv, &headerless, Compression::Zstd);
        assert!(
            sql.contains("QUOTE AS '''' EMPTYASNULL ZSTD") && !sql.contains("IGNOREHEADER"),
            "{sql}"
        );
        let mut regional = config();
        regional.region = Some("eu-west-1".into());
        let sql = copy_statement("t", &cols, url, &regional, Format::Jsonl, &csv, Compression::None);
        assert!(
            sql.contains("MANIFEST FORMAT AS JSON 'auto' REGION 'eu-west-1'"),
            "{sql}"
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
