//! Odd and hostile input: each file gets a correct load or a clear report, never a crash, a
//! hang, or rows outside its file. The real binary into SQLite, from a local folder and from
//! moto (for odd S3 keys).

mod common;

use std::io::Write;
use std::path::Path;

use common::*;
use sqlx::sqlite::SqlitePool;

async fn sqlite(dir: &Path) -> SqlitePool {
    SqlitePool::connect(&format!("sqlite://{}/data/loader.db", dir.display()))
        .await
        .unwrap()
}

fn report(dir: &Path, key: &str) -> serde_json::Value {
    let path = dir.join("data/failed").join(format!("{key}.error.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

async fn tables(pool: &SqlitePool) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_kind_of_broken_file_gets_a_report_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let incoming = d.join("data/incoming");
    // A good file first, so the bad ones meet an existing table.
    write_old(&incoming.join("orders/good.csv"), orders_csv(1, 5).as_bytes());
    let wide: String = (0..2000).map(|i| format!("c{i}")).collect::<Vec<_>>().join(",");
    write_old(
        &incoming.join("wide/w.csv"),
        format!("{wide}\n{}\n", vec!["1"; 2000].join(",")).as_bytes(),
    );
    write_old(&incoming.join("orders/utf8.csv"), b"id,customer\n7,ok\n8,\xc3\x28bad\n");
    write_old(&incoming.join("orders/nul.csv"), b"id,customer\n9,a\x00b\n");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(orders_csv(100, 2000).as_bytes()).unwrap();
    let mut gz = gz.finish().unwrap();
    gz.truncate(gz.len() * 2 / 3);
    write_old(&incoming.join("orders/cut.csv.gz"), &gz);
    write_old(&incoming.join("orders/badcol.csv"), b"id,\"first name\"\n1,a\n");
    write_old(&incoming.join("données/x.csv"), b"id\n1\n");

    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("loaded 1 (5 rows)") && stdout.contains("failed 6"),
        "{stdout}"
    );

    let wide = report(d, "wide/w.csv");
    assert_eq!(wide["error"]["kind"], "schema");
    assert!(
        wide["error"]["message"].as_str().unwrap().contains("2000 columns"),
        "{wide}"
    );
    let utf8 = report(d, "orders/utf8.csv");
    assert_eq!(
        (utf8["error"]["kind"].as_str(), utf8["error"]["line"].as_u64()),
        (Some("decode"), Some(3))
    );
    assert!(utf8["error"]["message"].as_str().unwrap().contains("UTF-8"), "{utf8}");
    let nul = report(d, "orders/nul.csv");
    assert_eq!(
        (nul["error"]["kind"].as_str(), nul["error"]["line"].as_u64()),
        (Some("decode"), Some(2))
    );
    let cut = report(d, "orders/cut.csv.gz");
    assert_eq!(cut["error"]["kind"], "decode", "{cut}");
    assert_eq!(report(d, "orders/badcol.csv")["error"]["kind"], "unsafe_name");
    assert_eq!(report(d, "données/x.csv")["error"]["kind"], "unsafe_name");

    let db = sqlite(d).await;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM orders ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap();
    assert_eq!(
        ids,
        [1, 2, 3, 4, 5],
        "only the good file's rows: none of utf8.csv's good first row, none of cut.csv.gz"
    );
    assert_eq!(
        tables(&db).await,
        ["orders", "s3_sql_loader_files"],
        "no table from a refused file"
    );
    assert_eq!(files_under(&incoming), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn empty_header_only_huge_and_oddly_named_files_load_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let incoming = d.join("data/incoming");
    write_old(&incoming.join("empty/zero.csv"), b"");
    write_old(&incoming.join("headers/only.csv"), b"id,name\r\n");
    let huge = "x".repeat(8 << 20);
    write_old(
        &incoming.join("notes/huge.csv"),
        format!("id,body\n1,\"{huge}\"\n2,small\n").as_bytes(),
    );
    let odd = "orders/naïve ü (1) & co.csv";
    write_old(&incoming.join(odd), orders_csv(1, 3).as_bytes());
    let long = format!("orders/{}.csv", "l".repeat(200));
    write_old(&incoming.join(&long), orders_csv(10, 2).as_bytes());

    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 5 (7 rows)"), "{stdout}");
    let mut expected = vec![
        "empty/zero.csv".to_string(),
        "headers/only.csv".into(),
        "notes/huge.csv".into(),
        odd.into(),
        long,
    ];
    expected.sort();
    assert_eq!(files_under(&d.join("data/processed")), expected);

    let db = sqlite(d).await;
    assert_eq!(
        tables(&db).await,
        ["notes", "orders", "s3_sql_loader_files"],
        "0 rows create no table"
    );
    let len: i64 = sqlx::query_scalar("SELECT length(body) FROM notes WHERE id = 1")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(len, 8 << 20);
    let zero: (String, i64) =
        sqlx::query_as("SELECT state, row_count FROM s3_sql_loader_files WHERE object_key = 'empty/zero.csv'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(zero, ("loaded".to_string(), 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_local_source_never_follows_a_link_out_of_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let outside = d.join("outside.csv");
    std::fs::write(&outside, orders_csv(1, 3)).unwrap();
    std::fs::create_dir_all(d.join("data/incoming/orders")).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("data/incoming/orders/link.csv")).unwrap();
    std::os::unix::fs::symlink(d, d.join("data/incoming/loop")).unwrap();
    write_old(&d.join("data/incoming/orders/real.csv"), orders_csv(50, 2).as_bytes());

    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("listed 1 | loaded 1 (2 rows)"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        orders_csv(1, 3),
        "untouched"
    );
    assert!(
        d.join("data/incoming/orders/link.csv").is_symlink(),
        "the link itself is left alone"
    );
    let db = sqlite(d).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_s3_keys_load_and_keep_their_exact_names() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "odd-keys").await;
    let names = [
        "with space/ü ñ.csv".to_string(),
        "a+b.csv".into(),
        "%41%2F.csv".into(),
        "x/../dots.csv".into(),
        "./dot.csv".into(),
        "semi;colon,comma'quote.csv".into(),
        format!("{}/long.csv", "deep/".repeat(150)),
    ];
    for (i, name) in names.iter().enumerate() {
        bucket
            .put(&format!("incoming/orders/{name}"), orders_csv(i as u64 * 10 + 1, 3))
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut env = moto.env();
    env.extend(kv(&[("LOADER_SOURCE__URL", "s3://odd-keys")]));
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("loaded {} ({} rows)", names.len(), names.len() * 3)),
        "{stdout}"
    );
    let mut expected: Vec<String> = names.iter().map(|n| format!("processed/orders/{n}")).collect();
    expected.sort();
    assert_eq!(bucket.keys("processed/").await, expected);
    assert!(bucket.keys("incoming/").await.is_empty());
    let db = sqlite(dir.path()).await;
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT id) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(distinct, names.len() as i64 * 3);
}
