//! Test harness: the real binary, a real S3-protocol server (moto in server mode), real
//! PostgreSQL. Each test gets its own folder, bucket, database and ports.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_s3-sql-loader");

/// The port of the loader's `http.listen` log line (JSON or text logs).
fn listening_port(log: &str) -> Option<u16> {
    let after = &log[log.find("http.listen")?..];
    let addr = &after[after.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = addr.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` every 100 ms until it returns true, or panics after `timeout` with `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes `contents` at `path` (creating folders) with a modification time in the past, so the
/// local source's settle time does not hold it back.
pub fn write_old(path: &Path, contents: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
    let past = SystemTime::now() - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(past)
        .unwrap();
}

/// Every file under `dir`, as relative paths with `/`, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A running moto server; killed when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let exe = std::env::var("MOTO_SERVER").unwrap_or_else(|_| {
            let venv = format!(
                "{}/.cache/s3-sql-loader/venv/bin/moto_server",
                std::env::var("HOME").unwrap()
            );
            if Path::new(&venv).exists() {
                venv
            } else {
                "moto_server".into()
            }
        });
        // Port 0: the system picks, moto says which on stderr (" * Running on http://..."). A
        // thread keeps reading stderr (moto logs every request there) so moto never blocks.
        let mut child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} (run the tests through scripts/test, which installs moto): {e}")
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("Running on http://127.0.0.1:") {
                    let digits: String = line[at + "Running on http://127.0.0.1:".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    let _ = tx.send(digits.parse::<u16>().ok());
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .ok()
            .flatten()
            .expect("moto did not say which port it listens on within 30 s");
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    /// The environment a loader needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("LOADER_SOURCE__FORCE_PATH_STYLE", "true"),
            // Nothing about copies: moto ignores If-None-Match on CopyObject, which the loader
            // must find out by itself.
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bucket with helpers.
pub struct Bucket {
    pub client: aws_sdk_s3::Client,
    pub name: String,
}

impl Bucket {
    pub async fn create(moto: &Moto, name: &str) -> Bucket {
        let client = moto.client();
        client.create_bucket().bucket(name).send().await.unwrap();
        Bucket {
            client,
            name: name.to_string(),
        }
    }

    pub async fn put(&self, key: &str, body: impl Into<Vec<u8>>) {
        self.client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .body(ByteStream::from(body.into()))
            .send()
            .await
            .unwrap();
    }

    pub async fn get(&self, key: &str) -> Vec<u8> {
        let o = self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .unwrap();
        o.body.collect().await.unwrap().into_bytes().to_vec()
    }

    /// Every key under `prefix`, sorted, paginating.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.name)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            keys.extend(
                page.unwrap()
                    .contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        keys.sort();
        keys
    }
}

/// Connection URL of the PostgreSQL server used by the tests.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh PostgreSQL database for one test, dropped afterwards.
pub struct PgDb {
    pub name: String,
    pub url: String,
    pub pool: sqlx::PgPool,
}

impl PgDb {
    pub async fn create(test: &str) -> PgDb {
        let admin_url = postgres_admin_url();
        let name = format!("loader_{test}_{}", std::process::id());
        let admin = sqlx::PgPool::connect(&admin_url)
            .await
            .expect("PostgreSQL must be reachable (TEST_POSTGRES_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        PgDb { name, url, pool }
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await.unwrap()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await. psql is on every machine with PostgreSQL.
        let _ = Command::new("psql")
            .arg(postgres_admin_url())
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The loader binary running as a daemon; killed when dropped.
pub struct Loader {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

/// Runs the binary to completion with `args` in `dir` and only the given environment.
pub fn run(dir: &Path, args: &[&str], env: &[(String, String)]) -> (ExitStatus, String, String) {
    let out = command(dir, env).args(args).output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn command(dir: &Path, env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("LOADER_LOG__FORMAT", "json")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    cmd
}

pub fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl Loader {
    /// Starts `s3-sql-loader run` in `dir`, serving HTTP on a port the system picks (port 0),
    /// read back from the loader's log line `serving ...` (no port is bound and released
    /// first, so none can be taken meanwhile). A loader that exits before it serves keeps
    /// port 0.
    pub fn spawn(dir: &Path, env: &[(String, String)]) -> Loader {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.join(format!("loader-{}-{n}.log", std::process::id()));
        let mut child = command(dir, env)
            .env("LOADER_HTTP__LISTEN", "127.0.0.1:0")
            .arg("run")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                break port;
            }
            if child.try_wait().ok().flatten().is_some() {
                break 0;
            }
            assert!(Instant::now() < deadline, "the loader did not start serving:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        };
        Loader {
            child: Some(child),
            port,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `/healthz` answers.
    pub async fn wait_up(&self) {
        let url = self.url("/healthz");
        wait_until(Duration::from_secs(30), "the loader's /healthz", || async {
            reqwest::get(&url)
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        })
        .await;
    }

    /// Waits until the loader has ticked `more` more times (whatever each tick found): a wait on
    /// its own progress, for "nothing else happens meanwhile" checks, instead of a fixed sleep.
    pub async fn wait_ticks(&self, more: u64) {
        let ticks = |s: serde_json::Value| s["totals"]["ticks"].as_u64().unwrap_or(0);
        let target = ticks(self.status().await) + more;
        wait_until(Duration::from_secs(60), "more ticks", || async {
            ticks(self.status().await) >= target
        })
        .await;
    }

    pub async fn status(&self) -> serde_json::Value {
        reqwest::get(self.url("/status")).await.unwrap().json().await.unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose message is `message`.
    pub fn log_events(&self, message: &str) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of the loader on port {} ----\n{}", self.port, self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CSV file of `rows` rows with ids `first..first+rows`.
pub fn orders_csv(first: u64, rows: u64) -> String {
    let mut s = String::from("id,customer,amount,paid,created_on\n");
    for id in first..first + rows {
        s.push_str(&format!(
            "{id},\"customer {id}, inc\",{}.{:02},{},2026-11-{:02}\n",
            id % 1000,
            id % 100,
            id % 2 == 0,
            id % 28 + 1
        ));
    }
    s
}
/// Ten order files for group commit (`001.csv` to `010.csv`, 50 rows each from id `f * 100`);
/// the 3rd ends with a row that does not fit, so it fails whole.
pub fn ten_files_the_third_bad() -> Vec<(String, String)> {
    (1..=10u64)
        .map(|f| {
            let mut csv = orders_csv(f * 100, 50);
            if f == 3 {
                csv.push_str(&format!("{},x,not-a-number,true,2026-11-01\n", f * 100 + 50));
            }
            (format!("{f:03}.csv"), csv)
        })
        .collect()
}

/// The "group loaded in one transaction" event in the JSON log of a `once` run.
pub fn group_event(stderr: &str) -> serde_json::Value {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["message"] == "group loaded in one transaction")
        .unwrap_or_else(|| panic!("no group: {stderr}"))
}

pub mod faults;

/// The venv's Python (with boto3, prometheus_client, cbor2), next to moto_server.
pub fn venv_python() -> String {
    let moto = std::env::var("MOTO_SERVER").unwrap_or_else(|_| {
        format!(
            "{}/.cache/s3-sql-loader/venv/bin/moto_server",
            std::env::var("HOME").unwrap()
        )
    });
    Path::new(&moto).with_file_name("python").to_string_lossy().into_owned()
}

/// Runs a Python snippet with the venv's interpreter; returns its standard output.
pub fn python(code: &str, args: &[&str]) -> String {
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The CloudWatch RPC v2 CBOR bridge in front of moto (tests/tools/cloudwatch_cbor_bridge.py).
pub struct CloudWatchBridge {
    child: Child,
    pub endpoint: String,
}

impl CloudWatchBridge {
    pub fn start(moto: &Moto, extra: &[&str]) -> CloudWatchBridge {
        use std::io::BufRead;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/cloudwatch_cbor_bridge.py");
        let mut child = Command::new(venv_python())
            .arg(script)
            .args(["--moto", &moto.endpoint, "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT=")
            .unwrap_or_else(|| panic!("bridge said {line:?}"));
        CloudWatchBridge {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for CloudWatchBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Admin URL of the MariaDB/MySQL server used by the tests.
pub fn mysql_admin_url() -> String {
    std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// A fresh MariaDB/MySQL database for one test, dropped afterwards.
pub struct MyDb {
    pub name: String,
    pub url: String,
    pub pool: sqlx::MySqlPool,
}

impl MyDb {
    pub async fn create(test: &str) -> MyDb {
        let admin_url = mysql_admin_url();
        let name = format!("loader_{test}_{}", std::process::id());
        let admin = sqlx::MySqlPool::connect(&admin_url)
            .await
            .expect("MariaDB must be reachable (TEST_MYSQL_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`")))
            .execute(&admin)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
        MyDb { name, url, pool }
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await.unwrap()
    }
}

impl Drop for MyDb {
    fn drop(&mut self) {
        let url = mysql_admin_url();
        let hostport = url
            .split('@')
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or("127.0.0.1:3306");
        let (host, port) = hostport.split_once(':').unwrap_or((hostport, "3306"));
        let _ = Command::new("mysql")
            .args([
                "-h",
                host,
                "-P",
                port,
                "-u",
                "root",
                "-e",
                &format!("DROP DATABASE IF EXISTS `{}`", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `data` compressed with zstd.
pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// The orders of [`orders_csv`] as JSON lines, with a nested value.
pub fn orders_jsonl(first: u64, rows: u64) -> String {
    (first..first + rows)
        .map(|id| {
            format!(
                "{{\"id\": {id}, \"customer\": \"customer {id}, inc\", \"amount\": {}.{:02}, \"paid\": {}, \"created_on\": \"2026-11-{:02}\", \"tags\": [\"t{}\"]}}\n",
                id % 1000,
                id % 100,
                id % 2 == 0,
                id % 28 + 1,
                id % 3
            )
        })
        .collect()
}

/// A test database of any of the three kinds, for scenarios run against each.
pub enum AnyDb {
    Postgres(PgDb),
    MySql(MyDb),
    Sqlite { url: String, pool: sqlx::SqlitePool },
}

impl AnyDb {
    pub async fn postgres(test: &str) -> AnyDb {
        AnyDb::Postgres(PgDb::create(test).await)
    }

    pub async fn mysql(test: &str) -> AnyDb {
        AnyDb::MySql(MyDb::create(test).await)
    }

    pub async fn sqlite(dir: &Path) -> AnyDb {
        let url = format!("sqlite://{}/test.db", dir.display());
        let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        AnyDb::Sqlite { url, pool }
    }

    pub fn url(&self) -> &str {
        match self {
            AnyDb::Postgres(d) => &d.url,
            AnyDb::MySql(d) => &d.url,
            AnyDb::Sqlite { url, .. } => url,
        }
    }

    /// Runs a query returning one integer (portable SQL only).
    pub async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self {
            AnyDb::Postgres(d) => sqlx::query_scalar::<_, i64>(sql).fetch_one(&d.pool).await.unwrap(),
            AnyDb::MySql(d) => sqlx::query_scalar::<_, i64>(sql).fetch_one(&d.pool).await.unwrap(),
            AnyDb::Sqlite { pool, .. } => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap(),
        }
    }

    /// Runs a query returning one text value (portable SQL only).
    pub async fn text(&self, sql: &str) -> Option<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self {
            AnyDb::Postgres(d) => sqlx::query_scalar::<_, Option<String>>(sql)
                .fetch_one(&d.pool)
                .await
                .unwrap(),
            AnyDb::MySql(d) => sqlx::query_scalar::<_, Option<String>>(sql)
                .fetch_one(&d.pool)
                .await
                .unwrap(),
            AnyDb::Sqlite { pool, .. } => sqlx::query_scalar::<_, Option<String>>(sql)
                .fetch_one(pool)
                .await
                .unwrap(),
        }
    }
}
