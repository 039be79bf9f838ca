//! `[redshift]`: the settings of the Redshift sink ([`crate::sink::redshift`]).

use serde::Deserialize;

/// `[redshift]`: only for `redshift://` database URLs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedshiftConfig {
    /// The IAM role Redshift assumes to read the bucket (`IAM_ROLE` of COPY).
    pub iam_role: String,
    /// Where manifests are written, under the source root.
    pub manifest_prefix: String,
    /// The bucket's region, when it differs from the cluster's (`REGION` of COPY).
    pub region: Option<String>,
    /// `redshift`; builds with the `redshift-emulation` feature (the tests') also take
    /// `postgres-emulation` (see [`crate::sink::redshift`]).
    pub copy: CopyMode,
}

impl Default for RedshiftConfig {
    fn default() -> Self {
        Self {
            iam_role: String::new(),
            manifest_prefix: "manifests/".into(),
            region: None,
            copy: CopyMode::Redshift,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    #[default]
    Redshift,
    #[cfg(feature = "redshift-emulation")]
    PostgresEmulation,
}

impl RedshiftConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let role = &self.iam_role;
        let valid = role.starts_with("arn:aws")
            && role.contains(":iam::")
            && role.contains(":role/")
            && role
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":/-_+=,.@".contains(&b));
        if !valid {
            problems.push(format!(
                "redshift.iam_role: expected an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME), got {role:?}"
            ));
        }
        if !self.manifest_prefix.ends_with('/') || self.manifest_prefix.starts_with('/') {
            problems.push("redshift.manifest_prefix: a folder such as \"manifests/\"".into());
        }
        let region_ok = |r: &String| {
            !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if let Some(r) = self.region.as_ref().filter(|r| !region_ok(r)) {
            problems.push(format!("redshift.region: {r:?} is not a region name"));
        }
        problems
    }
}

/// A valid configuration, for tests.
#[cfg(test)]
pub(crate) fn test_config() -> RedshiftConfig {
    RedshiftConfig {
        iam_role: "arn:aws:iam::123456789012:role/loader".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RedshiftConfig {
        test_config()
    }

    #[test]
    fn the_iam_role_and_prefix_are_checked() {
        assert!(config().problems().is_empty());
        let bad = RedshiftConfig {
            iam_role: "arn:aws:iam::1:role/x' --".into(),
            manifest_prefix: "m".into(),
            ..config()
        };
        let problems = bad.problems();
        assert!(problems[0].starts_with("redshift.iam_role") && problems[1].starts_with("redshift.manifest_prefix"));
    }
}
