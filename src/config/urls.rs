//! The source and database URLs: where files come from and which database gets them.

use std::path::PathBuf;

/// The source URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUrl {
    Local(PathBuf),
    S3 { bucket: String, root: String },
}

/// Which database the URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
    /// Amazon Redshift, over the PostgreSQL protocol, loading by COPY from S3.
    Redshift,
}

/// Parses `file://DIR` and `s3://BUCKET[/ROOT]`.
pub fn parse_source_url(url: &str) -> Result<SourceUrl, String> {
    if let Some(path) = url.strip_prefix("file://") {
        if path.is_empty() {
            return Err("file:// needs a folder, e.g. file://./data or file:///var/lib/loader".into());
        }
        return Ok(SourceUrl::Local(PathBuf::from(path)));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, root) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !valid_bucket {
            return Err(format!("{bucket:?} is not a valid S3 bucket name"));
        }
        let root = root.trim_matches('/');
        let root = if root.is_empty() {
            String::new()
        } else {
            format!("{root}/")
        };
        return Ok(SourceUrl::S3 {
            bucket: bucket.into(),
            root,
        });
    }
    Err(format!(
        "expected file://DIR or s3://BUCKET[/ROOT], got {:?}",
        crate::redact::url(url)
    ))
}

/// Picks the database from the URL scheme.
pub fn dialect_of(url: &str) -> Result<Dialect, String> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "postgres" | "postgresql" => Ok(Dialect::Postgres),
        "mysql" | "mariadb" => Ok(Dialect::MySql),
        "sqlite" => Ok(Dialect::Sqlite),
        "redshift" => Ok(Dialect::Redshift),
        _ => Err(format!(
            "expected a postgres://, mysql://, sqlite:// or redshift:// URL, got {:?}",
            crate::redact::url(url)
        )),
    }
}
