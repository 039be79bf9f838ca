//! The command line and configuration, through the real binary.

mod common;

use common::*;

#[test]
fn environment_variables_override_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("loader.toml"),
        "[source]\nurl = \"file://./from-file\"\n[database]\nurl = \"sqlite://./from-file.db\"\n",
    )
    .unwrap();
    // `check` looks and creates nothing: a folder that is not there is named, not made.
    let (status, stdout, stderr) = run(d, &["--config", "loader.toml", "check"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let expected = format!(
        "store file://{}/from-file: FAILED: there is no folder {}/from-file (a relative source.url is taken from the working directory",
        d.canonicalize().unwrap().display(),
        d.canonicalize().unwrap().display()
    );
    assert!(stdout.contains(&expected), "{expected}\n{stdout}");
    assert!(
        stdout.contains("database sqlite://./from-file.db: ok"),
        "the other checks run: {stdout}"
    );
    assert!(!d.join("from-file").exists());
    for folder in ["from-file", "from-env"] {
        std::fs::create_dir_all(d.join(folder).join("incoming")).unwrap();
    }
    let (status, stdout, stderr) = run(d, &["--config", "loader.toml", "check"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("from-file: ok"), "{stdout}");

    let env = kv(&[("LOADER_SOURCE__URL", "file://./from-env")]);
    let (status, stdout, stderr) = run(d, &["--config", "loader.toml", "check"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("from-env: ok") && !stdout.contains("from-file: ok"),
        "{stdout}"
    );
    assert!(stdout.contains("database sqlite://./from-file.db: ok"), "{stdout}");

    // LOADER_CONFIG names the file too.
    let env = kv(&[("LOADER_CONFIG", "loader.toml")]);
    let (status, stdout, _) = run(d, &["check"], &env);
    assert!(status.success() && stdout.contains("from-file: ok"), "{stdout}");
}

#[test]
fn an_unknown_key_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("loader.toml"), "[schedule]\nintervall = \"5s\"\n").unwrap();
    let (status, _, stderr) = run(d, &["--config", "loader.toml", "check"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("schedule.intervall: unknown key"), "{stderr}");
    assert!(stderr.contains("interval"), "the accepted keys are listed: {stderr}");

    // From the environment, the variable is named as it is spelled.
    let (status, _, stderr) = run(d, &["check"], &kv(&[("LOADER_WORKERS__THREADS", "4")]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("  - LOADER_WORKERS__THREADS: unknown key"), "{stderr}");

    // Every mistake of a file at once, under its key, in words rather than Rust's types.
    std::fs::write(
        d.join("three.toml"),
        "[schedule]\nintervall = \"5s\"\n[workers]\nconcurrency = \"four\"\n[[routes]]\nprefix = \"a/\"\nwrite_mode = \"merge\"\n",
    )
    .unwrap();
    let (status, _, stderr) = run(d, &["--config", "three.toml", "check"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    for line in [
        "  - schedule.intervall: unknown key; expected one of: interval, max_files_per_tick (in three.toml)",
        "  - workers.concurrency: expected a whole number (0 or more), found string \"four\" (in three.toml)",
        "  - routes[0].write_mode: unknown value \"merge\"; expected one of: append, upsert (in three.toml)",
    ] {
        assert!(stderr.lines().any(|l| l == line), "{line}\n{stderr}");
    }

    // A LOADER_ variable of something else is not the loader's business; one that looks like
    // a setting of a section that does not exist is ignored with a warning.
    std::fs::create_dir_all(d.join("data/incoming")).unwrap();
    let env = kv(&[("LOADER_FOO", "1"), ("LOADER_SOURC__URL", "file://./elsewhere")]);
    let (status, stdout, stderr) = run(d, &["check"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("LOADER_SOURC__URL") && !stderr.contains("LOADER_FOO"),
        "{stderr}"
    );
}

#[test]
fn a_bad_value_stops_start_up_naming_the_key_and_what_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (status, _, stderr) = run(d, &["check"], &kv(&[("LOADER_SCHEDULE__INTERVAL", "soon")]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("LOADER_SCHEDULE__INTERVAL: \"soon\" is not a duration"),
        "{stderr}"
    );
    assert!(stderr.contains("\"15s\""), "the accepted form is shown: {stderr}");

    std::fs::write(
        d.join("bad.toml"),
        "[workers]\nconcurrency = 0\n[http]\nlisten = \"everywhere\"\n",
    )
    .unwrap();
    let (status, _, stderr) = run(d, &["--config", "bad.toml", "check"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("workers.concurrency: must be between 1 and 256"),
        "{stderr}"
    );
    assert!(
        stderr.contains("http.listen: expected ADDRESS:PORT"),
        "both problems at once: {stderr}"
    );
}

#[test]
fn the_database_password_never_appears_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (status, _, stderr) = run(
        d,
        &["check"],
        &kv(&[("LOADER_DATABASE__URL", "oracle://scott:tiger-secret@db/x")]),
    );
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("database.url") && !stderr.contains("tiger-secret"),
        "{stderr}"
    );

    // Unreachable PostgreSQL with a password: `check` fails and says so, without the password.
    let port = free_port();
    let url = format!("postgres://app:tiger-secret@127.0.0.1:{port}/db");
    let env = kv(&[
        ("LOADER_DATABASE__URL", &url),
        ("LOADER_DATABASE__CONNECT_TIMEOUT", "2s"),
    ]);
    let (status, stdout, stderr) = run(d, &["check"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("database postgres://app:***@127.0.0.1"), "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(
        !stdout.contains("tiger-secret") && !stderr.contains("tiger-secret"),
        "{stdout}{stderr}"
    );
}

#[test]
fn healthcheck_fails_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (status, _, stderr) = run(
        dir.path(),
        &["healthcheck", "--url", &format!("http://127.0.0.1:{port}/healthz")],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("unhealthy"), "{stderr}");
}

#[test]
fn validate_says_what_would_load_or_why_not_without_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("in/incoming/orders")).unwrap();
    std::fs::write(d.join("in/incoming/orders/good.csv"), orders_csv(1, 12)).unwrap();
    // Types come from the first 1000 rows; a value after them that does not fit fails the file.
    let mut bad = String::from("id,amount\n");
    for i in 1..=1100 {
        bad.push_str(&format!("{i},{}\n", i * 2));
    }
    bad.push_str("x,4\n");
    std::fs::write(d.join("bad.csv"), bad).unwrap();
    // The database URL points nowhere: validate must not need it.
    let env = kv(&[("LOADER_DATABASE__URL", "postgres://nobody@127.0.0.1:1/none")]);
    let (status, stdout, stderr) = run(d, &["validate", "in/incoming/orders/good.csv"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("target:   table \"orders\""), "{stdout}");
    assert!(
        stdout.contains("table:    not checked: cannot connect to 127.0.0.1:1: Connection refused"),
        "{stdout}"
    );
    assert!(
        stdout.contains("id integer, customer text, amount decimal, paid boolean"),
        "{stdout}"
    );
    assert!(stdout.contains("would load 12 row(s)"), "{stdout}");
    // A value past the sample that does not fit an inferred type widens that new column: the
    // load would create `id` as text and load every row.
    let (status, stdout, _) = run(d, &["validate", "bad.csv", "--key", "prices/bad.csv"], &env);
    assert!(status.success(), "{stdout}");
    assert!(
        stdout.contains("columns:  id text, amount integer") && stdout.contains("would load 1101 row(s)"),
        "{stdout}"
    );
    // A declared type is kept: the same file then fails, with the value's line and column.
    std::fs::write(
        d.join("typed.toml"),
        "[[routes]]\nprefix = \"prices/\"\n[routes.column_types]\nid = \"integer\"\n",
    )
    .unwrap();
    let mut typed_env = env.clone();
    typed_env.extend(kv(&[("LOADER_CONFIG", "typed.toml")]));
    let (status, stdout, _) = run(d, &["validate", "bad.csv", "--key", "prices/bad.csv"], &typed_env);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("would FAIL (type): \"x\" is not a valid integer (line 1102) (column id)")
            && stdout.contains("rows:     1100\n"),
        "{stdout}"
    );
    assert!(!d.join("data").exists(), "validate creates no folders or databases");
}

/// `validate` checks a file against the table the database already has, as a load would: a
/// value the existing column cannot hold fails it, as the daemon then fails the same file; a
/// new column is named as one the load would add; `--offline` checks as for a new table.
#[test]
fn validate_checks_the_file_against_the_existing_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    let made = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute('CREATE TABLE prices (id INTEGER, amount DOUBLE, note TEXT)'); c.commit()",
        ])
        .arg(d.join("data/loader.db"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(d.join("p.csv"), "id,amount\n1,2.5\n2,n/a\n").unwrap();
    let (status, stdout, stderr) = run(d, &["validate", "p.csv", "--key", "prices/p.csv"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("table:    exists: id integer, amount float, note text"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would FAIL (type): \"n/a\" is not a valid number (line 3) (column amount)"),
        "{stdout}"
    );
    // The daemon agrees.
    write_old(&d.join("data/incoming/prices/p.csv"), b"id,amount\n1,2.5\n2,n/a\n");
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("failed 1"), "{stdout}");
    assert!(d.join("data/failed/prices/p.csv").is_file());

    // Offline, the same file is checked as for a new table, where `amount` would be text.
    let (status, stdout, _) = run(d, &["validate", "p.csv", "--key", "prices/p.csv", "--offline"], &[]);
    assert!(status.success(), "{stdout}");
    assert!(!stdout.contains("table:"), "{stdout}");
    assert!(stdout.contains("columns:  id integer, amount text"), "{stdout}");
    assert!(
        stdout.contains("would load 2 row(s) (types as a new table would get them)"),
        "{stdout}"
    );

    // A file that fits, with a column the table lacks: refused by default, added when the
    // route says `on_new_columns = "add"`.
    std::fs::write(d.join("q.csv"), "id,amount,size\n1,2.5,XL\n").unwrap();
    let (status, stdout, _) = run(d, &["validate", "q.csv", "--key", "prices/q.csv"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("would FAIL (schema): column(s) size of the file are not in table \"prices\""),
        "{stdout}"
    );
    std::fs::write(
        d.join("add.toml"),
        "[[routes]]\nprefix = \"prices/\"\non_new_columns = \"add\"\n",
    )
    .unwrap();
    let add = kv(&[("LOADER_CONFIG", "add.toml")]);
    let (status, stdout, _) = run(d, &["validate", "q.csv", "--key", "prices/q.csv"], &add);
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("adds:     size text"), "{stdout}");
    assert!(
        stdout.contains("would load 1 row(s) (checked against the existing table)"),
        "{stdout}"
    );

    // A table the database does not have yet.
    let (status, stdout, _) = run(d, &["validate", "q.csv", "--key", "sizes/q.csv"], &[]);
    assert!(status.success(), "{stdout}");
    assert!(
        stdout.contains("table:    does not exist yet: a load would create it"),
        "{stdout}"
    );
}

/// "What happened to file K?" and "reload file K", one command each: `ledger list`, `ledger
/// show` (every version, rows, attempts, error, and where the file is now), `reload` (after the
/// table was emptied, the same file loads again), and `status --json`.
#[test]
fn the_ledger_answers_what_happened_to_a_file_and_reload_loads_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), b"id,amount\n1,2.50\n2,3.10\n");
    write_old(&d.join("data/incoming/orders/bad.csv"), b"id,amount\n1,x\n");
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");

    let (status, stdout, stderr) = run(d, &["ledger", "list"], &[]);
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" loaded ") && l.contains(" 2 ") && l.ends_with("orders/a.csv")),
        "{stdout}"
    );
    let (_, stdout, _) = run(d, &["ledger", "list", "--state", "failed", "--json"], &[]);
    let failed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(failed.as_array().unwrap().len(), 1, "{stdout}");
    assert_eq!(failed[0]["key"], "orders/bad.csv");
    assert_eq!(failed[0]["error"]["kind"], "type");
    let (status, _, stderr) = run(d, &["ledger", "list", "--state", "done"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("--state: expected loaded, failed or pending"),
        "{stderr}"
    );

    // Any spelling of the key: relative, or with its folder.
    for key in ["orders/bad.csv", "failed/orders/bad.csv", "incoming/orders/bad.csv"] {
        let (status, stdout, stderr) = run(d, &["ledger", "show", key], &[]);
        assert!(status.success(), "{stderr}");
        assert!(stdout.contains("stored:   failed/orders/bad.csv"), "{stdout}");
        assert!(stdout.contains("version 1: failed"), "{stdout}");
        assert!(
            stdout.contains("error:      type: \"x\" is not a valid decimal"),
            "{stdout}"
        );
    }
    let (_, stdout, _) = run(d, &["ledger", "show", "orders/a.csv", "--json"], &[]);
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["stored"][0]["area"], "processed/", "{shown}");
    assert_eq!(shown["versions"][0]["state"], "loaded", "{shown}");
    assert_eq!(shown["versions"][0]["rows"], 2, "{shown}");
    assert_eq!(shown["versions"][0]["attempts"], 1, "{shown}");
    let (status, stdout, _) = run(d, &["ledger", "show", "orders/never.csv"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(stdout.contains("no version of it was ever claimed"), "{stdout}");

    // The table is emptied; the file, already loaded, is loaded again on purpose.
    let db = d.join("data/loader.db");
    let sqlite = |sql: &str| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); r=c.execute(sys.argv[2]).fetchall(); c.commit(); print(r)"])
            .arg(&db)
            .arg(sql)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    sqlite("DELETE FROM orders");
    let (status, stdout, stderr) = run(d, &["reload", "processed/orders/a.csv"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("ledger: 1 loaded or failed record(s) of this version of orders/a.csv set back to pending"),
        "{stdout}"
    );
    assert!(
        stdout.contains("moved processed/orders/a.csv back to incoming/orders/a.csv"),
        "{stdout}"
    );
    assert!(d.join("data/incoming/orders/a.csv").is_file());
    let (status, stdout, stderr) = run(d, &["once"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("loaded 1 (2 rows)"), "{stdout}");
    assert_eq!(
        sqlite("SELECT id, amount FROM orders ORDER BY id"),
        "[(1, '2.50'), (2, '3.10')]"
    );
    assert!(d.join("data/processed/orders/a.csv").is_file());

    // A failed file too, from failed/, its report removed.
    write_old(&d.join("data/failed/orders/bad.csv"), b"id,amount\n1,7.25\n");
    let (status, stdout, stderr) = run(d, &["reload", "orders/bad.csv"], &[]);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(!d.join("data/failed/orders/bad.csv.error.json").exists());
    let (_, stdout, _) = run(d, &["once"], &[]);
    assert!(stdout.contains("loaded 1 (1 rows)"), "{stdout}");

    let (status, _, stderr) = run(d, &["reload", "orders/nothing.csv"], &[]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("no file orders/nothing.csv in incoming/, processed/ or failed/"),
        "{stderr}"
    );

    write_old(&d.join("data/incoming/orders/c.csv"), b"id,amount\n3,1.00\n");
    let (status, stdout, stderr) = run(d, &["status", "--json"], &[]);
    assert!(status.success(), "{stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["files"], 1, "{s}");
    assert_eq!(s["failed_files"], 0, "{s}");
    assert!(s["oldest_age_seconds"].as_i64().unwrap() >= 59, "{s}");
}

/// Usual mistakes get one line that names what to fix: a database port where nothing listens
/// (not "pool timed out"), an S3 bucket that does not exist (no SDK debug dump).
#[test]
fn a_wrong_database_port_or_bucket_is_named_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let env = kv(&[
        ("LOADER_DATABASE__URL", "postgres://postgres@127.0.0.1:1/test"),
        ("LOADER_DATABASE__CONNECT_TIMEOUT", "1s"),
    ]);
    let (status, stdout, stderr) = run(d, &["check"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("database ")).unwrap();
    assert!(
        line.contains("FAILED: cannot connect to 127.0.0.1:1: Connection refused"),
        "{stdout}"
    );

    let moto = Moto::start();
    let mut env = moto.env();
    env.extend(kv(&[("LOADER_SOURCE__URL", "s3://no-such-bucket")]));
    let (status, stdout, stderr) = run(d, &["check"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("store s3://")).unwrap();
    assert_eq!(
        line,
        "store s3://no-such-bucket/: FAILED: listing s3://no-such-bucket/incoming/: NoSuchBucket: The specified bucket does not exist (HTTP 404)"
    );
    assert!(
        !stdout.contains("ServiceError") && !stderr.contains("ServiceError"),
        "{stdout}{stderr}"
    );
    // `once` says it once, as its error, not also as a log line before it.
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(stderr.matches("NoSuchBucket").count(), 1, "{stderr}");
    assert!(
        stderr.contains("error: listing s3://no-such-bucket/incoming/: NoSuchBucket"),
        "{stderr}"
    );
}

/// `validate` on a file named like the demo's: the table comes from the key, and the answer
/// says so; `--key` takes the key with or without `incoming/`.
#[test]
fn validate_hints_at_the_key_and_takes_it_with_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("orders-2026-11-01.csv"), "id,amount\n1,2.50\n").unwrap();
    let (status, stdout, _) = run(d, &["validate", "orders-2026-11-01.csv"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("would FAIL (unsafe_name)"), "{stdout}");
    assert!(
        stdout.contains("hint:     the table comes from the key")
            && stdout.contains("--key orders/orders-2026-11-01.csv"),
        "{stdout}"
    );
    for key in ["orders/x.csv", "incoming/orders/x.csv"] {
        let (status, stdout, _) = run(d, &["validate", "orders-2026-11-01.csv", "--key", key], &[]);
        assert!(status.success(), "{stdout}");
        assert!(stdout.contains("key:      incoming/orders/x.csv\n"), "{stdout}");
        assert!(stdout.contains("target:   table \"orders\""), "{stdout}");
    }
}

/// A file still within `source.settle_time` is not listed yet; `once` and `status` say it is
/// there instead of reporting an empty folder.
#[test]
fn files_within_the_settle_time_are_reported_as_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data/incoming/orders")).unwrap();
    std::fs::write(d.join("data/incoming/orders/new.csv"), "id\n1\n").unwrap();
    let env = kv(&[("LOADER_SOURCE__SETTLE_TIME", "1h")]);
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with("listed 0 |"), "{stdout}");
    assert!(
        stdout.contains("not listed yet: 1 file(s) in incoming/ changed within source.settle_time"),
        "{stdout}"
    );
    let (_, stdout, _) = run(d, &["status", "--json"], &env);
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (s["files"].as_u64(), s["settling_files"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
}

/// Strict routing: with `routing.unmatched = "fail"` a file no route matches fails with a
/// report instead of creating a table named after its folder; with "leave" it stays in
/// incoming/, with a warning. A route written with `incoming/` in front is warned about.
#[test]
fn files_that_match_no_route_fail_or_stay_as_routing_unmatched_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("routes.toml"),
        "[[routes]]\nprefix = \"orders/\"\n[[routes]]\nprefix = \"incoming/events/\"\n",
    )
    .unwrap();
    write_old(&d.join("data/incoming/orders/a.csv"), b"id\n1\n");
    write_old(&d.join("data/incoming/typo/b.csv"), b"id\n2\n");
    let config = |unmatched: &str| {
        kv(&[
            ("LOADER_CONFIG", "routes.toml"),
            ("LOADER_ROUTING__UNMATCHED", unmatched),
        ])
    };

    let (status, stdout, stderr) = run(d, &["check"], &config("fail"));
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("configuration: warning: routes[1].prefix: \"incoming/events/\" matches no key")
            && stdout.contains("did you mean \"events/\"?"),
        "{stdout}"
    );

    // A dry run says what a tick would do, and does nothing.
    let (status, stdout, stderr) = run(d, &["once", "--dry-run"], &config("leave"));
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("listed 2 | would take 1 | left in incoming/ (no route) 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  orders/a.csv  ->  table orders, csv append  [routes[0] (prefix \"orders/\")]"),
        "{stdout}"
    );
    let (_, stdout, _) = run(d, &["once", "--dry-run"], &config("fail"));
    assert!(
        stdout.contains("  typo/b.csv  ->  would FAIL: no route matches this key, and routing.unmatched = \"fail\""),
        "{stdout}"
    );
    assert!(d.join("data/incoming/orders/a.csv").is_file());
    assert_eq!(files_under(&d.join("data/processed")), Vec::<String>::new());

    let (status, stdout, stderr) = run(d, &["once"], &config("leave"));
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with("listed 2 | loaded 1 "), "{stdout}");
    assert!(d.join("data/incoming/typo/b.csv").is_file(), "left in place");
    assert!(
        stderr.contains("left in incoming/: no route matches these keys"),
        "{stderr}"
    );

    let (status, stdout, stderr) = run(d, &["once"], &config("fail"));
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let report = std::fs::read_to_string(d.join("data/failed/typo/b.csv.error.json")).unwrap();
    assert!(report.contains("no route matches this key"), "{report}");
    let (_, stdout, _) = run(d, &["ledger", "list", "--json"], &[]);
    let tables: Vec<serde_json::Value> = serde_json::from_str::<serde_json::Value>(&stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["table"].clone())
        .collect();
    assert!(
        !tables.contains(&serde_json::json!("typo")),
        "no table from the folder: {stdout}"
    );
}

/// `retry-failed` after the file was corrected in `failed/`: the corrected version loads, and
/// the version that failed stays `failed` in the ledger (it used to stay `pending` for ever).
#[test]
fn retry_failed_resets_only_the_version_that_goes_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), b"id,amount\n1,2,3\n");
    let (status, stdout, _) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1), "{stdout}");
    write_old(&d.join("data/failed/orders/a.csv"), b"id,amount\n1,2.50\n");
    let (status, stdout, stderr) = run(d, &["retry-failed"], &[]);
    assert!(
        status.success() && stdout.contains("moved 1 file(s)"),
        "{stdout}{stderr}"
    );
    let (status, stdout, _) = run(d, &["once"], &[]);
    assert!(status.success() && stdout.contains("loaded 1 (1 rows)"), "{stdout}");
    let (_, stdout, _) = run(d, &["ledger", "show", "orders/a.csv", "--json"], &[]);
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let states: Vec<&str> = shown["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "loaded"], "{shown}");
}
