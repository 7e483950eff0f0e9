//! Value syntax shared by the config file and the command line: durations,
//! sizes, compaction levels, `${VAR}` expansion.

use std::time::Duration;

use anyhow::{bail, Context};

/// Expand `${VAR}` from the environment; `$$` is a literal `$`.
/// The value of environment variable `name`. Unit tests set variables for
/// their own thread only ([`with_vars`]): a test never changes the process
/// environment while others run.
fn var(name: &str) -> Option<String> {
    #[cfg(test)]
    if let Some(v) = TEST_VARS.with(|t| t.borrow().as_ref().map(|m| m.get(name).cloned())) {
        return v;
    }
    std::env::var(name).ok()
}

#[cfg(test)]
thread_local! {
    static TEST_VARS: std::cell::RefCell<Option<std::collections::HashMap<String, String>>> =
        const { std::cell::RefCell::new(None) };
}

/// Run `f` with `vars` as this thread's whole environment for `${VAR}`.
#[cfg(test)]
pub(crate) fn with_vars<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
    let m = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    TEST_VARS.with(|t| *t.borrow_mut() = Some(m));
    let r = f();
    TEST_VARS.with(|t| *t.borrow_mut() = None);
    r
}

pub fn expand_env(s: &str, what: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let end = a.find('}').with_context(|| {
                format!(
                    "{what}: unterminated ${{ in {:?}",
                    crate::storage::redact(s)
                )
            })?;
            let name = &a[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!(
                    "{what}: invalid variable name {name:?} in {:?}",
                    crate::storage::redact(s)
                );
            }
            let v = var(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "{what}: environment variable {name} is not set (used as ${{{name}}})"
                )
            })?;
            out.push_str(&v);
            rest = &a[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `512MiB`, `1GiB`, `64MB`, `1048576`: a size in bytes (at least 1 MiB).
pub fn parse_size(s: &str, what: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{what}: invalid size {s:?} (examples: 512MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => bail!("{what}: unknown size unit {u:?} in {s:?} (use KiB, MiB, GiB, KB, MB or GB)"),
    };
    let v = n
        .checked_mul(mult)
        .with_context(|| format!("{what}: {s:?} is too large"))?;
    if v < 1 << 20 {
        bail!("{what}: {s:?} is below the minimum of 1MiB");
    }
    Ok(v)
}

pub fn parse_duration(s: &str, what: &str) -> anyhow::Result<Duration> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        anyhow::anyhow!("{what}: invalid duration {s:?}: {e} (examples: 1s, 250ms, 5m)")
    })?;
    if d.is_zero() {
        bail!("{what}: duration must be greater than zero");
    }
    Ok(d)
}

/// Compaction windows: whole seconds, growing, each a multiple of the one before.
pub(crate) fn check_levels(v: &[String]) -> anyhow::Result<Vec<Duration>> {
    let mut out: Vec<Duration> = Vec::new();
    for s in v {
        let d = parse_duration(s, "compaction level")?;
        if d.as_micros() % 1_000_000 != 0 {
            bail!("{s:?} must be whole seconds");
        }
        if let Some(prev) = out.last() {
            if d <= *prev || d.as_micros() % prev.as_micros() != 0 {
                bail!(
                    "levels must grow and each must be a multiple of the one before ({s:?} after {})",
                    humantime::format_duration(*prev)
                );
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// `1m,15m,4h` → the config file's list `["1m", "15m", "4h"]`; `off` → `[]`.
pub(crate) fn split_levels(s: &str) -> Vec<String> {
    if s.trim() == "off" {
        return Vec::new();
    }
    s.split(',').map(|p| p.trim().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB", "x").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB", "x").unwrap(), 2 << 30);
        assert_eq!(parse_size("64 MB", "x").unwrap(), 64_000_000);
        assert_eq!(parse_size("1048576", "x").unwrap(), 1 << 20);
        assert!(parse_size("12", "x")
            .unwrap_err()
            .to_string()
            .contains("minimum"));
        assert!(parse_size("5 furlongs", "x")
            .unwrap_err()
            .to_string()
            .contains("unit"));
        assert!(parse_size("big", "x").is_err());
    }

    #[test]
    fn env_expansion() {
        // PATH is set for every test run; nothing here changes the environment.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            expand_env("a:${PATH}:b", "f").unwrap(),
            format!("a:{path}:b")
        );
        let e = expand_env("${OFFSITE_SURELY_UNSET_VAR}", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("OFFSITE_SURELY_UNSET_VAR is not set"), "{e}");
        assert_eq!(expand_env("a$$b", "f").unwrap(), "a$b");
    }

    fn parse_levels(s: &str) -> anyhow::Result<Vec<Duration>> {
        check_levels(&split_levels(s))
    }

    #[test]
    fn levels() {
        assert_eq!(parse_levels("off").unwrap(), Vec::<Duration>::new());
        assert_eq!(
            parse_levels("1m, 15m,4h").unwrap(),
            crate::config::defaults::COMPACTION_LEVELS.to_vec()
        );
        assert!(parse_levels("15m,1m")
            .unwrap_err()
            .to_string()
            .contains("must grow"));
        assert!(parse_levels("1m,90s")
            .unwrap_err()
            .to_string()
            .contains("multiple"));
    }
}
