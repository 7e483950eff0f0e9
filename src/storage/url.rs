//! Replica URLs: where a replica lives.
//!
//! Accepted forms:
//!
//! * `file:///absolute/dir[?file-mode=0640]`
//! * `s3://BUCKET[/PREFIX][?endpoint=URL&region=NAME&force-path-style=true]`
//!
//! Credentials are never part of a replica URL: they come from the standard
//! AWS sources (environment, profiles, web identity). URLs that try to embed
//! them are rejected, and neither `Display` nor any error message prints
//! anything secret: errors show the URL through [`redact`], which hides a
//! `user:password@` part (also when the password contains `/`, `@`, `?` or
//! percent-escapes, and when the URL does not parse), the values of unknown
//! query parameters (`secret-access-key=…`) and credentials inside
//! `endpoint=`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};

/// Where a replica is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaUrl {
    /// A local (or mounted) directory, absolute. `mode`: the permission bits
    /// of the object files written there (`?file-mode=0640`); `None` =
    /// [`DEFAULT_FILE_MODE`].
    File { path: PathBuf, mode: Option<u32> },
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
const FILE_PARAMS: &[&str] = &["file-mode"];

const FORMS: &str =
    "file:///absolute/dir or s3://bucket/prefix?endpoint=URL&region=NAME&force-path-style=true";

impl ReplicaUrl {
    /// Whether both name the same place (settings such as `file-mode` aside).
    pub fn same_location(&self, other: &ReplicaUrl) -> bool {
        match (self, other) {
            (ReplicaUrl::File { path: a, .. }, ReplicaUrl::File { path: b, .. }) => a == b,
            (a, b) => a.to_string() == b.to_string(),
        }
    }
}

/// Permission bits of the files offsite creates (a restored database, the
/// objects of a `file://` replica) unless asked otherwise: owner only.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// A file mode given by the user (`--mode`, `?file-mode=`): octal digits
/// only (`0640`, `640` or `0o640`), at most `0777`, readable and writable
/// by the owner, and nothing for "other": backups and restored databases
/// are never world-readable. Group bits are allowed (a volume shared with
/// an application running as another user of the same group).
pub fn parse_file_mode(s: &str) -> anyhow::Result<u32> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    let shown = if digits.len() <= 6 { t } else { "(too long)" };
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        bail!("file mode {shown:?} is not an octal mode such as 0600, 0640 or 0660");
    }
    let mode = u32::from_str_radix(digits, 8).expect("octal digits");
    if mode > 0o777 {
        bail!(
            "file mode {shown:?} sets setuid/setgid/sticky bits; give permission bits only \
             (at most 0777), such as 0600, 0640 or 0660"
        );
    }
    if mode & 0o600 != 0o600 {
        bail!("file mode {shown:?} must let the owner read and write (06xx), such as 0600 or 0640");
    }
    if mode & 0o007 != 0 {
        bail!(
            "file mode {shown:?} grants access to every user (\"other\" bits); offsite only \
             grants the owner and the group: use 0600, 0640 or 0660"
        );
    }
    Ok(mode)
}

/// `s` — a replica URL as given, valid or not — with everything that may be
/// a credential replaced by `***`, for messages:
///
/// * a `user:password@` part: everything from `//` up to the last `@`, when
///   the first segment contains `:` (`s3://KEY:SE/CR@ET@bucket`) or when
///   nothing but the `@` ends it (`s3://KEY@bucket`);
/// * query parameters other than the known ones: the value (and a name
///   that is not a plain word);
/// * `endpoint=`: its own `user:password@` part;
/// * a fragment.
pub fn redact(s: &str) -> String {
    let (head, rest) = match s.find("://") {
        Some(i)
            if s[..i]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            s.split_at(i + 3)
        }
        // `file:x`, `s3:x`; any other `word:` may be `user:password`.
        _ => match s.split_once(':') {
            Some((scheme, _))
                if scheme.eq_ignore_ascii_case("file") || scheme.eq_ignore_ascii_case("s3") =>
            {
                s.split_at(scheme.len() + 1)
            }
            _ => ("", s),
        },
    };
    let mut out = String::from(head);
    let rest = match userinfo_end(rest) {
        Some(at) => {
            out.push_str("***@");
            &rest[at + 1..]
        }
        None => rest,
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    match rest.split_once('?') {
        None => out.push_str(rest),
        Some((location, query)) => {
            out.push_str(location);
            out.push('?');
            let pairs: Vec<String> = query.split('&').map(redact_param).collect();
            out.push_str(&pairs.join("&"));
        }
    }
    if let Some(f) = fragment {
        out.push('#');
        if !f.is_empty() {
            out.push_str("***");
        }
    }
    out
}

/// The index of the `@` that ends a `user:password@` part at the start of
/// `rest` (what follows `scheme://`), if it has one. Deliberately wider than
/// RFC 3986 (whose authority ends at the first `/`): a secret may contain
/// `/`, `?` or `#`, which a strict parser reads as the end of the host and
/// then echoes the secret as a path.
fn userinfo_end(rest: &str) -> Option<usize> {
    // `s3:/KEY:SECRET@b`: slashes before the user are no path.
    let off = rest.len() - rest.trim_start_matches('/').len();
    let r = &rest[off..];
    let first = &r[..r.find(['/', '?', '#']).unwrap_or(r.len())];
    if first.contains(':') {
        // `KEY:SE/CR?ET@bucket`: the secret runs to the last `@`.
        return rest.rfind('@');
    }
    // `user@bucket`, `user@host/dir` (RFC 3986).
    first.rfind('@').map(|i| off + i)
}

/// One `name=value` of a query, redacted (see [`redact`]).
fn redact_param(pair: &str) -> String {
    let (k, v) = match pair.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (pair, None),
    };
    let name = percent_decode(k).unwrap_or_default();
    let plain_word = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let shown_k = if plain_word { k } else { "***" };
    let Some(v) = v else {
        return shown_k.to_string();
    };
    let known = S3_PARAMS.contains(&name.as_str()) || FILE_PARAMS.contains(&name.as_str());
    let shown_v = if !known {
        if v.is_empty() {
            String::new()
        } else {
            "***".to_string()
        }
    } else if name == "endpoint" {
        match percent_decode(v) {
            Ok(d) => {
                let r = shown_endpoint(&d);
                if r == d {
                    v.to_string()
                } else {
                    query_escape(&r)
                }
            }
            Err(_) => "***".to_string(),
        }
    } else {
        v.to_string()
    };
    format!("{shown_k}={shown_v}")
}

/// An `endpoint=` value for messages: a `user:password@` part redacted,
/// and a value that does not parse and has a `:` after its scheme (a
/// `user:password` cut short by `/`, `?` or `#`, not a port) hidden whole.
fn shown_endpoint(v: &str) -> String {
    let (scheme, after) = match v.split_once("://") {
        Some((s, a)) => (Some(s), a),
        None => (None, v),
    };
    if let Some(at) = userinfo_end(after) {
        return match scheme {
            Some(s) => format!("{s}://***@{}", &after[at + 1..]),
            None => format!("***@{}", &after[at + 1..]),
        };
    }
    if ::url::Url::parse(v).is_err() && after.contains(':') {
        return "***".to_string();
    }
    v.to_string()
}

/// A parameter name for messages: itself when it is a plain word, else
/// `***` (a stray `&SECRET` would otherwise be echoed as a name).
fn shown_name(k: &str) -> String {
    let plain = !k.is_empty()
        && k.len() <= 40
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        format!("{k:?}")
    } else {
        "***".to_string()
    }
}

impl FromStr for ReplicaUrl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            bail!("empty replica URL; expected {FORMS}");
        }
        // Every message below shows the URL redacted, never `s` itself.
        let shown = redact(s);
        match s.split_once(':') {
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("file") => parse_file(s, &shown),
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("s3") => {
                parse_s3(s, &shown).map(ReplicaUrl::S3)
            }
            Some((scheme, after))
                if after.starts_with("//")
                    && !scheme.is_empty()
                    && scheme.len() <= 20
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                bail!(
                    "unsupported replica URL scheme {:?} (supported: file, s3); expected {FORMS}",
                    scheme.to_ascii_lowercase()
                )
            }
            _ if s.starts_with('/') => bail!(
                "replica URL {shown:?} has no scheme; for a local directory write file://{shown}"
            ),
            _ => bail!("replica URL {shown:?} has no scheme; expected {FORMS}"),
        }
    }
}

/// `user@`/`user:password@` before the location, in any form (see
/// [`userinfo_end`]): refused without echoing it.
fn refuse_credentials(rest: &str, what: &str) -> anyhow::Result<()> {
    if userinfo_end(rest).is_some() {
        bail!(
            "invalid {what} URL: credentials must not be part of the replica URL (found \
             `key:secret@` before the {}). Remove them and provide credentials through \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an AWS profile or web identity",
            if what == "S3" { "bucket" } else { "path" }
        );
    }
    Ok(())
}

fn parse_file(s: &str, shown: &str) -> anyhow::Result<ReplicaUrl> {
    // `file:/x`, `file:x`: no authority part at all.
    let rest = &s[s.find(':').expect("scheme checked") + 1..];
    let Some(after) = rest.strip_prefix("//") else {
        bail!(
            "invalid file URL {shown:?}: write file:///absolute/dir (three slashes, absolute path)"
        );
    };
    if !after.starts_with('/') {
        refuse_credentials(after, "file")?;
        // `file://host/x` or `file://relative/dir`.
        let (host, path) = after.split_once('/').unwrap_or((after, ""));
        let path = path.split(['?', '#']).next().unwrap_or("");
        bail!(
            "invalid file URL {shown:?}: {host:?} is read as a host name, and file URLs must name \
             a local absolute path; write file:///{host}{}{path} (three slashes) if {host:?} is a \
             directory under /",
            if path.is_empty() { "" } else { "/" },
        );
    }
    let (location, query) = match after.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (after, None),
    };
    if after.contains('#') {
        bail!(
            "invalid file URL {shown:?}: file URLs take no fragment (`#`); \
             write file:///absolute/dir"
        );
    }
    if location
        .split('/')
        .any(|seg| seg == ".." || seg.eq_ignore_ascii_case("%2e%2e"))
    {
        bail!("invalid file URL {shown:?}: the path must not contain `..`");
    }
    let parsed = ::url::Url::parse(&format!("file://{location}"))
        .with_context(|| format!("invalid file URL {shown:?}: write file:///absolute/dir"))?;
    let path = parsed.to_file_path().map_err(|()| {
        anyhow!(
            "invalid file URL {shown:?}: cannot convert to a local path; write file:///absolute/dir"
        )
    })?;
    if !path.is_absolute() {
        bail!("invalid file URL {shown:?}: the path must be absolute; write file:///absolute/dir");
    }
    let mut mode = None;
    for (k, v) in query_pairs(query, shown)? {
        match k.as_str() {
            "file-mode" => {
                mode = Some(
                    parse_file_mode(&v).with_context(|| format!("invalid file URL {shown:?}"))?,
                )
            }
            other => bail!(
                "invalid file URL {shown:?}: unknown parameter {}{}; the only parameter of a \
                 file URL is file-mode (e.g. ?file-mode=0640)",
                shown_name(other),
                match did_you_mean(other, FILE_PARAMS) {
                    Some(m) => format!(" (did you mean {m:?}?)"),
                    None => String::new(),
                },
            ),
        }
    }
    Ok(ReplicaUrl::File { path, mode })
}

/// The decoded `name=value` pairs of a query, each name at most once.
fn query_pairs(query: Option<&str>, shown: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).with_context(|| format!("invalid URL {shown:?}"))?;
        let v = percent_decode(v).with_context(|| format!("invalid URL {shown:?}"))?;
        if out.iter().any(|(seen, _)| *seen == k) {
            bail!(
                "invalid URL {shown:?}: parameter {} is given more than once",
                shown_name(&k)
            );
        }
        out.push((k, v));
    }
    Ok(out)
}

fn parse_s3(s: &str, shown: &str) -> anyhow::Result<S3Config> {
    let rest = &s[s.find(':').expect("scheme checked") + 1..];
    let Some(rest) = rest.strip_prefix("//") else {
        bail!("invalid S3 URL {shown:?}: write s3://bucket/prefix");
    };
    refuse_credentials(rest, "S3")?;
    if rest.contains('#') {
        bail!("invalid S3 URL {shown:?}: `#` is not allowed (no fragments, and not in prefixes)");
    }
    let (location, query) = match rest.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (rest, None),
    };
    let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
    if bucket.is_empty() {
        bail!("invalid S3 URL {shown:?}: the bucket name is empty; write s3://bucket/prefix");
    }
    if let Some(bad) = bucket
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        bail!(
            "invalid S3 URL {shown:?}: bucket name {bucket:?} contains {bad:?}; bucket names \
             consist of letters, digits, `.`, `-` and `_`{}",
            if bad == ':' {
                " (to use a custom server, put it in ?endpoint=http://host:port)"
            } else {
                ""
            }
        );
    }
    if bucket.len() > 255 {
        bail!("invalid S3 URL {shown:?}: bucket name is longer than 255 characters");
    }

    let prefix = normalize_prefix(prefix).with_context(|| format!("invalid S3 URL {shown:?}"))?;

    let mut cfg = S3Config {
        bucket: bucket.to_string(),
        prefix,
        ..S3Config::default()
    };
    for (k, v) in query_pairs(query, shown)? {
        match k.as_str() {
            "endpoint" => cfg.endpoint = Some(parse_endpoint(&v)?),
            "region" => {
                if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '/') {
                    bail!("invalid S3 URL {shown:?}: region {v:?} is not a valid region name");
                }
                cfg.region = Some(v);
            }
            "force-path-style" => {
                cfg.force_path_style = match v.to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "" => true,
                    "false" | "0" | "no" => false,
                    _ => bail!(
                    "invalid S3 URL {shown:?}: force-path-style must be true or false, not {v:?}"
                ),
                }
            }
            other => bail!(
                "invalid S3 URL {shown:?}: unknown parameter {}{}; valid parameters are {}",
                shown_name(other),
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
    let after_scheme = v.split_once("://").map_or(v, |(_, a)| a);
    if userinfo_end(after_scheme).is_some() {
        bail!(
            "invalid S3 URL: the endpoint must not contain credentials; provide them through \
             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an AWS profile or web identity"
        );
    }
    let shown = shown_endpoint(v);
    let u = ::url::Url::parse(v).map_err(|e| {
        anyhow!("invalid S3 URL: endpoint {shown:?} is not a URL ({e}); write e.g. endpoint=http://127.0.0.1:3900")
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        bail!(
            "invalid S3 URL: endpoint {shown:?} must start with http:// or https://, \
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
        bail!("invalid S3 URL: endpoint {shown:?} has no host");
    }
    if u.query().is_some() || u.fragment().is_some() {
        bail!("invalid S3 URL: endpoint {shown:?} must not have a query or fragment");
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
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    anyhow!("bad percent-escape (`%` must be followed by two hex digits)")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("percent-escapes that are not UTF-8"))
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
            ReplicaUrl::File { path, mode } => {
                match ::url::Url::from_file_path(path) {
                    Ok(u) => write!(f, "{u}")?,
                    Err(()) => write!(f, "file://{}", path.display())?,
                }
                match mode {
                    Some(m) => write!(f, "?file-mode={m:04o}"),
                    None => Ok(()),
                }
            }
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
                path: PathBuf::from("/var/backups/db"),
                mode: None,
            }
        );
        // Percent-encoding is decoded.
        assert_eq!(
            parse("file:///var/my%20backups").unwrap(),
            ReplicaUrl::File {
                path: PathBuf::from("/var/my backups"),
                mode: None,
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
        assert!(e.contains("file-mode"), "{e}");
        let e = err("file:///a#x");
        assert!(e.contains("fragment"), "{e}");
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
            "file:///var/backups?file-mode=0640",
            "file:///var/backups?file-mode=0600",
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
    #[test]
    fn file_mode_is_strict_octal_without_other_bits() {
        for (s, m) in [
            ("0600", 0o600),
            ("600", 0o600),
            ("0640", 0o640),
            ("0660", 0o660),
            ("0o640", 0o640),
            ("0700", 0o700),
            ("0770", 0o770),
        ] {
            assert_eq!(parse_file_mode(s).unwrap(), m, "{s}");
        }
        for (s, why) in [
            ("", "octal"),
            ("rw-r-----", "octal"),
            ("0x1a0", "octal"),
            ("0648", "octal"),
            ("+640", "octal"),
            ("-0640", "octal"),
            ("416", "owner"),
            ("00640", "octal"),
            ("4600", "setuid"),
            ("0644", "other"),
            ("0666", "other"),
            ("0601", "other"),
            ("0777", "other"),
            ("0400", "owner"),
            ("0060", "owner"),
        ] {
            let e = format!("{:#}", parse_file_mode(s).expect_err(s));
            assert!(e.contains(why), "{s}: {e}");
        }
        assert_eq!(
            parse("file:///b?file-mode=0660").unwrap(),
            ReplicaUrl::File {
                path: PathBuf::from("/b"),
                mode: Some(0o660)
            }
        );
        assert!(err("file:///b?file-mode=0644").contains("other"));
        assert!(err("file:///b?file-mode=0640&file-mode=0600").contains("more than once"));
        assert!(err("file:///b?filemode=0640").contains("did you mean \"file-mode\"?"));
        assert!(err("s3://b?file-mode=0640").contains("unknown parameter"));
        // The mode is no part of the location.
        let a = parse("file:///b?file-mode=0640").unwrap();
        assert!(a.same_location(&parse("file:///b").unwrap()));
        assert!(!a.same_location(&parse("file:///c").unwrap()));
    }

    /// Secrets as they come: AWS secret keys hold `/` and `+`, passwords
    /// anything, percent-escaped or not.
    const SECRETS: &[&str] = &[
        "wJalr/XUtnFEMI+K7MDENG",
        "Qz7/Vt9/Mw3",
        "Pl4+Kr8+Tt5",
        "Hq2@Rz6@Ux1",
        "Es3%2FVb8%2BNc4",
        "Od5/Yw2?Zx7#Fg9",
        "Jm4%40Lp8/Wq2",
    ];

    fn assert_hidden(text: &str, secret: &str, access: &str) {
        assert!(!text.contains(secret), "secret {secret:?} in: {text}");
        for part in secret.split(['/', '@', '+', '?', '#', '%']) {
            if part.len() >= 3 {
                assert!(
                    !text.contains(part),
                    "part {part:?} of {secret:?} in: {text}"
                );
            }
        }
        assert!(!text.contains(access), "access key {access:?} in: {text}");
    }

    #[test]
    fn credentials_are_never_echoed_in_any_url_form() {
        let access = "AKIAEXAMPLEKEY";
        for secret in SECRETS {
            let forms = [
                format!("s3://{access}:{secret}@bucket/prefix"),
                format!("s3://{access}:{secret}@bucket"),
                format!("S3://{access}:{secret}@bucket/p?region=r"),
                format!("s3://{access}:{secret}@host:9000/bucket"),
                format!("s3:{access}:{secret}@bucket/p"),
                format!("s3:/{access}:{secret}@bucket/p"),
                format!("s3://:{secret}@bucket/p"),
                format!("s3://bucket/p?secret-access-key={secret}&access-key-id={access}"),
                format!("s3://bucket/p?region=r&aws_secret_access_key={secret}"),
                format!("s3://bucket/p?endpoint=http://{access}:{secret}@127.0.0.1:9000"),
                format!("s3://bucket/p?endpoint=http%3A%2F%2F{access}%3A{secret}%40h%3A1"),
                format!("file://{access}:{secret}@host/dir"),
                format!("file://{access}:{secret}@/dir"),
                format!("file:///dir?password={secret}"),
                format!("gs://{access}:{secret}@bucket/p"),
                format!("{access}:{secret}@bucket/p"),
                format!("//{access}:{secret}@bucket"),
            ];
            for f in &forms {
                let e = format!("{:#}", parse(f).expect_err(f));
                assert_hidden(&e, secret, access);
                let r = redact(f);
                assert_hidden(&r, secret, access);
                assert!(r.contains("***"), "{f} -> {r}");
                // Debug formatting (`{:?}`) of the error too.
                assert_hidden(&format!("{:?}", parse(f).unwrap_err()), secret, access);
            }
        }
    }

    #[test]
    fn redact_keeps_what_is_not_secret() {
        for s in [
            "s3://bucket/prefix?endpoint=http://127.0.0.1:3900&region=garage&force-path-style=true",
            "file:///var/backups?file-mode=0640",
            "s3://bucket/user@example.com/db",
            "file:///data/user@host/x",
            "s3://host:9000/bucket",
            "/var/backups",
            "s3://b?region=a%26b",
        ] {
            assert_eq!(redact(s), s);
        }
        assert_eq!(
            redact("s3://KEY:SE/CR@ET@bucket/p?region=r&token=abc&x"),
            "s3://***@bucket/p?region=r&token=***&x"
        );
        assert_eq!(
            redact("s3://b?endpoint=http://u:p@h:1"),
            "s3://b?endpoint=http://***@h:1"
        );
        assert_eq!(redact("s3://b#frag"), "s3://b#***");
        assert_eq!(redact("s3://b?%2F%2Fsecret=1"), "s3://b?***=***");
        // The errors that show the URL still show it.
        let e = err("s3://host:9000/b");
        assert!(
            e.contains("s3://host:9000/b") && e.contains("endpoint="),
            "{e}"
        );
        let e = err("s3://b?regoin=x");
        assert!(e.contains("s3://b?regoin=***"), "{e}");
    }
}
