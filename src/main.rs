//! The `s3-sql-loader` binary: parses the command line and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use s3_sql_loader::app::App;
use s3_sql_loader::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Loads flat files from S3 (or a local folder) into a SQL database, exactly once.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (defaults, then this file, then LOADER_<SECTION>__<KEY> variables).
    #[arg(long, global = true, env = "LOADER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default): list incoming/ every interval, load, move.
    Run,
    /// Run one tick, wait for its loads, exit (non-zero if a file failed or must be retried).
    Once {
        /// Only say which files the tick would take, into which table, by which route and
        /// mode; load and move nothing (no database needed).
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the configuration and reach the store and the database.
    Check,
    /// Print the backlog and the latest failed files.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// What the ledger knows: `ledger list`, or `ledger show KEY` for one file.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Load a file again on purpose: its loaded or failed versions in the ledger become
    /// pending, and the file goes back to incoming/ (from processed/ or failed/).
    Reload {
        /// Its key: `orders/a.csv`, or with its folder, `processed/orders/a.csv`.
        key: String,
    },
    /// Move files from failed/ back to incoming/ so they are loaded again.
    RetryFailed {
        /// Only files whose key (relative to failed/) starts with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Decode a local file as the loader would (its route, format, names and types), check it
    /// against the target table when the database has one, and say what would load or why it
    /// would fail. Writes nothing.
    Validate {
        /// The file to check.
        file: PathBuf,
        /// Its key relative to incoming/, which picks the route and the table (default: the
        /// path after `incoming/` if it has one, else the file name).
        #[arg(long)]
        key: Option<String>,
        /// Do not ask the database: check the file as for a new table.
        #[arg(long)]
        offline: bool,
    },
    /// Exit 0 when the daemon's /healthz answers 200 (for container health checks).
    Healthcheck {
        /// Defaults to /healthz on the configured http.listen port, via 127.0.0.1.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// The files the ledger knows, the latest changed first.
    List {
        /// Only `loaded`, `failed` or `pending` files.
        #[arg(long)]
        state: Option<String>,
        /// Only files loaded (or tried) into this table.
        #[arg(long)]
        table: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one file: each version's state, rows, attempts, errors and times, and
    /// where the file is stored now.
    Show {
        /// Its key: `orders/a.csv`, or with its folder, `failed/orders/a.csv`.
        key: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli));
    // Loads abandoned after the grace period may still sit in blocking decoder threads: do
    // not wait for them (their transactions roll back when the process exits).
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

/// glibc gives each thread that meets contention an arena of its own (up to 8 per core) and
/// keeps what each one freed: loads that come and go on the runtime's and the decoders' threads
/// then leave the process two or three times the memory it uses (a soak of good and hostile
/// files peaked at 191 MB against 79 MB with two arenas). Two arenas, as `MALLOC_ARENA_MAX=2`
/// would set, unless the environment says otherwise. Before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let command = cli.command.unwrap_or(Command::Run);
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            if let Command::Healthcheck { url } = &command {
                // A health check must still work when the environment is partly unset.
                return healthcheck(url.clone().unwrap_or_else(|| "http://127.0.0.1:8080/healthz".into())).await;
            }
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    s3_sql_loader::telemetry::init(&config.log);
    for warning in config.warnings() {
        tracing::warn!(warning = %warning, "the configuration is valid, but probably not as meant");
    }
    for variable in Config::ignored_variables() {
        tracing::warn!(
            variable = %variable,
            sections = %s3_sql_loader::config::SECTIONS.join(", "),
            "ignored: a LOADER_ variable whose name starts with no section of the configuration"
        );
    }
    let daemon_command = matches!(command, Command::Run);
    let result = match command {
        Command::Run => daemon(config).await.map(|()| ExitCode::SUCCESS),
        Command::Once { dry_run: false } => once(config).await,
        Command::Once { dry_run: true } => {
            let app = App::build(config, None).await;
            match app {
                Ok(app) => app.dry_run().await.map(|plan| {
                    print!("{}", plan.render());
                    ExitCode::SUCCESS
                }),
                Err(e) => Err(e),
            }
        }
        Command::Check => check(config).await,
        Command::Status { json } => status(config, json).await,
        Command::Ledger { command } => ledger(config, command).await,
        Command::Reload { key } => reload(config, key).await,
        Command::RetryFailed { prefix } => retry_failed(config, prefix).await,
        Command::Validate { file, key, offline } => validate(config, file, key, offline).await,
        Command::Healthcheck { url } => {
            let port = config.listen_addr().port();
            return healthcheck(url.unwrap_or_else(|| format!("http://127.0.0.1:{port}/healthz"))).await;
        }
    };
    // Once: the daemon's error goes to its log (where its collectors look), a command's to the
    // terminal.
    result.unwrap_or_else(|e| {
        match daemon_command {
            true => tracing::error!(error.message = %format!("{e:#}"), "exiting on error"),
            false => eprintln!("error: {e:#}"),
        }
        ExitCode::FAILURE
    })
}

async fn daemon(config: Config) -> anyhow::Result<()> {
    let stop = s3_sql_loader::shutdown::on_signal().context("installing signal handlers")?;
    let listener = App::listen(&config).await?;
    App::build(config, listener).await?.run_until_stopped(stop).await
}

async fn once(config: Config) -> anyhow::Result<ExitCode> {
    let settle = config.source.settle_time;
    let summary = App::build(config, None).await?.run_once().await?;
    println!(
        "listed {} | loaded {} ({} rows) | already loaded {} | failed {} | to retry {} | held elsewhere {}",
        summary.listed,
        summary.loaded,
        summary.rows,
        summary.already_loaded,
        summary.failed,
        summary.retry,
        summary.busy
    );
    if summary.settling > 0 {
        println!(
            "not listed yet: {} file(s) in incoming/ changed within source.settle_time ({:?}); a later tick takes them",
            summary.settling, settle
        );
    }
    Ok(if summary.failed > 0 || summary.retry > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn check(config: Config) -> anyhow::Result<ExitCode> {
    println!("configuration: ok");
    for warning in config.warnings() {
        println!("configuration: warning: {warning}");
    }
    let app = App::build_to_check(config).await?;
    let mut ok = true;
    for (what, result) in app.check().await {
        match result {
            Ok(note) if note.is_empty() => println!("{what}: ok"),
            Ok(note) => println!("{what}: ok ({note})"),
            Err(e) => {
                ok = false;
                println!("{what}: FAILED: {e}");
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn status(config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let app = App::build(config, None).await?;
    let backlog = app.backlog().await?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&backlog)?),
        false => print!("{}", backlog.render()),
    }
    Ok(ExitCode::SUCCESS)
}

async fn ledger(config: Config, command: LedgerCommand) -> anyhow::Result<ExitCode> {
    let app = App::build(config, None).await?;
    match command {
        LedgerCommand::List {
            state,
            table,
            limit,
            json,
        } => {
            if let Some(s) = &state
                && !["loaded", "failed", "pending"].contains(&s.as_str())
            {
                anyhow::bail!("--state: expected loaded, failed or pending, got {s:?}");
            }
            let filter = s3_sql_loader::sink::entries::Filter {
                state,
                table,
                key: None,
                limit,
            };
            let entries = app.ledger_entries(&filter).await?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&entries)?),
                false => print!("{}", s3_sql_loader::app::render_entries(&entries)),
            }
        }
        LedgerCommand::Show { key, json } => {
            let history = app.file_history(&key).await?;
            match json {
                true => println!("{}", serde_json::to_string_pretty(&history)?),
                false => print!("{}", s3_sql_loader::app::render_history(&history)),
            }
            if history.versions.is_empty() && history.stored.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn reload(config: Config, key: String) -> anyhow::Result<ExitCode> {
    let app = App::build(config, None).await?;
    for line in app.reload(&key).await? {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn retry_failed(config: Config, prefix: Option<String>) -> anyhow::Result<ExitCode> {
    let app = App::build(config, None).await?;
    let moved = app.retry_failed(prefix.as_deref()).await?;
    println!("moved {moved} file(s) from failed/ back to incoming/");
    Ok(ExitCode::SUCCESS)
}

async fn validate(config: Config, file: PathBuf, key: Option<String>, offline: bool) -> anyhow::Result<ExitCode> {
    let given = key.is_some();
    // `--key incoming/orders/x.csv` means the file at that key, as everywhere else.
    let key = key.map(|k| s3_sql_loader::app::relative_key(&k)).unwrap_or_else(|| {
        let path = file.to_string_lossy();
        match path.rsplit_once("incoming/") {
            Some((_, rest)) => rest.to_string(),
            None => file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    });
    let v = s3_sql_loader::app::validate_file(&config, &file, &key, offline).await?;
    println!("file:     {}", file.display());
    println!("key:      incoming/{}", v.key);
    match &v.spec.table {
        Ok(table) => println!(
            "target:   table {table:?}, {} mode, format {}",
            format!("{:?}", v.spec.write_mode).to_lowercase(),
            v.spec
                .format
                .format
                .map(|f| format!("{f:?}").to_lowercase())
                .unwrap_or_else(|| "by extension".into())
        ),
        Err(_) => println!("target:   none"),
    }
    use s3_sql_loader::app::TableSeen;
    let against = match &v.table {
        TableSeen::Exists(columns) => {
            let columns: Vec<String> = columns.iter().map(|(c, t)| format!("{c} {t}")).collect();
            println!("table:    exists: {}", columns.join(", "));
            "checked against the existing table"
        }
        TableSeen::New => {
            println!("table:    does not exist yet: a load would create it");
            "types as a new table would get them"
        }
        TableSeen::Unreachable(why) => {
            println!("table:    not checked: {why}");
            "types as a new table would get them; the existing table was not checked"
        }
        TableSeen::NotAsked => "types as a new table would get them",
    };
    if !v.columns.is_empty() {
        let columns: Vec<String> = v.columns.iter().map(|(c, t)| format!("{c} {}", t.describe())).collect();
        let label = if matches!(v.table, TableSeen::Exists(_)) {
            "adds:    "
        } else {
            "columns: "
        };
        println!("{label} {}", columns.join(", "));
    }
    println!("rows:     {}", v.rows);
    match v.error {
        None => {
            println!("result:   ok: would load {} row(s) ({against})", v.rows);
            Ok(ExitCode::SUCCESS)
        }
        Some(e) => {
            println!("result:   would FAIL ({}): {e}", e.kind.as_str());
            if !given && e.kind == s3_sql_loader::error::FileErrorKind::UnsafeName && v.spec.table.is_err() {
                println!(
                    "hint:     the table comes from the key (its first folder under incoming/, else the file's name); \
                     say which key the file will have with --key, e.g. --key orders/{}",
                    v.key
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A bare HTTP/1.1 GET, so the container image needs no curl or wget.
async fn healthcheck(url: String) -> ExitCode {
    let result = tokio::time::timeout(Duration::from_secs(5), get_status(&url)).await;
    match result {
        Ok(Ok(200)) => ExitCode::SUCCESS,
        Ok(Ok(code)) => {
            eprintln!("unhealthy: {url} answered {code}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("unhealthy: {url}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("unhealthy: {url}: no answer within 5s");
            ExitCode::FAILURE
        }
    }
}

async fn get_status(url: &str) -> anyhow::Result<u16> {
    let rest = url.strip_prefix("http://").context("only http:// URLs are supported")?;
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("not an HTTP response")
}
