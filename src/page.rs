//! The status page at `/`: what a person wants at a glance (backlog, oldest file, throughput,
//! the last ticks, the latest failures) and a chart of the last hour, as one self-contained
//! HTML document: the SVG is drawn here, with no script, stylesheet or font from elsewhere.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::status::{Sample, StatusSnapshot};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "none".into(),
        Some(s) if s < 120.0 => format!("{s:.0} s"),
        Some(s) if s < 7200.0 => format!("{:.0} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%H:%M:%S").to_string()
}

/// The whole page.
pub fn render(s: &StatusSnapshot, samples: &[Sample], now: DateTime<Utc>) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="15">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>s3-sql-loader · {pipeline}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d2330; background: #fafbfc; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .2rem; }} h2 {{ font-size: 1.05rem; margin: 1.6rem 0 .5rem; }}
.sub {{ color: #5b6475; font-size: .85rem; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .8rem; margin-top: 1rem; }}
.card {{ background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: .6rem .9rem; min-width: 8.5rem; }}
.card .n {{ font-size: 1.5rem; font-weight: 600; }} .card .l {{ color: #5b6475; font-size: .8rem; }}
.degraded {{ border-color: #d9822b; background: #fff6ec; }} .bad {{ color: #b3261e; }}
table {{ border-collapse: collapse; background: #fff; font-size: .85rem; }}
th, td {{ border: 1px solid #dde2ea; padding: .3rem .55rem; text-align: left; vertical-align: top; }}
th {{ background: #f1f3f7; }} td.num {{ text-align: right; }}
svg text {{ font-size: 11px; fill: #5b6475; }}
</style></head><body>
<h1>s3-sql-loader · {pipeline}</h1>
<div class="sub">version {version} · up since {started} UTC · page generated {now} UTC · freshness <span id="freshness">{freshness}</span></div>
<div class="cards">
<div class="card{degraded}"><div class="n" id="backlog-files">{backlog_files}</div><div class="l">files waiting in incoming/</div></div>
<div class="card"><div class="n" id="backlog-bytes">{backlog_bytes}</div><div class="l">bytes waiting</div></div>
<div class="card{degraded}"><div class="n" id="oldest-age">{oldest}</div><div class="l">oldest waiting file</div></div>
<div class="card"><div class="n" id="in-flight">{in_flight}</div><div class="l">loads in flight</div></div>
<div class="card"><div class="n" id="files-loaded">{files_loaded}</div><div class="l">files loaded</div></div>
<div class="card"><div class="n" id="rows-loaded">{rows_loaded}</div><div class="l">rows loaded</div></div>
<div class="card"><div class="n{failed_class}" id="files-failed">{files_failed}</div><div class="l">files failed</div></div>
<div class="card"><div class="n" id="transient-errors">{transient}</div><div class="l">transient errors (retried)</div></div>
</div>
"#,
        pipeline = escape(&s.pipeline),
        version = s.version,
        started = s.started_at.format("%Y-%m-%d %H:%M:%S"),
        now = now.format("%Y-%m-%d %H:%M:%S"),
        freshness = s.freshness.as_str(),
        degraded = if s.freshness == crate::status::Freshness::Degraded {
            " degraded"
        } else {
            ""
        },
        backlog_files = s.backlog.files,
        backlog_bytes = s.backlog.bytes,
        oldest = age(s.backlog.oldest_age_seconds),
        in_flight = s.in_flight,
        files_loaded = s.totals.files_loaded,
        rows_loaded = s.totals.rows_loaded,
        files_failed = s.totals.files_failed,
        failed_class = if s.totals.files_failed > 0 { " bad" } else { "" },
        transient = s.totals.transient_errors,
    );
    if !s.loading.is_empty() {
        html.push_str("<h2>Loading now</h2>\n<table id=\"loading\"><tr><th>file</th><th>read</th><th>size</th><th>rows so far</th><th>for</th></tr>\n");
        for l in &s.loading {
            let _ = writeln!(
                html,
                "<tr class=\"loading\"><td>{}</td><td class=\"num\">{} ({:.0} %)</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1} s</td></tr>",
                escape(&l.key),
                l.bytes_read,
                if l.size > 0 {
                    l.bytes_read as f64 * 100.0 / l.size as f64
                } else {
                    0.0
                },
                l.size,
                l.rows_read,
                l.seconds,
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("<h2>Last hour</h2>\n");
    html.push_str(&chart(samples, now));
    if !s.tables.is_empty() {
        html.push_str("<h2>Tables</h2>\n<table id=\"tables\"><tr><th>table</th><th>files loaded</th><th>rows loaded</th><th>already loaded</th><th>failed</th><th>last loaded (UTC)</th></tr>\n");
        for (name, t) in &s.tables {
            let _ = writeln!(
                html,
                "<tr class=\"table\"><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num{}\">{}</td><td>{}</td></tr>",
                escape(name),
                t.files_loaded,
                t.rows_loaded,
                t.files_already_loaded,
                if t.files_failed > 0 { " bad" } else { "" },
                t.files_failed,
                t.last_loaded_at.as_ref().map(time).unwrap_or_else(|| "-".into()),
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("<h2>Last ticks</h2>\n<table id=\"recent-ticks\"><tr><th>started (UTC)</th><th>took</th><th>listed</th><th>dispatched</th><th>result</th></tr>\n");
    for t in &s.recent_ticks {
        let _ = writeln!(
            html,
            "<tr class=\"tick\"><td>{}</td><td class=\"num\">{} ms</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td{}>{}</td></tr>",
            time(&t.started_at),
            t.duration_ms,
            t.listed,
            t.dispatched,
            if t.result.is_ok() { "" } else { " class=\"bad\"" },
            escape(t.result.as_str())
        );
    }
    html.push_str("</table>\n<h2>Latest failures</h2>\n");
    if s.recent_failures.is_empty() {
        html.push_str("<p id=\"no-failures\">No file has failed since the loader started.</p>\n");
    } else {
        html.push_str(
            "<table id=\"recent-failures\"><tr><th>when (UTC)</th><th>file</th><th>kind</th><th>reason</th></tr>\n",
        );
        for f in &s.recent_failures {
            let _ = writeln!(
                html,
                "<tr class=\"failure\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(&f.at),
                escape(&f.key),
                f.error.kind.as_str(),
                escape(&f.error.to_string())
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("<p class=\"sub\">JSON: <a href=\"/status\">/status</a> · Prometheus: <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n");
    html
}

/// Backlog (line) and files loaded per minute (bars) over the last hour.
fn chart(samples: &[Sample], now: DateTime<Utc>) -> String {
    let start = now - chrono::TimeDelta::hours(1);
    let x = |t: &DateTime<Utc>| {
        40.0 + ((*t - start).num_milliseconds() as f64 / 3_600_000.0).clamp(0.0, 1.0) * (WIDTH - 50.0)
    };
    // Files loaded per minute: differences of the running total, bucketed by minute.
    let mut per_minute = [0u64; 60];
    for pair in samples.windows(2) {
        let minute = ((pair[1].at - start).num_seconds() / 60).clamp(0, 59) as usize;
        per_minute[minute] += pair[1].files_loaded.saturating_sub(pair[0].files_loaded);
    }
    let max_backlog = samples.iter().map(|s| s.backlog_files).max().unwrap_or(0).max(1) as f64;
    let max_rate = per_minute.iter().copied().max().unwrap_or(0).max(1) as f64;
    let plot = HEIGHT - 30.0;
    let mut svg = format!(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"backlog and throughput over the last hour\">\n\
         <rect x=\"40\" y=\"10\" width=\"{}\" height=\"{plot}\" fill=\"#fff\" stroke=\"#dde2ea\"/>\n",
        WIDTH - 50.0
    );
    let bar = (WIDTH - 50.0) / 60.0;
    for (i, n) in per_minute.iter().enumerate().filter(|(_, n)| **n > 0) {
        let h = *n as f64 / max_rate * (plot - 4.0);
        let _ = writeln!(
            svg,
            "<rect class=\"rate\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#b7d3f2\"><title>{n} files loaded</title></rect>",
            40.0 + i as f64 * bar + 1.0,
            10.0 + plot - h,
            bar - 2.0
        );
    }
    let points: Vec<String> = samples
        .iter()
        .filter(|s| s.at >= start)
        .map(|s| {
            format!(
                "{:.1},{:.1}",
                x(&s.at),
                10.0 + plot - s.backlog_files as f64 / max_backlog * (plot - 4.0)
            )
        })
        .collect();
    if !points.is_empty() {
        let _ = writeln!(
            svg,
            "<polyline id=\"backlog-line\" fill=\"none\" stroke=\"#d9822b\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    let _ = write!(
        svg,
        "<text x=\"4\" y=\"18\">{max_backlog}</text><text x=\"4\" y=\"{bottom}\">0</text>\
         <text x=\"40\" y=\"{label}\">-60 min</text><text x=\"{mid}\" y=\"{label}\">-30 min</text><text x=\"{end}\" y=\"{label}\">now</text>\
         <text x=\"{legend}\" y=\"24\" fill=\"#d9822b\">— backlog (files, max {max_backlog})</text>\
         <text x=\"{legend}\" y=\"38\">▮ files loaded per minute (max {max_rate})</text>\n</svg>\n",
        bottom = 10.0 + plot,
        label = HEIGHT - 6.0,
        mid = 40.0 + (WIDTH - 50.0) / 2.0 - 20.0,
        end = WIDTH - 30.0,
        legend = WIDTH - 260.0,
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_files_is_escaped() {
        assert_eq!(
            escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}
