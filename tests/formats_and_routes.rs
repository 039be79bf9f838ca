//! Formats (CSV, TSV, JSON lines; gzip and zstd), routes and their options, and write modes,
//! against each database: PostgreSQL, MariaDB and SQLite, with the real binary.

mod common;

use std::path::Path;

use common::*;

const ROUTES: &str = r#"
[[routes]]
prefix = "partner/"
table = "partner_orders"
format = "tsv"
null = "\\N"

[[routes]]
glob = "prices/**/*.csv"
table = "prices"
write_mode = "upsert"
key_columns = ["sku"]
on_new_columns = "add"

[[routes]]
prefix = "strict/"
table = "strict_orders"
on_missing_columns = "fail"

[[routes]]
prefix = "raw/"
table = "raw_lines"
header = false
columns = ["a", "b"]
metadata_columns = true
"#;

fn once(dir: &Path, db: &AnyDb) -> (std::process::ExitStatus, String) {
    std::fs::write(dir.join("routes.toml"), ROUTES).unwrap();
    let env = kv(&[("LOADER_DATABASE__URL", db.url()), ("LOADER_CONFIG", "routes.toml")]);
    let (status, stdout, stderr) = run(dir, &["once"], &env);
    (status, format!("{stdout}{stderr}"))
}

/// Every format and route option against one database.
async fn formats_and_routes_work_against(db: AnyDb, dir: &Path) {
    let incoming = dir.join("data/incoming");
    // Formats and compressions into one table.
    write_old(&incoming.join("orders/a.csv"), orders_csv(1, 10).as_bytes());
    write_old(&incoming.join("orders/b.csv.zst"), &zstd(orders_csv(11, 10).as_bytes()));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, orders_csv(21, 10).as_bytes()).unwrap();
    write_old(&incoming.join("orders/c.csv.gz"), &gz.finish().unwrap());
    write_old(&incoming.join("events/e.jsonl"), orders_jsonl(1, 6).as_bytes());
    write_old(
        &incoming.join("events/f.ndjson.zst"),
        &zstd(orders_jsonl(7, 4).as_bytes()),
    );
    // Routes.
    write_old(&incoming.join("partner/p.tsv"), b"id\tname\n1\t\\N\n2\t\n");
    write_old(
        &incoming.join("prices/2026/11/v1.csv"),
        b"sku,price\nA,1.5\nB,2.5\nA,1.75\n",
    );
    write_old(&incoming.join("raw/r.txt"), b"x,1\ny,2\n");
    let (status, out) = once(dir, &db);
    assert!(status.success(), "{out}");
    assert!(out.contains("loaded 8 "), "{out}");

    assert_eq!(db.scalar("SELECT count(*) FROM orders").await, 30);
    assert_eq!(db.scalar("SELECT count(DISTINCT id) FROM orders").await, 30);
    assert_eq!(db.scalar("SELECT count(*) FROM events").await, 10);
    assert_eq!(db.scalar("SELECT count(*) FROM events WHERE paid").await, 5);
    let tags = match &db {
        AnyDb::Postgres(_) => "SELECT tags::text FROM events WHERE id = 3",
        _ => "SELECT tags FROM events WHERE id = 3",
    };
    assert_eq!(db.text(tags).await.unwrap().replace(' ', ""), "[\"t0\"]");
    if let AnyDb::Postgres(_) = &db {
        assert_eq!(
            db.text("SELECT json_typeof(tags) FROM events WHERE id = 3")
                .await
                .as_deref(),
            Some("array")
        );
    }
    assert_eq!(
        db.scalar("SELECT count(*) FROM partner_orders WHERE name IS NULL")
            .await,
        1,
        "\\N is NULL"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM partner_orders WHERE name = ''").await,
        1,
        "an empty field is not"
    );
    // Upsert: the last row for a key wins within a file.
    assert_eq!(db.scalar("SELECT count(*) FROM prices").await, 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM prices WHERE sku = 'A' AND price = '1.75'")
            .await,
        1
    );
    // Declared columns and lineage.
    assert_eq!(
        db.scalar("SELECT count(*) FROM raw_lines WHERE _source_key = 'incoming/raw/r.txt'")
            .await,
        2
    );
    assert_eq!(db.scalar("SELECT _line FROM raw_lines WHERE a = 'y'").await, 2);
    assert_eq!(
        db.scalar("SELECT count(*) FROM raw_lines WHERE _etag IS NOT NULL AND _loaded_at IS NOT NULL")
            .await,
        2
    );

    // A corrected file: updates a row, inserts another, and brings a new column.
    write_old(
        &incoming.join("prices/2026/12/v2.csv"),
        b"sku,price,currency\nB,3.0,EUR\nC,9.0,USD\n",
    );
    // A file missing a column of its table, under on_missing_columns = "fail", then a good one.
    write_old(&incoming.join("strict/s1.csv"), b"id,name\n1,a\n");
    let (status, out) = once(dir, &db);
    assert!(status.success(), "{out}");
    write_old(&incoming.join("strict/s2.csv"), b"id\n2\n");
    let (status, out) = once(dir, &db);
    assert_eq!(status.code(), Some(1), "{out}");
    assert_eq!(db.scalar("SELECT count(*) FROM prices").await, 3);
    assert_eq!(
        db.text("SELECT currency FROM prices WHERE sku = 'B'").await.as_deref(),
        Some("EUR")
    );
    assert_eq!(db.text("SELECT currency FROM prices WHERE sku = 'A'").await, None);
    assert_eq!(
        db.scalar("SELECT count(*) FROM prices WHERE sku = 'B' AND price = '3.0'")
            .await,
        1
    );
    // An upsert updates the columns the file has and keeps the others: a file without `price`
    // changes B's currency and leaves its price; a new key gets NULL where the file is silent.
    write_old(&incoming.join("prices/2026/12/v3.csv"), b"sku,currency\nB,USD\nD,GBP\n");
    let (status, out) = once(dir, &db);
    assert!(status.success(), "{out}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM prices WHERE sku = 'B' AND price = '3.0' AND currency = 'USD'")
            .await,
        1
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM prices WHERE sku = 'D' AND price IS NULL AND currency = 'GBP'")
            .await,
        1
    );
    let report = std::fs::read_to_string(dir.join("data/failed/strict/s2.csv.error.json")).unwrap();
    assert!(
        report.contains("are not in the file") && report.contains("\"column\": \"name\""),
        "{report}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM strict_orders").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn formats_and_routes_into_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = AnyDb::sqlite(dir.path()).await;
    formats_and_routes_work_against(db, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn formats_and_routes_into_postgres() {
    let dir = tempfile::tempdir().unwrap();
    formats_and_routes_work_against(AnyDb::postgres("routes").await, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn formats_and_routes_into_mariadb() {
    let dir = tempfile::tempdir().unwrap();
    formats_and_routes_work_against(AnyDb::mysql("routes").await, dir.path()).await;
}
