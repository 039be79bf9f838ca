//! Reading the configuration: defaults, then the file, then `LOADER_*` variables of the
//! documented sections, with every problem reported at once, each under the name the operator
//! wrote it with (a key of the file, or the environment variable).

use std::path::Path;

use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};

use super::{Config, ConfigError};

/// The top-level keys: a `LOADER_` variable is read only when its name starts with one of these
/// (`LOADER_SOURCE__URL`, `LOADER_PIPELINE`); any other `LOADER_` variable belongs to something
/// else and is left alone.
pub const SECTIONS: &[&str] = &[
    "pipeline",
    "source",
    "database",
    "schedule",
    "workers",
    "csv",
    "http",
    "shutdown",
    "log",
    "cloudwatch",
    "retry",
    "claim",
    "health",
    "limits",
    "reports",
    "routes",
    "routing",
    "redshift",
];

/// At most this many rounds of finding problems (each round drops the keys it found wrong).
const MAX_ROUNDS: usize = 50;

fn section_of(key: &str) -> &str {
    key.split("__").next().unwrap_or(key)
}

fn is_section(key: &str) -> bool {
    SECTIONS.iter().any(|s| section_of(key).eq_ignore_ascii_case(s))
}

impl Config {
    /// Reads defaults, then `file` (when given), then the `LOADER_*` environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let figment = Self::figment(file);
        match figment.extract::<Config>() {
            Ok(config) => config.validated(),
            Err(first) => Err(ConfigError {
                problems: every_problem(&figment, first),
            }),
        }
    }

    pub(super) fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::new();
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed("LOADER_").filter(|k| is_section(k.as_str())).split("__"))
    }

    /// What is valid but most likely not meant: a route whose prefix or glob starts with
    /// `incoming/` never matches, since keys are relative to `incoming/`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            for (what, pattern) in [("prefix", &r.prefix), ("glob", &r.glob)] {
                if let Some(rest) = pattern.as_deref().and_then(|p| p.strip_prefix("incoming/")) {
                    warnings.push(format!(
                        "routes[{i}].{what}: {:?} matches no key unless the key itself starts with incoming/: \
                         keys are relative to incoming/ (did you mean {rest:?}?)",
                        pattern.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
        warnings
    }

    /// `LOADER_` variables that look like settings (`A__B`) but name no section: ignored, and
    /// worth a warning (`LOADER_SOURC__URL`).
    pub fn ignored_variables() -> Vec<String> {
        let mut ignored: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| {
                k.strip_prefix("LOADER_")
                    .is_some_and(|rest| rest.contains("__") && !is_section(rest))
            })
            .collect();
        ignored.sort();
        ignored
    }
}

/// The first error, then each next one found once the keys already found wrong are left out.
fn every_problem(figment: &Figment, first: figment::Error) -> Vec<String> {
    let mut problems = Vec::new();
    let mut data = figment
        .data()
        .ok()
        .and_then(|mut d| d.remove(figment.profile()))
        .unwrap_or_default();
    let mut errors = first;
    for round in 0..MAX_ROUNDS {
        let mut progressed = false;
        for e in errors {
            let path = full_path(&e);
            // Later rounds read a copy of the data: where a key came from is the original's.
            let metadata = figment
                .find_metadata(&path.join("."))
                .or(e.metadata.as_ref().filter(|_| round == 0));
            problems.push(describe(metadata, &e, &path));
            progressed |= remove(&mut data, &path);
        }
        if !progressed {
            break;
        }
        match Figment::from(Serialized::defaults(&data)).extract::<Config>() {
            Ok(_) => break,
            Err(next) => errors = next,
        }
    }
    problems.dedup();
    problems
}

/// The path of the key the error is about (an unknown top-level key's own name included).
fn full_path(e: &figment::Error) -> Vec<String> {
    match &e.kind {
        Kind::UnknownField(field, _) if e.path.is_empty() => vec![field.clone()],
        _ => e.path.clone(),
    }
}

/// Drops the value at `path`; false when there is none.
fn remove(dict: &mut Dict, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return dict.remove(first).is_some();
    }
    match dict.get_mut(first) {
        Some(value) => remove_in(value, rest),
        None => false,
    }
}

fn remove_in(value: &mut Value, path: &[String]) -> bool {
    match value {
        Value::Dict(_, dict) => remove(dict, path),
        Value::Array(_, items) => {
            let Some((index, rest)) = path.split_first() else {
                return false;
            };
            let Some(item) = index.parse::<usize>().ok().and_then(|i| items.get_mut(i)) else {
                return false;
            };
            if rest.is_empty() {
                // An item that is wrong as a whole: make it empty rather than shift the others.
                *item = Value::from(Dict::new());
                return true;
            }
            remove_in(item, rest)
        }
        _ => false,
    }
}

/// One line: the key as the operator wrote it, what is wrong, where it came from.
fn describe(metadata: Option<&figment::Metadata>, e: &figment::Error, path: &[String]) -> String {
    let from_env = metadata.is_some_and(|m| m.name.contains("environment"));
    let key = if path.is_empty() {
        "(top level)".to_string()
    } else if from_env {
        format!("LOADER_{}", path.join("__").to_ascii_uppercase())
    } else {
        // `routes[0].table`, as the checks after loading write it.
        let mut key = String::new();
        for segment in path {
            if segment.parse::<usize>().is_ok() {
                key.push_str(&format!("[{segment}]"));
            } else {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(segment);
            }
        }
        key
    };
    let origin = match metadata {
        Some(_) if from_env => String::new(),
        Some(m) => match &m.source {
            Some(src) => format!(" (in {src})"),
            None => format!(" (from {})", m.name),
        },
        None => String::new(),
    };
    let what = match &e.kind {
        Kind::UnknownField(_, expected) => format!("unknown key; expected one of: {}", expected.join(", ")),
        Kind::UnknownVariant(found, expected) => {
            format!("unknown value {found:?}; expected one of: {}", expected.join(", "))
        }
        Kind::InvalidType(found, expected) => format!("expected {}, found {found}", plain(expected)),
        Kind::InvalidValue(found, expected) => format!("expected {}, found {found}", plain(expected)),
        Kind::MissingField(field) => format!("{field} is required"),
        kind => kind.to_string(),
    };
    format!("{key}: {what}{origin}")
}

/// Rust's names of types as words.
fn plain(expected: &str) -> String {
    match expected {
        "usize" | "u8" | "u16" | "u32" | "u64" => "a whole number (0 or more)".into(),
        "isize" | "i8" | "i16" | "i32" | "i64" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "bool" | "a boolean" => "true or false".into(),
        "a string" | "string" => "a string".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sections_read_from_the_environment_are_the_top_level_keys() {
        let e = Figment::from(Serialized::defaults(serde_json::json!({"nope": 1})))
            .extract::<Config>()
            .unwrap_err();
        let Kind::UnknownField(_, expected) = &e.kind else {
            panic!("{e}")
        };
        let mut expected = expected.to_vec();
        let mut sections = SECTIONS.to_vec();
        expected.sort();
        sections.sort();
        assert_eq!(expected, sections);
    }

    #[test]
    fn every_problem_of_a_file_is_reported_at_once_under_its_key() {
        let figment = Figment::from(Toml::string(
            "[schedule]\nintervall = \"5s\"\nmax_files_per_tick = \"many\"\n\
             [[routes]]\nprefix = \"a/\"\n[[routes]]\nprefix = \"b/\"\nwrite_mode = \"merge\"\n[sourc]\nurl = \"x\"\n",
        ));
        let first = figment.extract::<Config>().unwrap_err();
        let problems = every_problem(&figment, first);
        // Each says where it came from (here a string; a file's path otherwise).
        assert!(
            problems.iter().all(|p| p.ends_with(" (from TOML source string)")),
            "{problems:?}"
        );
        let problems: Vec<&str> = problems
            .iter()
            .map(|p| p.trim_end_matches(" (from TOML source string)"))
            .collect();
        assert_eq!(
            problems,
            [
                "routes[1].write_mode: unknown value \"merge\"; expected one of: append, upsert",
                "schedule.intervall: unknown key; expected one of: interval, max_files_per_tick",
                "schedule.max_files_per_tick: expected a whole number (0 or more), found string \"many\"",
                "sourc: unknown key; expected one of: pipeline, source, database, schedule, workers, csv, http, \
                 shutdown, log, cloudwatch, retry, claim, health, limits, reports, routes, routing, redshift",
            ]
        );
    }
}
