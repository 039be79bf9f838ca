//! Keeps secrets out of logs, reports and HTTP responses.

/// A URL with any password replaced by `***` (`postgres://app:***@db/prod`).
pub fn url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| u).unwrap_or(userinfo);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{scheme}://{masked}@{host}{}", redact_query(tail))
        }
        None => format!("{scheme}://{authority}{}", redact_query(tail)),
    }
}

/// Masks `password=...` style query parameters.
fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.to_ascii_lowercase().contains("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}

/// Removes every occurrence of `secret` from `text` (for database messages that echo a URL).
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(*s, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            super::url("postgres://app:s3cret@db:5432/prod"),
            "postgres://app:***@db:5432/prod"
        );
        assert_eq!(super::url("mysql://root@h/test"), "mysql://root@h/test");
        assert_eq!(
            super::url("postgres://h/db?user=a&password=s3cret"),
            "postgres://h/db?user=a&password=***"
        );
        assert_eq!(super::url("sqlite://./data/loader.db"), "sqlite://./data/loader.db");
        assert_eq!(super::url("postgres://a:p@ss@h/db"), "postgres://a:***@h/db");
    }
}
