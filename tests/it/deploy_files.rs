//! The deployment files: Dockerfile, docker-compose.yml and
//! docker-compose.postgres.yml (+ deploy/compose/), the Kubernetes manifests (deploy/kubernetes/) and the policies in
//! docs/IAM.md.
//!
//! There is no container engine here, so the files are (a) parsed and checked
//! for the wiring they must have, and (b) the commands docker-compose.yml runs
//! (the app, the sidecar, the restores) are run as written, with the locally
//! built binaries, against the local S3 test server: compose's variable
//! interpolation is applied, MinIO's endpoint/bucket/credentials become the
//! test server's, and container paths (volumes, bind mounts, secrets) become
//! directories of a temp dir, exactly as a container runtime would map them.

use crate::support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::harness::{self, sigterm, wait_for, wait_timeout};
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel))
        .unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}"))
}

fn s(y: &Yaml) -> String {
    match y {
        Yaml::String(v) | Yaml::Real(v) => v.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn strs(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(a) => a.iter().map(s).collect(),
        Yaml::BadValue | Yaml::Null => Vec::new(),
        other => panic!("expected a list, got {other:?}"),
    }
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash()
        .map(|h| h.keys().map(s).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// docker compose's variable interpolation
// ---------------------------------------------------------------------------

/// `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:?error}`, `${VAR?error}`, as docker compose applies them to every
/// value of the file.
fn interpolate(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(a) = after.strip_prefix('{') {
            let end = a
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {text:?}"))?;
            let expr = &a[..end];
            let name_end = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            let (name, op) = expr.split_at(name_end);
            let val = vars.get(name).cloned();
            let v = match op {
                "" => val.unwrap_or_default(),
                _ if op.starts_with(":-") => {
                    val.filter(|v| !v.is_empty()).unwrap_or(op[2..].into())
                }
                _ if op.starts_with('-') => val.unwrap_or(op[1..].into()),
                _ if op.starts_with(":?") => val.filter(|v| !v.is_empty()).ok_or_else(|| {
                    format!("required variable {name} is missing a value: {}", &op[2..])
                })?,
                _ if op.starts_with('?') => val.ok_or_else(|| {
                    format!("required variable {name} is missing a value: {}", &op[1..])
                })?,
                _ => return Err(format!("unsupported interpolation ${{{expr}}}")),
            };
            out.push_str(&v);
            rest = &a[end + 1..];
        } else {
            let n = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if n == 0 {
                out.push('$');
            } else {
                out.push_str(vars.get(&after[..n]).map(String::as_str).unwrap_or(""));
            }
            rest = &after[n..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn interpolate_yaml(y: &Yaml, vars: &BTreeMap<String, String>) -> Result<Yaml, String> {
    Ok(match y {
        Yaml::String(v) => Yaml::String(interpolate(v, vars)?),
        Yaml::Array(a) => Yaml::Array(
            a.iter()
                .map(|x| interpolate_yaml(x, vars))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Hash(h) => {
            let mut n = yaml_rust2::yaml::Hash::new();
            for (k, v) in h {
                n.insert(k.clone(), interpolate_yaml(v, vars)?);
            }
            Yaml::Hash(n)
        }
        other => other.clone(),
    })
}

/// A compose file as compose sees it with these variables set.
fn compose_file(rel: &str, vars: &[(&str, &str)]) -> Result<Yaml, String> {
    let vars = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: one document");
    interpolate_yaml(&docs[0], &vars)
}

/// docker-compose.yml (SQLite) as compose sees it with these variables set.
fn compose(vars: &[(&str, &str)]) -> Result<Yaml, String> {
    compose_file("docker-compose.yml", vars)
}

/// docker-compose.postgres.yml as compose sees it with these variables set.
fn compose_pg(vars: &[(&str, &str)]) -> Result<Yaml, String> {
    compose_file("docker-compose.postgres.yml", vars)
}

/// The variables a compose file's values refer to (`${VAR…}`, `$VAR`; not
/// `$$`, nor comments, which compose does not interpolate).
fn compose_file_vars(rel: &str) -> std::collections::BTreeSet<String> {
    fn walk(y: &Yaml, out: &mut std::collections::BTreeSet<String>) {
        match y {
            Yaml::String(v) => {
                let mut rest = v.as_str();
                while let Some(i) = rest.find('$') {
                    let after = &rest[i + 1..];
                    if let Some(a) = after.strip_prefix('$') {
                        rest = a;
                        continue;
                    }
                    let a = after.strip_prefix('{').unwrap_or(after);
                    let n = a
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(a.len());
                    if n > 0 {
                        out.insert(a[..n].to_string());
                    }
                    rest = &a[n..];
                }
            }
            Yaml::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Yaml::Hash(h) => h.iter().for_each(|(k, v)| {
                walk(k, out);
                walk(v, out)
            }),
            _ => {}
        }
    }
    let mut out = std::collections::BTreeSet::new();
    for d in yaml_docs(rel) {
        walk(&d, &mut out);
    }
    out
}

/// An age identity that pins the test shipper's verifying key (restores in
/// these tests run with a cleared environment: the pin is all they trust).
fn pinned_keygen(dir: &Path) -> (PathBuf, String) {
    harness::keygen_with(dir, &["--pin", harness::TEST_VERIFY_KEY])
}

/// The test shipper's signing key as a file (the compose secret).
fn signing_key_file(dir: &Path) -> PathBuf {
    let p = dir.join("offsite-signing.key");
    std::fs::write(&p, harness::TEST_SIGNING_KEY).unwrap();
    p
}

const TEST_RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// The secrets docker-compose.yml requires (it has no default passwords).
const COMPOSE_SECRETS: &[(&str, &str)] = &[
    ("MINIO_ROOT_PASSWORD", "test-minio-root-password"),
    ("OFFSITE_SHIPPER_SECRET_KEY", "test-shipper-secret"),
    ("OFFSITE_RESTORE_SECRET_KEY", "test-restore-secret"),
];

/// The secrets docker-compose.postgres.yml requires: its own MinIO's root
/// password and the PostgreSQL ones, none of the SQLite file's.
const PG_COMPOSE_SECRETS: &[(&str, &str)] = &[
    ("MINIO_ROOT_PASSWORD", "test-minio-root-password"),
    ("POSTGRES_PASSWORD", "test-postgres-superuser-password"),
    ("OFFSITE_PG_PASSWORD", "test-pg-replication-password"),
    ("OFFSITE_PG_SHIPPER_SECRET_KEY", "test-pg-shipper-secret"),
    ("OFFSITE_PG_RESTORE_SECRET_KEY", "test-pg-restore-secret"),
];

/// Every variable docker-compose.yml refers to: exactly those it had before
/// the PostgreSQL services existed (an existing SQLite deployment's .env
/// keeps working unchanged).
const COMPOSE_VARS: &[&str] = &[
    "MINIO_ROOT_PASSWORD",
    "MINIO_ROOT_USER",
    "OFFSITE_AGE_RECIPIENT",
    "OFFSITE_IDENTITY_FILE",
    "OFFSITE_RESTORE_ACCESS_KEY",
    "OFFSITE_RESTORE_SECRET_KEY",
    "OFFSITE_SHIPPER_ACCESS_KEY",
    "OFFSITE_SHIPPER_SECRET_KEY",
    "OFFSITE_SIGNING_KEY_FILE",
];

fn compose_default() -> Yaml {
    let mut vars = vec![
        ("OFFSITE_AGE_RECIPIENT", TEST_RECIPIENT),
        ("OFFSITE_IDENTITY_FILE", "/nonexistent/identity.txt"),
    ];
    vars.extend_from_slice(COMPOSE_SECRETS);
    compose(&vars).unwrap()
}

/// docker-compose.postgres.yml with its own variables only (none of the
/// SQLite file's: it stands alone).
fn compose_pg_default() -> Yaml {
    let mut vars = vec![
        ("OFFSITE_AGE_RECIPIENT", TEST_RECIPIENT),
        ("OFFSITE_IDENTITY_FILE", "/nonexistent/identity.txt"),
    ];
    vars.extend_from_slice(PG_COMPOSE_SECRETS);
    compose_pg(&vars).unwrap()
}

fn service<'a>(c: &'a Yaml, name: &str) -> &'a Yaml {
    let svc = &c["services"][name];
    assert!(
        svc.is_hash(),
        "no service {name:?} in {:?}",
        keys(&c["services"])
    );
    svc
}

fn env(svc: &Yaml) -> BTreeMap<String, String> {
    match &svc["environment"] {
        Yaml::Hash(h) => h.iter().map(|(k, v)| (s(k), s(v))).collect(),
        Yaml::Array(a) => a
            .iter()
            .map(|e| {
                let e = s(e);
                let (k, v) = e.split_once('=').expect("KEY=VALUE");
                (k.to_string(), v.to_string())
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Short-syntax volumes: (source, target, read_only).
fn volumes(svc: &Yaml) -> Vec<(String, String, bool)> {
    strs(&svc["volumes"])
        .iter()
        .map(|v| {
            let p: Vec<&str> = v.split(':').collect();
            assert!(p.len() >= 2, "volume {v:?}: expected SOURCE:TARGET[:ro]");
            (p[0].to_string(), p[1].to_string(), p.get(2) == Some(&"ro"))
        })
        .collect()
}

fn depends_on(svc: &Yaml) -> BTreeMap<String, String> {
    match &svc["depends_on"] {
        Yaml::Hash(h) => h
            .iter()
            .map(|(k, v)| {
                let c = &v["condition"];
                (
                    s(k),
                    if c.is_badvalue() {
                        "service_started".into()
                    } else {
                        s(c)
                    },
                )
            })
            .collect(),
        Yaml::Array(a) => a.iter().map(|k| (s(k), "service_started".into())).collect(),
        _ => BTreeMap::new(),
    }
}

/// The value following `flag` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// `${VAR}` references in offsite's config syntax (outside comments).
fn config_vars(text: &str) -> Vec<String> {
    let mut v = Vec::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("${") {
        let end = rest[i..].find('}').expect("terminated ${") + i;
        v.push(rest[i + 2..end].to_string());
        rest = &rest[end..];
    }
    v.sort();
    v.dedup();
    v
}

/// The `mc …` lines of the createbucket script.
fn mc_lines(c: &Yaml) -> Vec<Vec<String>> {
    let script = strs(&service(c, "createbucket")["command"]).join("\n");
    script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("mc "))
        .map(|l| {
            l.split_whitespace()
                .take_while(|w| *w != "||")
                .map(|w| w.trim_matches('"').to_string())
                .collect()
        })
        .collect()
}

fn dockerfile_entrypoint() -> Vec<String> {
    let df = read("Dockerfile");
    let line = df
        .lines()
        .rfind(|l| l.starts_with("ENTRYPOINT"))
        .expect("Dockerfile has an ENTRYPOINT");
    serde_json::from_str(line.trim_start_matches("ENTRYPOINT").trim())
        .expect("ENTRYPOINT in exec form, a JSON array")
}

/// The program and arguments a service runs: entrypoint (the service's or
/// the image's) followed by its command.
fn service_argv(svc: &Yaml) -> Vec<String> {
    assert!(
        matches!(svc["command"], Yaml::Array(_)),
        "commands are in exec form (a list), so no shell is involved: {:?}",
        svc["command"]
    );
    let mut argv = match &svc["entrypoint"] {
        Yaml::BadValue => dockerfile_entrypoint(),
        e => strs(e),
    };
    argv.extend(strs(&svc["command"]));
    argv
}

// ---------------------------------------------------------------------------
// (a) static checks
// ---------------------------------------------------------------------------

#[test]
fn compose_file_has_the_services_volumes_and_wiring() {
    let c = compose_default();
    let svcs = keys(&c["services"]);
    for want in [
        "minio",
        "createbucket",
        "app",
        "offsite",
        "restore",
        "recover",
    ] {
        assert!(
            svcs.contains(&want.to_string()),
            "service {want} missing: {svcs:?}"
        );
    }
    assert_eq!(keys(&c["volumes"]), ["minio-data", "app-data", "restored"]);
    assert_eq!(
        keys(&c["secrets"]),
        ["offsite-identity", "offsite-signing-key"]
    );

    // MinIO, with a health check the bucket job waits for.
    let minio = service(&c, "minio");
    assert!(
        s(&minio["image"]).contains("minio/minio:RELEASE."),
        "a pinned MinIO release"
    );
    assert_eq!(
        strs(&minio["healthcheck"]["test"]),
        ["CMD", "mc", "ready", "local"]
    );
    let cb = service(&c, "createbucket");
    assert!(s(&cb["image"]).contains("minio/mc:RELEASE."));
    assert_eq!(depends_on(cb)["minio"], "service_healthy");

    // The bucket job: the bucket and the two users the other services use.
    let mc = mc_lines(&c);
    let bucket = mc
        .iter()
        .find(|l| l[1] == "mb")
        .and_then(|l| l.last())
        .and_then(|t| t.strip_prefix("local/"))
        .expect("mc mb local/BUCKET")
        .to_string();
    let cb_env = env(cb);
    let user = |access_var: &str| -> (String, String, String) {
        let add = mc
            .iter()
            .find(|l| l[1..4] == ["admin", "user", "add"] && l[5] == format!("${access_var}"))
            .unwrap_or_else(|| panic!("mc admin user add for ${access_var}: {mc:?}"));
        let secret_var = add[6].trim_start_matches('$');
        let attach = mc
            .iter()
            .find(|l| {
                l[1..4] == ["admin", "policy", "attach"]
                    && l.last() == Some(&format!("${access_var}"))
            })
            .unwrap_or_else(|| panic!("mc admin policy attach … --user ${access_var}"));
        (
            cb_env[access_var].clone(),
            cb_env[secret_var].clone(),
            attach[5].clone(),
        )
    };
    let (ship_key, ship_secret, ship_policy) = user("SHIPPER_ACCESS_KEY");
    let (rest_key, rest_secret, rest_policy) = user("RESTORE_ACCESS_KEY");
    assert_ne!(ship_key, rest_key);
    assert_eq!(
        (ship_policy.as_str(), rest_policy.as_str()),
        ("offsite-shipper", "offsite-restore")
    );
    // The policy files the job loads exist in the mounted directory.
    let mounts = volumes(cb);
    for l in mc
        .iter()
        .filter(|l| l[1..4] == ["admin", "policy", "create"])
    {
        assert!(
            [ship_policy.as_str(), rest_policy.as_str()].contains(&l[5].as_str()),
            "{l:?}"
        );
        let file = &l[6];
        let (src, tgt, _) = mounts
            .iter()
            .find(|(_, t, _)| file.starts_with(&format!("{t}/")))
            .unwrap_or_else(|| panic!("{file} is not in a mounted directory"));
        let host = Path::new(ROOT).join(src).join(&file[tgt.len() + 1..]);
        let _: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&host).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", host.display()));
    }

    // The application writes /data/app.db on the shared volume.
    let app = service(&c, "app");
    let app_argv = service_argv(app);
    assert_eq!(app_argv[0], "offsite-workload");
    assert_eq!(app_argv[1], "/data/app.db");
    assert_eq!(
        volumes(app),
        [(String::from("app-data"), String::from("/data"), false)]
    );

    // The sidecar: same volume, the config file, the listener, the shipper's
    // credentials, recipients only.
    let off = service(&c, "offsite");
    let argv = service_argv(off);
    assert_eq!(argv[..2], ["offsite", "replicate"]);
    let listen = flag(&argv, "--listen").expect("replicate --listen");
    let port = listen.rsplit(':').next().unwrap();
    assert_eq!(strs(&off["ports"]), [format!("127.0.0.1:{port}:{port}")]);
    let e = env(off);
    assert_eq!(e["AWS_ACCESS_KEY_ID"], ship_key);
    assert_eq!(e["AWS_SECRET_ACCESS_KEY"], ship_secret);
    assert_eq!(e["OFFSITE_S3_ENDPOINT"], "http://minio:9000");
    assert_eq!(e["OFFSITE_BUCKET"], bucket);
    assert_eq!(e["OFFSITE_AGE_RECIPIENT"], TEST_RECIPIENT);
    assert!(e.contains_key("AWS_REGION"));
    let deps = depends_on(off);
    assert_eq!(deps["createbucket"], "service_completed_successfully");
    assert_eq!(deps["app"], "service_started");
    assert_eq!(
        strs(&off["secrets"]),
        ["offsite-signing-key"],
        "the sidecar sees its signing key and never the identity"
    );
    assert_eq!(
        flag(&service_argv(off), "--signing-key-file"),
        Some("/run/secrets/offsite-signing-key")
    );
    assert!(volumes(off).contains(&("app-data".into(), "/data".into(), false)));
    assert!(
        s(&off["stop_grace_period"])
            .trim_end_matches('s')
            .parse::<u64>()
            .unwrap()
            > 60,
        "longer than offsite's 60s shutdown timeout"
    );

    // Every service that mounts the config provides its ${VAR}s.
    for name in ["offsite", "restore", "recover"] {
        let svc = service(&c, name);
        let argv = service_argv(svc);
        let cfg = flag(&argv, "--config").expect("--config");
        let (src, _, ro) = volumes(svc)
            .into_iter()
            .find(|(_, t, _)| t == cfg)
            .unwrap_or_else(|| panic!("{name}: {cfg} is not mounted"));
        assert!(ro, "{name}: config mounted read-only");
        assert_eq!(src, "./deploy/compose/offsite.toml");
        let e = env(svc);
        for v in config_vars(&read(&src)) {
            assert!(
                e.contains_key(&v),
                "{name}: the config uses ${{{v}}}, not in its environment"
            );
        }
        assert!(
            !read(&src).contains("age-identity"),
            "the config holds no identity"
        );
    }

    // The restores: profiles, the restore user, the identity as a secret.
    for name in ["restore", "recover"] {
        let svc = service(&c, name);
        assert_eq!(strs(&svc["profiles"]), [name]);
        let e = env(svc);
        assert_eq!(e["AWS_ACCESS_KEY_ID"], rest_key);
        assert_eq!(e["AWS_SECRET_ACCESS_KEY"], rest_secret);
        assert_eq!(e["OFFSITE_BUCKET"], bucket);
        assert_eq!(strs(&svc["secrets"]), ["offsite-identity"]);
        let argv = service_argv(svc);
        assert_eq!(argv[..2], ["offsite", "restore"]);
        assert_eq!(
            flag(&argv, "--age-identity"),
            Some("/run/secrets/offsite-identity")
        );
    }
    let rec = service_argv(service(&c, "recover"));
    assert_eq!(flag(&rec, "-o"), Some("/data/app.db"));
    assert!(
        rec.contains(&"--if-db-not-exists".into()) && rec.contains(&"--if-replica-exists".into())
    );
    assert!(volumes(service(&c, "recover")).contains(&("app-data".into(), "/data".into(), false)));
    assert_eq!(
        flag(&service_argv(service(&c, "restore")), "-o"),
        Some("/restore/app.db")
    );

    // Services built from this repository's image.
    for name in ["app", "offsite", "restore", "recover"] {
        let svc = service(&c, name);
        assert_eq!(s(&svc["image"]), "offsite:local");
        assert_eq!(s(&svc["build"]), ".");
    }

    // Encryption is never off by accident: no recipient, no compose.
    let mut vars = COMPOSE_SECRETS.to_vec();
    let err = compose(&vars).unwrap_err();
    assert!(err.contains("OFFSITE_AGE_RECIPIENT"), "{err}");
    // No default password either: each secret missing (or empty) stops
    // compose with a message naming it.
    vars.push(("OFFSITE_AGE_RECIPIENT", TEST_RECIPIENT));
    for (missing, _) in COMPOSE_SECRETS {
        for empty in [false, true] {
            let vars: Vec<(&str, &str)> = vars
                .iter()
                .filter_map(|(k, v)| match (k == missing, empty) {
                    (false, _) => Some((*k, *v)),
                    (true, true) => Some((*k, "")),
                    (true, false) => None,
                })
                .collect();
            let err = compose(&vars).unwrap_err();
            assert!(err.contains(missing), "{missing}: {err}");
        }
    }
    // Every password and secret key in the file comes from a required variable.
    let text = read("docker-compose.yml");
    for l in text.lines().map(str::trim) {
        let Some((k, v)) = l.split_once(": ") else {
            continue;
        };
        if k.contains("PASSWORD") || k.contains("SECRET") {
            assert!(
                v.starts_with("${") && v.contains(":?") && !v.contains(":-"),
                "{l}: a secret without a required variable"
            );
        }
    }
    for (_, v) in COMPOSE_SECRETS {
        assert!(!text.contains(v));
    }
}

#[test]
fn dockerfile_is_multistage_nonroot_with_offsite_as_entrypoint() {
    let df = read("Dockerfile");
    let froms: Vec<&str> = df.lines().filter(|l| l.starts_with("FROM ")).collect();
    // build, the PostgreSQL variant (a named stage), and the runtime last:
    // the last stage is what a plain `docker build .` makes.
    assert_eq!(froms.len(), 3, "{froms:?}");
    assert!(
        froms[0].starts_with("FROM rust:") && froms[0].ends_with(" AS build"),
        "{}",
        froms[0]
    );
    assert!(froms[1].ends_with(" AS postgres"), "{}", froms[1]);
    let froms = [froms[0], froms[2]];
    assert!(
        froms[1].contains("distroless") || froms[1].contains("-slim"),
        "small runtime image: {}",
        froms[1]
    );
    // The dependency layer is built before the sources are copied.
    let dep_build = df.find("cargo build --release --locked").unwrap();
    let copy_src = df.find("COPY src src").unwrap();
    assert!(df.find("COPY Cargo.toml Cargo.lock").unwrap() < dep_build && dep_build < copy_src);
    assert!(df[copy_src..].contains("cargo build --release --locked"));
    // Both binaries land in the runtime image.
    let runtime = &df[df.find(froms[1]).unwrap()..];
    let copy_bins = runtime
        .lines()
        .find(|l| l.starts_with("COPY --from=build") && l.contains("/offsite "))
        .expect("COPY of the binaries");
    assert!(copy_bins.contains("offsite-workload"), "{copy_bins}");
    // Non-root, numeric (Kubernetes runAsNonRoot can only check a number).
    let user = runtime
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("USER");
    let (uid, gid) = user[5..].trim().split_once(':').expect("USER uid:gid");
    let (uid, gid): (u32, u32) = (uid.parse().unwrap(), gid.parse().unwrap());
    assert!(uid != 0 && gid != 0);
    assert_eq!(
        uid,
        k8s_run_as_user(),
        "the Kubernetes example runs as the image's user"
    );
    assert_eq!(dockerfile_entrypoint(), ["offsite"]);
    // The build context lets through what the build COPYs.
    let ignore = read(".dockerignore");
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(
        ignore.lines().any(|l| l == "*"),
        ".dockerignore is an allowlist"
    );
    for l in df
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(allowed.contains(src), "{src} is excluded by .dockerignore");
        }
    }
}

fn k8s_docs() -> Vec<(String, Yaml)> {
    let mut out = Vec::new();
    let dir = Path::new(ROOT).join("deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    for f in files {
        for d in yaml_docs(&format!("deploy/kubernetes/{f}")) {
            out.push((f.clone(), d));
        }
    }
    out
}

fn k8s_kind<'a>(docs: &'a [(String, Yaml)], kind: &str, name: &str) -> &'a Yaml {
    &docs
        .iter()
        .find(|(_, d)| s(&d["kind"]) == kind && s(&d["metadata"]["name"]) == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
        .1
}

fn k8s_pod(docs: &[(String, Yaml)]) -> Yaml {
    k8s_kind(docs, "StatefulSet", "app")["spec"]["template"]["spec"].clone()
}

fn k8s_run_as_user() -> u32 {
    k8s_pod(&k8s_docs())["securityContext"]["runAsUser"]
        .as_i64()
        .expect("runAsUser") as u32
}

fn container<'a>(list: &'a Yaml, name: &str) -> &'a Yaml {
    list.as_vec()
        .and_then(|v| v.iter().find(|c| s(&c["name"]) == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// (volume name, mount path) of a container.
fn mounts(c: &Yaml) -> Vec<(String, String)> {
    c["volumeMounts"]
        .as_vec()
        .map(|v| {
            v.iter()
                .map(|m| (s(&m["name"]), s(&m["mountPath"])))
                .collect()
        })
        .unwrap_or_default()
}

fn env_names(c: &Yaml) -> Vec<String> {
    c["env"]
        .as_vec()
        .map(|v| v.iter().map(|e| s(&e["name"])).collect())
        .unwrap_or_default()
}

fn secret_refs(c: &Yaml) -> Vec<String> {
    c["envFrom"]
        .as_vec()
        .map(|v| v.iter().map(|e| s(&e["secretRef"]["name"])).collect())
        .unwrap_or_default()
}

#[test]
fn kubernetes_pod_has_sidecar_init_restore_and_keeps_the_identity_out_of_the_sidecar() {
    let docs = k8s_docs();
    // kustomization.yaml lists every other manifest.
    let kust = &docs
        .iter()
        .find(|(f, _)| f == "kustomization.yaml")
        .expect("kustomization.yaml")
        .1;
    let mut listed = strs(&kust["resources"]);
    listed.sort();
    let mut files: Vec<String> = docs
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    files.dedup();
    assert_eq!(listed, files);

    let pod = k8s_pod(&docs);
    assert_eq!(
        k8s_kind(&docs, "StatefulSet", "app")["spec"]["replicas"].as_i64(),
        Some(1)
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let volume = |name: &str| -> Yaml {
        pod["volumes"]
            .as_vec()
            .and_then(|v| v.iter().find(|x| s(&x["name"]) == name).cloned())
            .unwrap_or_else(|| Yaml::BadValue)
    };
    let inits = &pod["initContainers"];
    let restore = container(inits, "restore");
    let sidecar = container(inits, "offsite");
    let app = container(&pod["containers"], "app");
    assert_eq!(
        inits
            .as_vec()
            .unwrap()
            .iter()
            .map(|c| s(&c["name"]))
            .collect::<Vec<_>>(),
        ["restore", "offsite"],
        "restore runs before the sidecar starts"
    );
    assert!(
        restore["restartPolicy"].is_badvalue(),
        "restore is a plain init container"
    );
    assert_eq!(
        s(&sidecar["restartPolicy"]),
        "Always",
        "offsite is a native sidecar"
    );
    for c in [restore, sidecar, app] {
        assert!(mounts(c).contains(&("data".into(), "/data".into())));
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false)
        );
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true)
        );
    }

    // Credentials: one Secret per role (docs/IAM.md). The sidecar has the
    // shipper's; the init container the read-only restore role's, never the
    // shipper's (it only reads); the app none.
    let shipper = k8s_kind(&docs, "Secret", "offsite-s3");
    let restorer = k8s_kind(&docs, "Secret", "offsite-s3-restore");
    for secret in [shipper, restorer] {
        assert_eq!(
            keys(&secret["stringData"]),
            ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
        );
    }
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert_ne!(
            s(&shipper["stringData"][k]),
            s(&restorer["stringData"][k]),
            "{k}: the restore role has credentials of its own"
        );
    }
    assert!(s(&restorer["stringData"]["AWS_ACCESS_KEY_ID"]).contains("RESTORE"));
    assert_eq!(secret_refs(restore), ["offsite-s3-restore"]);
    assert_eq!(secret_refs(sidecar), ["offsite-s3"]);
    assert!(secret_refs(app).is_empty() && app["env"].is_badvalue());

    // The identity: an optional Secret volume mounted into the init container
    // only; no secret volume at all in the sidecar or the app.
    let id_mount = flag(&strs(&restore["args"]), "--age-identity")
        .unwrap()
        .to_string();
    let (id_vol, id_dir) = mounts(restore)
        .into_iter()
        .find(|(_, p)| id_mount.starts_with(&format!("{p}/")))
        .expect("the identity file is on a mounted volume");
    let idv = volume(&id_vol);
    assert_eq!(idv["secret"]["optional"].as_bool(), Some(true), "{idv:?}");
    assert!(id_dir != "/data");
    for c in [sidecar, app] {
        for (v, p) in mounts(c) {
            // The sidecar's one secret is its signing key.
            let signing =
                volume(&v)["secret"]["secretName"].as_str() == Some("offsite-signing-key");
            assert!(
                volume(&v)["secret"].is_badvalue() || (signing && s(&c["name"]) == "offsite"),
                "{} mounts secret volume {v} at {p}",
                s(&c["name"])
            );
        }
    }

    // The init container's command.
    let rargs = strs(&restore["args"]);
    assert_eq!(rargs[0], "restore");
    assert_eq!(flag(&rargs, "-o"), Some("/data/app.db"));
    assert!(
        rargs.contains(&"--if-db-not-exists".into())
            && rargs.contains(&"--if-replica-exists".into())
    );

    // The sidecar: the ConfigMap's config, recipients only, the listener
    // on the pod's loopback, probed for liveness from inside the pod.
    let sargs = strs(&sidecar["args"]);
    assert_eq!(sargs[0], "replicate");
    let cfg_path = flag(&sargs, "--config").unwrap();
    let (cfg_vol, cfg_dir) = mounts(sidecar)
        .into_iter()
        .find(|(_, p)| cfg_path.starts_with(&format!("{p}/")))
        .expect("config on a mounted volume");
    let cm_name = s(&volume(&cfg_vol)["configMap"]["name"]);
    let cm = k8s_kind(&docs, "ConfigMap", &cm_name);
    let cfg = s(&cm["data"][&cfg_path[cfg_dir.len() + 1..]]);
    assert!(
        !cfg.contains("age-identity"),
        "no identity in the sidecar's config"
    );
    let rfile = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("age-recipients-file = "))
        .expect("age-recipients-file")
        .trim_matches('"');
    assert!(
        !s(&cm["data"][&rfile[cfg_dir.len() + 1..]]).is_empty(),
        "{rfile} in the ConfigMap"
    );
    let names = env_names(sidecar);
    for v in config_vars(&cfg) {
        assert!(
            names.contains(&v),
            "the config uses ${{{v}}}; the sidecar's env lacks it"
        );
    }
    // The listener stays inside the pod (docs/DEPLOY.md, "Keeping the HTTP
    // port inside the pod"): loopback, no container port, no Service port,
    // no scrape annotations pointing at it.
    let listen = flag(&sargs, "--listen").unwrap();
    assert!(
        listen.starts_with("127.0.0.1:"),
        "the sidecar's listener must be on loopback, not {listen}"
    );
    assert!(
        sidecar["ports"].is_badvalue(),
        "a port for a loopback listener"
    );
    let svc = k8s_kind(&docs, "Service", "app");
    assert!(
        svc["spec"]["ports"].is_badvalue(),
        "the Service exposes a port of the loopback listener: {:?}",
        svc["spec"]["ports"]
    );
    let annotations =
        &k8s_kind(&docs, "StatefulSet", "app")["spec"]["template"]["metadata"]["annotations"];
    assert!(
        keys(annotations)
            .iter()
            .all(|k| !k.starts_with("prometheus.io/")),
        "scrape annotations for a loopback listener: {annotations:?}"
    );
    // Liveness: an exec probe that asks the daemon over loopback (the
    // kubelet's httpGet and tcpSocket probes go to the pod IP).
    let live = &sidecar["livenessProbe"];
    assert!(
        live["httpGet"].is_badvalue() && live["tcpSocket"].is_badvalue(),
        "{live:?}"
    );
    let probe = strs(&live["exec"]["command"]);
    assert_eq!(probe[..2], ["offsite", "sync"], "{probe:?}");
    assert_eq!(flag(&probe, "--listen"), Some(listen), "{probe:?}");
    assert!(
        !probe.contains(&"--wait".into()),
        "the probe must not wait for the bucket"
    );
    assert!(
        cfg.contains(&format!("path = \"{}\"", probe[2])),
        "the probe names a database the sidecar replicates: {probe:?}"
    );
    assert!(
        sidecar["readinessProbe"].is_badvalue(),
        "backup lag must not take the app out of service"
    );
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 60);
    // The init container restores from where the sidecar ships.
    assert!(cfg.contains("path = \"/data/app.db\""));
    let url_prefix = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("url = "))
        .unwrap()
        .trim_matches('"')
        .replace("${", "$(")
        .replace('}', ")");
    assert_eq!(rargs[1], url_prefix);
    assert_eq!(env_names(restore), names);
}

// ---------------------------------------------------------------------------
// PostgreSQL: the image variant, the compose services, the Kubernetes example
// ---------------------------------------------------------------------------

/// The Dockerfile's stage `NAME`: its lines, from its FROM to the next FROM.
fn dockerfile_stage(name: &str) -> Vec<String> {
    let df = read("Dockerfile");
    let mut out = Vec::new();
    let mut inside = false;
    for l in df.lines() {
        if l.starts_with("FROM ") {
            inside = l.ends_with(&format!(" AS {name}"));
        }
        if inside {
            out.push(l.to_string());
        }
    }
    assert!(!out.is_empty(), "Dockerfile has no stage {name}");
    out
}

/// The PostgreSQL major version of an image reference `postgres:15-bookworm`.
fn pg_major_of_image(image: &str) -> u32 {
    let tag = image
        .strip_prefix("postgres:")
        .unwrap_or_else(|| panic!("{image}: not the official postgres image"));
    tag.split(['.', '-'])
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{image}: tag without a major version"))
}

/// offsite restore's --start, restore drills and POSTGRES.md: PostgreSQL 15.
const PG_MAJOR: u32 = 15;

/// A DSN carries no password: not as `user:password@` nor as `password=`.
fn assert_dsn_without_password(dsn: &str) {
    let d = dsn.to_ascii_lowercase();
    assert!(!d.contains("password"), "{dsn}: a password in the DSN");
    let rest = d
        .strip_prefix("postgres://")
        .or_else(|| d.strip_prefix("postgresql://"))
        .unwrap_or_else(|| panic!("{dsn}: expected a postgres:// URL"));
    let userinfo = rest.split_once('@').map(|(u, _)| u).unwrap_or("");
    assert!(
        !userinfo.contains(':'),
        "{dsn}: a password in the DSN's user part"
    );
    assert!(!userinfo.is_empty(), "{dsn}: name the replication role");
}

/// `user@` of a postgres:// DSN.
fn dsn_user(dsn: &str) -> String {
    dsn.split_once("://")
        .unwrap()
        .1
        .split_once('@')
        .unwrap()
        .0
        .to_string()
}

/// `-c name=value` settings of a postgres command line.
fn pg_settings(argv: &[String]) -> BTreeMap<String, String> {
    argv.windows(2)
        .filter(|w| w[0] == "-c")
        .map(|w| {
            let (k, v) = w[1].split_once('=').expect("-c name=value");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// What the server needs for offsite pg stream, and the slot's bound.
fn check_pg_settings(what: &str, argv: &[String]) {
    assert_eq!(argv[0], "postgres", "{what}: {argv:?}");
    let set = pg_settings(argv);
    assert_eq!(
        set.get("wal_level").map(String::as_str),
        Some("replica"),
        "{what}"
    );
    let n = |k: &str| -> i64 {
        set.get(k)
            .unwrap_or_else(|| panic!("{what}: {k} not set"))
            .parse()
            .unwrap()
    };
    assert!(n("max_wal_senders") >= 2, "{what}: stream + base backup");
    assert!(n("max_replication_slots") >= 1, "{what}");
    // A bound on the WAL the slot may hold (PostgreSQL's default -1 is
    // none: an outage of the store would fill the disk).
    let keep = set
        .get("max_slot_wal_keep_size")
        .unwrap_or_else(|| panic!("{what}: max_slot_wal_keep_size not set"));
    assert!(
        keep.ends_with("GB") || keep.ends_with("MB") || keep.ends_with("TB"),
        "{what}: max_slot_wal_keep_size={keep}: give it a unit"
    );
    assert!(
        !keep.starts_with('-') && !keep.starts_with('0'),
        "{what}: {keep}"
    );
}

/// The init script: the role (REPLICATION LOGIN, nothing more), from the
/// password variable, and the pg_hba line for replication with SCRAM.
fn check_initdb_script(what: &str, text: &str, hba_addr: &str) {
    let sql: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.to_ascii_uppercase().starts_with("CREATE ROLE"))
        .collect();
    assert_eq!(
        sql,
        ["CREATE ROLE offsite WITH REPLICATION LOGIN PASSWORD :'pw';"],
        "{what}"
    );
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let up = code.to_ascii_uppercase();
    for bad in ["SUPERUSER", "GRANT ", "BYPASSRLS", "CREATEDB", "CREATEROLE"] {
        assert!(
            !up.contains(bad),
            "{what}: {bad}: the role needs REPLICATION only"
        );
    }
    assert!(
        text.contains("pw=\"${OFFSITE_PG_PASSWORD:?"),
        "{what}: the password from OFFSITE_PG_PASSWORD, required"
    );
    let hba = format!("host replication offsite {hba_addr} scram-sha-256");
    assert!(
        text.contains(&format!("'{hba}' >>\"$PGDATA/pg_hba.conf\"")),
        "{what}: {hba}"
    );
}

#[test]
fn dockerfile_postgres_stage_has_postgres_15_and_offsite() {
    let stage = dockerfile_stage("postgres");
    let from = stage[0].split_whitespace().nth(1).unwrap();
    assert_eq!(pg_major_of_image(from), PG_MAJOR, "{from}");
    assert!(
        from.ends_with("-bookworm"),
        "the build stage's Debian (glibc): {from}"
    );
    assert!(
        read("Dockerfile").contains("-slim-bookworm AS build"),
        "the build stage is bookworm too"
    );
    assert!(
        stage
            .iter()
            .any(|l| l == "COPY --from=build /out/bin/offsite /usr/local/bin/offsite"),
        "offsite at /usr/local/bin/offsite (the path restore_command names): {stage:?}"
    );
    assert!(
        stage.iter().any(|l| l.contains("ca-certificates")),
        "CA certificates for HTTPS to S3"
    );
    // Non-root, numeric: the official image's postgres user.
    let user = stage
        .iter()
        .rfind(|l| l.starts_with("USER "))
        .expect("USER in the postgres stage");
    assert_eq!(user, "USER 999:999");
    // It stays a PostgreSQL server image: no ENTRYPOINT/CMD of its own.
    assert!(
        !stage
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") || l.starts_with("CMD")),
        "{stage:?}"
    );
}

#[test]
fn compose_postgres_services_stream_with_a_replication_role_and_restore_with_the_variant() {
    let c = compose_pg_default();
    let secret = |k: &str| {
        PG_COMPOSE_SECRETS
            .iter()
            .find(|(n, _)| *n == k)
            .unwrap()
            .1
            .to_string()
    };

    // The file stands alone: its own S3 server, bucket job, secrets and
    // volumes; the server and the sidecar start with a plain `up` (no
    // profile), the restore only when run.
    assert_eq!(
        keys(&c["services"]),
        [
            "minio",
            "createbucket",
            "postgres",
            "offsite-postgres",
            "restore-postgres"
        ]
    );
    assert_eq!(
        keys(&c["volumes"]),
        ["minio-data", "pg-data", "pg-restored"]
    );
    assert_eq!(
        keys(&c["secrets"]),
        ["offsite-identity", "offsite-signing-key"]
    );
    let sqlite = compose_default();
    assert_ne!(
        s(&c["name"]),
        s(&sqlite["name"]),
        "a project of its own: its volumes and containers are not the SQLite example's"
    );
    let minio = service(&c, "minio");
    assert_eq!(
        s(&minio["image"]),
        s(&service(&sqlite, "minio")["image"]),
        "the same pinned MinIO release as docker-compose.yml"
    );
    assert_eq!(
        strs(&minio["healthcheck"]["test"]),
        ["CMD", "mc", "ready", "local"]
    );
    assert!(volumes(minio).contains(&("minio-data".into(), "/data".into(), false)));
    // Both examples can run side by side: no host port in common.
    let host_ports = |c: &Yaml| -> Vec<String> {
        c["services"]
            .as_hash()
            .unwrap()
            .values()
            .flat_map(|svc| strs(&svc["ports"]))
            .map(|p| p.rsplit_once(':').unwrap().0.to_string())
            .collect()
    };
    for p in host_ports(&c) {
        assert!(
            !host_ports(&sqlite).contains(&p),
            "host port {p} in both files"
        );
    }
    let cbs = service(&c, "createbucket");
    assert_eq!(
        s(&cbs["image"]),
        s(&service(&sqlite, "createbucket")["image"])
    );
    assert_eq!(depends_on(cbs)["minio"], "service_healthy");
    for name in ["postgres", "offsite-postgres"] {
        assert!(
            service(&c, name)["profiles"].is_badvalue(),
            "{name}: started by `docker compose -f docker-compose.postgres.yml up -d`"
        );
    }

    // The server: PostgreSQL 15, settings, passwords, the init script.
    let pg = service(&c, "postgres");
    let image = s(&pg["image"]);
    assert_eq!(pg_major_of_image(&image), PG_MAJOR);
    let argv = strs(&pg["command"]);
    check_pg_settings("compose postgres", &argv);
    let pe = env(pg);
    assert_eq!(pe["POSTGRES_PASSWORD"], secret("POSTGRES_PASSWORD"));
    assert_eq!(pe["OFFSITE_PG_PASSWORD"], secret("OFFSITE_PG_PASSWORD"));
    assert!(
        pe["POSTGRES_INITDB_ARGS"].contains("--auth-host=scram-sha-256"),
        "no trust for TCP connections"
    );
    let init = volumes(pg)
        .into_iter()
        .find(|(_, t, _)| t.starts_with("/docker-entrypoint-initdb.d/"))
        .expect("the init script in /docker-entrypoint-initdb.d");
    assert!(init.2, "mounted read-only");
    check_initdb_script("compose", &read(init.0.trim_start_matches("./")), "samenet");
    assert!(volumes(pg).contains(&("pg-data".into(), "/var/lib/postgresql/data".into(), false)));
    assert!(pg["healthcheck"]["test"].is_array());

    // The users createbucket makes for the PostgreSQL archive (and only
    // those: the SQLite users belong to docker-compose.yml).
    let mc = mc_lines(&c);
    let cb = env(service(&c, "createbucket"));
    let bucket = mc
        .iter()
        .find(|l| l[1] == "mb")
        .and_then(|l| l.last())
        .and_then(|t| t.strip_prefix("local/"))
        .expect("mc mb local/BUCKET")
        .to_string();
    assert_eq!(bucket, "offsite");
    let cb_mounts = volumes(service(&c, "createbucket"));
    let created: Vec<String> = mc
        .iter()
        .filter(|l| l[1..4] == ["admin", "policy", "create"])
        .map(|l| {
            let file = &l[6];
            let (src, tgt, _) = cb_mounts
                .iter()
                .find(|(_, t, _)| file.starts_with(&format!("{t}/")))
                .unwrap_or_else(|| panic!("{file} is not in a mounted directory"));
            let host = Path::new(ROOT).join(src).join(&file[tgt.len() + 1..]);
            let _: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&host).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", host.display()));
            l[5].clone()
        })
        .collect();
    assert_eq!(created, ["offsite-pg-shipper", "offsite-pg-restore"]);
    assert_eq!(
        mc.iter()
            .filter(|l| l[1..4] == ["admin", "user", "add"])
            .count(),
        2,
        "{mc:?}"
    );
    let policy_of = |access_var: &str| -> String {
        mc.iter()
            .find(|l| {
                l[1..4] == ["admin", "policy", "attach"]
                    && l.last() == Some(&format!("${access_var}"))
            })
            .unwrap_or_else(|| panic!("no policy attached to ${access_var}"))[5]
            .clone()
    };
    assert_eq!(policy_of("PG_SHIPPER_ACCESS_KEY"), "offsite-pg-shipper");
    assert_eq!(policy_of("PG_RESTORE_ACCESS_KEY"), "offsite-pg-restore");
    for (user, pass) in [
        ("PG_SHIPPER_ACCESS_KEY", "PG_SHIPPER_SECRET_KEY"),
        ("PG_RESTORE_ACCESS_KEY", "PG_RESTORE_SECRET_KEY"),
    ] {
        assert!(
            mc.iter().any(|l| l[1..4] == ["admin", "user", "add"]
                && l[5] == format!("${user}")
                && l[6] == format!("${pass}")),
            "mc admin user add ${user} ${pass}"
        );
    }
    let ship_key = cb["PG_SHIPPER_ACCESS_KEY"].clone();
    let rest_key = cb["PG_RESTORE_ACCESS_KEY"].clone();
    assert_ne!(ship_key, rest_key);
    assert_eq!(
        cb["PG_SHIPPER_SECRET_KEY"],
        secret("OFFSITE_PG_SHIPPER_SECRET_KEY")
    );
    assert_eq!(
        cb["PG_RESTORE_SECRET_KEY"],
        secret("OFFSITE_PG_RESTORE_SECRET_KEY")
    );
    // Not the SQLite example's users (one MinIO may serve both: the SQLite
    // sidecar cannot touch the PostgreSQL archive, nor the other way round).
    let sqlite_cb = env(service(&sqlite, "createbucket"));
    for k in [&ship_key, &rest_key] {
        assert!(
            ![
                sqlite_cb["SHIPPER_ACCESS_KEY"].as_str(),
                sqlite_cb["RESTORE_ACCESS_KEY"].as_str()
            ]
            .contains(&k.as_str()),
            "{k}"
        );
    }

    // The sidecar: offsite pg stream, no password in the DSN, PGPASSWORD
    // from the required variable, the signing key and the recipient, never
    // the identity.
    let side = service(&c, "offsite-postgres");
    assert_eq!(s(&side["image"]), "offsite:local");
    let argv = service_argv(side);
    assert_eq!(argv[..3], ["offsite", "pg", "stream"]);
    let dsn = flag(&argv, "--dsn").expect("--dsn");
    assert_dsn_without_password(dsn);
    assert_eq!(dsn_user(dsn), "offsite", "the role initdb-offsite.sh makes");
    assert!(
        dsn.contains("@postgres:5432/"),
        "{dsn}: the postgres service"
    );
    let se = env(side);
    assert_eq!(se["PGPASSWORD"], secret("OFFSITE_PG_PASSWORD"));
    assert_eq!(se["AWS_ACCESS_KEY_ID"], ship_key);
    assert_eq!(
        se["AWS_SECRET_ACCESS_KEY"],
        secret("OFFSITE_PG_SHIPPER_SECRET_KEY")
    );
    assert_eq!(flag(&argv, "--age-recipient"), Some(TEST_RECIPIENT));
    assert!(!argv.contains(&"--no-encryption".to_string()));
    assert_eq!(
        flag(&argv, "--signing-key-file"),
        Some("/run/secrets/offsite-signing-key")
    );
    assert_eq!(strs(&side["secrets"]), ["offsite-signing-key"]);
    for k in se.keys() {
        assert!(
            !k.contains("IDENTITY") && !k.contains("SIGNING_KEY"),
            "{k}: the sidecar gets its key as a secret file, and no identity"
        );
    }
    assert!(!argv.iter().any(|a| a.contains("identity")), "{argv:?}");
    assert!(volumes(side).is_empty(), "the sidecar needs no volume");
    let deps = depends_on(side);
    assert_eq!(deps["postgres"], "service_healthy");
    assert_eq!(deps["createbucket"], "service_completed_successfully");
    let url = se["OFFSITE_REPLICA_URL"].clone();
    assert!(url.starts_with("s3://offsite/postgres?"), "{url}");

    // The PostgreSQL policies: the prefix the URL names; restore reads only.
    let policy = |n: &str| -> serde_json::Value {
        serde_json::from_str(&read(&format!("deploy/compose/policies/{n}.json"))).unwrap()
    };
    for (n, p) in [
        ("pg-shipper", policy("pg-shipper")),
        ("pg-restore", policy("pg-restore")),
    ] {
        for st in p["Statement"].as_array().unwrap() {
            for r in st["Resource"].as_array().unwrap() {
                let r = r.as_str().unwrap();
                assert!(
                    r == "arn:aws:s3:::offsite" || r.starts_with("arn:aws:s3:::offsite/postgres/"),
                    "{n}: {r}"
                );
            }
            if let Some(c) = st["Condition"]["StringLike"]["s3:prefix"].as_array() {
                assert_eq!(c, &[serde_json::json!("postgres/pg/*")], "{n}");
            }
        }
        let a = actions(&p);
        if n == "pg-restore" {
            assert!(
                !a.iter()
                    .any(|x| x.starts_with("s3:Put") || x.starts_with("s3:Delete")),
                "{n}: {a:?}"
            );
        }
    }

    // The restore: the image variant, the identity, the restore user, --start
    // and a clean stop, into a directory of an empty volume.
    let r = service(&c, "restore-postgres");
    assert_eq!(strs(&r["profiles"]), ["restore-postgres"]);
    assert_eq!(s(&r["image"]), "offsite:postgres");
    assert_eq!(s(&r["build"]["context"]), ".");
    assert_eq!(s(&r["build"]["target"]), "postgres");
    dockerfile_stage("postgres");
    assert_eq!(strs(&r["entrypoint"]), ["/bin/sh", "-euc"]);
    let script = strs(&r["command"]).join("\n");
    let lines: Vec<Vec<String>> = script
        .lines()
        .map(|l| shell_words::split(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .filter(|w| !w.is_empty())
        .collect();
    assert_eq!(lines.len(), 2, "{script}");
    let rs = &lines[0];
    assert_eq!(rs[..2], ["offsite", "restore"]);
    assert_eq!(rs[2], "$OFFSITE_REPLICA_URL");
    assert_eq!(flag(rs, "-o"), Some("$PGDATA"));
    assert_eq!(
        flag(rs, "--age-identity"),
        Some("/run/secrets/offsite-identity")
    );
    assert!(
        rs.contains(&"--start".to_string()),
        "recover in the restore"
    );
    assert!(
        !rs.contains(&"--force".to_string()),
        "never over a data directory"
    );
    assert_eq!(
        lines[1],
        ["pg_ctl", "-D", "$PGDATA", "stop", "-m", "fast"],
        "a clean stop after --start"
    );
    assert_eq!(strs(&r["secrets"]), ["offsite-identity"]);
    let re = env(r);
    assert_eq!(
        re["OFFSITE_REPLICA_URL"], url,
        "restores from where the sidecar ships"
    );
    assert_eq!(re["AWS_ACCESS_KEY_ID"], rest_key);
    assert_eq!(
        re["AWS_SECRET_ACCESS_KEY"],
        secret("OFFSITE_PG_RESTORE_SECRET_KEY")
    );
    let vols = volumes(r);
    assert_eq!(vols.len(), 1, "{vols:?}");
    let (vol, mnt, ro) = &vols[0];
    assert_eq!(vol, "pg-restored");
    assert!(!ro);
    assert!(
        re["PGDATA"].starts_with(&format!("{mnt}/")),
        "PGDATA {} is a directory inside the volume {mnt} (offsite renames it into place)",
        re["PGDATA"]
    );
    // The identity reaches the restore only.
    for (name, svc) in c["services"].as_hash().unwrap() {
        let name = s(name);
        if strs(&svc["secrets"]).contains(&"offsite-identity".to_string()) {
            assert_eq!(name, "restore-postgres", "{name} mounts the identity");
        }
    }
    // No password or secret key of the PostgreSQL file has a default, and
    // encryption is never off by accident: each missing (or empty) stops
    // compose with a message naming it.
    let mut all = PG_COMPOSE_SECRETS.to_vec();
    all.push(("OFFSITE_AGE_RECIPIENT", TEST_RECIPIENT));
    for (missing, _) in &all {
        for empty in [false, true] {
            let vars: Vec<(&str, &str)> = all
                .iter()
                .filter_map(|(k, v)| match (k == missing, empty) {
                    (false, _) => Some((*k, *v)),
                    (true, true) => Some((*k, "")),
                    (true, false) => None,
                })
                .collect();
            let err = compose_pg(&vars).unwrap_err();
            assert!(err.contains(missing), "{missing}: {err}");
        }
    }
}

/// Compose interpolates every variable of a file before it applies
/// profiles, so a variable a file names is one every user of that file must
/// set. The two files stay apart: docker-compose.yml needs exactly what it
/// needed before PostgreSQL (no PostgreSQL variable: existing SQLite
/// deployments keep their .env), and docker-compose.postgres.yml none of the
/// SQLite ones.
#[test]
fn compose_files_need_only_their_own_variables() {
    let sqlite = compose_file_vars("docker-compose.yml");
    assert_eq!(
        sqlite.iter().map(String::as_str).collect::<Vec<_>>(),
        COMPOSE_VARS,
        "docker-compose.yml's variables"
    );
    let pg_vars = compose_file_vars("docker-compose.postgres.yml");
    let pg_only: Vec<&String> = pg_vars.difference(&sqlite).collect();
    for v in [
        "POSTGRES_PASSWORD",
        "OFFSITE_PG_PASSWORD",
        "OFFSITE_PG_SHIPPER_ACCESS_KEY",
        "OFFSITE_PG_SHIPPER_SECRET_KEY",
        "OFFSITE_PG_RESTORE_ACCESS_KEY",
        "OFFSITE_PG_RESTORE_SECRET_KEY",
    ] {
        assert!(
            pg_only.contains(&&v.to_string()),
            "{v}: a PostgreSQL variable only docker-compose.postgres.yml names"
        );
        assert!(!sqlite.contains(v), "docker-compose.yml names {v}");
    }
    // docker-compose.yml resolves with the SQLite secrets and the recipient
    // alone; nothing of PostgreSQL is left in it.
    let c = compose_default();
    for name in keys(&c["services"]) {
        assert!(
            !name.contains("postgres"),
            "docker-compose.yml: service {name}"
        );
        assert!(
            !strs(&c["services"][name.as_str()]["profiles"]).contains(&"postgres".to_string()),
            "{name}"
        );
    }
    assert!(!keys(&c["volumes"]).iter().any(|v| v.starts_with("pg-")));
    assert!(
        !mc_lines(&c).iter().flatten().any(|w| w.contains("pg")),
        "docker-compose.yml's createbucket makes no PostgreSQL users"
    );
    // docker-compose.postgres.yml names none of the SQLite variables, and
    // resolves with its own.
    for v in [
        "OFFSITE_SHIPPER_ACCESS_KEY",
        "OFFSITE_SHIPPER_SECRET_KEY",
        "OFFSITE_RESTORE_ACCESS_KEY",
        "OFFSITE_RESTORE_SECRET_KEY",
    ] {
        assert!(
            !pg_vars.contains(v),
            "docker-compose.postgres.yml names {v}"
        );
    }
    compose_pg_default();
    // In both, every password and secret key comes from a required variable.
    for (rel, secrets) in [
        ("docker-compose.yml", COMPOSE_SECRETS),
        ("docker-compose.postgres.yml", PG_COMPOSE_SECRETS),
    ] {
        let text = read(rel);
        for l in text.lines().map(str::trim) {
            let Some((k, v)) = l.split_once(": ") else {
                continue;
            };
            if k.contains("PASSWORD") || k.contains("SECRET") {
                assert!(
                    v.starts_with("${") && v.contains(":?") && !v.contains(":-"),
                    "{rel}: {l}: a secret without a required variable"
                );
            }
        }
        for (_, v) in secrets {
            assert!(!text.contains(v));
        }
    }
}

fn k8s_pg_docs() -> Vec<(String, Yaml)> {
    let dir = Path::new(ROOT).join("deploy/kubernetes/postgres");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for d in yaml_docs(&format!("deploy/kubernetes/postgres/{f}")) {
            out.push((f.clone(), d));
        }
    }
    out
}

fn env_value(c: &Yaml, name: &str) -> Option<String> {
    c["env"]
        .as_vec()?
        .iter()
        .find(|e| s(&e["name"]) == name)
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

fn env_secret(c: &Yaml, name: &str) -> Option<(String, String)> {
    let e = c["env"].as_vec()?.iter().find(|e| s(&e["name"]) == name)?;
    let r = &e["valueFrom"]["secretKeyRef"];
    r.is_hash().then(|| (s(&r["name"]), s(&r["key"])))
}

#[test]
fn kubernetes_postgres_example_streams_with_least_privilege_and_restores_with_a_job() {
    let docs = k8s_pg_docs();
    let kind = |kind: &str, name: &str| -> Yaml {
        docs.iter()
            .find(|(_, d)| s(&d["kind"]) == kind && s(&d["metadata"]["name"]) == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes/postgres"))
            .1
            .clone()
    };
    // The kustomization lists every manifest but the restore Job (run by hand).
    let kust = &docs
        .iter()
        .find(|(f, _)| f == "kustomization.yaml")
        .unwrap()
        .1;
    let mut listed = strs(&kust["resources"]);
    listed.sort();
    let mut files: Vec<String> = docs
        .iter()
        .map(|(f, _)| f.clone())
        .filter(|f| f != "kustomization.yaml" && f != "restore-job.yaml")
        .collect();
    files.dedup();
    assert_eq!(listed, files);

    let sts = kind("StatefulSet", "postgres");
    assert_eq!(sts["spec"]["replicas"].as_i64(), Some(1));
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_i64(), Some(999));
    assert_eq!(pod["securityContext"]["fsGroup"].as_i64(), Some(999));
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 60);
    let volume = |name: &str| -> Yaml {
        pod["volumes"]
            .as_vec()
            .and_then(|v| v.iter().find(|x| s(&x["name"]) == name).cloned())
            .unwrap_or(Yaml::BadValue)
    };
    let pgc = container(&pod["containers"], "postgres");
    let side = container(&pod["containers"], "offsite");
    assert!(
        pod["initContainers"].is_badvalue(),
        "no restore init container: a PostgreSQL restore refuses a non-empty data directory"
    );
    for c in [pgc, side] {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    }

    // PostgreSQL: 15, the settings, passwords from Secrets, the init script,
    // probes like the SQLite example (exec, from inside the pod).
    let image = s(&pgc["image"]);
    assert_eq!(pg_major_of_image(&image), PG_MAJOR);
    check_pg_settings("k8s postgres", &strs(&pgc["args"]));
    assert_eq!(
        env_value(pgc, "POSTGRES_INITDB_ARGS").as_deref(),
        Some("--auth-host=scram-sha-256")
    );
    assert_eq!(secret_refs(pgc), ["postgres-superuser"]);
    let superuser = kind("Secret", "postgres-superuser");
    assert_eq!(keys(&superuser["stringData"]), ["POSTGRES_PASSWORD"]);
    let repl = env_secret(pgc, "OFFSITE_PG_PASSWORD").expect("OFFSITE_PG_PASSWORD from a Secret");
    let pgdata = env_value(pgc, "PGDATA").expect("PGDATA");
    let (data_vol, data_mnt) = mounts(pgc)
        .into_iter()
        .find(|(_, p)| pgdata.starts_with(&format!("{p}/")))
        .expect("PGDATA inside a mounted volume, not its root");
    assert_eq!(data_vol, "data");
    let (init_vol, _) = mounts(pgc)
        .into_iter()
        .find(|(_, p)| p == "/docker-entrypoint-initdb.d")
        .expect("the init script");
    let cm_name = s(&volume(&init_vol)["configMap"]["name"]);
    let cm = kind("ConfigMap", &cm_name);
    check_initdb_script("k8s", &s(&cm["data"]["initdb-offsite.sh"]), "127.0.0.1/32");
    for p in ["readinessProbe", "livenessProbe"] {
        let probe = strs(&pgc[p]["exec"]["command"]);
        assert_eq!(probe.first().map(String::as_str), Some("pg_isready"), "{p}");
    }
    assert!(
        side["readinessProbe"].is_badvalue(),
        "backup lag must not take the database out of service"
    );

    // The sidecar: pg stream over loopback as the replication role, no
    // password in the DSN, PGPASSWORD from the same Secret key the role is
    // made with; its own user; no data volume, no identity.
    let args = strs(&side["args"]);
    assert_eq!(args[..2], ["pg", "stream"]);
    let dsn = flag(&args, "--dsn").unwrap();
    assert_dsn_without_password(dsn);
    assert_eq!(dsn_user(dsn), "offsite");
    assert!(
        dsn.contains("@127.0.0.1:5432/"),
        "{dsn}: the pod's loopback"
    );
    assert_eq!(env_secret(side, "PGPASSWORD"), Some(repl.clone()));
    assert_eq!(repl.1, "PGPASSWORD");
    assert_eq!(keys(&kind("Secret", &repl.0)["stringData"]), ["PGPASSWORD"]);
    assert_eq!(secret_refs(side), ["offsite-pg-s3"]);
    assert_eq!(
        keys(&kind("Secret", "offsite-pg-s3")["stringData"]),
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    );
    let uid = side["securityContext"]["runAsUser"].as_i64();
    assert!(
        uid.is_some() && uid != Some(999),
        "the sidecar runs as a user of its own"
    );
    assert!(
        !mounts(side).iter().any(|(v, _)| v == "data"),
        "the sidecar reads nothing from the data volume"
    );
    let rfile = flag(&args, "--age-recipients-file").expect("recipients");
    let (rvol, rdir) = mounts(side)
        .into_iter()
        .find(|(_, p)| rfile.starts_with(&format!("{p}/")))
        .expect("recipients on a mounted volume");
    assert!(
        volume(&rvol)["configMap"].is_hash(),
        "recipients are public: a ConfigMap"
    );
    assert!(!s(&cm["data"][&rfile[rdir.len() + 1..]]).is_empty());
    let key = flag(&args, "--signing-key-file").expect("--signing-key-file");
    for (v, p) in mounts(side) {
        let sec = &volume(&v)["secret"];
        if sec.is_hash() {
            assert_eq!(s(&sec["secretName"]), "offsite-signing-key", "{v}");
            assert!(key.starts_with(&format!("{p}/")));
        }
    }
    assert!(!args.iter().any(|a| a.contains("identity")), "{args:?}");
    assert!(!args.contains(&"--no-encryption".to_string()));
    let names = env_names(side);
    let url = flag(&args, "--replica").unwrap().to_string();

    // Services: PostgreSQL's port, nothing of offsite.
    let svc = kind("Service", "postgres");
    assert_eq!(s(&sts["spec"]["serviceName"]), "postgres");
    let ports: Vec<i64> = svc["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [5432]);

    // The restore Job: the image variant, on the StatefulSet's volume, with
    // the identity and the read-only role, --start and a clean stop.
    let job = kind("Job", "postgres-restore");
    let jpod = &job["spec"]["template"]["spec"];
    assert_eq!(s(&jpod["restartPolicy"]), "Never");
    assert_eq!(
        jpod["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        jpod["securityContext"]["runAsUser"].as_i64(),
        pod["securityContext"]["runAsUser"].as_i64(),
        "the data directory belongs to the user the StatefulSet runs PostgreSQL as"
    );
    let jc = container(&jpod["containers"], "restore");
    assert_eq!(
        s(&jc["image"]),
        "offsite:postgres",
        "the image with PostgreSQL 15"
    );
    assert_eq!(
        jc["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    assert_eq!(strs(&jc["command"]), ["/bin/sh", "-euc"]);
    let script = strs(&jc["args"]).join("\n");
    let lines: Vec<Vec<String>> = script
        .lines()
        .map(|l| shell_words::split(l).unwrap())
        .filter(|w| !w.is_empty())
        .collect();
    assert_eq!(lines.len(), 2, "{script}");
    let rs = &lines[0];
    assert_eq!(rs[..2], ["offsite", "restore"]);
    assert_eq!(
        rs[2]
            .replace("$OFFSITE_BUCKET", "$(OFFSITE_BUCKET)")
            .replace("$OFFSITE_PREFIX", "$(OFFSITE_PREFIX)"),
        url,
        "restores from where the sidecar ships"
    );
    for v in ["OFFSITE_BUCKET", "OFFSITE_PREFIX", "AWS_REGION"] {
        assert_eq!(env_value(jc, v), env_value(side, v), "{v}");
        assert!(names.contains(&v.to_string()));
    }
    assert_eq!(flag(rs, "-o"), Some("$PGDATA"));
    assert_eq!(env_value(jc, "PGDATA"), Some(pgdata.clone()));
    assert!(rs.contains(&"--start".to_string()));
    assert!(!rs.contains(&"--force".to_string()));
    assert_eq!(lines[1], ["pg_ctl", "-D", "$PGDATA", "stop", "-m", "fast"]);
    let id = flag(rs, "--age-identity").unwrap();
    let jvol = |name: &str| -> Yaml {
        jpod["volumes"]
            .as_vec()
            .and_then(|v| v.iter().find(|x| s(&x["name"]) == name).cloned())
            .unwrap_or(Yaml::BadValue)
    };
    let (idv, _) = mounts(jc)
        .into_iter()
        .find(|(_, p)| id.starts_with(&format!("{p}/")))
        .expect("the identity on a mounted volume");
    assert_eq!(
        s(&jvol(&idv)["secret"]["secretName"]),
        "offsite-age-identity"
    );
    assert_eq!(secret_refs(jc), ["offsite-pg-s3-restore"]);
    let restorer = kind("Secret", "offsite-pg-s3-restore");
    assert!(s(&restorer["stringData"]["AWS_ACCESS_KEY_ID"]).contains("RESTORE"));
    let (jdata, jmnt) = mounts(jc)
        .into_iter()
        .find(|(_, p)| pgdata.starts_with(&format!("{p}/")))
        .expect("PGDATA inside the Job's volume");
    assert_eq!(jmnt, data_mnt);
    let claim = s(&jvol(&jdata)["persistentVolumeClaim"]["claimName"]);
    let template = s(&sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]);
    assert_eq!(
        claim,
        format!("{template}-postgres-0"),
        "the StatefulSet's volume"
    );
    // The identity is in no other manifest.
    for (f, d) in &docs {
        if f != "restore-job.yaml" {
            let text = format!("{d:?}");
            assert!(
                !text.contains("offsite-age-identity"),
                "{f} mentions the identity"
            );
        }
    }
}

/// initdb-offsite.sh (compose and Kubernetes) against a real PostgreSQL 15:
/// it makes a role that can stream with its password (and only with it),
/// and that is no superuser.
#[tokio::test]
async fn initdb_scripts_make_a_replication_role_that_needs_its_password() {
    use crate::support::pgcluster::PgCluster;
    use offsite::engine::postgres::{dsn::Dsn, wire::Conn};
    if !PgCluster::available() {
        return;
    }
    let k8s = k8s_pg_docs()
        .into_iter()
        .find(|(_, d)| s(&d["kind"]) == "ConfigMap")
        .map(|(_, d)| s(&d["data"]["initdb-offsite.sh"]))
        .unwrap();
    for (what, script) in [
        ("compose", read("deploy/compose/postgres/initdb-offsite.sh")),
        ("k8s", k8s),
    ] {
        let pg = PgCluster::start(&[]);
        let pw = "Test-Repl-pw-42";
        let f = pg.dir.path().join("initdb-offsite.sh");
        std::fs::write(&f, &script).unwrap();
        // As the image's entrypoint runs it: sourced by bash with these set.
        let out = Command::new("bash")
            .arg("-ec")
            .arg(format!(". {}", f.display()))
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port.to_string())
            .env("POSTGRES_USER", "postgres")
            .env("PGDATA", &pg.data)
            .env("OFFSITE_PG_PASSWORD", pw)
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Drop initdb's trust lines for TCP (POSTGRES_INITDB_ARGS=
        // --auth-host=scram-sha-256 in the examples) except the superuser's
        // own, which this harness uses.
        let hba = pg.data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                !(l.starts_with("host") && l.contains("trust") && l.contains("replication"))
            })
            .collect();
        std::fs::write(&hba, kept.join("\n") + "\n").unwrap();
        pg.psql("select pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            pg.psql("select rolreplication, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls from pg_roles where rolname = 'offsite'"),
            "t|t|f|f|f|f",
            "{what}"
        );
        let dsn = |password: Option<&str>| Dsn {
            user: "offsite".into(),
            password: password.map(str::to_string),
            ..Dsn::parse(&pg.dsn()).unwrap()
        };
        let mut c = Conn::connect(&dsn(Some(pw)), true)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: replication connection as offsite: {e:#}\n{}",
                    pg.log_tail()
                )
            });
        c.identify_system().await.unwrap();
        c.close().await;
        for bad in [Some("wrong-password"), None] {
            assert!(
                Conn::connect(&dsn(bad), true).await.is_err(),
                "{what}: offsite connected with password {bad:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// docs/IAM.md: the compose example's MinIO policies are the documented ones
// ---------------------------------------------------------------------------

/// ```json blocks preceded by `<!-- policy: NAME -->`.
fn doc_policies() -> BTreeMap<String, serde_json::Value> {
    let md = read("docs/IAM.md");
    let mut out = BTreeMap::new();
    let mut rest = md.as_str();
    while let Some(i) = rest.find("<!-- policy: ") {
        let after = &rest[i + 13..];
        let name = after[..after.find(" -->").unwrap()].to_string();
        let start = after.find("```json\n").unwrap() + 8;
        let end = start + after[start..].find("```").unwrap();
        let v: serde_json::Value = serde_json::from_str(&after[start..end])
            .unwrap_or_else(|e| panic!("docs/IAM.md policy {name}: {e}"));
        out.insert(name, v);
        rest = &after[end..];
    }
    out
}

fn actions(policy: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|st| st["Action"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn iam_policies_are_least_privilege_and_match_the_compose_example() {
    let docs = doc_policies();
    for name in [
        "shipper",
        "shipper-no-delete",
        "shipper-object-lock",
        "restore",
        "pruner",
    ] {
        assert!(
            docs.contains_key(name),
            "docs/IAM.md has no policy {name}: {:?}",
            docs.keys()
        );
    }
    let sub = |v: &serde_json::Value| -> serde_json::Value {
        serde_json::from_str(
            &v.to_string()
                .replace("BUCKET", "offsite")
                .replace("PREFIX", "app"),
        )
        .unwrap()
    };
    for name in ["shipper", "restore"] {
        let file: serde_json::Value =
            serde_json::from_str(&read(&format!("deploy/compose/policies/{name}.json"))).unwrap();
        assert_eq!(
            file,
            sub(&docs[name]),
            "deploy/compose/policies/{name}.json differs from docs/IAM.md"
        );
    }
    let a = |n: &str| actions(&docs[n]);
    // The pruner decrypts nothing; it reads the record and the signed
    // envelopes of snapshots (ranged reads), so that only proven objects
    // steer what it deletes.
    for st in docs["pruner"]["Statement"].as_array().unwrap() {
        if st["Action"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "s3:GetObject")
        {
            assert_eq!(
                st["Resource"],
                serde_json::json!([
                    "arn:aws:s3:::BUCKET/PREFIX/replica.json",
                    "arn:aws:s3:::BUCKET/PREFIX/lineages/*"
                ]),
                "pruner: GetObject on the replica record and the objects' envelopes"
            );
        }
    }
    assert!(a("shipper").contains(&"s3:DeleteObject".into()));
    assert!(!a("shipper-no-delete")
        .iter()
        .any(|x| x.starts_with("s3:Delete")));
    assert!(!a("restore")
        .iter()
        .any(|x| x.starts_with("s3:Delete") || x.starts_with("s3:Put")));
    assert!(!a("pruner").iter().any(|x| x.starts_with("s3:Put")));
    // Objects only under PREFIX/lineages/, listing only of that prefix.
    for (name, p) in &docs {
        for st in p["Statement"].as_array().unwrap() {
            for r in st["Resource"].as_array().unwrap() {
                let r = r.as_str().unwrap();
                // The replica's objects, and the shipper's lease (fencing).
                let lease = r == "arn:aws:s3:::BUCKET/PREFIX/lease.json"
                    && name.starts_with("shipper")
                    && st["Action"] == serde_json::json!(["s3:GetObject", "s3:PutObject"]);
                // The replica record: the shipper writes it, everyone reads it.
                let record = r == "arn:aws:s3:::BUCKET/PREFIX/replica.json"
                    && (st["Action"] == serde_json::json!(["s3:GetObject"])
                        || (name.starts_with("shipper")
                            && st["Action"]
                                == serde_json::json!(["s3:GetObject", "s3:PutObject"])));
                // The signed head record (rollback detection): the same.
                let head = r == "arn:aws:s3:::BUCKET/PREFIX/head.json"
                    && (st["Action"] == serde_json::json!(["s3:GetObject"])
                        || (name.starts_with("shipper")
                            && st["Action"]
                                == serde_json::json!(["s3:GetObject", "s3:PutObject"])));
                assert!(
                    r == "arn:aws:s3:::BUCKET"
                        || r == "arn:aws:s3:::BUCKET/PREFIX/lineages/*"
                        || lease
                        || record
                        || head,
                    "{name}: resource {r}"
                );
            }
            if st["Action"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "s3:ListBucket")
            {
                assert_eq!(
                    st["Condition"]["StringLike"]["s3:prefix"],
                    serde_json::json!(["PREFIX/lineages/*"]),
                    "{name}: ListBucket limited to the replica's prefix"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// (b) the compose commands, run
// ---------------------------------------------------------------------------

/// A compose service turned into a local process: its argv, environment and
/// container paths mapped onto the test's temp dir and S3 server.
struct Runner {
    tmp: PathBuf,
    /// Garage in place of MinIO.
    s3: S3Map,
    listen_port: u16,
}

#[derive(Clone)]
struct S3Map {
    endpoint: String,
    region: String,
    /// bucket/unique-prefix: the compose example's bucket name becomes this.
    bucket: String,
    access_key: String,
    secret_key: String,
}

impl S3Map {
    fn from_target(t: &support::S3Target) -> S3Map {
        let cfg = t.s3_config();
        let creds = |v: &str| {
            std::env::var(v).unwrap_or_else(|_| panic!("{v} must be set for the S3 test server"))
        };
        S3Map {
            endpoint: cfg.endpoint.clone().expect("test server endpoint"),
            region: cfg.region.clone().expect("test server region"),
            bucket: format!("{}/{}", cfg.bucket, cfg.prefix),
            access_key: creds("AWS_ACCESS_KEY_ID"),
            secret_key: creds("AWS_SECRET_ACCESS_KEY"),
        }
    }
}

impl Runner {
    /// Container path → host path for this service: its named volumes
    /// (tmp/volumes/NAME), bind-mounted files (a copy with container paths
    /// rewritten the same way) and secrets (/run/secrets/NAME → the file).
    fn mounts(&self, c: &Yaml, svc: &Yaml) -> Vec<(String, PathBuf)> {
        let mut m: Vec<(String, PathBuf)> = Vec::new();
        let vols = volumes(svc);
        for (src, tgt, _) in &vols {
            if !src.starts_with('.') && !src.starts_with('/') {
                let p = self.tmp.join("volumes").join(src);
                std::fs::create_dir_all(&p).unwrap();
                m.push((tgt.clone(), p));
            }
        }
        for name in strs(&svc["secrets"]) {
            let file = s(&c["secrets"][name.as_str()]["file"]);
            m.push((format!("/run/secrets/{name}"), PathBuf::from(file)));
        }
        let dirs = m.clone();
        for (src, tgt, _) in &vols {
            if src.starts_with('.') {
                let text = std::fs::read_to_string(Path::new(ROOT).join(src)).unwrap();
                let host = self.tmp.join("bind").join(tgt.trim_start_matches('/'));
                std::fs::create_dir_all(host.parent().unwrap()).unwrap();
                std::fs::write(&host, map_paths_in_text(&text, &dirs)).unwrap();
                m.push((tgt.clone(), host));
            }
        }
        m.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        m
    }

    /// The service's environment with MinIO's values replaced by the test
    /// server's (checking they are the values the compose file wires up).
    fn env(&self, c: &Yaml, svc: &Yaml) -> BTreeMap<String, String> {
        let mut e = env(svc);
        let minio = &c["services"]["minio"];
        assert!(minio.is_hash());
        let users: Vec<String> = ["SHIPPER_ACCESS_KEY", "RESTORE_ACCESS_KEY"]
            .iter()
            .map(|k| env(service(c, "createbucket"))[*k].clone())
            .collect();
        for (k, v) in e.iter_mut() {
            match k.as_str() {
                "AWS_ACCESS_KEY_ID" => {
                    assert!(
                        users.contains(v),
                        "{k}={v} is not a user createbucket makes"
                    );
                    *v = self.s3.access_key.clone();
                }
                "AWS_SECRET_ACCESS_KEY" => *v = self.s3.secret_key.clone(),
                "AWS_REGION" => *v = self.s3.region.clone(),
                "OFFSITE_S3_ENDPOINT" => {
                    assert_eq!(v, "http://minio:9000");
                    *v = self.s3.endpoint.clone();
                }
                "OFFSITE_BUCKET" => *v = self.s3.bucket.clone(),
                _ => {}
            }
        }
        // What the container runtime provides: the image's temp dir.
        let t = self.tmp.join("container-tmp");
        std::fs::create_dir_all(&t).unwrap();
        e.insert("TMPDIR".into(), t.display().to_string());
        e
    }

    fn command(&self, c: &Yaml, name: &str) -> (Command, Vec<String>) {
        let svc = service(c, name);
        let mounts = self.mounts(c, svc);
        let mut argv: Vec<String> = service_argv(svc)
            .iter()
            .map(|a| map_path(a, &mounts))
            .collect();
        if let Some(i) = argv.iter().position(|a| a == "--listen") {
            argv[i + 1] = format!("127.0.0.1:{}", self.listen_port);
        }
        let exe = match argv[0].as_str() {
            "offsite" => env!("CARGO_BIN_EXE_offsite"),
            "offsite-workload" => env!("CARGO_BIN_EXE_offsite-workload"),
            other => panic!("{name}: runs {other}, which is not in the image"),
        };
        let mut cmd = Command::new(exe);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(self.env(c, svc))
            .env("OFFSITE_LOG", "info,offsite=debug")
            .current_dir(&self.tmp)
            .stdin(Stdio::null());
        (cmd, argv)
    }

    fn spawn(&self, c: &Yaml, name: &str) -> (Child, PathBuf) {
        let (mut cmd, argv) = self.command(c, name);
        let log = self.tmp.join(format!("{name}.log"));
        eprintln!("{name}: {argv:?}");
        let child = cmd
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(self.tmp.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        (child, self.tmp.join(format!("{name}.err")))
    }

    fn run(&self, c: &Yaml, name: &str) -> (bool, String) {
        let (mut cmd, argv) = self.command(c, name);
        eprintln!("{name}: {argv:?}");
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), err)
    }
}

fn map_path(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    for (tgt, host) in mounts {
        if arg == tgt {
            return host.display().to_string();
        }
        if let Some(rest) = arg.strip_prefix(&format!("{tgt}/")) {
            return host.join(rest).display().to_string();
        }
    }
    arg.to_string()
}

/// Container paths inside a mounted config file ("/data/app.db"): every
/// quoted string is mapped once, like an argument.
fn map_paths_in_text(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut m = mounts.to_vec();
    m.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
    text.split('"')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                map_path(part, &m)
            } else {
                part.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\"")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (status, body) of GET http://127.0.0.1:PORT/PATH, or None if nothing listens.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    c.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Panic with the process's stderr if it has exited.
fn still_running(child: &mut Child, err: &Path, what: &str) {
    if let Some(st) = child.try_wait().unwrap() {
        panic!(
            "{what} exited ({st}):\n{}",
            std::fs::read_to_string(err).unwrap_or_default()
        );
    }
}

/// (last commit, BLAKE3 of every row) of a workload database, after
/// `PRAGMA integrity_check` and the workload's own row-by-row check.
fn db_state(db: &Path) -> (u64, String) {
    let m = offsite::workload::verify(db).unwrap_or_else(|e| panic!("{}: {e:#}", db.display()));
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let ic: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ic, "ok");
    let mut h = blake3::Hasher::new();
    let mut st = c
        .prepare("SELECT id, version, payload FROM t ORDER BY id")
        .unwrap();
    let mut rows = st.query([]).unwrap();
    let mut n = 0u64;
    while let Some(r) = rows.next().unwrap() {
        h.update(&r.get::<_, i64>(0).unwrap().to_le_bytes());
        h.update(&r.get::<_, i64>(1).unwrap().to_le_bytes());
        h.update(&r.get::<_, Vec<u8>>(2).unwrap());
        n += 1;
    }
    assert!(n > 0);
    (m, h.finalize().to_hex().to_string())
}

fn last_commit(db: &Path) -> u64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .ok()
        .and_then(|c| offsite::workload::last_commit(&c).ok())
        .unwrap_or(0)
}

fn remove_db(db: &Path) {
    for ext in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(ext);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

#[test]
fn compose_commands_replicate_and_restore_against_s3() {
    let Some(target) = support::s3_target("garage") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (identity, recipient) = pinned_keygen(tmp.path());
    let signing = signing_key_file(tmp.path());
    let mut vars = vec![
        ("OFFSITE_AGE_RECIPIENT", recipient.as_str()),
        ("OFFSITE_IDENTITY_FILE", identity.to_str().unwrap()),
        ("OFFSITE_SIGNING_KEY_FILE", signing.to_str().unwrap()),
    ];
    vars.extend_from_slice(COMPOSE_SECRETS);
    let c = compose(&vars).unwrap();
    let r = Runner {
        tmp: tmp.path().to_path_buf(),
        s3: S3Map::from_target(&target),
        listen_port: free_port(),
    };
    let app_db = tmp.path().join("volumes/app-data/app.db");
    // The replica the config names, as the test server sees it.
    let cfg = read("deploy/compose/offsite.toml");
    let url_line = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("url = "))
        .unwrap();
    let replica = format!(
        "s3://{}/{}?endpoint={}&region={}&force-path-style=true",
        r.s3.bucket,
        url_line
            .trim_matches('"')
            .split_once("}/")
            .unwrap()
            .1
            .split('?')
            .next()
            .unwrap(),
        r.s3.endpoint,
        r.s3.region
    );

    // `recover` on an empty bucket, before anything exists: nothing to do.
    let (ok, err) = r.run(&c, "recover");
    assert!(
        ok,
        "recover with no backup must succeed and do nothing:\n{err}"
    );
    assert!(!app_db.exists(), "recover created a database from nothing");

    // `docker compose up`: the app, then (depends_on: app) the sidecar.
    let (mut app, app_err) = r.spawn(&c, "app");
    wait_for("the app's first commit", Duration::from_secs(30), || {
        still_running(&mut app, &app_err, "app");
        last_commit(&app_db) >= 1
    });
    let (mut off, off_err) = r.spawn(&c, "offsite");
    wait_for("offsite's /healthz", Duration::from_secs(60), || {
        still_running(&mut off, &off_err, "offsite replicate");
        http_get(r.listen_port, "/healthz").is_some_and(|(st, _)| st == 200)
    });
    wait_for("25 commits shipped", Duration::from_secs(120), || {
        still_running(&mut off, &off_err, "offsite replicate");
        still_running(&mut app, &app_err, "app");
        harness::latest_txid(&replica).unwrap_or(0) >= 25
    });
    wait_for("/readyz 200", Duration::from_secs(60), || {
        http_get(r.listen_port, "/readyz").is_some_and(|(st, _)| st == 200)
    });
    let (st, metrics) = http_get(r.listen_port, "/metrics").unwrap();
    assert_eq!(st, 200);
    assert!(
        metrics.contains("offsite_"),
        "no offsite metric in:\n{metrics}"
    );

    // `docker compose stop`: the app, then the sidecar, which ships the rest.
    sigterm(&app);
    wait_timeout(&mut app, Duration::from_secs(30));
    sigterm(&off);
    let st = wait_timeout(&mut off, Duration::from_secs(90));
    assert!(
        st.success(),
        "offsite did not exit 0 on SIGTERM:\n{}",
        std::fs::read_to_string(&off_err).unwrap()
    );
    // Read once nothing holds the database (see the Kubernetes test).
    let written = db_state(&app_db);
    assert!(written.0 >= 25);

    // `docker compose run --rm restore`: the latest state, in the restored volume.
    let (ok, err) = r.run(&c, "restore");
    assert!(ok, "restore failed:\n{err}");
    let restored = tmp.path().join("volumes/restored/app.db");
    assert_eq!(
        db_state(&restored),
        written,
        "the restore differs from what the app wrote"
    );

    // `docker compose run --rm recover` with the database in place: no-op.
    let before = std::fs::read(&app_db).unwrap();
    let (ok, err) = r.run(&c, "recover");
    assert!(
        ok,
        "recover with an existing database must do nothing:\n{err}"
    );
    assert_eq!(std::fs::read(&app_db).unwrap(), before);
    assert_eq!(db_state(&app_db), written);
    // … and after losing the volume: the database comes back.
    remove_db(&app_db);
    let (ok, err) = r.run(&c, "recover");
    assert!(ok, "recover failed:\n{err}");
    assert_eq!(
        db_state(&app_db),
        written,
        "recover differs from what the app wrote"
    );

    // `docker compose up -d` again: the app goes on from the recovered
    // database and the sidecar ships its new commits on top.
    let shipped = harness::latest_txid(&replica).unwrap();
    let (mut app, app_err) = r.spawn(&c, "app");
    let (mut off, off_err) = r.spawn(&c, "offsite");
    wait_for(
        "new commits shipped after recover",
        Duration::from_secs(120),
        || {
            still_running(&mut off, &off_err, "offsite replicate");
            still_running(&mut app, &app_err, "app");
            last_commit(&app_db) >= written.0 + 10
                && harness::latest_txid(&replica).unwrap_or(0) >= shipped + 10
        },
    );
    sigterm(&app);
    wait_timeout(&mut app, Duration::from_secs(30));
    let written2 = db_state(&app_db);
    sigterm(&off);
    assert!(wait_timeout(&mut off, Duration::from_secs(90)).success());
    remove_db(&restored);
    let (ok, err) = r.run(&c, "restore");
    assert!(ok, "restore after recover failed:\n{err}");
    assert_eq!(
        db_state(&restored),
        written2,
        "the commits after recover were not all shipped"
    );
}

// ---------------------------------------------------------------------------
// (b') the Kubernetes pod's commands, run
// ---------------------------------------------------------------------------

/// A container of the example pod as a local process: `$(VAR)` expanded from
/// its env (as the kubelet does), the Secret's keys as the test server's
/// credentials, volumes as temp dirs. The manifests name no endpoint (they
/// target AWS); AWS_ENDPOINT_URL points the SDK at the test server instead.
struct PodRunner {
    tmp: PathBuf,
    s3: S3Map,
    pod: Yaml,
    configmaps: BTreeMap<String, Yaml>,
    recipient: String,
    /// Whether Secret offsite-age-identity exists (its volume is optional).
    identity: Option<PathBuf>,
    listen_port: u16,
}

impl PodRunner {
    fn volume_dir(&self, c: &Yaml) -> Vec<(String, PathBuf)> {
        let mut m = Vec::new();
        for (vol, path) in mounts(c) {
            let dir = self.tmp.join("pod").join(&vol);
            let spec = self.pod["volumes"]
                .as_vec()
                .unwrap()
                .iter()
                .find(|v| s(&v["name"]) == vol)
                .unwrap_or_else(|| {
                    assert_eq!(vol, "data", "volume {vol} not in the pod");
                    &Yaml::BadValue
                });
            // The PVC ("data", from volumeClaimTemplates) persists; config
            // and secret volumes are laid out anew for every container start.
            if spec.is_hash() {
                let _ = std::fs::remove_dir_all(&dir);
            }
            std::fs::create_dir_all(&dir).unwrap();
            if spec["configMap"].is_hash() {
                let cm = &self.configmaps[&s(&spec["configMap"]["name"])];
                for (k, v) in cm["data"].as_hash().unwrap() {
                    std::fs::write(dir.join(s(k)), s(v)).unwrap();
                }
            } else if spec["secret"]["secretName"].as_str() == Some("offsite-signing-key") {
                std::fs::write(dir.join("signing.key"), harness::TEST_SIGNING_KEY).unwrap();
            } else if spec["secret"].is_hash() {
                if let Some(id) = &self.identity {
                    std::fs::copy(id, dir.join("age-identity.txt")).unwrap();
                }
            }
            m.push((path, dir));
        }
        // Container paths inside the mounted files, and the recipient.
        let dirs = m.clone();
        for (_, dir) in &m {
            for f in std::fs::read_dir(dir).unwrap() {
                let p = f.unwrap().path();
                if let Ok(text) = std::fs::read_to_string(&p) {
                    let text = map_paths_in_text(&text, &dirs)
                        .replace("REPLACE_WITH_YOUR_AGE_RECIPIENT", &self.recipient);
                    std::fs::write(&p, text).unwrap();
                }
            }
        }
        m.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        m
    }

    fn env(&self, c: &Yaml) -> BTreeMap<String, String> {
        let mut e = BTreeMap::new();
        for v in c["env"].as_vec().into_iter().flatten() {
            let (k, mut val) = (s(&v["name"]), s(&v["value"]));
            match k.as_str() {
                "OFFSITE_BUCKET" => val = self.s3.bucket.clone(),
                "AWS_REGION" => val = self.s3.region.clone(),
                _ => {}
            }
            e.insert(k, val);
        }
        for name in secret_refs(c) {
            // The test server has one key: both roles' Secrets map to it.
            assert!(
                ["offsite-s3", "offsite-s3-restore"].contains(&name.as_str()),
                "{name}"
            );
            e.insert("AWS_ACCESS_KEY_ID".into(), self.s3.access_key.clone());
            e.insert("AWS_SECRET_ACCESS_KEY".into(), self.s3.secret_key.clone());
        }
        if !secret_refs(c).is_empty() {
            e.insert("AWS_ENDPOINT_URL".into(), self.s3.endpoint.clone());
        }
        e
    }

    fn command(&self, c: &Yaml) -> Command {
        let mounts = self.volume_dir(c);
        let env = self.env(c);
        let mut argv = match &c["command"] {
            Yaml::BadValue => dockerfile_entrypoint(),
            x => strs(x),
        };
        argv.extend(strs(&c["args"]));
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                let mut a = a.clone();
                for (k, v) in &env {
                    a = a.replace(&format!("$({k})"), v);
                }
                self.map_listen(&mut a);
                map_path(&a, &mounts)
            })
            .collect();
        eprintln!("{}: {argv:?}", s(&c["name"]));
        let exe = match argv[0].as_str() {
            "offsite" => env!("CARGO_BIN_EXE_offsite"),
            "offsite-workload" => env!("CARGO_BIN_EXE_offsite-workload"),
            other => panic!("runs {other}, which is not in the image"),
        };
        let tmp = mounts
            .iter()
            .find(|(t, _)| t == "/tmp")
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| self.tmp.clone());
        let mut cmd = Command::new(exe);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(env)
            .env("TMPDIR", tmp)
            .env("OFFSITE_LOG", "info,offsite=debug")
            .stdin(Stdio::null());
        cmd
    }

    /// The listener's address in the manifest → the test's port.
    fn map_listen(&self, a: &mut String) {
        if a.starts_with("0.0.0.0:") || a.starts_with("127.0.0.1:") {
            *a = format!("127.0.0.1:{}", self.listen_port);
        }
    }

    /// Run container `c`'s exec liveness probe, as the kubelet runs it in
    /// the running container (its volumes as they are; no shell).
    fn probe(&self, c: &Yaml) -> (bool, String) {
        let mut mounts: Vec<(String, PathBuf)> = mounts(c)
            .into_iter()
            .map(|(vol, path)| (path, self.tmp.join("pod").join(vol)))
            .collect();
        mounts.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        let argv: Vec<String> = strs(&c["livenessProbe"]["exec"]["command"])
            .into_iter()
            .map(|mut a| {
                self.map_listen(&mut a);
                map_path(&a, &mounts)
            })
            .collect();
        assert_eq!(argv[0], "offsite", "the probe runs {argv:?}");
        let out = Command::new(env!("CARGO_BIN_EXE_offsite"))
            .args(&argv[1..])
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn spawn(&self, c: &Yaml) -> (Child, PathBuf) {
        let err = self.tmp.join(format!("{}.err", s(&c["name"])));
        let child = self
            .command(c)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        (child, err)
    }

    fn run(&self, c: &Yaml) -> (bool, String) {
        let out = self.command(c).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[test]
fn kubernetes_commands_restore_only_when_needed_and_without_identity_when_not() {
    let Some(target) = support::s3_target("garage") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (identity, recipient) = pinned_keygen(tmp.path());
    let docs = k8s_docs();
    let configmaps = docs
        .iter()
        .filter(|(_, d)| s(&d["kind"]) == "ConfigMap")
        .map(|(_, d)| (s(&d["metadata"]["name"]), d.clone()))
        .collect();
    let mut r = PodRunner {
        tmp: tmp.path().to_path_buf(),
        s3: S3Map::from_target(&target),
        pod: k8s_pod(&docs),
        configmaps,
        recipient,
        identity: None,
        listen_port: free_port(),
    };
    let pod = r.pod.clone();
    let init = container(&pod["initContainers"], "restore");
    let sidecar = container(&pod["initContainers"], "offsite");
    let app = container(&pod["containers"], "app");
    let db = tmp.path().join("pod/data/app.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let replica = {
        let e = r.env(sidecar);
        format!(
            "s3://{}/{}/app.db?endpoint={}&region={}&force-path-style=true",
            r.s3.bucket, e["OFFSITE_PREFIX"], r.s3.endpoint, r.s3.region
        )
    };

    // First deploy, no identity Secret: empty bucket, no database → nothing to do.
    let (ok, err) = r.run(init);
    assert!(
        ok,
        "init container on an empty bucket without identity:\n{err}"
    );
    assert!(!db.exists());

    // The sidecar starts before the app and waits for the database to appear.
    let (mut off, off_err) = r.spawn(sidecar);
    wait_for("offsite's /healthz", Duration::from_secs(60), || {
        still_running(&mut off, &off_err, "offsite sidecar");
        http_get(r.listen_port, "/healthz").is_some_and(|(st, _)| st == 200)
    });
    // Its liveness probe passes before the database exists…
    let (ok, err) = r.probe(sidecar);
    assert!(ok, "liveness probe while waiting for the database:\n{err}");
    let (mut a, a_err) = r.spawn(app);
    wait_for("15 commits shipped", Duration::from_secs(120), || {
        still_running(&mut off, &off_err, "offsite sidecar");
        still_running(&mut a, &a_err, "app");
        harness::latest_txid(&replica).unwrap_or(0) >= 15
    });
    // …and while shipping.
    let (ok, err) = r.probe(sidecar);
    assert!(ok, "liveness probe while shipping:\n{err}");
    // Pod deletion: the app stops first, then the native sidecar.
    sigterm(&a);
    wait_timeout(&mut a, Duration::from_secs(30));
    sigterm(&off);
    let st = wait_timeout(&mut off, Duration::from_secs(90));
    assert!(
        st.success(),
        "{}",
        std::fs::read_to_string(&off_err).unwrap()
    );
    // A sidecar that does not answer fails the probe.
    let (ok, err) = r.probe(sidecar);
    assert!(
        !ok && err.contains("cannot reach the offsite daemon"),
        "{err}"
    );
    // Read the state only once nothing holds the database: the app was
    // killed, possibly after writing a commit frame but before updating the
    // WAL index; SQLite's recovery at the next open counts that commit (and
    // offsite, which reads the WAL itself, shipped it).
    let written = db_state(&db);

    // Restart with the volume intact, no identity: nothing to do.
    let before = std::fs::read(&db).unwrap();
    let (ok, err) = r.run(init);
    assert!(
        ok,
        "init container with the database present, without identity:\n{err}"
    );
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // Volume lost, no identity: the init container fails, the app does not
    // start on an empty database.
    remove_db(&db);
    let (ok, err) = r.run(init);
    assert!(!ok, "a needed restore without identity must fail");
    assert!(err.contains("identity"), "{err}");
    assert!(!db.exists());

    // With the identity Secret: the database comes back.
    r.identity = Some(identity);
    let (ok, err) = r.run(init);
    assert!(ok, "init container restore:\n{err}");
    assert_eq!(db_state(&db), written);
}
