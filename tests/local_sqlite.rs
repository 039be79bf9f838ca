//! The embedded default, end to end with the real binary: a local folder into SQLite.

mod common;

use std::time::Duration;

use common::*;
use sqlx::sqlite::SqlitePool;

async fn sqlite(dir: &std::path::Path) -> SqlitePool {
    SqlitePool::connect(&format!("sqlite://{}/data/loader.db", dir.display()))
        .await
        .unwrap()
}

async fn count(pool: &SqlitePool, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_default_loads_nested_files_once_and_moves_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(
        &d.join("data/incoming/orders/2026/11/a.csv"),
        orders_csv(1, 50).as_bytes(),
    );
    write_old(
        &d.join("data/incoming/orders/2026/12/b.csv"),
        orders_csv(51, 30).as_bytes(),
    );
    write_old(
        &d.join("data/incoming/customers/c.csv"),
        b"id,name\r\n1,\"Ann \"\"A\"\" Smith\"\r\n2,Bob\r\n",
    );

    // Nothing but a port (tests run in parallel) and a slow start rate, to watch the backlog fall.
    let mut loader = Loader::spawn(d, &kv(&[("LOADER_WORKERS__FILES_PER_SECOND", "2")]));
    loader.wait_up().await;
    let max_backlog = std::sync::atomic::AtomicU64::new(0);
    wait_until(Duration::from_secs(30), "backlog 0 and 3 files loaded", || async {
        let s = loader.status().await;
        if s["backlog"]["listed_at"].is_null() {
            return false;
        }
        max_backlog.fetch_max(
            s["backlog"]["files"].as_u64().unwrap(),
            std::sync::atomic::Ordering::Relaxed,
        );
        s["backlog"]["files"] == 0 && s["totals"]["files_loaded"] == 3
    })
    .await;
    let max_backlog = max_backlog.into_inner();
    assert!(max_backlog > 0, "the backlog was never seen above 0");
    let status = loader.status().await;
    assert_eq!(status["totals"]["rows_loaded"], 82);
    assert_eq!(status["totals"]["files_failed"], 0);

    assert_eq!(files_under(&d.join("data/incoming")), Vec::<String>::new());
    assert_eq!(
        files_under(&d.join("data/processed")),
        ["customers/c.csv", "orders/2026/11/a.csv", "orders/2026/12/b.csv"]
    );
    let db = sqlite(d).await;
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 80);
    assert_eq!(count(&db, "SELECT count(DISTINCT id) FROM orders").await, 80);
    assert_eq!(count(&db, "SELECT sum(id) FROM orders").await, (1..=80).sum::<i64>());
    let name: String = sqlx::query_scalar("SELECT name FROM customers WHERE id = 1")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(name, "Ann \"A\" Smith");
    let paid: i64 = sqlx::query_scalar("SELECT paid FROM orders WHERE id = 2")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(paid, 1, "booleans are stored as 1/0 in SQLite");

    loader.signal(libc::SIGTERM);
    let exit = loader.wait_exit(Duration::from_secs(10)).expect("exits after SIGTERM");
    assert!(exit.success(), "{exit:?}\n{}", loader.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_file_goes_to_failed_with_a_report_and_leaves_no_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/first.csv"), orders_csv(1, 10).as_bytes());
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");

    // A type error in the middle of a file, a ragged row, and good files around them.
    let mut typed = orders_csv(100, 5);
    typed.push_str("105,\"x\",not-a-number,true,2026-11-01\n");
    typed.push_str(orders_csv(106, 5).split_once('\n').unwrap().1);
    write_old(&d.join("data/incoming/orders/typed.csv"), typed.as_bytes());
    write_old(
        &d.join("data/incoming/orders/ragged.csv"),
        b"id,customer,amount,paid,created_on\n200,a,1,true,2026-11-01\n201,b\n",
    );
    write_old(&d.join("data/incoming/orders/good.csv"), orders_csv(300, 7).as_bytes());
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert_eq!(
        status.code(),
        Some(1),
        "a failed file makes `once` exit non-zero\n{stdout}{stderr}"
    );
    assert!(
        stdout.contains("loaded 1 (7 rows)") && stdout.contains("failed 2"),
        "{stdout}"
    );

    assert_eq!(
        files_under(&d.join("data/failed")),
        [
            "orders/ragged.csv",
            "orders/ragged.csv.error.json",
            "orders/typed.csv",
            "orders/typed.csv.error.json"
        ]
    );
    assert_eq!(
        files_under(&d.join("data/processed")),
        ["orders/first.csv", "orders/good.csv"]
    );
    assert_eq!(files_under(&d.join("data/incoming")), Vec::<String>::new());

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("data/failed/orders/typed.csv.error.json")).unwrap()).unwrap();
    assert_eq!(report["key"], "incoming/orders/typed.csv");
    assert_eq!(report["error"]["kind"], "type");
    assert_eq!(report["error"]["column"], "amount");
    assert_eq!(report["error"]["line"], 7);
    assert_eq!(report["error"]["record"], 6);
    assert!(
        report["error"]["message"].as_str().unwrap().contains("not-a-number"),
        "{report}"
    );
    assert!(report["etag"].is_string() && report["failed_at"].is_string());

    let ragged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("data/failed/orders/ragged.csv.error.json")).unwrap()).unwrap();
    assert_eq!(ragged["error"]["kind"], "decode");
    assert_eq!(ragged["error"]["line"], 3);

    let db = sqlite(d).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM orders WHERE id >= 100 AND id < 300").await,
        0,
        "no row of a failed file stays"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 17);
    assert_eq!(
        count(&db, "SELECT count(*) FROM s3_sql_loader_files WHERE state = 'failed'").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_committed_but_not_moved_is_moved_later_without_duplicating_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 25).as_bytes());
    // A plain file where the move needs a folder: the commit succeeds, the move fails, exactly
    // as if the process had died between the two.
    write_old(&d.join("data/processed/orders"), b"blocker");
    let (status, stdout, _) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("to retry 1"), "{stdout}");
    assert_eq!(files_under(&d.join("data/incoming")), ["orders/a.csv"]);
    let db = sqlite(d).await;
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 25);
    assert_eq!(
        count(&db, "SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded'").await,
        1
    );

    std::fs::remove_file(d.join("data/processed/orders")).unwrap();
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("loaded 0") && stdout.contains("already loaded 1"),
        "{stdout}"
    );
    assert_eq!(files_under(&d.join("data/processed")), ["orders/a.csv"]);
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 25, "not one row twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_failed_moves_files_back_and_they_load_once_fixed_conditions_allow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The table does not exist and creating tables is off: the file fails for a reason that an
    // operator can fix (here, by turning creation on), then retries it.
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 4).as_bytes());
    let off = kv(&[("LOADER_DATABASE__CREATE_TABLES", "false")]);
    let (status, stdout, _) = run(d, &["once"], &off);
    assert_eq!(status.code(), Some(1), "{stdout}");
    let report = std::fs::read_to_string(d.join("data/failed/orders/a.csv.error.json")).unwrap();
    assert!(report.contains("does not exist"), "{report}");

    // The prefix is relative to failed/, or names it.
    let (status, stdout, stderr) = run(d, &["retry-failed", "--prefix", "events/"], &[]);
    assert!(
        status.success() && stdout.contains("moved 0 file(s)"),
        "{stdout}{stderr}"
    );
    let (status, stdout, stderr) = run(d, &["retry-failed", "--prefix", "failed/orders/"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("moved 1 file(s)"), "{stdout}");
    assert_eq!(files_under(&d.join("data/failed")), Vec::<String>::new());
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 1 (4 rows)"), "{stdout}");
    assert_eq!(count(&sqlite(d).await, "SELECT count(*) FROM orders").await, 4);
}

/// A failed file stored as `K.<tag>` (its key in failed/ was taken by another version) goes
/// back to `incoming/K` on `retry-failed`, as its report says, so it is read as what it is.
#[tokio::test(flavor = "multi_thread")]
async fn retry_failed_restores_the_original_key_of_a_file_stored_under_a_tag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let off = kv(&[("LOADER_DATABASE__CREATE_TABLES", "false")]);
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 4).as_bytes());
    assert_eq!(run(d, &["once"], &off).0.code(), Some(1));
    // A second version of the same key fails too: failed/orders/a.csv is taken.
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(10, 7).as_bytes());
    assert_eq!(run(d, &["once"], &off).0.code(), Some(1));
    let failed = files_under(&d.join("data/failed"));
    let tagged: Vec<&String> = failed
        .iter()
        .filter(|f| f.starts_with("orders/a.csv.") && !f.ends_with(".error.json"))
        .collect();
    assert_eq!(tagged.len(), 1, "{failed:?}");
    // The operator gives up on the first version and retries the second.
    std::fs::remove_file(d.join("data/failed/orders/a.csv")).unwrap();
    std::fs::remove_file(d.join("data/failed/orders/a.csv.error.json")).unwrap();
    let (status, stdout, stderr) = run(d, &["retry-failed"], &[]);
    assert!(
        status.success() && stdout.contains("moved 1 file(s)"),
        "{stdout}{stderr}"
    );
    assert_eq!(files_under(&d.join("data/incoming")), vec!["orders/a.csv".to_string()]);
    assert_eq!(files_under(&d.join("data/failed")), Vec::<String>::new());
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(
        status.success() && stdout.contains("loaded 1 (7 rows)"),
        "{stdout}{stderr}"
    );
    assert_eq!(
        count(&sqlite(d).await, "SELECT count(*) FROM orders WHERE id >= 10").await,
        7
    );
}

/// On the embedded default too: a file whose load kills the loader every time counts an
/// attempt each time (committed before its rows), and after `retry.max_attempts` it goes to
/// failed/ as `crashed_loader` instead of stopping the pipeline.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_whose_load_kills_the_loader_every_time_ends_in_failed_as_crashed_loader() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(
        &d.join("data/incoming/orders/big.csv"),
        orders_csv(1, 500_000).as_bytes(),
    );
    let env = kv(&[("LOADER_RETRY__MAX_ATTEMPTS", "2")]);
    let attempts = || {
        let db = d.join("data/loader.db");
        async move {
            let url = format!("sqlite://{}?mode=ro", db.display());
            let Ok(pool) = sqlx::SqlitePool::connect(&url).await else {
                return 0;
            };
            let n: Option<i64> = sqlx::query_scalar("SELECT attempts FROM s3_sql_loader_files")
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten();
            pool.close().await;
            n.unwrap_or(0)
        }
    };
    for kill in 1..=2 {
        let mut loader = Loader::spawn(d, &env);
        // The count is committed before the rows are read: the load is under way from then on.
        wait_until(Duration::from_secs(60), "the attempt counted", || async {
            attempts().await == kill
        })
        .await;
        loader.signal(libc::SIGKILL);
        loader.wait_exit(Duration::from_secs(10)).expect("killed");
        assert_eq!(
            files_under(&d.join("data/processed")),
            Vec::<String>::new(),
            "killed mid-load"
        );
    }
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("data/failed/orders/big.csv.error.json")).unwrap()).unwrap();
    assert_eq!(report["error"]["kind"], "crashed_loader", "{report}");
}

/// Writes `path` in place (same inode when it exists) and sets its mtime to 2020-01-01, as a
/// producer using `cp -p` or `rsync -t` does.
fn write_dated(path: &std::path::Path, contents: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
    let dated = std::time::UNIX_EPOCH + Duration::from_secs(1_577_836_800);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(dated)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewrite_with_the_same_size_and_mtime_is_a_new_version_and_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("data/incoming/t/a.csv");
    write_dated(&file, b"id\n1\n");
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    // The same key again: same size, same mtime, other content.
    write_dated(&file, b"id\n2\n");
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 1 (1 rows)"), "{stdout}");

    // And rewritten in place after its commit but before its move (the process stopped in
    // between): the new bytes are loaded, not taken for the committed ones.
    write_dated(&file, b"id\n3\n");
    std::fs::rename(d.join("data/processed/t"), d.join("data/processed/t.saved")).unwrap();
    write_old(&d.join("data/processed/t"), b"a file where the move needs a folder");
    let (status, stdout, _) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("to retry 1"), "{stdout}");
    write_dated(&file, b"id\n4\n");
    std::fs::remove_file(d.join("data/processed/t")).unwrap();
    std::fs::rename(d.join("data/processed/t.saved"), d.join("data/processed/t")).unwrap();
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 1 (1 rows)"), "{stdout}");

    let db = sqlite(d).await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(ids, [1, 2, 3, 4], "every version loaded once");
    assert_eq!(files_under(&d.join("data/incoming")), Vec::<String>::new());
    // Versions 1, 2 and 4 (version 3's bytes were overwritten before its move).
    let processed = files_under(&d.join("data/processed"));
    assert_eq!(processed.len(), 3, "{processed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn processed_and_failed_on_another_file_system_receive_files_by_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let other = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is needed for this test");
    {
        use std::os::unix::fs::MetadataExt;
        assert_ne!(
            std::fs::metadata(other.path()).unwrap().dev(),
            std::fs::metadata(d).unwrap().dev(),
            "/dev/shm must be another file system than the temporary folder"
        );
    }
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(other.path().join("processed")).unwrap();
    std::fs::create_dir_all(other.path().join("failed")).unwrap();
    std::os::unix::fs::symlink(other.path().join("processed"), d.join("data/processed")).unwrap();
    std::os::unix::fs::symlink(other.path().join("failed"), d.join("data/failed")).unwrap();
    let good = orders_csv(1, 30);
    write_old(&d.join("data/incoming/orders/good.csv"), good.as_bytes());
    write_old(&d.join("data/incoming/rejects/bad.csv"), b"id,amount\n1,2,3\n");
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "one file failed\n{stdout}{stderr}");
    assert!(
        stdout.contains("loaded 1 (30 rows)") && stdout.contains("failed 1"),
        "{stdout}{stderr}"
    );
    assert_eq!(files_under(&d.join("data/incoming")), Vec::<String>::new());
    assert_eq!(
        std::fs::read_to_string(other.path().join("processed/orders/good.csv")).unwrap(),
        good
    );
    assert_eq!(
        files_under(&other.path().join("failed")),
        ["rejects/bad.csv", "rejects/bad.csv.error.json"]
    );
    assert_eq!(files_under(&other.path().join("processed")), ["orders/good.csv"]);
    let db = sqlite(d).await;
    assert_eq!(count(&db, "SELECT count(*) FROM orders").await, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producers_file_named_like_a_report_is_never_overwritten_nor_taken_for_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A producer's own file named as the report of `t/a.csv` would be; it fails (not JSON).
    write_old(
        &d.join("data/incoming/t/a.csv.error.json"),
        b"producer's bytes, not JSON\n",
    );
    let (status, stdout, _) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(d.join("data/failed/t/a.csv.error.json").exists());
    // Then `t/a.csv` fails too: its report must not replace the producer's file.
    write_old(&d.join("data/incoming/t/a.csv"), b"id,amount\n1,2,3\n");
    let (status, stdout, _) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(
        std::fs::read(d.join("data/failed/t/a.csv.error.json")).unwrap(),
        b"producer's bytes, not JSON\n",
        "the producer's file was overwritten"
    );
    let failed = files_under(&d.join("data/failed"));
    assert_eq!(failed.len(), 4, "{failed:?}");
    let tagged = failed
        .iter()
        .find(|f| f.starts_with("t/a.csv.") && !f.ends_with(".error.json"))
        .unwrap_or_else(|| panic!("t/a.csv went to another name: {failed:?}"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join(format!("data/failed/{tagged}.error.json"))).unwrap()).unwrap();
    assert_eq!(report["key"], "incoming/t/a.csv");

    // `status` counts two failed files (not the producer's file as a report) with their reasons.
    let (status, stdout, stderr) = run(d, &["status"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("failed:   2 file(s)"), "{stdout}");
    assert!(stdout.contains(&format!("failed/{tagged}")), "{stdout}");
    assert!(stdout.contains("(from incoming/t/a.csv)"), "{stdout}");
    assert!(stdout.contains("failed/t/a.csv.error.json\n"), "{stdout}");

    // retry-failed sends both back under their own keys and deletes only the reports.
    let (status, stdout, stderr) = run(d, &["retry-failed"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("moved 2 file(s)"), "{stdout}");
    assert_eq!(files_under(&d.join("data/failed")), Vec::<String>::new());
    assert_eq!(files_under(&d.join("data/incoming")), ["t/a.csv", "t/a.csv.error.json"]);
    assert_eq!(
        std::fs::read(d.join("data/incoming/t/a.csv.error.json")).unwrap(),
        b"producer's bytes, not JSON\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_include_values_off_no_value_of_a_failed_file_reaches_reports_status_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let env = kv(&[("LOADER_REPORTS__INCLUDE_VALUES", "false")]);
    // The table exists (from a good file), so a value of another type fails the file.
    write_old(&d.join("data/incoming/orders/first.csv"), orders_csv(1, 3).as_bytes());
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    let mut typed = orders_csv(10, 3);
    typed.push_str("14,\"x\",secret-value-8812,true,2026-11-01\n");
    write_old(&d.join("data/incoming/orders/typed.csv"), typed.as_bytes());
    // Failed by the daemon, whose /status, page and log are what operators look at.
    let loader = Loader::spawn(d, &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(30), "the typed file failed", || async {
        loader.status().await["totals"]["files_failed"] == 1
    })
    .await;
    let status_json = loader.status().await;
    let failure = &status_json["recent_failures"][0]["error"];
    assert_eq!(
        (failure["kind"].as_str(), failure["column"].as_str()),
        (Some("type"), Some("amount"))
    );
    let page = reqwest::get(loader.url("/")).await.unwrap().text().await.unwrap();
    assert!(page.contains("a value does not fit"), "the failure is on the page");
    for (what, text) in [
        ("/status", status_json.to_string()),
        ("/", page),
        ("the log", loader.log()),
    ] {
        assert!(!text.contains("secret-value"), "a value in {what}: {text}");
    }
    drop(loader);
    let report_text = std::fs::read_to_string(d.join("data/failed/orders/typed.csv.error.json")).unwrap();
    assert!(!report_text.contains("secret-value"), "{report_text}");
    let report: serde_json::Value = serde_json::from_str(&report_text).unwrap();
    // Where it is stays: kind, line, record, column.
    assert_eq!(report["error"]["kind"], "type");
    assert_eq!(report["error"]["column"], "amount");
    assert_eq!(report["error"]["line"], 5);
    assert_eq!(report["error"]["record"], 4);
    let (status, stdout, stderr) = run(d, &["status"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("type: a value does not fit"), "{stdout}");
    assert!(!stdout.contains("secret-value"), "{stdout}");
    // The ledger, in the operator's database, keeps the full text.
    let db = sqlite(d).await;
    let kept: String = sqlx::query_scalar("SELECT error FROM s3_sql_loader_files WHERE state = 'failed'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(kept.contains("secret-value-8812"), "{kept}");
}

/// Group commit on SQLite: the 3rd of ten files of an existing table is bad; it is rolled back
/// to its savepoint and fails alone, the other nine load in the same transaction.
#[tokio::test(flavor = "multi_thread")]
async fn the_third_of_ten_grouped_files_is_bad_and_fails_alone_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let env = kv(&[("LOADER_WORKERS__CONCURRENCY", "1")]);
    write_old(&d.join("data/incoming/orders/000.csv"), orders_csv(1, 5).as_bytes());
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    for (name, csv) in ten_files_the_third_bad() {
        write_old(&d.join(format!("data/incoming/orders/{name}")), csv.as_bytes());
    }
    let (status, stdout, stderr) = run(d, &["once"], &env);
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
    let pool = sqlite(d).await;
    assert_eq!(count(&pool, "SELECT count(*) FROM orders").await, 5 + 450);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM orders WHERE id BETWEEN 300 AND 399").await,
        0
    );
    assert!(d.join("data/failed/orders/003.csv").is_file());
    assert!(d.join("data/failed/orders/003.csv.error.json").is_file());
    assert_eq!(files_under(&d.join("data/processed")).len(), 10);
    assert!(files_under(&d.join("data/incoming")).is_empty());
}
