//! Faults: frozen and killed loaders, database and store outages, connections cut mid-load,
//! SIGTERM mid-load, files overwritten while they load, transient errors that never end, and
//! secrets that must not leak. Real binary, moto, PostgreSQL, and fault-injecting proxies.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::faults::{Fault, Rule, S3Proxy, TcpProxy};
use common::*;

fn postgres_addr() -> SocketAddr {
    let url = postgres_admin_url();
    let hostport = url
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("127.0.0.1:5432");
    hostport.parse().unwrap_or_else(|_| "127.0.0.1:5432".parse().unwrap())
}

/// `db`'s URL, but through `proxy`.
fn via(proxy: &TcpProxy, db: &PgDb) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name)
}

fn throttle(key_part: &str, bytes_per_second: u64) -> Rule {
    Rule {
        method: Some("GET"),
        path_contains: key_part.into(),
        fault: Fault::Throttle(bytes_per_second),
        rate: 1.0,
    }
}

fn s3_env(moto: &Moto, endpoint: &str, bucket: &str, db_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = moto.env();
    env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.extend(kv(&[
        ("AWS_ENDPOINT_URL", endpoint),
        ("LOADER_SOURCE__URL", &format!("s3://{bucket}")),
        ("LOADER_DATABASE__URL", db_url),
        ("LOADER_SCHEDULE__INTERVAL", "1s"),
        ("LOADER_RETRY__INITIAL_BACKOFF", "200ms"),
    ]));
    env.extend(kv(extra));
    env
}

/// Waits until `bytes` of a throttled object have been read through `proxy`: past the
/// start, so the load is mid-way (claimed, counted, its transaction open).
async fn wait_read(proxy: &S3Proxy, bytes: u64) {
    wait_until(Duration::from_secs(30), "the load reading the object", || async {
        proxy.throttled_bytes.load(std::sync::atomic::Ordering::Relaxed) > bytes
    })
    .await;
}

/// Waits until a COPY into `db` has received rows (uncommitted): the load is mid-way.
async fn wait_copying(db: &PgDb) {
    wait_until(Duration::from_secs(30), "the load writing rows", || async {
        db.count(
            "SELECT count(*) FROM pg_stat_progress_copy WHERE datname = current_database() AND tuples_processed > 0",
        )
        .await
            == 1
    })
    .await;
}

/// `/readyz`: its status code and body.
async fn readyz(loader: &Loader) -> (u16, serde_json::Value) {
    let r = reqwest::get(loader.url("/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn wait_in_flight(loader: &Loader) {
    wait_until(Duration::from_secs(30), "a load in flight", || async {
        loader.status().await["in_flight"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_loaders_claim_expires_and_another_loader_takes_the_file_once() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "frozen").await;
    let db = PgDb::create("frozen").await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 20_000)).await;
    proxy.set_rules(vec![throttle("big.csv", 100_000)]);
    let env = s3_env(
        &moto,
        &proxy.endpoint,
        "frozen",
        &db.url,
        &[("LOADER_CLAIM__LEASE", "2s")],
    );

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Loader::spawn(dir_a.path(), &env);
    a.wait_up().await;
    wait_in_flight(&a).await;
    wait_read(&proxy, 256 << 10).await;
    // /status shows the load in flight and how far it has read.
    let s = a.status().await;
    let loading = &s["loading"][0];
    assert_eq!(loading["key"], "orders/big.csv", "{s}");
    let (read, size) = (
        loading["bytes_read"].as_u64().unwrap(),
        loading["size"].as_u64().unwrap(),
    );
    assert!(read > 0 && read < size, "{s}");
    // Rows so far: counted as they pass (none yet while the first megabyte is read up front).
    assert!(loading["rows_read"].as_u64().unwrap() < 20_000, "{s}");
    a.signal(libc::SIGSTOP); // frozen mid-load, its connections open and its rows uncommitted
    proxy.set_rules(vec![]);

    let b = Loader::spawn(dir_b.path(), &env);
    b.wait_up().await;
    wait_until(
        Duration::from_secs(60),
        "the file loaded by the second loader",
        || async { b.status().await["totals"]["files_loaded"] == 1 },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_000);
    assert!(
        !b.log_events("the claim's lease expired: ended the holder's session; its transaction rolls back")
            .is_empty(),
        "{}",
        b.log()
    );

    a.signal(libc::SIGCONT);
    wait_until(Duration::from_secs(60), "the first loader notices", || async {
        let s = a.status().await;
        s["totals"]["transient_errors"].as_u64().unwrap_or(0)
            + s["totals"]["files_already_loaded"].as_u64().unwrap_or(0)
            >= 1
    })
    .await;
    assert!(a.log_events("loaded").is_empty(), "the frozen loader committed nothing");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_000);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 20_000);
    assert_eq!(bucket.keys("processed/").await, ["processed/orders/big.csv"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn while_postgres_is_unreachable_the_loader_stays_up_reports_not_ready_and_resumes() {
    let db = PgDb::create("outage").await;
    let proxy = TcpProxy::start(postgres_addr()).await;
    proxy.set_refusing(true);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..3 {
        write_old(
            &d.join(format!("data/incoming/orders/{i}.csv")),
            orders_csv(i * 100 + 1, 100).as_bytes(),
        );
    }
    let env = kv(&[
        ("LOADER_DATABASE__URL", &via(&proxy, &db)),
        ("LOADER_DATABASE__CONNECT_TIMEOUT", "1s"),
        ("LOADER_SCHEDULE__INTERVAL", "500ms"),
    ]);
    let loader = Loader::spawn(d, &env);
    loader.wait_up().await;

    wait_until(
        Duration::from_secs(20),
        "a tick that failed on the database",
        || async {
            let s = loader.status().await;
            s["last_tick"]["result"]
                .as_str()
                .is_some_and(|r| r.starts_with("database: ") && !r.starts_with("database: database"))
        },
    )
    .await;
    // Readiness is checked in the background: wait for a check that saw the outage.
    let seen = std::sync::Mutex::new(serde_json::Value::Null);
    wait_until(
        Duration::from_secs(20),
        "a readiness check that saw the database down",
        || async {
            let (code, body) = readyz(&loader).await;
            let saw = code == 503 && body["checks"]["database"]["ok"] == false;
            *seen.lock().unwrap() = body;
            saw
        },
    )
    .await;
    let body = seen.into_inner().unwrap();
    assert_eq!(body["checks"]["database"]["ok"], false, "{body}");
    assert_eq!(body["checks"]["store"]["ok"], true, "{body}");
    assert!(
        body["checks"]["database"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{body}"
    );

    for i in 3..5 {
        write_old(
            &d.join(format!("data/incoming/orders/{i}.csv")),
            orders_csv(i * 100 + 1, 100).as_bytes(),
        );
    }
    wait_until(Duration::from_secs(20), "the backlog grows to 5", || async {
        loader.status().await["backlog"]["files"] == 5
    })
    .await;
    assert_eq!(loader.status().await["totals"]["files_loaded"], 0);

    proxy.set_refusing(false);
    wait_until(Duration::from_secs(30), "loading resumes by itself", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"] == 5 && s["backlog"]["files"] == 0
    })
    .await;
    wait_until(Duration::from_secs(20), "ready again", || async {
        readyz(&loader).await.0 == 200
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 500);
    assert_eq!(files_under(&d.join("data/incoming")), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn while_the_store_fails_the_loader_waits_and_then_loads_everything_once() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "store-outage").await;
    let db = PgDb::create("store_outage").await;
    for i in 0..4u64 {
        bucket
            .put(&format!("incoming/orders/{i}.csv"), orders_csv(i * 100 + 1, 100))
            .await;
    }
    proxy.set_rules(vec![S3Proxy::everything(Fault::Status(503), 1.0)]);
    let env = s3_env(&moto, &proxy.endpoint, "store-outage", &db.url, &[]);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(60), "a tick that failed on the listing", || async {
        loader.status().await["last_tick"]["result"]
            .as_str()
            .is_some_and(|r| r.starts_with("listing s3://store-outage/incoming/"))
    })
    .await;
    let seen = std::sync::Mutex::new(serde_json::Value::Null);
    wait_until(
        Duration::from_secs(20),
        "a readiness check that saw the store fail",
        || async {
            let (code, body) = readyz(&loader).await;
            let saw = code == 503 && body["checks"]["store"]["ok"] == false;
            *seen.lock().unwrap() = body;
            saw
        },
    )
    .await;
    let body = seen.into_inner().unwrap();
    assert_eq!(body["checks"]["store"]["ok"], false, "{body}");

    proxy.set_rules(vec![]);
    wait_until(Duration::from_secs(60), "everything loaded", || async {
        loader.status().await["totals"]["files_loaded"] == 4
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 400);
    assert!(bucket.keys("incoming/").await.is_empty());
    assert!(
        bucket.keys("failed/").await.is_empty(),
        "a store outage never sends files to failed/"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_connection_cut_mid_load_rolls_back_and_the_retry_loads_once() {
    let moto = Moto::start();
    let s3 = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "cut").await;
    let db = PgDb::create("cut").await;
    let pg = TcpProxy::start(postgres_addr()).await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 20_000)).await;
    s3.set_rules(vec![throttle("big.csv", 200_000)]);
    let env = s3_env(&moto, &s3.endpoint, "cut", &via(&pg, &db), &[]);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_in_flight(&loader).await;
    wait_read(&s3, 256 << 10).await;
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded'")
            .await,
        0
    );
    pg.cut_all();
    s3.set_rules(vec![]);
    wait_until(Duration::from_secs(60), "the retry loads the file", || async {
        loader.status().await["totals"]["files_loaded"] == 1
    })
    .await;
    let s = loader.status().await;
    assert!(s["totals"]["transient_errors"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_000);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 20_000);
    assert_eq!(
        db.count("SELECT attempts::bigint FROM s3_sql_loader_files").await,
        2,
        "one cut, one success"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_load_lets_it_finish_within_the_grace_and_exits_0() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "drain").await;
    let db = PgDb::create("drain").await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 20_000)).await;
    proxy.set_rules(vec![throttle("big.csv", 400_000)]);
    let env = s3_env(
        &moto,
        &proxy.endpoint,
        "drain",
        &db.url,
        &[("LOADER_SHUTDOWN__GRACE", "30s")],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_in_flight(&loader).await;
    let stopped = Instant::now();
    loader.signal(libc::SIGTERM);
    let exit = loader
        .wait_exit(Duration::from_secs(30))
        .expect("exits within the grace");
    assert!(exit.success(), "{exit:?}\n{}", loader.log());
    assert!(stopped.elapsed() < Duration::from_secs(30));
    assert_eq!(loader.log_events("loaded").len(), 1, "the load in flight finished");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_000);
    assert_eq!(bucket.keys("processed/").await, ["processed/orders/big.csv"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_short_grace_rolls_the_load_back_exits_0_and_a_restart_loads_it_once() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "abandon").await;
    let db = PgDb::create("abandon").await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 60_000)).await;
    proxy.set_rules(vec![throttle("big.csv", 200_000)]);
    let env = s3_env(
        &moto,
        &proxy.endpoint,
        "abandon",
        &db.url,
        &[("LOADER_SHUTDOWN__GRACE", "1s")],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    // PostgreSQL's own progress view: rows are streaming into COPY (the table, created in the
    // load's transaction, is not visible before the commit).
    wait_copying(&db).await;
    assert_eq!(loader.status().await["in_flight"], 1);
    let stopped = Instant::now();
    loader.signal(libc::SIGTERM);
    let exit = loader
        .wait_exit(Duration::from_secs(10))
        .expect("exits soon after the grace");
    assert!(exit.success(), "{exit:?}\n{}", loader.log());
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "exited {took:?} after SIGTERM with a 1s grace"
    );
    assert!(loader.log_events("loaded").is_empty());
    assert_eq!(
        db.count("SELECT count(*) FROM pg_tables WHERE tablename = 'orders'")
            .await,
        0,
        "the abandoned load rolled back, its CREATE TABLE with it"
    );
    assert_eq!(bucket.keys("incoming/").await, ["incoming/orders/big.csv"]);

    proxy.set_rules(vec![]);
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 60_000);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 60_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_whose_reads_always_fail_goes_to_failed_with_its_history_after_max_attempts() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "poison").await;
    let db = PgDb::create("poison").await;
    bucket.put("incoming/orders/poison.csv", orders_csv(1, 10)).await;
    bucket.put("incoming/orders/fine.csv", orders_csv(100, 10)).await;
    proxy.set_rules(vec![Rule {
        method: Some("GET"),
        path_contains: "incoming/orders/poison.csv".into(),
        fault: Fault::Status(500),
        rate: 1.0,
    }]);
    let env = s3_env(
        &moto,
        &proxy.endpoint,
        "poison",
        &db.url,
        &[
            ("LOADER_RETRY__MAX_ATTEMPTS", "3"),
            ("LOADER_RETRY__INITIAL_BACKOFF", "100ms"),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(120), "the poison file failed", || async {
        loader.status().await["totals"]["files_failed"] == 1
    })
    .await;
    assert_eq!(loader.status().await["totals"]["files_loaded"], 1);
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/poison.csv.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "retries_exhausted", "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 3 attempts"),
        "{report}"
    );
    let history = report["error"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{report}");
    for attempt in history {
        assert_eq!(attempt["stage"], "get");
        assert!(attempt["message"].as_str().unwrap().contains("500"), "{attempt}");
    }
    assert!(
        bucket
            .keys("failed/")
            .await
            .contains(&"failed/orders/poison.csv".to_string())
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_version_uploaded_during_a_load_is_loaded_too_and_processed_is_never_overwritten() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "versions").await;
    let db = PgDb::create("versions").await;
    bucket.put("incoming/orders/k.csv", orders_csv(1, 20_000)).await;
    proxy.set_rules(vec![throttle("k.csv", 300_000)]);
    let env = s3_env(&moto, &proxy.endpoint, "versions", &db.url, &[]);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    // The overwrite must come after the first GET was answered (with the first version, its
    // body then streaming slowly), not merely once the file is in flight: the proxy says when.
    let answered = proxy.throttled_answers.clone();
    wait_until(Duration::from_secs(30), "the first GET answered", || {
        let answered = answered.clone();
        async move { answered.load(std::sync::atomic::Ordering::Relaxed) >= 1 }
    })
    .await;
    let v2 = orders_csv(100_001, 10);
    bucket.put("incoming/orders/k.csv", v2.clone()).await; // a producer rewrites the key mid-load
    proxy.set_rules(vec![]);
    wait_until(Duration::from_secs(60), "both versions loaded", || async {
        loader.status().await["totals"]["files_loaded"] == 2 && bucket.keys("incoming/").await.is_empty()
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_010);
    assert_eq!(bucket.get("processed/orders/k.csv").await, v2.as_bytes());

    let v3 = orders_csv(200_001, 5);
    bucket.put("incoming/orders/k.csv", v3.clone()).await;
    wait_until(Duration::from_secs(60), "the third version loaded", || async {
        loader.status().await["totals"]["files_loaded"] == 3 && bucket.keys("incoming/").await.is_empty()
    })
    .await;
    let processed = bucket.keys("processed/").await;
    assert_eq!(processed.len(), 2, "{processed:?}");
    assert_eq!(
        bucket.get("processed/orders/k.csv").await,
        v2.as_bytes(),
        "processed/K was not overwritten"
    );
    let other = processed
        .iter()
        .find(|k| k.as_str() != "processed/orders/k.csv")
        .unwrap();
    assert!(other.starts_with("processed/orders/k.csv."), "{other}");
    assert_eq!(bucket.get(other).await, v3.as_bytes());
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 20_015);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_appears_in_logs_status_metrics_readiness_or_reports() {
    const DB_PASSWORD: &str = "pw-Secret-42";
    const AWS_SECRET: &str = "aws-Secret-77";
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "secrets").await;
    let db = PgDb::create("secrets").await;
    bucket.put("incoming/orders/good.csv", orders_csv(1, 3)).await;
    bucket
        .put(
            "incoming/orders/bad.csv",
            "id,amount\n1,not-a-number-but-text-is-fine\nx,2\n",
        )
        .await;
    // Trust authentication accepts any password, so the loader really runs with this URL.
    let url = db.url.replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1);
    let mut env = s3_env(&moto, &moto.endpoint, "secrets", &url, &[]);
    env.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    env.extend(kv(&[("AWS_SECRET_ACCESS_KEY", AWS_SECRET)]));
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(30), "both files done", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"].as_u64().unwrap() + s["totals"]["files_failed"].as_u64().unwrap() == 2
    })
    .await;
    // And a second loader whose database is unreachable, so its readiness shows an error.
    let mut down = env.clone();
    down.retain(|(k, _)| k != "LOADER_DATABASE__URL");
    down.extend(kv(&[
        (
            "LOADER_DATABASE__URL",
            &format!("postgres://app:{DB_PASSWORD}@127.0.0.1:{}/x", free_port()),
        ),
        ("LOADER_DATABASE__CONNECT_TIMEOUT", "1s"),
    ]));
    let dir2 = tempfile::tempdir().unwrap();
    let unready = Loader::spawn(dir2.path(), &down);
    unready.wait_up().await;
    // Its readiness is checked in the background: wait for the check that failed.
    wait_until(Duration::from_secs(20), "a readiness check that failed", || async {
        readyz(&unready).await.1["checks"]["database"]["ok"] == false
    })
    .await;
    let mut seen = String::new();
    for l in [&loader, &unready] {
        for path in ["/status", "/metrics", "/readyz", "/healthz"] {
            seen.push_str(&reqwest::get(l.url(path)).await.unwrap().text().await.unwrap());
        }
    }
    // More ticks of both for their logs (the unready one's first tick fails on the database).
    loader.wait_ticks(2).await;
    unready.wait_ticks(1).await;
    seen.push_str(&loader.log());
    seen.push_str(&unready.log());
    for key in bucket.keys("failed/").await {
        seen.push_str(&String::from_utf8_lossy(&bucket.get(&key).await));
    }
    let (_, out, err) = run(dir2.path(), &["check"], &down);
    seen.push_str(&out);
    seen.push_str(&err);
    assert!(
        seen.contains("postgres://app:***@"),
        "the redacted URL is shown where a URL is shown"
    );
    assert!(seen.contains("\"ok\":false"), "the unreachable database is reported");
    assert!(!seen.contains(DB_PASSWORD), "the database password leaked");
    assert!(!seen.contains(AWS_SECRET), "the AWS secret key leaked");
}

/// A file whose load kills the loader every time (out of memory, a crash in a dependency: here
/// a SIGKILL while its rows stream in) counts an attempt each time, and after
/// `retry.max_attempts` goes to failed/ as `crashed_loader`; the files behind it load.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_whose_load_kills_the_loader_every_time_ends_in_failed_and_the_rest_load() {
    let db = PgDb::create("crash_loop").await;
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("data/incoming/orders");
    // The oldest, so it is picked first every time.
    write_old(&incoming.join("big.csv"), orders_csv(1, 500_000).as_bytes());
    let env = kv(&[
        ("LOADER_DATABASE__URL", db.url.as_str()),
        ("LOADER_RETRY__MAX_ATTEMPTS", "2"),
        ("LOADER_WORKERS__CONCURRENCY", "1"),
    ]);
    for kill in 1..=2 {
        let mut loader = Loader::spawn(dir.path(), &env);
        wait_until(Duration::from_secs(60), "big.csv's rows streaming into COPY", || async {
            db.count("SELECT count(*) FROM pg_stat_progress_copy WHERE datname = current_database() AND tuples_processed > 0")
                .await
                == 1
        })
        .await;
        loader.signal(libc::SIGKILL);
        loader.wait_exit(Duration::from_secs(10)).expect("killed");
        assert_eq!(
            db.count("SELECT attempts::bigint FROM s3_sql_loader_files").await,
            kill,
            "the attempt counted although the process died mid-load"
        );
    }
    // Newer files, behind the one that kills.
    for i in 0..3 {
        write_old(
            &incoming.join(format!("good-{i}.csv")),
            orders_csv(1_000_000 + i * 10, 10).as_bytes(),
        );
    }
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "one file failed\n{stdout}{stderr}");
    assert_eq!(
        files_under(&dir.path().join("data/failed")),
        ["orders/big.csv", "orders/big.csv.error.json"]
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/failed/orders/big.csv.error.json")).unwrap())
            .unwrap();
    assert_eq!(report["error"]["kind"], "crashed_loader", "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 of which ended without any outcome"),
        "{report}"
    );
    // big.csv was to create the new table `orders`: the files that waited for it load on the
    // next run (the daemon's next tick).
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert_eq!(
        files_under(&dir.path().join("data/processed")),
        ["orders/good-0.csv", "orders/good-1.csv", "orders/good-2.csv"]
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 30);
}

/// A flood of readiness probes costs the store and the database nothing extra: `/readyz`
/// answers from checks that run in the background, one LIST and one query every 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_readiness_probes_makes_no_extra_store_or_database_calls() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    Bucket::create(&moto, "probes").await;
    let db = PgDb::create("probes").await;
    // One tick at start, the next in an hour: only the readiness checks call the store.
    let env = s3_env(
        &moto,
        &proxy.endpoint,
        "probes",
        &db.url,
        &[("LOADER_SCHEDULE__INTERVAL", "1h")],
    );
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(20), "ready", || async {
        readyz(&loader).await.0 == 200
    })
    .await;
    let count = || proxy.requests.load(std::sync::atomic::Ordering::Relaxed);
    let before = count();
    let probes: Vec<_> = (0..200)
        .map(|_| {
            let url = loader.url("/readyz");
            tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status().as_u16()) })
        })
        .collect();
    for probe in probes {
        assert_eq!(probe.await.unwrap().unwrap(), 200);
    }
    // At most one more background check may have run meanwhile (one store call each; its
    // database query comes from the same check, so it is as bounded).
    assert!(count() - before <= 1, "{} store calls for 200 probes", count() - before);
}
