//! PostgreSQL connection strings: the URL form
//! (`postgres://user:pass@host:port/db?sslmode=disable`) and libpq's
//! `key=value` form, with libpq's defaults (the `PG*` environment variables,
//! the passfile). A [`Dsn`] never shows its password: [`Dsn::redacted`] and
//! [`Dsn::display`] are the only forms meant for logs, errors and labels,
//! and its `Debug` output is redacted too.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};

/// Where the server listens.
#[derive(Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address (TCP).
    Tcp(String),
    /// A directory holding the server's socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

/// A parsed connection string, defaults applied.
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn {
    pub host: Host,
    pub port: u16,
    pub user: String,
    /// From the DSN, else `PGPASSWORD`, else the passfile.
    pub password: Option<String>,
    /// `None`: the server's default (the user name).
    pub dbname: Option<String>,
    pub application_name: Option<String>,
    /// libpq's sslmode: `disable`, `allow`, `prefer` (all three: plain
    /// connections for now), `require`, `verify-ca`, `verify-full` (refused:
    /// TLS is not supported yet).
    pub sslmode: String,
}

const EXAMPLES: &str = "examples: postgres://user@db.example:5432/app?sslmode=disable, \
     postgres://user@/app?host=/var/run/postgresql, \"host=/var/run/postgresql port=5432 user=backup dbname=app\"";

/// The error for TLS modes (shared with the connection code).
pub(crate) const TLS_UNSUPPORTED: &str = "TLS to PostgreSQL is not supported yet; connect over a Unix socket or a trusted network with sslmode=disable/prefer";

const SSLMODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

/// The parameters a DSN may set, in either form.
const KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "application_name",
    "sslmode",
    "passfile",
    "connect_timeout",
];

impl Dsn {
    /// Parse `postgres://user:pass@host:port/db?application_name=x&sslmode=disable&host=/var/run/postgresql`
    /// (also `postgresql://`; user, password, host and database are
    /// percent-decoded) or libpq's `key=value` form (`"host=/tmp port=5433
    /// user=x dbname=y"`, values may be single-quoted). What is not given
    /// comes from `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
    /// `PGAPPNAME`, `PGSSLMODE`, then `/var/run/postgresql` (if it exists)
    /// else `127.0.0.1`, port 5432, the current OS user. The password comes
    /// from the DSN, else `PGPASSWORD`, else the passfile (`passfile=`,
    /// `PGPASSFILE` or `~/.pgpass`, libpq's format and matching; ignored with
    /// a warning unless only its owner can read it). A host starting with `/`
    /// is a Unix socket directory.
    pub fn parse(s: &str) -> anyhow::Result<Dsn> {
        parse_with(
            s,
            &|k| std::env::var(k).ok(),
            &Path::new("/var/run/postgresql").is_dir(),
        )
    }

    /// The DSN as a URL with any password replaced by `***`: the only form
    /// of it that may reach logs, errors and labels.
    pub fn redacted(&self) -> String {
        let mut out = String::from("postgres://");
        out.push_str(&pct(&self.user));
        if self.password.is_some() {
            out.push_str(":***");
        }
        out.push('@');
        let mut query = Vec::new();
        match &self.host {
            Host::Tcp(h) if h.contains(':') => out.push_str(&format!("[{h}]:{}", self.port)),
            Host::Tcp(h) => out.push_str(&format!("{}:{}", pct(h), self.port)),
            Host::Unix(dir) => {
                query.push(format!("host={}", pct_path(&dir.to_string_lossy())));
                query.push(format!("port={}", self.port));
            }
        }
        out.push('/');
        if let Some(db) = &self.dbname {
            out.push_str(&pct(db));
        }
        if let Some(app) = &self.application_name {
            query.push(format!("application_name={}", pct(app)));
        }
        query.push(format!("sslmode={}", pct(&self.sslmode)));
        out.push('?');
        out.push_str(&query.join("&"));
        out
    }

    /// A short identity without the password: `user@host:port/db`.
    pub fn display(&self) -> String {
        let host = match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]"),
            Host::Tcp(h) => h.clone(),
            Host::Unix(dir) => dir.display().to_string(),
        };
        format!(
            "{}@{host}:{}/{}",
            self.user,
            self.port,
            self.dbname.as_deref().unwrap_or(&self.user)
        )
    }

    /// The same DSN with `application_name` set (how the server lists the
    /// connection in `pg_stat_activity` and `pg_stat_replication`).
    pub fn with_application_name(mut self, name: &str) -> Dsn {
        self.application_name = Some(name.to_string());
        self
    }

    /// Where to connect, for errors: `host:port` or the socket's path.
    pub(crate) fn address(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Unix(dir) => dir
                .join(format!(".s.PGSQL.{}", self.port))
                .display()
                .to_string(),
        }
    }

    /// The database the server will use: the given one, else the user name.
    pub(crate) fn database(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.user)
    }
}

impl FromStr for Dsn {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Dsn> {
        Dsn::parse(s)
    }
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Dsn").field(&self.redacted()).finish()
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Tcp(h) => write!(f, "Tcp({h:?})"),
            Host::Unix(p) => write!(f, "Unix({p:?})"),
        }
    }
}

/// The parameters as given, before defaults.
#[derive(Default)]
struct Given {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    application_name: Option<String>,
    sslmode: Option<String>,
    passfile: Option<String>,
}

impl Given {
    fn set(&mut self, key: &str, value: String) -> anyhow::Result<()> {
        let slot = match key {
            // hostaddr skips name resolution in libpq; an address is a host name here.
            "host" | "hostaddr" => &mut self.host,
            "port" => &mut self.port,
            "user" => &mut self.user,
            "password" => &mut self.password,
            "dbname" => &mut self.dbname,
            "application_name" => &mut self.application_name,
            "sslmode" => &mut self.sslmode,
            "passfile" => &mut self.passfile,
            // The connect timeout is fixed (10 s).
            "connect_timeout" => return Ok(()),
            other => bail!(
                "unknown connection parameter {other:?} (known: {})",
                KEYS.join(", ")
            ),
        };
        if key == "hostaddr" && slot.is_some() {
            return Ok(()); // host wins
        }
        *slot = Some(value);
        Ok(())
    }
}

/// [`Dsn::parse`] with the environment (`env`) and the existence of
/// `/var/run/postgresql` given, for tests.
fn parse_with(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
    default_socket_dir: &bool,
) -> anyhow::Result<Dsn> {
    let s = s.trim();
    let given = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        parse_url(s)
    } else if s.contains("://") {
        Err(anyhow!(
            "the URL scheme must be postgres:// or postgresql://"
        ))
    } else {
        parse_kv(s)
    };
    // The password never reaches the error: errors name keys and positions
    // of the DSN, not its text.
    let given = given.with_context(|| format!("bad PostgreSQL DSN ({EXAMPLES})"))?;
    let env = |k: &str| env(k).filter(|v| !v.is_empty());

    let host_s = given.host.or_else(|| env("PGHOST"));
    let host = match host_s {
        Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
        Some(h) if h.contains(',') => bail!(
            "bad PostgreSQL DSN: several hosts ({h:?}) are not supported; name one ({EXAMPLES})"
        ),
        Some(h) => Host::Tcp(h),
        None if *default_socket_dir => Host::Unix(PathBuf::from("/var/run/postgresql")),
        None => Host::Tcp("127.0.0.1".into()),
    };
    let port = match given.port.or_else(|| env("PGPORT")) {
        None => 5432,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => bail!("bad PostgreSQL DSN: port {p:?} is not a port number ({EXAMPLES})"),
        },
    };
    let user = match given.user.or_else(|| env("PGUSER")) {
        Some(u) => u,
        None => os_user_name().context(
            "no PostgreSQL user given (user= in the DSN or PGUSER) and the OS user has no name",
        )?,
    };
    let dbname = given.dbname.or_else(|| env("PGDATABASE"));
    let application_name = given.application_name.or_else(|| env("PGAPPNAME"));
    let sslmode = given
        .sslmode
        .or_else(|| env("PGSSLMODE"))
        .unwrap_or_else(|| "prefer".into());
    if !SSLMODES.contains(&sslmode.as_str()) {
        bail!(
            "bad PostgreSQL DSN: sslmode={sslmode:?} is not one of {} ({EXAMPLES})",
            SSLMODES.join(", ")
        );
    }
    if matches!(sslmode.as_str(), "require" | "verify-ca" | "verify-full") {
        bail!("sslmode={sslmode}: {TLS_UNSUPPORTED}");
    }
    let mut dsn = Dsn {
        host,
        port,
        user,
        password: given.password,
        dbname,
        application_name,
        sslmode,
    };
    if dsn.password.is_none() {
        dsn.password = env("PGPASSWORD");
    }
    if dsn.password.is_none() {
        let file = given
            .passfile
            .or_else(|| env("PGPASSFILE"))
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
        if let Some(file) = file {
            dsn.password = passfile_password(&file, &dsn);
        }
    }
    Ok(dsn)
}

/// `postgres://[user[:password]@][host][:port][/dbname][?key=value&...]`.
fn parse_url(s: &str) -> anyhow::Result<Given> {
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(i) => (&main[..i], Some(&main[i + 1..])),
        None => (main, None),
    };
    let mut g = Given::default();
    let hostport = match authority.rfind('@') {
        Some(i) => {
            let userinfo = &authority[..i];
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    g.user = nonempty(decode(u, "user name")?);
                    g.password = Some(decode(p, "password")?);
                }
                None => g.user = nonempty(decode(userinfo, "user name")?),
            }
            &authority[i + 1..]
        }
        None => authority,
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| anyhow!("the IPv6 address in the URL lacks its closing ']'"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| anyhow!("unexpected text after the IPv6 address in the URL"))?,
            ),
        };
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (decode(h, "host")?, Some(p)),
            None => (decode(hostport, "host")?, None),
        }
    };
    g.host = nonempty(host);
    if let Some(p) = port.filter(|p| !p.is_empty()) {
        if p.parse::<u16>().is_err() {
            bail!("the URL's port {p:?} is not a port number");
        }
        g.port = Some(p.to_string());
    }
    if let Some(path) = path {
        g.dbname = nonempty(decode(path, "database name")?);
    }
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            anyhow!(
                "the URL's query parameter {:?} has no value",
                pair.split('=').next().unwrap_or(pair)
            )
        })?;
        let k = decode(k, "query parameter name")?;
        let v = decode(v, &format!("value of {k}"))?;
        g.set(&k, v)?;
    }
    Ok(g)
}

/// libpq's `key=value key2='quoted \' value'`.
fn parse_kv(s: &str) -> anyhow::Result<Given> {
    let mut g = Given::default();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            bail!("{key:?} is not of the form key=value");
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(c) => value.push(c),
                        None => break,
                    },
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                bail!("the quoted value of {key} lacks its closing quote");
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(c) = chars.next() {
                        value.push(c);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        g.set(&key, value)?;
    }
    Ok(g)
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Percent-decode `s` (`what` names it in errors, never its text: it may
/// be a password).
fn decode(s: &str, what: &str) -> anyhow::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| anyhow!("the {what} has a bad percent-escape (write % as %25)"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| anyhow!("the {what} is not UTF-8 once percent-decoded"))
}

/// Percent-encode what is not unreserved in a URL component.
fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Like [`pct`], keeping `/` (socket directories read better).
fn pct_path(s: &str) -> String {
    s.split('/').map(pct).collect::<Vec<_>>().join("/")
}

/// The effective OS user's name.
fn os_user_name() -> Option<String> {
    // SAFETY: getpwuid_r with a buffer we own; the result points into it.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let mut buf = vec![0 as libc::c_char; 4096];
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        );
        if rc != 0 || out.is_null() || pw.pw_name.is_null() {
            return std::env::var("USER").ok().filter(|u| !u.is_empty());
        }
        std::ffi::CStr::from_ptr(pw.pw_name)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

/// The password for `dsn` from the passfile at `file`, if it matches a line
/// (libpq: `hostname:port:database:username:password`, `*` matches
/// anything, `\` escapes `:` and `\`, the first matching line wins). A file
/// others can read is ignored with a warning, as libpq does.
fn passfile_password(file: &Path, dsn: &Dsn) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignoring it (chmod 0600 it)",
            file.display()
        );
        return None;
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("cannot read password file {}: {e}", file.display());
            return None;
        }
    };
    passfile_lookup(&text, dsn)
}

/// The matching in [`passfile_password`], on the file's text.
fn passfile_lookup(text: &str, dsn: &Dsn) -> Option<String> {
    let port = dsn.port.to_string();
    let (host, default_socket) = match &dsn.host {
        Host::Tcp(h) => (h.clone(), false),
        Host::Unix(d) => (
            d.to_string_lossy().into_owned(),
            d == Path::new("/var/run/postgresql") || d == Path::new("/tmp"),
        ),
    };
    let db = dsn.database();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_passfile_line(line);
        if fields.len() < 5 {
            continue;
        }
        let field_matches = |f: &str, v: &str| f == "*" || f == v;
        let host_ok =
            field_matches(&fields[0], &host) || (default_socket && fields[0] == "localhost");
        if host_ok
            && field_matches(&fields[1], &port)
            && field_matches(&fields[2], db)
            && field_matches(&fields[3], &dsn.user)
        {
            // A password containing ':' was escaped; the rest of the line is it.
            return Some(fields[4..].join(":"));
        }
    }
    None
}

/// Split a passfile line at unescaped `:`, removing the escapes.
fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().unwrap().push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse_env(s: &str, vars: &[(&str, &str)], socket_dir: bool) -> anyhow::Result<Dsn> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_with(s, &|k| map.get(k).cloned(), &socket_dir)
    }

    /// Parse with an empty environment (no passfile: HOME unset).
    fn p(s: &str) -> Dsn {
        parse_env(s, &[("PGUSER", "me")], false).unwrap()
    }

    #[test]
    fn url_forms() {
        let d = p("postgres://alice:s3cret@db.example:5433/app?application_name=x&sslmode=disable");
        assert_eq!(d.host, Host::Tcp("db.example".into()));
        assert_eq!(d.port, 5433);
        assert_eq!(d.user, "alice");
        assert_eq!(d.password.as_deref(), Some("s3cret"));
        assert_eq!(d.dbname.as_deref(), Some("app"));
        assert_eq!(d.application_name.as_deref(), Some("x"));
        assert_eq!(d.sslmode, "disable");

        let d = p("postgresql://db.example");
        assert_eq!(d.host, Host::Tcp("db.example".into()));
        assert_eq!(
            (d.port, d.user.as_str(), d.dbname.clone()),
            (5432, "me", None)
        );
        assert_eq!(d.sslmode, "prefer");
        assert_eq!(d.password, None);

        let d = p("postgres://bob@/app?host=/var/run/postgresql&port=5444");
        assert_eq!(d.host, Host::Unix("/var/run/postgresql".into()));
        assert_eq!(d.port, 5444);
        assert_eq!(d.address(), "/var/run/postgresql/.s.PGSQL.5444");

        let d = p("postgres://%2Ftmp%2Fsock:6000/db");
        assert_eq!(d.host, Host::Unix("/tmp/sock".into()));
        assert_eq!(d.port, 6000);

        let d = p("postgres://u@[::1]:5999/d");
        assert_eq!(d.host, Host::Tcp("::1".into()));
        assert_eq!(d.port, 5999);
        assert_eq!(d.display(), "u@[::1]:5999/d");

        // Percent-decoding of user, password, database and query values.
        let d = p("postgres://us%40er:p%3Aa%2Fss%25@h/my%20db?application_name=a%26b");
        assert_eq!(d.user, "us@er");
        assert_eq!(d.password.as_deref(), Some("p:a/ss%"));
        assert_eq!(d.dbname.as_deref(), Some("my db"));
        assert_eq!(d.application_name.as_deref(), Some("a&b"));

        // Query parameters override the authority.
        let d = p("postgres://h1:1/d?host=h2&port=2&user=u2&dbname=d2");
        assert_eq!(d.host, Host::Tcp("h2".into()));
        assert_eq!((d.port, d.user.as_str()), (2, "u2"));
        assert_eq!(d.dbname.as_deref(), Some("d2"));
        let d: Dsn = "postgres://h".parse().unwrap();
        assert_eq!(d.host, Host::Tcp("h".into()));
    }

    #[test]
    fn kv_form() {
        let d = p("host=/tmp port=5433 user=x dbname=y");
        assert_eq!(d.host, Host::Unix("/tmp".into()));
        assert_eq!((d.port, d.user.as_str()), (5433, "x"));
        assert_eq!(d.dbname.as_deref(), Some("y"));
        let d =
            p(" host = 10.0.0.1  password='it\\'s a secret' application_name=a\\ b sslmode=allow");
        assert_eq!(d.host, Host::Tcp("10.0.0.1".into()));
        assert_eq!(d.password.as_deref(), Some("it's a secret"));
        assert_eq!(d.application_name.as_deref(), Some("a b"));
        assert_eq!(d.sslmode, "allow");
        assert_eq!(d.user, "me");
        // Empty string: all defaults.
        let d = p("");
        assert_eq!(d.host, Host::Tcp("127.0.0.1".into()));
        assert_eq!(d.port, 5432);
    }

    #[test]
    fn environment_defaults() {
        let env = [
            ("PGHOST", "pg.internal"),
            ("PGPORT", "6543"),
            ("PGUSER", "envuser"),
            ("PGDATABASE", "envdb"),
            ("PGPASSWORD", "envpw"),
            ("PGAPPNAME", "envapp"),
            ("PGSSLMODE", "disable"),
        ];
        let d = parse_env("", &env, true).unwrap();
        assert_eq!(d.host, Host::Tcp("pg.internal".into()));
        assert_eq!((d.port, d.user.as_str()), (6543, "envuser"));
        assert_eq!(d.dbname.as_deref(), Some("envdb"));
        assert_eq!(d.password.as_deref(), Some("envpw"));
        assert_eq!(d.application_name.as_deref(), Some("envapp"));
        assert_eq!(d.sslmode, "disable");
        // The DSN wins over the environment.
        let d = parse_env("postgres://u:pw@h:1/db?sslmode=prefer", &env, true).unwrap();
        assert_eq!(d.password.as_deref(), Some("pw"));
        assert_eq!((d.port, d.user.as_str()), (1, "u"));
        assert_eq!(d.sslmode, "prefer");
        // Socket directory default, and the OS user.
        let d = parse_env("", &[], true).unwrap();
        assert_eq!(d.host, Host::Unix("/var/run/postgresql".into()));
        assert!(!d.user.is_empty());
        let d = parse_env("", &[], false).unwrap();
        assert_eq!(d.host, Host::Tcp("127.0.0.1".into()));
    }

    #[test]
    fn bad_dsns_say_what_and_never_show_the_password() {
        let cases = [
            "postgres://u:hunter2@h:notaport/db",
            "postgres://u:hunter2@h/db?sslmode=bogus",
            "postgres://u:hunter2@h/db?frobnicate=1",
            "postgres://u:hunter2@h/db?sslmode=require",
            "postgres://u:hunter2@h/db?sslmode=verify-full",
            "password=hunter2 host",
            "password='hunter2",
            "password=hunter2 nonsense=1",
            "mysql://u:hunter2@h/db",
            "postgres://u:hunter2%zz@h/db",
            "postgres://u:hunter2@h1,h2/db",
        ];
        for c in cases {
            let e = format!("{:#}", parse_env(c, &[], false).unwrap_err());
            assert!(!e.contains("hunter2"), "{c}: {e}");
            assert!(
                e.contains("example") || e.contains("TLS to PostgreSQL is not supported yet"),
                "{c}: {e}"
            );
        }
        let e = format!("{:#}", parse_env(cases[0], &[], false).unwrap_err());
        assert!(e.contains("port"), "{e}");
        let e = format!("{:#}", parse_env(cases[2], &[], false).unwrap_err());
        assert!(e.contains("frobnicate"), "{e}");
        let e = format!("{:#}", parse_env(cases[3], &[], false).unwrap_err());
        assert!(e.contains("sslmode=disable/prefer"), "{e}");
    }

    #[test]
    fn redaction() {
        let d = p("postgres://alice:hunter2@db:5433/app?application_name=x&sslmode=disable");
        assert_eq!(
            d.redacted(),
            "postgres://alice:***@db:5433/app?application_name=x&sslmode=disable"
        );
        assert_eq!(d.display(), "alice@db:5433/app");
        assert!(!format!("{d:?}").contains("hunter2"));
        // The redacted form parses back to the same DSN, password aside.
        let back = p(&d.redacted());
        assert_eq!(back.password.as_deref(), Some("***"));
        assert_eq!(
            Dsn {
                password: None,
                ..back
            },
            Dsn {
                password: None,
                ..d
            }
        );

        let d = p("host='/run/pg sock' port=7 user='a b' dbname=x");
        assert_eq!(
            d.redacted(),
            "postgres://a%20b@/x?host=/run/pg%20sock&port=7&sslmode=prefer"
        );
        assert_eq!(p(&d.redacted()), d);
        assert_eq!(d.display(), "a b@/run/pg sock:7/x");
        assert_eq!(p("user=me").display(), "me@127.0.0.1:5432/me");
        let d = p("user=me").with_application_name("offsite");
        assert_eq!(d.application_name.as_deref(), Some("offsite"));
    }

    #[test]
    fn passfile_matching() {
        let text = "\
# comment
other:*:*:*:wrong
db:5433:app:alice:first
*:*:*:alice:second
localhost:5432:*:bob:sock\\:pw\\\\x
";
        let dsn = |s: &str| p(s);
        let look = |s: &str| passfile_lookup(text, &dsn(s));
        assert_eq!(
            look("postgres://alice@db:5433/app").as_deref(),
            Some("first")
        );
        assert_eq!(
            look("postgres://alice@db:5433/other").as_deref(),
            Some("second")
        );
        assert_eq!(look("postgres://carol@db:5433/app"), None);
        // localhost matches the default socket directory, not another one.
        assert_eq!(
            look("host=/var/run/postgresql user=bob").as_deref(),
            Some("sock:pw\\x")
        );
        assert_eq!(look("host=/srv/sock user=bob"), None);
        assert_eq!(
            look("host=localhost user=bob").as_deref(),
            Some("sock:pw\\x")
        );
        // The database defaults to the user name.
        assert_eq!(
            passfile_lookup("h:5432:bob:bob:pw\n", &dsn("host=h user=bob")).as_deref(),
            Some("pw")
        );

        // From a file: used when 0600, ignored when others can read it,
        // never used over PGPASSWORD or a password in the DSN.
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, text).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = file.to_str().unwrap();
        let env = [("PGPASSFILE", f)];
        let d = parse_env("postgres://alice@db:5433/app", &env, false).unwrap();
        assert_eq!(d.password.as_deref(), Some("first"));
        let d = parse_env(
            "postgres://alice@db:5433/app",
            &[("PGPASSFILE", f), ("PGPASSWORD", "env")],
            false,
        )
        .unwrap();
        assert_eq!(d.password.as_deref(), Some("env"));
        let d = parse_env("postgres://alice:url@db:5433/app", &env, false).unwrap();
        assert_eq!(d.password.as_deref(), Some("url"));
        let d = parse_env(
            &format!("host=db port=5433 dbname=app user=alice passfile={f}"),
            &[],
            false,
        )
        .unwrap();
        assert_eq!(d.password.as_deref(), Some("first"));
        let home = [("HOME", dir.path().to_str().unwrap())];
        std::fs::copy(&file, dir.path().join(".pgpass")).unwrap();
        std::fs::set_permissions(
            dir.path().join(".pgpass"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let d = parse_env("postgres://alice@db:5433/app", &home, false).unwrap();
        assert_eq!(d.password.as_deref(), Some("first"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = parse_env("postgres://alice@db:5433/app", &env, false).unwrap();
        assert_eq!(d.password, None);
    }
}
