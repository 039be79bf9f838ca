//! The commands that put the ledger and the backlog in the operator's hands: `ledger list`,
//! `ledger show KEY` ("what happened to file K?"), `reload KEY` and `status --json`.

use anyhow::bail;
use serde::Serialize;

use super::App;
use crate::sink::entries::{Entry, Filter, Reopen};
use crate::source::{FAILED, INCOMING, MoveOutcome, PROCESSED};

/// A key as an operator may write it (`incoming/K`, `processed/K`, `failed/K` or `K`), as the
/// ledger and the areas know it: relative to the area.
pub fn relative_key(key: &str) -> String {
    let key = key.trim_start_matches('/');
    for area in [INCOMING, PROCESSED, FAILED] {
        if let Some(rest) = key.strip_prefix(area) {
            return rest.to_string();
        }
    }
    key.to_string()
}

/// Where a key's file is stored now.
#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    /// `incoming/`, `processed/` or `failed/`.
    pub area: &'static str,
    pub etag: String,
    pub size: u64,
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

/// `ledger show KEY`: every version the ledger knows, and where the file is now.
#[derive(Debug, Clone, Serialize)]
pub struct FileHistory {
    pub key: String,
    pub versions: Vec<Entry>,
    pub stored: Vec<Stored>,
}

/// `status`: the backlog from a listing, and the latest failures from their reports.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    pub source: String,
    pub files: u64,
    pub bytes: u64,
    pub oldest: Option<chrono::DateTime<chrono::Utc>>,
    pub oldest_age_seconds: Option<i64>,
    /// In `incoming/` but not counted above: changed within `source.settle_time`.
    pub settling_files: u64,
    pub failed_files: u64,
    /// The ten latest, newest first.
    pub latest_failures: Vec<Failure>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// Its key in `failed/`.
    pub key: String,
    /// The key it had in `incoming/`, when its report names another.
    pub from: Option<String>,
    pub failed_at: chrono::DateTime<chrono::Utc>,
    pub kind: Option<String>,
    pub message: Option<String>,
}

/// `once --dry-run`: one file the next tick would take, and what it would do with it.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub key: String,
    pub size: u64,
    /// The table, or why the file would fail (it would go to `failed/`).
    pub table: Result<String, String>,
    /// `routes[i]` and its prefix or glob, or the default rule.
    pub route: String,
    /// `csv`, `tsv`, `jsonl`.
    pub format: String,
    /// `append` or `upsert`.
    pub mode: String,
}

/// What `once --dry-run` found.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub listed: u64,
    /// Files no route matches, left in `incoming/` (`routing.unmatched = "leave"`).
    pub left: u64,
    pub settling: u64,
    /// The files the next tick would take (oldest first, at most `schedule.max_files_per_tick`).
    pub files: Vec<Planned>,
}

impl App {
    /// `once --dry-run`: the files a tick would take now, each with its table, route, format
    /// and mode; nothing is claimed, read or moved, and the database is not needed.
    pub async fn dry_run(&self) -> anyhow::Result<Plan> {
        let (mut listing, _) = self.source.list_incoming().await?;
        let listed = listing.len() as u64;
        let routes = crate::routes::Routes::new(&self.config);
        listing.retain(|o| !routes.leaves(&o.key));
        let left = listed - listing.len() as u64;
        listing.sort_by(|a, b| a.last_modified.cmp(&b.last_modified).then_with(|| a.key.cmp(&b.key)));
        listing.truncate(self.config.schedule.max_files_per_tick);
        let files = listing
            .into_iter()
            .map(|o| {
                let spec = routes.resolve(&o.key);
                let route = match routes.route_of(&o.key) {
                    Some(i) => {
                        let r = &self.config.routes[i];
                        match (&r.prefix, &r.glob) {
                            (Some(p), _) => format!("routes[{i}] (prefix {p:?})"),
                            (None, Some(g)) => format!("routes[{i}] (glob {g:?})"),
                            (None, None) => format!("routes[{i}]"),
                        }
                    }
                    None => "default (the key's first folder)".into(),
                };
                let format = spec
                    .format
                    .format
                    .unwrap_or_else(|| crate::format::Format::from_key(&o.key));
                Planned {
                    key: o.key,
                    size: o.size,
                    table: spec.table.map_err(|e| e.to_string()),
                    route,
                    format: format!("{format:?}").to_lowercase(),
                    mode: format!("{:?}", spec.write_mode).to_lowercase(),
                }
            })
            .collect();
        Ok(Plan {
            listed,
            left,
            settling: self.source.settling().await?,
            files,
        })
    }

    /// `ledger list`: the ledger's rows for this source that `filter` picks.
    pub async fn ledger_entries(&self, filter: &Filter) -> anyhow::Result<Vec<Entry>> {
        self.db.ensure_ledger().await?;
        Ok(self.db.entries(self.source.id(), filter).await?)
    }

    /// `ledger show KEY`.
    pub async fn file_history(&self, key: &str) -> anyhow::Result<FileHistory> {
        let key = relative_key(key);
        self.db.ensure_ledger().await?;
        let filter = Filter {
            key: Some(key.clone()),
            limit: 1000,
            ..Filter::default()
        };
        let versions = self.db.entries(self.source.id(), &filter).await?;
        let mut stored = Vec::new();
        for area in [INCOMING, PROCESSED, FAILED] {
            if let Some(meta) = self.source.meta_at(area, &key).await? {
                stored.push(Stored {
                    area,
                    etag: meta.etag,
                    size: meta.size,
                    last_modified: meta.last_modified,
                });
            }
        }
        Ok(FileHistory { key, versions, stored })
    }

    /// `reload KEY`: lets the ledger load `KEY` again (its loaded and failed versions become
    /// pending, attempts zero) and puts the file back in `incoming/` from `processed/` or
    /// `failed/`. The ledger first: a file back in `incoming/` must not be found "already
    /// loaded". Returns what was done, a line each.
    pub async fn reload(&self, key: &str) -> anyhow::Result<Vec<String>> {
        let key = relative_key(key);
        if key.is_empty() {
            bail!("reload needs a file's key, such as orders/2026-11-01.csv");
        }
        self.db.ensure_ledger().await?;
        // Where the file is decides which version loads again: the ledger is reset for that
        // version only, before the file is put back.
        let (area, obj) = match self.source.meta_at(INCOMING, &key).await? {
            Some(obj) => (INCOMING, obj),
            None => match self.source.meta_at(PROCESSED, &key).await? {
                Some(obj) => (PROCESSED, obj),
                None => match self.source.meta_at(FAILED, &key).await? {
                    Some(obj) => (FAILED, obj),
                    None => bail!(
                        "no file {key} in {INCOMING}, {PROCESSED} or {FAILED} (keys are relative to those folders; \
                         `ledger list` shows the keys the ledger knows)"
                    ),
                },
            },
        };
        let reset = self.db.reopen(self.source.id(), &key, &obj.etag, Reopen::Done).await?;
        let mut done = vec![format!(
            "ledger: {reset} loaded or failed record(s) of this version of {key} set back to pending"
        )];
        let moved = match area {
            INCOMING => {
                done.push(format!("{INCOMING}{key} is in place: the next tick loads it"));
                None
            }
            PROCESSED => Some(self.source.move_back_from_processed(&obj).await?),
            _ => Some(self.source.move_back_as(&obj, &key).await?),
        };
        match moved {
            None => {}
            Some(Some(MoveOutcome::Moved { .. })) => {
                if area == FAILED && crate::report::read(&self.source, &key).await?.is_some() {
                    let report = format!("{FAILED}{key}{}", crate::report::SUFFIX);
                    self.source.delete(&report).await?;
                }
                done.push(format!(
                    "moved {area}{key} back to {INCOMING}{key}: the next tick loads it"
                ));
            }
            Some(Some(MoveOutcome::SourceGone)) => bail!("{area}{key} changed or went away while it was moved back"),
            Some(None) => bail!("{INCOMING}{key} holds another version now: reload it once that one is loaded"),
        }
        if reset > 0 {
            done.push(
                "the rows it loaded before are still in its table: they load again beside them unless the table \
                 was emptied or the route upserts"
                    .into(),
            );
        }
        Ok(done)
    }

    /// `status`: a listing of `incoming/` and `failed/`.
    pub async fn backlog(&self) -> anyhow::Result<Backlog> {
        let (incoming, _) = self.source.list_incoming().await?;
        let failed = self.source.list_failed().await?;
        let now = chrono::Utc::now();
        let oldest = incoming.iter().map(|o| o.last_modified).min();
        let mut failed = crate::report::failed_files(&self.source, failed).await?;
        failed.sort_by_key(|o| std::cmp::Reverse(o.last_modified));
        let mut latest = Vec::new();
        for f in failed.iter().take(10) {
            let report = crate::report::read(&self.source, &f.key).await.ok().flatten();
            let text = |field: &str| {
                report
                    .as_ref()
                    .and_then(|r| r.error[field].as_str().map(str::to_string))
            };
            latest.push(Failure {
                key: f.key.clone(),
                from: report
                    .as_ref()
                    .and_then(|r| r.original_key())
                    .filter(|k| *k != f.key)
                    .map(str::to_string),
                failed_at: f.last_modified,
                kind: text("kind"),
                message: text("message"),
            });
        }
        Ok(Backlog {
            source: self.source.id().to_string(),
            files: incoming.len() as u64,
            bytes: incoming.iter().map(|o| o.size).sum(),
            oldest,
            oldest_age_seconds: oldest.map(|t| (now - t).num_seconds()),
            settling_files: self.source.settling().await?,
            failed_files: failed.len() as u64,
            latest_failures: latest,
        })
    }
}

impl Backlog {
    /// For a terminal.
    pub fn render(&self) -> String {
        let settling = match self.settling_files {
            0 => String::new(),
            n => format!(" (and {n} changed within source.settle_time, listed on a later tick)"),
        };
        let mut out = format!(
            "source:   {}\nbacklog:  {} file(s), {} byte(s){settling}\noldest:   {}\nfailed:   {} file(s) in {FAILED}\n",
            self.source,
            self.files,
            self.bytes,
            match (self.oldest, self.oldest_age_seconds) {
                (Some(t), Some(age)) => format!("{age}s old ({t})"),
                _ => "-".into(),
            },
            self.failed_files,
        );
        if !self.latest_failures.is_empty() {
            out.push_str("latest failures:\n");
        }
        for f in &self.latest_failures {
            let from = f
                .from
                .as_ref()
                .map(|k| format!(" (from {INCOMING}{k})"))
                .unwrap_or_default();
            let reason = match (&f.kind, &f.message) {
                (Some(kind), Some(message)) => format!("{kind}: {message}{from}"),
                _ => format!("no readable report{from}"),
            };
            out.push_str(&format!(
                "  {}  {FAILED}{}\n      {reason}\n",
                f.failed_at.format("%Y-%m-%d %H:%M:%S"),
                f.key
            ));
        }
        out
    }
}

impl Plan {
    /// For a terminal.
    pub fn render(&self) -> String {
        let mut out = format!(
            "dry run: nothing is loaded or moved\nlisted {} | would take {}{}{}\n",
            self.listed,
            self.files.len(),
            match self.left {
                0 => String::new(),
                n => format!(" | left in incoming/ (no route) {n}"),
            },
            match self.settling {
                0 => String::new(),
                n => format!(" | not listed yet (settle time) {n}"),
            },
        );
        for f in &self.files {
            let target = match &f.table {
                Ok(t) => format!("table {t}, {} {}", f.format, f.mode),
                Err(e) => format!("would FAIL: {e}"),
            };
            out.push_str(&format!("  {}  ->  {target}  [{}]\n", f.key, f.route));
        }
        out
    }
}

/// `ledger list` for a terminal: one line a version, the latest changed first.
pub fn render_entries(entries: &[Entry]) -> String {
    let mut out = format!(
        "{:<30}  {:<7}  {:>10}  {:>8}  {:<20}  {}\n",
        "updated", "state", "rows", "attempts", "table", "key"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<30}  {:<7}  {:>10}  {:>8}  {:<20}  {}\n",
            e.updated_at.as_deref().unwrap_or("-"),
            e.state,
            e.rows.map_or_else(|| "-".into(), |r| r.to_string()),
            e.attempts,
            e.table.as_deref().unwrap_or("-"),
            e.key
        ));
    }
    out
}

/// `ledger show` for a terminal.
pub fn render_history(h: &FileHistory) -> String {
    let mut out = format!("key:      {}\n", h.key);
    if h.stored.is_empty() {
        out.push_str(&format!(
            "stored:   nowhere ({INCOMING}, {PROCESSED} and {FAILED} hold no {})\n",
            h.key
        ));
    }
    for s in &h.stored {
        out.push_str(&format!(
            "stored:   {}{} ({} bytes, {}, version {})\n",
            s.area, h.key, s.size, s.last_modified, s.etag
        ));
    }
    if h.versions.is_empty() {
        out.push_str("ledger:   no version of it was ever claimed by a loader\n");
    }
    for (i, v) in h.versions.iter().enumerate() {
        out.push_str(&format!(
            "version {}: {} (version {}, {} bytes)\n",
            i + 1,
            v.state,
            v.etag,
            v.bytes
        ));
        if let Some(table) = &v.table {
            out.push_str(&format!("  table:      {table}\n"));
        }
        if let Some(rows) = v.rows {
            out.push_str(&format!("  rows:       {rows}\n"));
        }
        out.push_str(&format!("  attempts:   {}\n", v.attempts));
        out.push_str(&format!(
            "  first seen: {}\n",
            v.first_seen_at.as_deref().unwrap_or("-")
        ));
        if let Some(at) = &v.loaded_at {
            out.push_str(&format!("  loaded at:  {at}\n"));
        }
        out.push_str(&format!("  updated:    {}\n", v.updated_at.as_deref().unwrap_or("-")));
        if let Some(by) = &v.claimed_by {
            out.push_str(&format!("  by:         {by}\n"));
        }
        if let Some(error) = &v.error {
            let kind = error["kind"].as_str().unwrap_or("?");
            let message = error["message"]
                .as_str()
                .map_or_else(|| error.to_string(), str::to_string);
            out.push_str(&format!("  error:      {kind}: {message}\n"));
        }
        for attempt in v.history.as_ref().and_then(|h| h.as_array()).into_iter().flatten() {
            out.push_str(&format!(
                "  attempt:    {} {}: {}\n",
                attempt["at"].as_str().unwrap_or("?"),
                attempt["stage"].as_str().unwrap_or("?"),
                attempt["message"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}
