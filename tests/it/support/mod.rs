//! Helpers shared by the integration tests, each defined once.
//!
//! * S3 test targets (`s3_targets`, `s3_target`, `s3_lock_target`, `unique_prefix`)
//! * `harness`: running `offsite` and `offsite-workload`, SIGTERM, waiting
//!   on conditions (`wait_for`, `wait_shipped`), the ship-in-rounds fixture
//! * `writer`: the deterministic in-process `Writer`
//! * `gate`: tests that measure run alone
//! * `fault_proxy`, `private_s3`: a store that misbehaves or goes away
//! * `pgcluster`: throwaway PostgreSQL clusters (skipped when PostgreSQL is missing)

pub mod fault_proxy;
pub mod gate;
pub mod harness;
pub mod pgcluster;
pub mod private_s3;
pub mod writer;

// ---------------------------------------------------------------------------
// S3 test targets
// ---------------------------------------------------------------------------

/// Environment variable listing the S3 servers to test against:
/// `name=s3://bucket?endpoint=...&region=...&force-path-style=true;name2=...`.
/// Written by `scripts/test-servers.sh start` into its env file.
pub const S3_TARGETS_ENV: &str = "OFFSITE_TEST_S3_TARGETS";
/// Environment variable naming the S3 bucket with Object Lock enabled (moto):
/// `name=s3://bucket?endpoint=...`. Kept apart from `OFFSITE_TEST_S3_TARGETS`
/// because it is an emulator, used only for what the real stores lack.
pub const S3_LOCK_TARGET_ENV: &str = "OFFSITE_TEST_S3_LOCK_TARGET";
/// Set to `1` to run without S3 servers (S3 tests then pass vacuously, with a warning).
pub const ALLOW_NO_S3_ENV: &str = "OFFSITE_TEST_ALLOW_NO_S3";

/// One S3-compatible server to run tests against.
#[derive(Debug, Clone)]
pub struct S3Target {
    /// Short name, e.g. `garage` or `s3s`.
    pub name: String,
    /// Replica URL with a fresh, unique prefix, e.g.
    /// `s3://offsite-test/t-1a2b...?endpoint=http://127.0.0.1:39000&region=garage&force-path-style=true`.
    pub url: String,
}

impl S3Target {
    pub fn replica_url(&self) -> offsite::storage::ReplicaUrl {
        self.url
            .parse()
            .unwrap_or_else(|e| panic!("S3 test target {}: bad URL {}: {e:#}", self.name, self.url))
    }

    pub fn s3_config(&self) -> offsite::storage::S3Config {
        match self.replica_url() {
            offsite::storage::ReplicaUrl::S3(cfg) => cfg,
            other => panic!("S3 test target {} is not an s3:// URL: {other}", self.name),
        }
    }
}

/// A fresh random key prefix, `t-<16 hex digits>`.
pub fn unique_prefix() -> String {
    format!("t-{:016x}", rand::random::<u64>())
}

/// All S3 targets from `OFFSITE_TEST_S3_TARGETS`, each with a fresh unique
/// prefix (so tests never see each other's objects).
///
/// Panics if the variable is unset, unless `OFFSITE_TEST_ALLOW_NO_S3=1`, in
/// which case it warns and returns no targets.
pub fn s3_targets() -> Vec<S3Target> {
    let raw = match std::env::var(S3_TARGETS_ENV) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => {
            if std::env::var(ALLOW_NO_S3_ENV).as_deref() == Ok("1") {
                eprintln!(
                    "WARNING: {S3_TARGETS_ENV} is not set and {ALLOW_NO_S3_ENV}=1: \
                     skipping tests against S3 servers"
                );
                return Vec::new();
            }
            panic!(
                "{S3_TARGETS_ENV} is not set, so there are no S3 servers to test against.\n\
                 Start the local test servers and load their environment:\n\
                 \n    scripts/test-servers.sh start\n    \
                 source ${{OFFSITE_SERVERS_STATE:-/tmp/offsite-test-servers}}/env\n\n\
                 (or set {ALLOW_NO_S3_ENV}=1 to skip S3 tests)"
            );
        }
    };
    parse_targets(&raw)
        .into_iter()
        .map(|(name, base)| S3Target {
            url: with_prefix(&base, &unique_prefix()),
            name,
        })
        .collect()
}

/// The Object Lock test target from `OFFSITE_TEST_S3_LOCK_TARGET`, with a
/// fresh unique prefix.
///
/// Panics if the variable is unset, unless `OFFSITE_TEST_ALLOW_NO_S3=1`, in
/// which case it warns and returns `None`.
pub fn s3_lock_target() -> Option<S3Target> {
    let raw = match std::env::var(S3_LOCK_TARGET_ENV) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => {
            if std::env::var(ALLOW_NO_S3_ENV).as_deref() == Ok("1") {
                eprintln!(
                    "WARNING: {S3_LOCK_TARGET_ENV} is not set and {ALLOW_NO_S3_ENV}=1: \
                     skipping Object Lock tests"
                );
                return None;
            }
            panic!(
                "{S3_LOCK_TARGET_ENV} is not set, so there is no S3 bucket with Object Lock to \
                 test against.\n\
                 Start the local test servers (moto provides it) and load their environment:\n\
                 \n    scripts/test-servers.sh start\n    \
                 source ${{OFFSITE_SERVERS_STATE:-/tmp/offsite-test-servers}}/env\n\n\
                 (or set {ALLOW_NO_S3_ENV}=1 to skip S3 tests)"
            );
        }
    };
    let mut all = parse_targets(&raw);
    assert_eq!(
        all.len(),
        1,
        "{S3_LOCK_TARGET_ENV} must name exactly one target, got {raw:?}"
    );
    let (name, base) = all.remove(0);
    Some(S3Target {
        url: with_prefix(&base, &unique_prefix()),
        name,
    })
}

/// The target called `name`.
///
/// Panics if the environment does not list it, like [`s3_targets`] does when
/// there are no targets at all: a test that asks for a server must not pass
/// without it. Only with `OFFSITE_TEST_ALLOW_NO_S3=1` and no targets at all
/// is it `None` (with a warning).
pub fn s3_target(name: &str) -> Option<S3Target> {
    let all = s3_targets();
    if all.is_empty() {
        // Only reachable with OFFSITE_TEST_ALLOW_NO_S3=1 (s3_targets warned).
        return None;
    }
    let names: Vec<_> = all.iter().map(|t| t.name.clone()).collect();
    match all.into_iter().find(|t| t.name == name) {
        Some(t) => Some(t),
        None => panic!(
            "{S3_TARGETS_ENV} has no S3 server named {name:?} (it lists {names:?}), \
             and this test needs it.\n\
             Start the local test servers and load their environment:\n\
             \n    scripts/test-servers.sh start\n    \
             source ${{OFFSITE_SERVERS_STATE:-/tmp/offsite-test-servers}}/env\n"
        ),
    }
}

fn parse_targets(raw: &str) -> Vec<(String, String)> {
    raw.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (name, url) = item.split_once('=').unwrap_or_else(|| {
                panic!("{S3_TARGETS_ENV}: entry {item:?} is not of the form name=s3://bucket?...")
            });
            let (name, url) = (name.trim(), url.trim());
            assert!(
                !name.is_empty() && url.starts_with("s3://"),
                "{S3_TARGETS_ENV}: entry {item:?} is not of the form name=s3://bucket?..."
            );
            (name.to_string(), url.to_string())
        })
        .collect()
}

/// Append `/prefix` to the path part of an `s3://` URL, before any query.
fn with_prefix(url: &str, prefix: &str) -> String {
    let (loc, query) = match url.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (url, None),
    };
    let mut out = format!("{}/{prefix}", loc.trim_end_matches('/'));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[test]
fn support_parses_targets_and_appends_prefixes() {
    let t = parse_targets(
        " garage=s3://b?endpoint=http://127.0.0.1:39000&region=garage ; s3s=s3://b/base/;",
    );
    assert_eq!(
        t,
        vec![
            (
                "garage".to_string(),
                "s3://b?endpoint=http://127.0.0.1:39000&region=garage".to_string()
            ),
            ("s3s".to_string(), "s3://b/base/".to_string()),
        ]
    );
    assert_eq!(
        with_prefix(&t[0].1, "t-1"),
        "s3://b/t-1?endpoint=http://127.0.0.1:39000&region=garage"
    );
    assert_eq!(with_prefix(&t[1].1, "t-2"), "s3://b/base/t-2");
    assert_ne!(unique_prefix(), unique_prefix());
}
