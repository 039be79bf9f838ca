//! Tests of loading and validating the configuration.

use std::path::Path;

use super::*;

#[test]
fn source_urls_parse_into_folder_or_bucket_and_root() {
    assert_eq!(parse_source_url("file://./data"), Ok(SourceUrl::Local("./data".into())));
    assert_eq!(
        parse_source_url("s3://my-bucket"),
        Ok(SourceUrl::S3 {
            bucket: "my-bucket".into(),
            root: String::new()
        })
    );
    assert_eq!(
        parse_source_url("s3://my-bucket/a/b/"),
        Ok(SourceUrl::S3 {
            bucket: "my-bucket".into(),
            root: "a/b/".into()
        })
    );
    assert!(parse_source_url("s3://UPPER").is_err());
    assert!(parse_source_url("http://x").is_err());
    assert!(parse_source_url("file://").is_err());
}

#[test]
fn the_database_scheme_selects_the_dialect() {
    assert_eq!(dialect_of("postgres://u:p@h/db"), Ok(Dialect::Postgres));
    assert_eq!(dialect_of("postgresql://h/db"), Ok(Dialect::Postgres));
    assert_eq!(dialect_of("mysql://root@h/db"), Ok(Dialect::MySql));
    assert_eq!(dialect_of("sqlite://./x.db"), Ok(Dialect::Sqlite));
    let err = dialect_of("oracle://scott:tiger@h/db").unwrap_err();
    assert!(!err.contains("tiger"), "{err}");
}

#[test]
fn the_shipped_configuration_files_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["config/default.toml", "config/container.toml", "k8s/base/config.toml"] {
        Config::figment(Some(&root.join(file)))
            .extract::<Config>()
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .validated()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn a_pool_no_larger_than_the_workers_is_refused() {
    let mut c = Config::default();
    c.workers.concurrency = 4;
    c.database.max_connections = 4;
    let err = c.clone().validated().unwrap_err();
    assert!(err.problems[0].starts_with("database.max_connections:"), "{err:?}");
    c.database.max_connections = 5;
    assert!(c.clone().validated().is_ok());
    c.database.max_connections = 0;
    assert!(c.validated().is_ok());
}

#[test]
fn every_problem_is_reported_at_once_with_its_key() {
    let mut c = Config::default();
    c.schedule.max_files_per_tick = 0;
    c.workers.concurrency = 0;
    c.csv.delimiter = ",,".into();
    c.http.listen = "nowhere".into();
    let err = c.validated().unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.split(':').next().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "schedule.max_files_per_tick",
            "workers.concurrency",
            "csv.delimiter",
            "http.listen"
        ]
    );
}

#[test]
fn bad_limits_are_each_named_with_what_is_accepted() {
    let limits = Config::default().limits.input_limits();
    assert_eq!(
        (
            limits.record_bytes,
            limits.field_bytes,
            limits.columns,
            limits.json_keys
        ),
        (16 << 20, 10 << 20, 1600, 1600)
    );
    let mut c = Config::default();
    c.limits.record_bytes = 100;
    c.limits.field_bytes = 0;
    c.limits.columns = 5000;
    c.limits.json_keys = 0;
    let keys: Vec<String> = c
        .validated()
        .unwrap_err()
        .problems
        .iter()
        .map(|p| p.split(':').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "limits.record_bytes",
            "limits.field_bytes",
            "limits.columns",
            "limits.json_keys"
        ]
    );
}
