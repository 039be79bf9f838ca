//! S3 (moto, through the real aws-sdk-s3) into the real PostgreSQL, with the real binary.

mod common;

use std::time::Duration;

use common::*;

fn loader_env(moto: &Moto, bucket: &str, db: &PgDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = moto.env();
    env.extend(kv(&[
        ("LOADER_SOURCE__URL", &format!("s3://{bucket}")),
        ("LOADER_DATABASE__URL", &db.url),
        ("LOADER_SCHEDULE__INTERVAL", "1s"),
    ]));
    env.extend(kv(extra));
    env
}

async fn put_many(bucket: &Bucket, files: Vec<(String, String)>) {
    for chunk in files.chunks(32) {
        let puts = chunk.iter().map(|(k, v)| bucket.put(k, v.clone().into_bytes()));
        futures_join(puts).await;
    }
}

async fn futures_join<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let handles: Vec<_> = futures.collect();
    for f in handles {
        f.await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_in_nested_prefixes_load_into_postgres_and_move_to_processed() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "e2e").await;
    let db = PgDb::create("e2e").await;
    bucket.put("incoming/orders/2026/11/01/a.csv", orders_csv(1, 100)).await;
    bucket
        .put("incoming/orders/2026/11/02/b.csv", orders_csv(101, 50))
        .await;
    bucket.put("incoming/orders/c.csv", orders_csv(151, 1)).await;
    bucket.put("incoming/customers/x y.csv", "id,name\n1,Ann\n2,\n").await;
    bucket.put("unrelated/z.csv", "id\n1\n").await;

    let env = loader_env(&moto, "e2e", &db, &[("LOADER_WORKERS__FILES_PER_SECOND", "2")]);
    let dir = tempfile::tempdir().unwrap();
    let mut loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    let max_backlog = std::sync::atomic::AtomicU64::new(0);
    wait_until(Duration::from_secs(60), "4 files loaded and backlog 0", || async {
        let s = loader.status().await;
        max_backlog.fetch_max(
            s["backlog"]["files"].as_u64().unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        !s["backlog"]["listed_at"].is_null() && s["backlog"]["files"] == 0 && s["totals"]["files_loaded"] == 4
    })
    .await;
    assert!(max_backlog.into_inner() > 0, "the backlog was never seen above 0");
    let status = loader.status().await;
    assert_eq!(status["totals"]["rows_loaded"], 153);
    assert_eq!(status["backlog"]["oldest_age_seconds"], serde_json::Value::Null);

    assert_eq!(bucket.keys("incoming/").await, Vec::<String>::new());
    assert_eq!(
        bucket.keys("processed/").await,
        [
            "processed/customers/x y.csv",
            "processed/orders/2026/11/01/a.csv",
            "processed/orders/2026/11/02/b.csv",
            "processed/orders/c.csv"
        ]
    );
    assert_eq!(bucket.keys("unrelated/").await, ["unrelated/z.csv"]);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 151);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 151);
    assert_eq!(
        db.count("SELECT sum(id)::bigint FROM orders").await,
        (1..=151).sum::<i64>()
    );
    assert_eq!(
        db.count("SELECT count(*) FROM customers WHERE name IS NULL").await,
        1,
        "empty field is NULL"
    );
    let types: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_name = 'orders' ORDER BY ordinal_position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let types: Vec<(&str, &str)> = types.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        types,
        [
            ("id", "bigint"),
            ("customer", "text"),
            ("amount", "numeric"),
            ("paid", "boolean"),
            ("created_on", "date")
        ]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded' AND attempts = 1")
            .await,
        4
    );

    loader.signal(libc::SIGTERM);
    assert!(
        loader.wait_exit(Duration::from_secs(10)).expect("exits").success(),
        "{}",
        loader.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_a_thousand_keys_are_all_found_and_loaded() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "many").await;
    let db = PgDb::create("many").await;
    let files = (0..1100)
        .map(|i| (format!("incoming/events/{i:05}.csv"), format!("id,n\n{i},{}\n", i * 2)))
        .collect();
    put_many(&bucket, files).await;

    let dir = tempfile::tempdir().unwrap();
    let env = loader_env(
        &moto,
        "many",
        &db,
        &[
            ("LOADER_SCHEDULE__MAX_FILES_PER_TICK", "5000"),
            ("LOADER_WORKERS__FILES_PER_SECOND", "1000"),
        ],
    );
    let (status, stdout, stderr) = run(dir.path(), &["status"], &env);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("backlog:  1100 file(s)"), "{stdout}");

    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("listed 1100 | loaded 1100 (1100 rows)"), "{stdout}");
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM events").await, 1100);
    assert_eq!(bucket.keys("processed/events/").await.len(), 1100);
    assert!(bucket.keys("incoming/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_files_go_to_failed_with_reports_and_leave_no_rows_while_good_ones_load() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "bad").await;
    let db = PgDb::create("bad").await;
    let dir = tempfile::tempdir().unwrap();
    let env = loader_env(&moto, "bad", &db, &[]);
    bucket.put("incoming/orders/first.csv", orders_csv(1, 10)).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");

    let mut typed = orders_csv(100, 3);
    typed.push_str("103,x,1.5,maybe,2026-11-01\n");
    bucket.put("incoming/orders/typed.csv", typed).await;
    bucket
        .put("incoming/orders/ragged.csv", "id,customer\n1,a,extra\n")
        .await;
    bucket.put("incoming/orders/newcol.csv", "id,surprise\n500,x\n").await;
    bucket.put("incoming/bad-table/a.csv", "id\n1\n").await;
    bucket
        .put("incoming/orders/badcol.csv", "id,\"x; drop table orders\"\n1,2\n")
        .await;
    bucket.put("incoming/orders/good.csv", orders_csv(200, 5)).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1));
    assert!(
        stdout.contains("loaded 1 (5 rows)") && stdout.contains("failed 5"),
        "{stdout}"
    );
    // The log names the kind as the report does (`type`, not `Type`).
    let logged: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["message"] == "failed; moved to failed/")
        .collect();
    let typed_log = logged
        .iter()
        .find(|e| e["file.key"] == "orders/typed.csv" || e["span"]["file.key"] == "orders/typed.csv")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(typed_log["error.kind"], "type", "{typed_log}");

    assert_eq!(bucket.keys("incoming/").await, Vec::<String>::new());
    assert_eq!(
        bucket.keys("processed/").await,
        ["processed/orders/first.csv", "processed/orders/good.csv"]
    );
    let report = |key: &'static str| {
        let bucket = &bucket;
        async move { serde_json::from_slice::<serde_json::Value>(&bucket.get(key).await).unwrap() }
    };
    let typed = report("failed/orders/typed.csv.error.json").await;
    assert_eq!(typed["error"]["kind"], "type", "{typed}");
    assert_eq!(typed["error"]["record"], 4, "{typed}");
    assert_eq!(typed["error"]["column"], "paid", "{typed}");
    // The loader's own check caught it, before PostgreSQL could read the value its own way.
    assert!(
        typed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"maybe\" is not a valid boolean"),
        "{typed}"
    );
    assert_eq!(typed["key"], "incoming/orders/typed.csv");
    assert_eq!(
        report("failed/orders/ragged.csv.error.json").await["error"]["kind"],
        "decode"
    );
    let newcol = report("failed/orders/newcol.csv.error.json").await;
    assert_eq!(newcol["error"]["kind"], "schema");
    assert_eq!(newcol["error"]["column"], "surprise");
    assert_eq!(
        report("failed/bad-table/a.csv.error.json").await["error"]["kind"],
        "unsafe_name"
    );
    assert_eq!(
        report("failed/orders/badcol.csv.error.json").await["error"]["kind"],
        "unsafe_name"
    );
    for key in [
        "failed/orders/typed.csv",
        "failed/orders/ragged.csv",
        "failed/bad-table/a.csv",
    ] {
        assert!(
            bucket.keys(key).await.contains(&key.to_string()),
            "{key} moved to failed/"
        );
    }

    assert_eq!(
        db.count("SELECT count(*) FROM orders").await,
        15,
        "only first.csv and good.csv"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE id >= 100 AND id < 200")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'failed'")
            .await,
        5
    );
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        ["orders", "s3_sql_loader_files", "s3_sql_loader_files_claims"],
        "nothing was created from a bad name"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_whose_move_failed_is_moved_on_the_next_tick_without_duplicates() {
    let db = PgDb::create("crash_move").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 40).as_bytes());
    write_old(
        &d.join("data/processed/orders"),
        b"a file where the move needs a folder",
    );
    let env = kv(&[("LOADER_DATABASE__URL", &db.url)]);
    let (status, stdout, _) = run(d, &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 40);
    assert_eq!(files_under(&d.join("data/incoming")), ["orders/a.csv"]);

    std::fs::remove_file(d.join("data/processed/orders")).unwrap();
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("already loaded 1"), "{stdout}");
    assert_eq!(files_under(&d.join("data/processed")), ["orders/a.csv"]);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 40);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_loaders_on_one_bucket_never_load_a_file_twice() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "replicas").await;
    let db = PgDb::create("replicas").await;
    let files = (0..200u64)
        .map(|i| (format!("incoming/orders/{:03}/f.csv", i), orders_csv(i * 10 + 1, 10)))
        .collect();
    put_many(&bucket, files).await;

    // Both list the same files at the same moments; only ledger locks keep them apart.
    let env = loader_env(
        &moto,
        "replicas",
        &db,
        &[
            ("LOADER_WORKERS__CONCURRENCY", "3"),
            ("LOADER_SCHEDULE__MAX_FILES_PER_TICK", "200"),
        ],
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Loader::spawn(dir_a.path(), &env);
    let mut b = Loader::spawn(dir_b.path(), &env);
    a.wait_up().await;
    b.wait_up().await;
    wait_until(Duration::from_secs(120), "200 files processed", || async {
        bucket.keys("processed/").await.len() == 200 && bucket.keys("incoming/").await.is_empty()
    })
    .await;
    // Let both finish what they hold, then stop them.
    for l in [&a, &b] {
        wait_until(Duration::from_secs(20), "idle", || async {
            l.status().await["in_flight"] == 0
        })
        .await;
    }
    let (sa, sb) = (a.status().await, b.status().await);
    for l in [&mut a, &mut b] {
        l.signal(libc::SIGTERM);
        assert!(l.wait_exit(Duration::from_secs(15)).expect("exits").success());
    }

    let loaded_a = a.log_events("loaded").len();
    let loaded_b = b.log_events("loaded").len();
    assert_eq!(
        loaded_a + loaded_b,
        200,
        "every file loaded exactly once across both processes"
    );
    assert!(
        loaded_a > 0 && loaded_b > 0,
        "both loaders did work: {loaded_a} + {loaded_b}"
    );
    let total = sa["totals"]["files_loaded"].as_u64().unwrap() + sb["totals"]["files_loaded"].as_u64().unwrap();
    assert_eq!(total, 200);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 2000);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 2000);
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded'")
            .await,
        200
    );
    assert_eq!(
        db.count("SELECT coalesce(sum(attempts), 0)::bigint FROM s3_sql_loader_files")
            .await,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_that_copy_would_misread_is_loaded_through_the_parser_instead() {
    let db = PgDb::create("passthrough").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = [
        (
            "notes/plain.csv",
            "id,note\n1,a\n2,\"b,\"\"c\"\"\nd\"\n3,\"\"\n4,\n".to_string(),
        ),
        ("notes/blank_line.csv", "id,note\n5,a\n\n6,b\n".into()),
        ("notes/inner_quote.csv", "id,note\n7,5\" disk\n".into()),
        ("notes/mixed_line_ends.csv", "id,note\r\n8,a\r\n9,b\n".into()),
        ("notes/bom_crlf.csv", "\u{feff}id,note\r\n10,a\r\n".into()),
        // COPY would stop at a line holding only \. and load half the file; the parser loads all.
        ("marks/m.csv", "mark\nx\n\\.\ny\n".into()),
    ];
    // The tables exist, so every file goes to COPY as raw bytes when it safely can.
    sqlx::query("CREATE TABLE notes (id bigint, note text)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE marks (mark text)")
        .execute(&db.pool)
        .await
        .unwrap();
    for (key, csv) in &files {
        write_old(&d.join("data/incoming").join(key), csv.as_bytes());
    }
    let (status, stdout, stderr) = run(
        d,
        &["once"],
        &kv(&[("LOADER_DATABASE__URL", &db.url), ("RUST_LOG", "info")]),
    );
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 6 (13 rows)"), "{stdout}");
    let notes: Vec<(i64, Option<String>)> = sqlx::query_as("SELECT id, note FROM notes ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let note = |id: i64, n: Option<&str>| (id, n.map(str::to_string));
    assert_eq!(
        notes,
        [
            note(1, Some("a")),
            note(2, Some("b,\"c\"\nd")),
            note(3, Some("")),
            note(4, None),
            note(5, Some("a")),
            note(6, Some("b")),
            note(7, Some("5\" disk")),
            note(8, Some("a")),
            note(9, Some("b")),
            note(10, Some("a")),
        ]
    );
    let marks: Vec<String> = sqlx::query_scalar("SELECT mark FROM marks ORDER BY mark")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(marks, ["\\.", "x", "y"]);
    let refused = stderr.matches("passthrough refused").count();
    assert_eq!(
        refused, 4,
        "blank line, inner quote, mixed line ends and the marker fall back:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_ignores_conditional_copies_is_found_out_and_processed_is_never_replaced() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "copy-guard").await;
    let db = PgDb::create("copy_guard").await;
    let dir = tempfile::tempdir().unwrap();
    // The README's settings for an S3-compatible store: endpoint and path style, nothing else.
    let env = loader_env(&moto, "copy-guard", &db, &[]);
    let (status, stdout, stderr) = run(dir.path(), &["check"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("store never replaces processed/ and failed/ names: ok (the store ignores If-None-Match"),
        "{stdout}"
    );
    assert!(
        bucket.keys("processed/").await.is_empty(),
        "the probe's objects are gone"
    );

    let first = orders_csv(1, 20);
    bucket.put("incoming/orders/a.csv", first.clone()).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    // A new file under the same key: loaded, and moved beside the archived one, not over it.
    bucket.put("incoming/orders/a.csv", orders_csv(21, 5)).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 1 (5 rows)"), "{stdout}");
    let processed = bucket.keys("processed/").await;
    assert_eq!(processed.len(), 2, "{processed:?}");
    assert_eq!(
        bucket.get("processed/orders/a.csv").await,
        first.as_bytes(),
        "not replaced"
    );
    assert!(processed[1].starts_with("processed/orders/a.csv."), "{processed:?}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 25);
}

/// `validate` reads an existing PostgreSQL table's declared limits: a value `numeric(12,2)`
/// would round fails, with the column and line; one that fits would load.
#[tokio::test(flavor = "multi_thread")]
async fn validate_checks_values_against_an_existing_postgres_tables_limits() {
    let db = PgDb::create("validate_limits").await;
    sqlx::query("CREATE TABLE amounts (id integer, amount numeric(12,2))")
        .execute(&db.pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ok.csv"), "id,amount\n1,2.50\n").unwrap();
    std::fs::write(d.join("bad.csv"), "id,amount\n1,2.50\n2,1.234\n").unwrap();
    let env = kv(&[("LOADER_DATABASE__URL", db.url.as_str())]);
    let (status, stdout, stderr) = run(d, &["validate", "ok.csv", "--key", "amounts/ok.csv"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("table:    exists: id integer, amount numeric"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would load 1 row(s) (checked against the existing table)"),
        "{stdout}"
    );
    let (status, stdout, _) = run(d, &["validate", "bad.csv", "--key", "amounts/bad.csv"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "would FAIL (type): \"1.234\" has more than 2 digits after the point: the column would round it (line 3) (column amount)"
        ),
        "{stdout}"
    );
}

/// Group commit: ten files of an existing table load in one transaction (one `loaded_at`, as
/// PostgreSQL's `now()` is the transaction's start); the 3rd is bad, is rolled back to its
/// savepoint and recorded failed with a report, and the other nine commit, all rows exact.
#[tokio::test(flavor = "multi_thread")]
async fn the_third_of_ten_grouped_files_is_bad_and_fails_alone() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "group").await;
    let db = PgDb::create("group").await;
    let dir = tempfile::tempdir().unwrap();
    let env = loader_env(&moto, "group", &db, &[("LOADER_WORKERS__CONCURRENCY", "1")]);
    bucket.put("incoming/orders/000.csv", orders_csv(1, 5)).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    for (name, csv) in ten_files_the_third_bad() {
        bucket.put(&format!("incoming/orders/{name}"), csv).await;
    }
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("loaded 9 (450 rows)") && stdout.contains("failed 1"),
        "{stdout}"
    );
    let group = group_event(&stderr);
    assert_eq!(
        (&group["files"], &group["committed"]),
        (&10.into(), &10.into()),
        "{group}"
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 5 + 450);
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE id BETWEEN 300 AND 399")
            .await,
        0
    );
    assert_eq!(
        db.count(
            "SELECT count(DISTINCT loaded_at) FROM s3_sql_loader_files
             WHERE state = 'loaded' AND object_key <> 'orders/000.csv'"
        )
        .await,
        1,
        "the nine committed in one transaction"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'failed' AND object_key = 'orders/003.csv'")
            .await,
        1
    );
    let processed = bucket.keys("processed/orders/").await;
    assert_eq!(processed.len(), 10, "{processed:?}");
    assert!(!processed.contains(&"processed/orders/003.csv".to_string()));
    assert_eq!(
        bucket.keys("failed/").await,
        ["failed/orders/003.csv", "failed/orders/003.csv.error.json"]
    );
    assert!(bucket.keys("incoming/").await.is_empty());
}
