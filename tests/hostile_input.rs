//! Odd and hostile input: each file gets a correct load or a clear report, never a crash, a
//! hang, or rows outside its file. The real binary into SQLite, from a local folder and from
//! moto (for odd S3 keys). Files built to exhaust memory each fail on their `[limits]` key
//! while the loader's peak memory is measured.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;

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
    // A good file first (by key order: the first file of a new table creates it, and with
    // `once` the others wait behind it), so the bad ones meet an existing table.
    write_old(&incoming.join("orders/a_good.csv"), orders_csv(1, 5).as_bytes());
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

    // Stopped while its header is read, at the 1601st field (see the tests of the limits below).
    let wide = report(d, "wide/w.csv");
    assert_eq!(
        (wide["error"]["kind"].as_str(), wide["error"]["line"].as_u64()),
        (Some("limit"), Some(1)),
        "{wide}"
    );
    assert!(
        wide["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.columns = 1600"),
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

/// The loader's peak resident memory may not pass this in any hostile case (a quarter of the
/// 256 MiB a Kubernetes pod of the loader gets).
const PEAK_RSS_LIMIT_KIB: i64 = 64 * 1024;

/// What the helper process prints before its JSON result.
const PROBE_MARK: &str = "PEAK_RSS_PROBE ";

/// One `s3-sql-loader once` in `dir` (embedded default: local folder and SQLite), run from a
/// helper process; returns its exit code, its output, and its peak RSS in KiB.
///
/// Why a helper process: `getrusage(RUSAGE_CHILDREN)` gives the largest peak RSS of all the
/// children the calling process has waited for, and this test binary runs many loaders at once
/// (one per test); and Linux counts in a child's peak the memory it shared with its parent
/// before it called exec (std spawns with vfork semantics), so a parent that has grown counts
/// too. The helper is this test binary run again for [`peak_rss_probe`] alone: a small process
/// whose only child is the loader, so its `RUSAGE_CHILDREN` peak is the loader's (give or take
/// the helper's own few MiB, which only make the figure larger). `/usr/bin/time -f %M` would
/// measure the same way, but is not on every machine.
fn once_with_peak_rss(dir: &Path) -> (Option<i32>, String, String, i64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["peak_rss_probe", "--exact", "--nocapture", "--test-threads=1"])
        .env("RSS_PROBE_DIR", dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(PROBE_MARK).map(|(_, json)| json))
        .unwrap_or_else(|| panic!("the probe said: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    let result: serde_json::Value = serde_json::from_str(line).unwrap();
    (
        result["code"].as_i64().map(|c| c as i32),
        result["stdout"].as_str().unwrap_or_default().to_string(),
        result["stderr"].as_str().unwrap_or_default().to_string(),
        result["peak_kib"].as_i64().unwrap(),
    )
}

/// Not a test of its own: the helper process of [`once_with_peak_rss`], which does nothing
/// unless `RSS_PROBE_DIR` names the folder to run the loader in.
#[test]
fn peak_rss_probe() {
    let Some(dir) = std::env::var_os("RSS_PROBE_DIR") else {
        return;
    };
    let (status, stdout, stderr) = run(Path::new(&dir), &["once"], &[]);
    // SAFETY: `rusage` is plain data, valid when zeroed; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    let result = serde_json::json!({
        "code": status.code(),
        "stdout": stdout,
        "stderr": stderr,
        "peak_kib": usage.ru_maxrss, // KiB on Linux
    });
    println!("{PROBE_MARK}{result}");
}

/// Writes `total` bytes of `chunk` repeated into `out`: a big hostile file costs the test no memory.
fn write_repeated(out: &mut impl Write, chunk: &[u8], total: usize) {
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        out.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
}

/// Creates `incoming/KEY` (with an old modification time), written through `fill`.
fn write_hostile(dir: &Path, key: &str, fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>)) -> u64 {
    let path = dir.join("data/incoming").join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    fill(&mut out);
    let file = out.into_inner().unwrap();
    file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(60))
        .unwrap();
    file.metadata().unwrap().len()
}

/// Runs `once` on the hostile file at `key` beside a good file, and checks that the hostile one
/// failed on `limit` (a report of kind `limit` naming it), the good one loaded, and the loader
/// stayed under [`PEAK_RSS_LIMIT_KIB`]. Returns the peak, in KiB.
async fn assert_fails_on_its_limit_in_bounded_memory(dir: &Path, key: &str, limit: &str) -> i64 {
    write_old(&dir.join("data/incoming/orders/good.csv"), orders_csv(1, 5).as_bytes());
    let (code, stdout, stderr, peak_kib) = once_with_peak_rss(dir);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("loaded 1 (5 rows)") && stdout.contains("failed 1"),
        "{stdout}{stderr}"
    );
    let report = report(dir, key);
    assert_eq!(report["error"]["kind"], "limit", "{report}");
    let message = report["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(limit), "{limit} not named: {report}");
    assert_eq!(
        files_under(&dir.join("data/failed")),
        [key.to_string(), format!("{key}.error.json")]
    );
    assert_eq!(files_under(&dir.join("data/processed")), ["orders/good.csv"]);
    let db = sqlite(dir).await;
    assert_eq!(
        tables(&db).await,
        ["orders", "s3_sql_loader_files"],
        "nothing of the hostile file"
    );
    let size = std::fs::metadata(dir.join("data/failed").join(key)).unwrap().len();
    eprintln!("{key} ({size} bytes): {message}; loader peak RSS {peak_kib} KiB");
    assert!(
        peak_kib < PEAK_RSS_LIMIT_KIB,
        "{key}: the loader's peak RSS was {peak_kib} KiB, over {PEAK_RSS_LIMIT_KIB} KiB"
    );
    peak_kib
}

#[tokio::test(flavor = "multi_thread")]
async fn a_400_mb_line_in_a_small_gzip_fails_on_field_bytes_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let size = write_hostile(dir.path(), "t/x.csv.gz", |out| {
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        gz.write_all(b"a\n").unwrap();
        write_repeated(&mut gz, &vec![b'x'; 1 << 20], 400_000_000);
        gz.write_all(b"\n").unwrap();
        gz.finish().unwrap();
    });
    assert!(size < 1 << 20, "{size} bytes");
    assert_fails_on_its_limit_in_bounded_memory(dir.path(), "t/x.csv.gz", "limits.field_bytes = 10485760").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_of_20_million_commas_fails_on_columns_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let size = write_hostile(dir.path(), "t/commas.csv.gz", |out| {
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        write_repeated(&mut gz, &vec![b','; 1 << 20], 20_000_000);
        gz.write_all(b"\n1\n").unwrap();
        gz.finish().unwrap();
    });
    assert!(size < 100_000, "{size} bytes");
    assert_fails_on_its_limit_in_bounded_memory(dir.path(), "t/commas.csv.gz", "limits.columns = 1600").await;
    assert_eq!(report(dir.path(), "t/commas.csv.gz")["error"]["line"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_json_line_of_300_000_keys_fails_on_json_keys_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    write_hostile(dir.path(), "t/keys.jsonl", |out| {
        out.write_all(b"{\"k0\": 0").unwrap();
        for i in 1..300_000 {
            write!(out, ", \"k{i}\": {i}").unwrap();
        }
        out.write_all(b"}\n{\"k0\": 1}\n").unwrap();
    });
    assert_fails_on_its_limit_in_bounded_memory(dir.path(), "t/keys.jsonl", "limits.json_keys = 1600").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zstd_file_that_expands_without_bound_fails_on_compression_ratio_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut row = vec![b'x'; 1024];
    row[1023] = b'\n';
    let size = write_hostile(dir.path(), "t/bomb.csv.zst", |out| {
        let mut zst = zstd::stream::write::Encoder::new(out, 3).unwrap();
        zst.write_all(b"a\n").unwrap();
        write_repeated(&mut zst, &row.repeat(1024), 256 << 20);
        zst.finish().unwrap();
    });
    assert!(size < 100_000, "{size} bytes");
    assert_fails_on_its_limit_in_bounded_memory(dir.path(), "t/bomb.csv.zst", "limits.compression_ratio = 1000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_set_in_the_environment_apply_and_bad_ones_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/good.csv"), orders_csv(1, 5).as_bytes());
    write_old(
        &d.join("data/incoming/notes/long.csv"),
        format!("id,body\n1,{}\n", "y".repeat(2000)).as_bytes(),
    );
    let env = kv(&[("LOADER_LIMITS__FIELD_BYTES", "1000")]);
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 1 (5 rows)"), "{stdout}");
    let long = report(d, "notes/long.csv");
    assert_eq!(long["error"]["kind"], "limit", "{long}");
    assert_eq!(long["error"]["line"], 2, "{long}");
    assert!(
        long["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.field_bytes = 1000"),
        "{long}"
    );

    let env = kv(&[
        ("LOADER_LIMITS__COLUMNS", "0"),
        ("LOADER_LIMITS__FIELD_BYTES", "99999999999"),
    ]);
    let (status, _, stderr) = run(d, &["check"], &env);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("limits.columns: must be between 1 and 1600"),
        "{stderr}"
    );
    assert!(
        stderr.contains("limits.field_bytes: must be between 1 and limits.record_bytes"),
        "{stderr}"
    );
}
