//! The soak test: one loader (the embedded default: a local folder into SQLite) runs while a
//! producer feeds it, for a bounded time, a mixed stream of good files and hostile ones (ragged
//! rows, invalid UTF-8, NUL bytes, a truncated gzip, an unsafe column name, a 400 MB line in a
//! small gzip, a header of 20 million commas, a JSON line of 300,000 keys, a zstd bomb). At the
//! end every good file is loaded exactly once, every hostile file is in failed/ with a report of
//! the expected kind, nothing of a hostile file is in the table, and the process that started is
//! the one still serving: no input stopped or restarted it.
//!
//! Ignored by default; `scripts/test` runs it with `--ignored` for `SOAK_SECONDS` (default 30).

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;

/// A hostile file: its name's tail, its bytes, and the kind of error its report must give.
struct Hostile {
    name: &'static str,
    bytes: Vec<u8>,
    kind: &'static str,
}

fn repeated(out: &mut (impl Write + ?Sized), chunk: &[u8], total: usize) {
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        out.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
}

/// Every hostile file, made once (the bombs take a few seconds to compress).
fn hostile_files() -> Vec<Hostile> {
    let gzip = |fill: &dyn Fn(&mut dyn Write)| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        fill(&mut gz);
        gz.finish().unwrap()
    };
    let mut cut = gzip(&|w| w.write_all(orders_csv(1, 3000).as_bytes()).unwrap());
    cut.truncate(cut.len() * 2 / 3);
    let mut keys = String::from("{\"k0\": 0");
    for i in 1..300_000 {
        keys.push_str(&format!(", \"k{i}\": {i}"));
    }
    keys.push_str("}\n");
    let mut row = vec![b'x'; 1024];
    row[1023] = b'\n';
    let mut zst = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    zst.write_all(b"a\n").unwrap();
    repeated(&mut zst, &row.repeat(1024), 256 << 20);
    vec![
        Hostile {
            name: "ragged.csv",
            bytes: b"id,customer\n1,a\n2,b,c\n".to_vec(),
            kind: "decode",
        },
        Hostile {
            name: "utf8.csv",
            bytes: b"id,customer\n7,ok\n8,\xc3\x28bad\n".to_vec(),
            kind: "decode",
        },
        Hostile {
            name: "nul.csv",
            bytes: b"id,customer\n9,a\x00b\n".to_vec(),
            kind: "decode",
        },
        Hostile {
            name: "cut.csv.gz",
            bytes: cut,
            kind: "decode",
        },
        Hostile {
            name: "badcol.csv",
            bytes: b"id,\"first name\"\n1,a\n".to_vec(),
            kind: "unsafe_name",
        },
        Hostile {
            name: "longline.csv.gz",
            bytes: gzip(&|w| {
                w.write_all(b"a\n").unwrap();
                repeated(w, &vec![b'x'; 1 << 20], 400_000_000);
                w.write_all(b"\n").unwrap();
            }),
            kind: "limit",
        },
        Hostile {
            name: "commas.csv.gz",
            bytes: gzip(&|w| {
                repeated(w, &vec![b','; 1 << 20], 20_000_000);
                w.write_all(b"\n1\n").unwrap();
            }),
            kind: "limit",
        },
        Hostile {
            name: "keys.jsonl",
            bytes: keys.into_bytes(),
            kind: "limit",
        },
        Hostile {
            name: "bomb.csv.zst",
            bytes: zst.finish().unwrap(),
            kind: "limit",
        },
    ]
}

/// Writes `incoming/KEY` as a producer should: a hidden temporary name, then a rename.
fn publish(dir: &Path, key: &str, bytes: &[u8]) {
    let path = dir.join("data/incoming").join(key);
    let parent = path.parent().unwrap();
    std::fs::create_dir_all(parent).unwrap();
    let tmp = parent.join(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a soak of SOAK_SECONDS (default 30); scripts/test runs it"]
async fn a_mixed_stream_of_good_and_hostile_files_never_stops_the_loader() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let hostile = hostile_files();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A first good file, so the table exists and no hostile file is ever the one to create it.
    publish(d, "orders/g-000000.csv", orders_csv(0, 100).as_bytes());
    let env = kv(&[
        ("LOADER_SCHEDULE__INTERVAL", "250ms"),
        ("LOADER_SOURCE__SETTLE_TIME", "0s"),
        ("LOADER_WORKERS__FILES_PER_SECOND", "200"),
    ]);
    let mut loader = Loader::spawn(d, &env);
    loader.wait_up().await;
    let pid = loader.pid();
    let started_at = loader.status().await["started_at"].clone();

    let mut rng = rand::rng();
    let (mut good, mut good_rows, mut bad) = (vec!["orders/g-000000.csv".to_string()], 100u64, Vec::new());
    let mut next_id = 100u64;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut n = 1;
    while Instant::now() < deadline {
        if rng.random_bool(0.3) {
            let h = &hostile[rng.random_range(0..hostile.len())];
            // A table of its own per kind, so that each fails on its own fault (in `orders` a
            // bomb with another header fails on its columns before it expands).
            let table = h.name.split('.').next().unwrap();
            let key = format!("hostile_{table}/h-{n:06}-{}", h.name);
            publish(d, &key, &h.bytes);
            bad.push((key, h.kind));
        } else {
            let rows = rng.random_range(1..300);
            let key = format!("orders/g-{n:06}.csv");
            publish(d, &key, orders_csv(next_id, rows).as_bytes());
            next_id += rows;
            good_rows += rows;
            good.push(key);
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..80))).await;
        // The same process, alive and healthy, throughout.
        assert!(loader.wait_exit(Duration::ZERO).is_none(), "the loader exited");
    }
    let files = good.len() + bad.len();
    wait_until(Duration::from_secs(120), "every file processed", || async {
        files_under(&d.join("data/incoming")).is_empty() && loader.status().await["in_flight"] == 0
    })
    .await;

    let status = loader.status().await;
    assert_eq!(status["started_at"], started_at, "the loader restarted");
    assert_eq!(loader.pid(), pid);
    assert!(loader.wait_exit(Duration::ZERO).is_none(), "the loader exited");
    assert_eq!(reqwest::get(loader.url("/healthz")).await.unwrap().status(), 200);
    let peak = peak_rss_kib(pid);

    let db = sqlx::sqlite::SqlitePool::connect(&format!("sqlite://{}/data/loader.db", d.display()))
        .await
        .unwrap();
    let (rows, distinct): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT id) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    let mut processed = files_under(&d.join("data/processed"));
    processed.sort();
    good.sort();
    let failed = files_under(&d.join("data/failed"));
    let mut expected_failed: Vec<String> = bad
        .iter()
        .flat_map(|(k, _)| [k.clone(), format!("{k}.error.json")])
        .collect();
    expected_failed.sort();
    for (key, kind) in &bad {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("data/failed").join(format!("{key}.error.json"))).unwrap())
                .unwrap();
        assert_eq!(report["error"]["kind"], *kind, "{key}: {report}");
    }
    println!(
        "soak results\n  seconds                   {seconds}\n  files published           {files}\n  \
         good files                {}\n  hostile files             {}\n  rows expected             {good_rows}\n  \
         rows in the table         {rows}\n  distinct ids              {distinct}\n  loader peak RSS (KiB)     {peak}",
        good.len(),
        bad.len()
    );
    assert_eq!(processed, good, "every good file in processed/, nothing else");
    assert_eq!(failed, expected_failed, "every hostile file in failed/ with its report");
    assert_eq!(rows as u64, good_rows, "every good row once, no row of a hostile file");
    assert_eq!(distinct, rows, "no row twice");
    // Several hostile loads run at once here (workers.concurrency): half the shipped container
    // limit (256 MiB) for all of them together.
    assert!(
        peak < 128 * 1024,
        "the loader's peak RSS was {peak} KiB, over half the shipped container limit of 256 MiB"
    );
}
