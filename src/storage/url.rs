//! Replica URLs: where a replica lives.
//!
//! Accepted forms:
//!
//! * `file:///absolute/dir`
//! * `s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME&force-path-style=true]`
//!
//! Credentials are never part of a replica URL: they come from the standard
//! AWS sources (environment, profiles, web identity). URLs that try to embed
//! them are rejected, and `Display` never prints anything secret.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};

/// Where a replica is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// A local (or mounted) directory, absolute.
    File { path: PathBuf },
    /// An S3-compatible bucket.
    S3(S3Config),
}

/// Location and connection settings of an S3 replica. Holds no credentials.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing slash; may be empty.
    pub prefix: String,
    /// Custom endpoint, e.g. `http://127.0.0.1:3900`; `None` = AWS (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// `None` = from the AWS environment/profile, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most
    /// self-hosted servers.
    pub force_path_style: bool,
}

const S3_PARAMS: &[&str] = &["endpoint", "region", "force-path-style"];

const FORMS: &str =
    "file:///absolute/dir or s3://bucket/prefix?endpoint=URL&region=NAME&force-path-style=true";

impl FromStr for ReplicaUrl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            bail!("empty replica URL; expected {FORMS}");
        }
        let Some((scheme, _)) = s.split_once(':') else {
            if s.starts_with('/') {
                bail!(
                    "replica URL {s:?} has no scheme; for a local directory write file://{}",
                    s
                );
            }
            bail!("replica URL {s:?} has no scheme; expected {FORMS}");
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => parse_file(s),
            "s3" => parse_s3(s).map(ReplicaUrl::S3),
            other => bail!(
                "unsupported replica URL scheme {other:?} (supported: file, s3); expected {FORMS}"
            ),
        }
    }
}

fn parse_file(s: &str) -> anyhow::Result<ReplicaUrl> {
    // `file:/x`, `file:x`: no authority part at all.
    let rest = &s[s.find(':').expect("scheme checked") + 1..];
    let Some(after) = rest.strip_prefix("//") else {
        bail!("invalid file URL {s:?}: write file:///absolute/dir (three slashes, absolute path)");
    };
    if !after.starts_with('/') {
        // `file://host/x` or `file://relative/dir`.
        let (host, path) = after.split_once('/').unwrap_or((after, ""));
        bail!(
            "invalid file URL {s:?}: {host:?} is read as a host name, and file URLs must name a \
             local absolute path; write file:///{host}{}{path} (three slashes) if {host:?} is a \
             directory under /",
            if path.is_empty() { "" } else { "/" },
        );
    }
    if after
        .split('/')
        .any(|seg| seg == ".." || seg.eq_ignore_ascii_case("%2e%2e"))
    {
        bail!("invalid file URL {s:?}: the path must not contain `..`");
    }
    if after.contains('?') || after.contains('#') {
        bail!(
            "invalid file URL {s:?}: file URLs take no query or fragment (`?`/`#`); \
             write file:///absolute/dir"
        );
    }
    let parsed = ::url::Url::parse(s)
        .with_context(|| format!("invalid file URL {s:?}: write file:///absolute/dir"))?;
    let path = parsed.to_file_path().map_err(|()| {
        anyhow!(
            "invalid file URL {s:?}: cannot convert to a local path; write file:///absolute/dir"
        )
    })?;
    if !path.is_absolute() {
        bail!("invalid file URL {s:?}: the path must be absolute; write file:///absolute/dir");
    }
    Ok(ReplicaUrl::File { path })
}

fn parse_s3(s: &str) -> anyhow::Result<S3Config> {
    let rest = &s[s.find(':').expect("scheme checked") + 1..];
    let Some(rest) = rest.strip_prefix("//") else {
        bail!("invalid S3 URL {s:?}: write s3://bucket/prefix");
    };
    if rest.contains('#') {
        bail!("invalid S3 URL {s:?}: `#` is not allowed (no fragments, and not in prefixes)");
    }
    let (location, query) = match rest.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (rest, None),
    };
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    if bucket.contains('@') {
        // Deliberately do not echo the URL: it probably contains a secret.
        bail!(
            "invalid S3 URL: credentials must not be part of the replica URL (found `user@` \
             before the bucket). Remove them and provide credentials through \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an AWS profile or web identity"
        );
    }
    if bucket.is_empty() {
        bail!("invalid S3 URL {s:?}: the bucket name is empty; write s3://bucket/prefix");
    }
    if let Some(bad) = bucket
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        bail!(
            "invalid S3 URL {s:?}: bucket name {bucket:?} contains {bad:?}; bucket names \
             consist of letters, digits, `.`, `-` and `_`{}",
            if bad == ':' {
                " (to use a custom server, put it in ?endpoint=http://host:port)"
            } else {
                ""
            }
        );
    }
    if bucket.len() > 255 {
        bail!("invalid S3 URL {s:?}: bucket name is longer than 255 characters");
    }

    let prefix = normalize_prefix(prefix).with_context(|| format!("invalid S3 URL {s:?}"))?;

    let mut cfg = S3Config {
        bucket: bucket.to_string(),
        prefix,
        ..S3Config::default()
    };
    let mut seen: Vec<String> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).with_context(|| format!("invalid S3 URL {s:?}"))?;
        let v = percent_decode(v).with_context(|| format!("invalid S3 URL {s:?}"))?;
        if seen.contains(&k) {
            bail!("invalid S3 URL {s:?}: parameter {k:?} is given more than once");
        }
        seen.push(k.clone());
        match k.as_str() {
            "endpoint" => cfg.endpoint = Some(parse_endpoint(&v)?),
            "region" => {
                if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '/') {
                    bail!("invalid S3 URL {s:?}: region {v:?} is not a valid region name");
                }
                cfg.region = Some(v);
            }
            "force-path-style" => {
                cfg.force_path_style = match v.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "" => true,
                    "false" | "0" | "no" => false,
                    _ => bail!(
                        "invalid S3 URL {s:?}: force-path-style must be true or false, not {v:?}"
                    ),
                }
            }
            other => bail!(
                "invalid S3 URL {s:?}: unknown parameter {other:?}{}; valid parameters are {}",
                match did_you_mean(other, S3_PARAMS) {
                    Some(m) => format!(" (did you mean {m:?}?)"),
                    None => String::new(),
                },
                S3_PARAMS.join(", ")
            ),
        }
    }
    Ok(cfg)
}

/// The candidate closest to a misspelt `word` (case, `-`/`_` and up to a
/// third of the letters may differ), for "did you mean" hints.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    let w: Vec<char> = norm(word).chars().collect();
    candidates
        .iter()
        .map(|c| {
            let c2: Vec<char> = norm(c).chars().collect();
            // Levenshtein distance, one row at a time.
            let mut row: Vec<usize> = (0..=c2.len()).collect();
            for (i, a) in w.iter().enumerate() {
                let mut prev = row[0];
                row[0] = i + 1;
                for (j, b) in c2.iter().enumerate() {
                    let cur = row[j + 1];
                    row[j + 1] = (prev + usize::from(a != b)).min(row[j] + 1).min(cur + 1);
                    prev = cur;
                }
            }
            (row[c2.len()], *c)
        })
        .filter(|(d, c)| *d <= (c.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Strip leading/trailing slashes, collapse repeated ones, reject `.`/`..`.
fn normalize_prefix(prefix: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty()).collect();
    if let Some(bad) = parts.iter().find(|p| **p == "." || **p == "..") {
        bail!("the prefix must not contain a {bad:?} path segment");
    }
    if prefix.chars().any(|c| c.is_control()) {
        bail!("the prefix must not contain control characters");
    }
    Ok(parts.join("/"))
}

fn parse_endpoint(v: &str) -> anyhow::Result<String> {
    let u = ::url::Url::parse(v).map_err(|e| {
        anyhow!("invalid S3 URL: endpoint {v:?} is not a URL ({e}); write e.g. endpoint=http://127.0.0.1:3900")
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        bail!(
            "invalid S3 URL: endpoint {v:?} must start with http:// or https://, \
             e.g. endpoint=http://127.0.0.1:3900"
        );
    }
    if !u.username().is_empty() || u.password().is_some() {
        bail!(
            "invalid S3 URL: the endpoint must not contain credentials; provide them through \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an AWS profile or web identity"
        );
    }
    if u.host_str().unwrap_or("").is_empty() {
        bail!("invalid S3 URL: endpoint {v:?} has no host");
    }
    if u.query().is_some() || u.fragment().is_some() {
        bail!("invalid S3 URL: endpoint {v:?} must not have a query or fragment");
    }
    Ok(v.trim_end_matches('/').to_string())
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| anyhow!("bad percent-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("percent-escapes in {s:?} are not UTF-8"))
}

/// Escape exactly what would otherwise change the meaning of a query value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' | '&' | '=' | '#' | '+' | ' ' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl fmt::Display for ReplicaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaUrl::File { path } => match ::url::Url::from_file_path(path) {
                Ok(u) => write!(f, "{u}"),
                Err(()) => write!(f, "file://{}", path.display()),
            },
            ReplicaUrl::S3(cfg) => write!(f, "{cfg}"),
        }
    }
}

impl fmt::Display for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        let mut sep = '?';
        if let Some(e) = &self.endpoint {
            write!(f, "{sep}endpoint={}", query_escape(e))?;
            sep = '&';
        }
        if let Some(r) = &self.region {
            write!(f, "{sep}region={}", query_escape(r))?;
            sep = '&';
        }
        if self.force_path_style {
            write!(f, "{sep}force-path-style=true")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<ReplicaUrl> {
        s.parse()
    }

    fn err(s: &str) -> String {
        format!("{:#}", parse(s).expect_err(s))
    }

    fn s3(s: &str) -> S3Config {
        match parse(s).unwrap() {
            ReplicaUrl::S3(c) => c,
            other => panic!("expected s3, got {other:?}"),
        }
    }

    #[test]
    fn did_you_mean_finds_near_misses_only() {
        assert_eq!(did_you_mean("regoin", S3_PARAMS), Some("region"));
        assert_eq!(
            did_you_mean("force_path_style", S3_PARAMS),
            Some("force-path-style")
        );
        assert_eq!(did_you_mean("Endpoint", S3_PARAMS), Some("endpoint"));
        assert_eq!(did_you_mean("bucket", S3_PARAMS), None);
        assert_eq!(
            did_you_mean("retension", &["retention", "url"]),
            Some("retention")
        );
        let e = "s3://b/p?regoin=x".parse::<ReplicaUrl>().unwrap_err();
        assert!(e.to_string().contains("did you mean \"region\"?"), "{e}");
    }

    #[test]
    fn file_absolute() {
        assert_eq!(
            parse("file:///var/backups/db").unwrap(),
            ReplicaUrl::File {
                path: PathBuf::from("/var/backups/db")
            }
        );
        // Percent-encoding is decoded.
        assert_eq!(
            parse("file:///var/my%20backups").unwrap(),
            ReplicaUrl::File {
                path: PathBuf::from("/var/my backups")
            }
        );
    }

    #[test]
    fn file_rejects_host_and_relative() {
        let e = err("file://host/dir");
        assert!(e.contains("file:///host/dir"), "{e}");
        let e = err("file://relative");
        assert!(e.contains("file:///relative"), "{e}");
        let e = err("file:relative/dir");
        assert!(e.contains("file:///absolute/dir"), "{e}");
        let e = err("file:/abs");
        assert!(e.contains("file:///absolute/dir"), "{e}");
        let e = err("/var/backups");
        assert!(e.contains("file:///var/backups"), "{e}");
        let e = err("file:///a/../b");
        assert!(e.contains(".."), "{e}");
        let e = err("file:///a?x=1");
        assert!(e.contains("query"), "{e}");
    }

    #[test]
    fn s3_full() {
        let c = s3("s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:3900&region=garage&force-path-style=true");
        assert_eq!(
            c,
            S3Config {
                bucket: "my-bucket".into(),
                prefix: "some/prefix".into(),
                endpoint: Some("http://127.0.0.1:3900".into()),
                region: Some("garage".into()),
                force_path_style: true,
            }
        );
    }

    #[test]
    fn s3_minimal_and_prefix_normalization() {
        let c = s3("s3://b");
        assert_eq!(c.bucket, "b");
        assert_eq!(c.prefix, "");
        assert_eq!(c.endpoint, None);
        assert_eq!(c.region, None);
        assert!(!c.force_path_style);
        assert_eq!(s3("s3://b/").prefix, "");
        assert_eq!(s3("s3://b//x//y/").prefix, "x/y");
        assert_eq!(
            s3("s3://b?region=eu-west-1").region.as_deref(),
            Some("eu-west-1")
        );
        assert!(!s3("s3://b?force-path-style=false").force_path_style);
        assert_eq!(
            s3("s3://b?endpoint=https://s3.example.com/")
                .endpoint
                .as_deref(),
            Some("https://s3.example.com")
        );
    }

    #[test]
    fn s3_errors() {
        assert!(err("s3:///prefix").contains("bucket name is empty"));
        assert!(err("s3://").contains("bucket name is empty"));
        let e = err("s3://b?endpont=http://x");
        assert!(e.contains("\"endpont\""), "{e}");
        assert!(e.contains("endpoint, region, force-path-style"), "{e}");
        assert!(err("s3://b?region=a&region=b").contains("more than once"));
        assert!(err("s3://b?force-path-style=maybe").contains("true or false"));
        assert!(err("s3://b?endpoint=ftp://x").contains("http://"));
        assert!(err("s3://b?endpoint=notaurl").contains("not a URL"));
        assert!(err("s3://host:9000/b").contains("endpoint="));
        assert!(err("s3://b/x/../y").contains(".."));
        assert!(err("gs://b").contains("unsupported"));
        assert!(err("").contains("empty"));
    }

    #[test]
    fn s3_credentials_rejected_without_echo() {
        let e = err("s3://AKIAXXXX:SuperSecret@bucket/p");
        assert!(e.contains("credentials"), "{e}");
        assert!(!e.contains("SuperSecret"), "{e}");
        let e = err("s3://b?endpoint=http://ak:SuperSecret@127.0.0.1:9000");
        assert!(e.contains("credentials"), "{e}");
        assert!(!e.contains("SuperSecret"), "{e}");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "file:///var/backups/db",
            "file:///var/my%20backups",
            "s3://b",
            "s3://b/p",
            "s3://b/a/b/c?region=us-east-2",
            "s3://bucket/prefix?endpoint=http://127.0.0.1:3900&region=garage&force-path-style=true",
            "s3://b?endpoint=http://h:1/path%26x",
        ] {
            let u = parse(s).unwrap();
            let shown = u.to_string();
            assert_eq!(shown, s, "display of {s}");
            assert_eq!(parse(&shown).unwrap(), u, "round trip of {s}");
        }
        // Non-canonical input displays canonically and round-trips.
        let u = parse("s3://b//p/?force-path-style=1&region=r").unwrap();
        assert_eq!(u.to_string(), "s3://b/p?region=r&force-path-style=true");
        assert_eq!(parse(&u.to_string()).unwrap(), u);
    }
}
