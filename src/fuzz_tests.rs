//! Hostile input for every parser of what offsite reads back from the bucket
//! (issue 11, "trust nothing in the bucket").
//!
//! Anything in the bucket may have been written, replaced or damaged by
//! someone other than the shipper. These property tests feed hostile bytes to
//! each parser of such input — the object envelope, `authenticate` and
//! `open_object` (codec), the body reader driven the way `replay` drives it
//! (snapshot and segment bodies, format 3 and format-1 legacy bodies), the
//! SQLite page replay (hostile page sizes, database sizes, record counts and
//! page numbers), `replica.json`, `head.json`, `lease.json` and object names
//! (`layout::parse_key`) — and check that each one
//! 1. never panics,
//! 2. never allocates more than a bound related to its input: a counting
//!    global allocator (test builds only, active only on the thread of the
//!    case being run) fails a case whose live allocations grow past
//!    [`BASE_BUDGET`] plus 64 bytes per input byte, and aborts the test binary
//!    outright (with a message on stderr) once they pass twice that, so a
//!    hostile size can never make a test run out of memory;
//! 3. either refuses the input with a clean `Err` or returns an `Ok` that is
//!    consistent with it (checked against an independent reading of the
//!    input: the pages a restore produced, the fields a signature covers, the
//!    name a key parses back to).
//!
//! Mutation properties start from valid objects made by the writers
//! (`ObjectWriter`, `SnapshotWriter`/`SegmentWriter` with the `sqlite-pages`
//! payload) and flip, insert, delete, overwrite and truncate bytes: every
//! changed signed object must be refused by `authenticate` given the pinned
//! key and the replica id, also when unsigned objects are allowed (no
//! downgrade to an unsigned format); every single-byte change of a small
//! object is tried exhaustively.
//!
//! Bodies are sealed in objects signed with the test's own key, so hostile
//! content gets past `authenticate` to the parsers behind it (as it would
//! from a compromised shipper, or with `--allow-unsigned`); the properties
//! on whole objects cover what `authenticate` refuses. tests/it/mutation_fuzz.rs
//! is the end-to-end counterpart: seeded mutations of a whole replica,
//! through verify and restore.
//!
//! Inputs they found are kept as plain regression tests at the end: a
//! lease age overflow, a format-1 commit length overflow, and page-state
//! growth for records a commit declared but did not carry.
//!
//! Not measured: memory that zstd (C code, its window is capped by the
//! decoder's default limit) allocates outside the Rust allocator.
//!
//! Cost: the whole module runs in a few seconds in a debug build. Each
//! property runs its default number of cases with a fixed seed, so runs are
//! repeatable; `OFFSITE_FUZZ_CASES=N` runs N cases per property and
//! `OFFSITE_FUZZ_SEED=<u64>|random` picks the seed, for longer local runs:
//! `OFFSITE_FUZZ_CASES=20000 OFFSITE_FUZZ_SEED=random cargo test --features
//! testing --lib fuzz_tests`. A failure prints the shrunk input and the seed;
//! add it as a plain regression test at the end of this file.

use std::fmt::Debug;
use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Value};

use crate::codec::{
    authenticate, open_object, Encryption, Envelope, EnvelopeMeta, ObjectKind, ObjectWriter, Seal,
    FOOTER_LEN, MAGIC,
};
use crate::engine::sqlite::checksum::PageState;
use crate::engine::sqlite::pages::{self, SegmentFields, SnapshotFields};
use crate::engine::sqlite::PageReplay;
use crate::engine::{Engine, ExactRead, Replay};
use crate::keys::{Identities, Recipients};
use crate::layout::{self, Entry, SegmentEntry, SnapshotEntry, MAX_TXID};
use crate::record::ReplicaRecord;
use crate::replay::{self, Chain, Downloaded, Keys, Stop};
use crate::segment::{BodyReader, Header, Link, SegmentWriter, SnapshotWriter};
use crate::sign::{Binding, Signer, Trust, SIGNING_PREFIX};
use crate::storage::file::FileStorage;
use crate::storage::{Body, Storage};

// ---------------------------------------------------------------------------
// Allocation budget

/// Live bytes any case may allocate whatever its input (a body header may be
/// up to 1 MiB, and is allocated before it is read).
const BASE_BUDGET: usize = 4 << 20;
/// Live bytes allowed per input byte (a page of input costs a 16-byte state
/// term; vectors double).
const PER_INPUT_BYTE: usize = 64;

mod budget {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// The system allocator, counting the live bytes of one thread while a
    /// measurement runs on it.
    pub struct Counting;

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    thread_local! {
        /// Abort past this many live bytes (0: not measuring).
        static HARD: Cell<usize> = const { Cell::new(0) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    /// Write to stderr without allocating.
    fn say(parts: &[&[u8]]) {
        for p in parts {
            // SAFETY: writing a valid buffer to fd 2.
            unsafe {
                libc::write(2, p.as_ptr().cast(), p.len());
            }
        }
    }

    fn digits(mut n: usize, buf: &mut [u8; 24]) -> &[u8] {
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return &buf[i..];
            }
        }
    }

    /// Account for `n` more bytes; false refuses the allocation.
    fn grow(n: usize) -> bool {
        HARD.try_with(|hard| {
            let cap = hard.get();
            if cap == 0 {
                return true;
            }
            let live = LIVE.get() + n as isize;
            if live > cap as isize {
                let (mut a, mut b) = ([0u8; 24], [0u8; 24]);
                say(&[
                    b"\nfuzz_tests: a case asked for ",
                    digits(n, &mut a),
                    b" more bytes, past its hard cap of ",
                    digits(cap, &mut b),
                    b" live bytes: unbounded allocation driven by hostile input; aborting\n",
                ]);
                // The process aborts on the failed allocation; let the
                // abort path allocate.
                hard.set(0);
                return false;
            }
            LIVE.set(live);
            if live > PEAK.get() {
                PEAK.set(live);
            }
            true
        })
        .unwrap_or(true)
    }

    fn shrink(n: usize) {
        let _ = HARD.try_with(|hard| {
            if hard.get() != 0 {
                LIVE.set(LIVE.get() - n as isize);
            }
        });
    }

    // SAFETY: every call is forwarded to the system allocator unchanged;
    // only the accounting (thread-local cells, no allocation) is added.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            if !grow(l.size()) {
                return std::ptr::null_mut();
            }
            System.alloc(l)
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            if !grow(l.size()) {
                return std::ptr::null_mut();
            }
            System.alloc_zeroed(l)
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            shrink(l.size());
            System.dealloc(p, l)
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            if new > l.size() {
                if !grow(new - l.size()) {
                    return std::ptr::null_mut();
                }
            } else {
                shrink(l.size() - new);
            }
            System.realloc(p, l, new)
        }
    }

    /// A panic stops the measurement of its thread first: the panic hook
    /// may allocate plenty (symbolizing a backtrace under RUST_BACKTRACE),
    /// and must not run into the cap.
    pub fn stop_on_panic() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let _ = HARD.try_with(|h| h.set(0));
                prev(info)
            }));
        });
    }

    struct Measuring;

    impl Drop for Measuring {
        fn drop(&mut self) {
            HARD.set(0);
        }
    }

    /// Run `f`, counting this thread's live allocations; returns its result
    /// and the peak live bytes it added. Past `hard` live bytes an allocation
    /// fails, which aborts the process.
    pub fn measure<T>(hard: usize, f: impl FnOnce() -> T) -> (T, usize) {
        LIVE.set(0);
        PEAK.set(0);
        HARD.set(hard.max(1));
        let guard = Measuring;
        let r = f();
        drop(guard);
        (r, PEAK.get().max(0) as usize)
    }
}

/// Run `f` on an input of `input_len` bytes; fail the case if it allocated
/// past its budget.
fn bounded<T>(input_len: usize, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let budget = BASE_BUDGET + PER_INPUT_BYTE * input_len;
    let (r, peak) = budget::measure(2 * budget, f);
    prop_assert!(
        peak <= budget,
        "parsing a {input_len}-byte input allocated {peak} live bytes (budget {budget})"
    );
    Ok(r)
}

// ---------------------------------------------------------------------------
// Runner

thread_local! {
    static ACCEPTED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Count a case whose input was accepted (reported with the case count, to
/// show the properties reach past the first check).
fn accepted() {
    ACCEPTED.set(ACCEPTED.get() + 1);
}

fn env_cases(default: u32) -> u32 {
    std::env::var("OFFSITE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed: 11 unless OFFSITE_FUZZ_SEED names one, or says `random` (a
/// new one, printed with the results so a failure can be replayed).
fn seed() -> RngSeed {
    match std::env::var("OFFSITE_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Fixed(rand::random()),
        Ok(s) => s.parse().unwrap_or(RngSeed::Fixed(11)),
        Err(_) => RngSeed::Fixed(11),
    }
}

/// Run `test` on `cases` values of `strategy` (see the module doc for the
/// environment variables), shrinking a failure to a small input.
fn run<S>(name: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let config = ProptestConfig {
        cases: env_cases(cases),
        failure_persistence: None,
        max_shrink_iters: 4096,
        rng_seed: seed(),
        ..ProptestConfig::default()
    };
    budget::stop_on_panic();
    let (n, seed) = (config.cases, config.rng_seed);
    let mut runner = TestRunner::new(config);
    let start = Instant::now();
    ACCEPTED.set(0);
    let r = runner.run(&strategy, test);
    eprintln!(
        "fuzz {name}: {n} cases ({} accepted) in {:.2?} (seed {seed})",
        ACCEPTED.get(),
        start.elapsed()
    );
    if let Err(e) = r {
        panic!("fuzz {name} (seed {seed}): {e}");
    }
}

// ---------------------------------------------------------------------------
// Generators

/// Hostile bytes, shown as an escaped string when a case fails.
#[derive(Clone, PartialEq)]
struct Hostile(Vec<u8>);

impl Debug for Hostile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\" ({} bytes)", self.0.escape_ascii(), self.0.len())
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Xor(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    Append(u8),
    Overwrite(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Xor(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<u8>().prop_map(Mutation::Append),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(i, v)| Mutation::Overwrite(i, v)),
    ]
}

fn mutations(max: usize) -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 0..=max)
}

fn mutate(b: &mut Vec<u8>, m: &Mutation) {
    let n = b.len();
    match m {
        Mutation::Xor(i, x) if n > 0 => b[i % n] ^= x,
        Mutation::Set(i, v) if n > 0 => b[i % n] = *v,
        Mutation::Insert(i, v) => b.insert(i % (n + 1), *v),
        Mutation::Delete(i) if n > 0 => {
            b.remove(i % n);
        }
        Mutation::Truncate(i) => b.truncate(i % (n + 1)),
        Mutation::Append(v) => b.push(*v),
        Mutation::Overwrite(i, v) if n > 0 => {
            let s = i % n;
            for (k, x) in v.iter().enumerate().take(n - s) {
                b[s + k] = *x;
            }
        }
        _ => {}
    }
}

fn h_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..8u64,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(MAX_TXID),
        1 => Just(MAX_TXID + 1),
        1 => Just(1u64 << 32),
        2 => any::<u64>(),
    ]
}

fn h_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0..8u32,
        1 => Just(u32::MAX),
        1 => Just(u32::MAX - 1),
        1 => Just(1u32 << 31),
        1 => (1u32 << 16)..(1u32 << 24),
        2 => any::<u32>(),
    ]
}

fn h_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => -2..200i64,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        2 => any::<i64>(),
    ]
}

/// Page sizes: mostly the smallest valid one (cheap), some other valid
/// ones, some hostile.
fn h_page_size() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => Just(512u32),
        1 => Just(1024u32),
        1 => Just(65536u32),
        1 => Just(0u32),
        1 => Just(511u32),
        1 => Just(131072u32),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

/// A hostile JSON value to put where a field was.
fn h_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
        Just(json!("x")),
        Just(json!([])),
        Just(json!({})),
        Just(json!("0".repeat(64))),
        any::<u32>().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
    ]
}

/// A change to a JSON object (a header, or its engine fields).
#[derive(Debug, Clone)]
enum JsonTweak {
    None,
    Remove(usize),
    Set(usize, Value),
    Add,
}

fn json_tweak() -> impl Strategy<Value = (JsonTweak, bool)> {
    (
        prop_oneof![
            12 => Just(JsonTweak::None),
            1 => any::<usize>().prop_map(JsonTweak::Remove),
            2 => (any::<usize>(), h_json()).prop_map(|(i, v)| JsonTweak::Set(i, v)),
            1 => Just(JsonTweak::Add),
        ],
        any::<bool>(),
    )
}

fn apply_tweak(v: &mut Value, (t, nested): &(JsonTweak, bool)) {
    let target = match v.get_mut("payload") {
        Some(p) if *nested && p.is_object() => p,
        _ => v,
    };
    let Value::Object(m) = target else { return };
    let keys: Vec<String> = m.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    match t {
        JsonTweak::None => {}
        JsonTweak::Remove(i) => {
            m.remove(&keys[i % keys.len()]);
        }
        JsonTweak::Set(i, h) => {
            m.insert(keys[i % keys.len()].clone(), h.clone());
        }
        JsonTweak::Add => {
            m.insert("unexpected".into(), json!(1));
        }
    }
}

// ---------------------------------------------------------------------------
// Fixtures: a replica, its shipper's key, objects made by the writers

const LINEAGE: &str = "0000000000000001-0000abcd";
const REPLICA: &str = "0123456789abcdef0123456789abcdef";
const DB: &str = "app.db";
/// Page size of the base snapshot that hostile segments continue.
const PS: usize = 512;

fn signer() -> Arc<Signer> {
    static S: OnceLock<Arc<Signer>> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Signer::parse(&format!("{SIGNING_PREFIX}{}", "42".repeat(32))).unwrap())
    })
    .clone()
}

fn age_keys() -> &'static (Identities, Recipients) {
    static K: OnceLock<(Identities, Recipients)> = OnceLock::new();
    K.get_or_init(|| {
        let (id, rcpt) = crate::keys::generate();
        (
            Identities::from_x25519(vec![id]),
            Recipients::parse_list(&[rcpt]).unwrap(),
        )
    })
}

fn seal(encrypted: bool) -> Seal {
    Seal {
        enc: if encrypted {
            Encryption::Age(age_keys().1.clone())
        } else {
            Encryption::None
        },
        binding: Binding {
            signer: Some(signer()),
            replica: REPLICA.into(),
            database: DB.into(),
        },
    }
}

/// A reader that pins the shipper's key and knows the replica and database.
fn trust() -> Trust {
    Trust {
        keys: vec![signer().public()],
        replica: Some(REPLICA.into()),
        database: Some(DB.into()),
        ..Trust::default()
    }
}

fn keys(encrypted: bool, allow_unsigned: bool) -> Keys {
    let mut trust = trust();
    trust.allow_unsigned = allow_unsigned;
    Keys {
        ids: encrypted.then(|| age_keys().0.clone()),
        trust,
    }
}

fn meta(first: u64, last: u64, time_us: i64, level: u8, link: String) -> EnvelopeMeta {
    EnvelopeMeta {
        engine: "sqlite".into(),
        replica: String::new(),
        database: String::new(),
        lineage: LINEAGE.into(),
        first_txid: first,
        last_txid: last,
        time_us,
        level,
        signer: String::new(),
        link,
        resume: json!({"frames": 0}),
    }
}

/// A format-3 object: `body` sealed under `env` (signed; age if `encrypted`).
fn signed_object(env: &Envelope, body: &[u8], encrypted: bool) -> Vec<u8> {
    let mut w = ObjectWriter::new(Vec::new(), env, &seal(encrypted)).unwrap();
    w.write_all(body).unwrap();
    w.finish().unwrap()
}

/// A format-1 envelope (SQLite only, unsigned, plaintext), as written before
/// the engine boundary; not validated (its txids may be hostile), as
/// `Envelope::read_from` would read it.
fn legacy_envelope(kind: ObjectKind, first: u64, last: u64) -> Envelope {
    let json = serde_json::to_vec(&json!({
        "lineage": LINEAGE,
        "first_txid": first,
        "last_txid": last,
        "resume_at": 0,
        "resume_tag": "",
        "state_tag": "",
    }))
    .unwrap();
    let mut raw = MAGIC.to_vec();
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.extend_from_slice(&[kind as u8, 0, 1, 0]);
    raw.extend_from_slice(&(json.len() as u16).to_le_bytes());
    raw.extend_from_slice(&json);
    let mut meta = meta(first, last, 0, 0, String::new());
    meta.resume = json!({"frames": 0, "tag": "", "state_tag": ""});
    Envelope {
        version: 1,
        kind,
        encrypted: false,
        meta,
        raw,
    }
}

fn legacy_object(env: &Envelope, body: &[u8]) -> Vec<u8> {
    let mut o = env.raw.clone();
    o.extend_from_slice(&zstd::encode_all(body, 3).unwrap());
    o
}

/// A framed body header: as the writers serialize `header`, or (tweaked)
/// through a JSON value.
fn framed<T: serde::Serialize>(header: &T, tweak: &(JsonTweak, bool)) -> Vec<u8> {
    let json = if matches!(tweak.0, JsonTweak::None) {
        serde_json::to_vec(header).unwrap()
    } else {
        let mut v = serde_json::to_value(header).unwrap();
        apply_tweak(&mut v, tweak);
        serde_json::to_vec(&v).unwrap()
    };
    let mut b = (json.len() as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&json);
    b
}

/// Append the body hash, apply `muts`, and (if `fix_hash`) make the hash
/// match the mutated body again, so the mutation reaches the parsers behind
/// it. Returns the body and whether it differs from the valid one.
fn finish_body(mut body: Vec<u8>, muts: &[Mutation], fix_hash: bool) -> (Vec<u8>, bool) {
    let h = blake3::hash(&body);
    body.extend_from_slice(h.as_bytes());
    let orig = body.clone();
    for m in muts {
        mutate(&mut body, m);
    }
    if fix_hash && body != orig && body.len() >= 32 {
        let n = body.len() - 32;
        let h = blake3::hash(&body[..n]);
        body[n..].copy_from_slice(h.as_bytes());
    }
    let changed = body != orig;
    (body, changed)
}

/// `pages::commit_len` for hostile page sizes too (the reader computes it
/// only for valid ones).
fn commit_len(records: u32, page_size: u32) -> u64 {
    (records as u64)
        .saturating_mul(4 + page_size as u64)
        .saturating_add(8)
}

fn valid_page_size(ps: u32) -> bool {
    (512..=65536).contains(&ps) && ps.is_power_of_two()
}

/// The bytes of a page filled with `fill` (hostile page sizes capped).
fn page_bytes(ps: u32, fill: u8) -> Vec<u8> {
    vec![fill; (ps as usize).min(65536)]
}

/// Drive a body the way `replay` does, without an engine: the header, then
/// the snapshot data (its length from the engine fields, when it has one) or
/// each commit's payload (read in chunks, or skipped), each digest, the
/// final hash.
fn drive_body(env: &Envelope, body: &[u8], skip: bool) -> anyhow::Result<()> {
    let (mut br, header) = BodyReader::open(body, env)?;
    match header {
        Header::Snapshot(h) => {
            let field = |k: &str| h.payload.get(k).and_then(Value::as_u64).unwrap_or(0);
            let want = field("page_size")
                .saturating_mul(field("db_pages"))
                .min(body.len() as u64 + 1);
            let mut buf = vec![0u8; want as usize];
            br.read_data(&mut buf)?;
            br.read_digest()?;
        }
        Header::Segment(h) => {
            for _ in 0..h.commit_count {
                br.read_commit_head()?;
                if skip {
                    br.skip_payload()?;
                } else {
                    let mut p = br.payload();
                    let mut chunk = [0u8; 4096];
                    while p.remaining() > 0 {
                        let n = p.remaining().min(chunk.len() as u64) as usize;
                        p.read_exact(&mut chunk[..n])?;
                    }
                }
                br.read_digest()?;
            }
        }
    }
    br.finish()
}

// ---------------------------------------------------------------------------
// Snapshots

#[derive(Debug, Clone)]
struct SnapPlan {
    legacy: bool,
    encrypted: bool,
    page_size: u32,
    db_pages: u32,
    /// One fill byte per page supplied.
    pages: Vec<u8>,
    /// Bytes after the pages, before the digest.
    extra: Vec<u8>,
    right_digest: bool,
    txid: u64,
    time_us: i64,
    tweak: (JsonTweak, bool),
    muts: Vec<Mutation>,
    fix_hash: bool,
}

fn snap_plan() -> impl Strategy<Value = SnapPlan> {
    (
        (any::<bool>(), prop::bool::weighted(0.15)),
        h_page_size(),
        prop_oneof![6 => 0..5u32, 1 => h_u32()],
        prop::collection::vec(any::<u8>(), 0..5),
        prop_oneof![6 => Just(vec![]), 1 => prop::collection::vec(any::<u8>(), 1..40)],
        prop::bool::weighted(0.9),
        prop_oneof![6 => Just(1u64), 1 => h_u64()],
        prop_oneof![6 => Just(100i64), 1 => h_i64()],
        json_tweak(),
        prop_oneof![2 => Just(vec![]), 1 => mutations(3)],
        prop::bool::weighted(0.8),
    )
        .prop_map(
            |(
                (legacy, enc),
                page_size,
                db_pages,
                pages,
                extra,
                right_digest,
                txid,
                time_us,
                tweak,
                muts,
                fix_hash,
            )| {
                // A consistent snapshot more often than chance would give.
                let db_pages = if db_pages < 5 {
                    pages.len() as u32
                } else {
                    db_pages
                };
                SnapPlan {
                    legacy,
                    encrypted: enc && !legacy,
                    page_size,
                    db_pages,
                    pages,
                    extra,
                    right_digest,
                    txid,
                    time_us,
                    tweak,
                    muts,
                    fix_hash,
                }
            },
        )
}

/// The digest of the pages of `fills` (`PageState`), if the page size is
/// valid.
fn pages_digest(ps: u32, fills: &[u8]) -> Option<[u8; 16]> {
    if !valid_page_size(ps) {
        return None;
    }
    let mut st = PageState::new(ps as usize);
    for (i, f) in fills.iter().enumerate() {
        st.set_page(i as u32 + 1, &page_bytes(ps, *f));
    }
    Some(st.checksum().0)
}

struct BuiltObject {
    env: Envelope,
    body: Vec<u8>,
    obj: Vec<u8>,
    changed: bool,
}

fn build_snapshot(p: &SnapPlan) -> (SnapshotEntry, BuiltObject) {
    let model = pages_digest(p.page_size, &p.pages);
    let mut digest = model.unwrap_or([0xEE; 16]);
    if !p.right_digest {
        digest[0] ^= 1;
    }
    let link = Link::genesis(LINEAGE, p.txid, p.time_us, &digest);
    let (env, mut body) = if p.legacy {
        let env = legacy_envelope(ObjectKind::Snapshot, p.txid, p.txid);
        let h = json!({
            "kind": "snapshot",
            "payload": "sqlite-pages",
            "lineage": LINEAGE,
            "page_size": p.page_size,
            "envelope_blake3": env.blake3_hex(),
            "txid": p.txid,
            "time_us": p.time_us,
            "db_pages": p.db_pages,
        });
        let body = framed(&h, &p.tweak);
        (env, body)
    } else {
        let env = Envelope::new(
            ObjectKind::Snapshot,
            &seal(p.encrypted),
            meta(p.txid, p.txid, p.time_us, 0, link.to_hex()),
        );
        let h = pages::snapshot_header(
            LINEAGE,
            env.blake3_hex(),
            (p.txid, p.time_us),
            link,
            SnapshotFields::new(p.page_size, p.db_pages),
        );
        let body = framed(&h, &p.tweak);
        (env, body)
    };
    for f in &p.pages {
        body.extend_from_slice(&page_bytes(p.page_size, *f));
    }
    body.extend_from_slice(&p.extra);
    body.extend_from_slice(&digest);
    let (body, changed) = finish_body(body, &p.muts, p.fix_hash);
    let obj = if p.legacy {
        legacy_object(&env, &body)
    } else {
        signed_object(&env, &body, p.encrypted)
    };
    let entry = SnapshotEntry {
        key: layout::snapshot_key(LINEAGE, p.txid, p.time_us),
        lineage: LINEAGE.into(),
        txid: p.txid,
        time_us: p.time_us,
        size: obj.len() as u64,
    };
    (
        entry,
        BuiltObject {
            env,
            body,
            obj,
            changed,
        },
    )
}

/// An independent reading of an accepted SQLite snapshot body: its engine
/// fields, the pages after the header, and nothing but the digest and the
/// hash after them. Returns the pages' digest.
fn reread_snapshot(body: &[u8], legacy: bool) -> Result<[u8; 16], TestCaseError> {
    let len = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&body[4..4 + len]).unwrap();
    let fields = if legacy { &header } else { &header["payload"] };
    let ps = fields["page_size"].as_u64().unwrap() as usize;
    let n = fields["db_pages"].as_u64().unwrap() as usize;
    let data = &body[4 + len..];
    prop_assert_eq!(
        data.len(),
        n * ps + 16 + 32,
        "accepted snapshot has bytes beyond its pages"
    );
    let mut st = PageState::new(ps);
    for i in 0..n {
        st.set_page(i as u32 + 1, &data[i * ps..(i + 1) * ps]);
    }
    prop_assert_eq!(&data[n * ps..n * ps + 16], &st.checksum().0[..]);
    Ok(st.checksum().0)
}

#[test]
fn hostile_snapshots_are_refused_or_restored_exactly() {
    run("snapshot", 1024, snap_plan(), |p| {
        let (entry, b) = build_snapshot(&p);
        let keys = keys(p.encrypted, p.legacy);
        let obj = Downloaded::Mem(b.obj.clone().into());
        let r = bounded(b.obj.len(), || {
            replay::apply_snapshot(&entry, &obj, &keys, None, None)
        })?;
        let direct = bounded(b.body.len(), || drive_body(&b.env, &b.body, false))?;
        match r {
            Ok(chain) => {
                accepted();
                prop_assert!(
                    direct.is_ok(),
                    "replay accepted a body the reader refuses: {direct:?}"
                );
                let digest = reread_snapshot(&b.body, p.legacy)?;
                prop_assert_eq!(chain.digest(), digest);
                prop_assert_eq!(chain.txid, p.txid);
                if !b.changed {
                    prop_assert!(p.right_digest && p.extra.is_empty());
                    prop_assert_eq!(p.db_pages as usize, p.pages.len());
                }
            }
            Err(_) => {
                // Written correctly by the writers, with sane fields: must
                // be accepted (the properties above are not vacuous).
                let sane = !b.changed
                    && matches!(p.tweak.0, JsonTweak::None)
                    && p.right_digest
                    && p.extra.is_empty()
                    && valid_page_size(p.page_size)
                    && p.db_pages as usize == p.pages.len()
                    && p.txid == 1
                    && p.time_us == 100;
                prop_assert!(!sane, "a valid snapshot was refused: {r:?}", r = r.err());
            }
        }
        Ok(())
    });
}

/// A snapshot restored to a file: the file holds exactly the pages.
#[test]
fn hostile_snapshots_restored_to_a_file_write_only_what_they_carry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.db");
    run("snapshot to file", 192, snap_plan(), |p| {
        let (entry, b) = build_snapshot(&p);
        let keys = keys(p.encrypted, p.legacy);
        let obj = Downloaded::Mem(b.obj.clone().into());
        let out = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let r = bounded(b.obj.len(), || {
            replay::apply_snapshot(&entry, &obj, &keys, None, Some(out))
        })?;
        let written = std::fs::metadata(&path).unwrap().len();
        prop_assert!(
            written <= b.body.len() as u64,
            "a {}-byte body left a {written}-byte file",
            b.body.len()
        );
        if let Ok(chain) = r {
            accepted();
            reread_snapshot(&b.body, p.legacy)?;
            let file = std::fs::read(&path).unwrap();
            let len = u32::from_le_bytes(b.body[..4].try_into().unwrap()) as usize;
            prop_assert_eq!(&file[..], &b.body[4 + len..4 + len + file.len()]);
            drop(chain);
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Segments

#[derive(Debug, Clone)]
struct CommitPlan {
    /// Database size after the commit: the size before plus this, or hostile.
    grow: i8,
    db_pages: Option<u32>,
    /// (page number choice, fill): `pgno = 1 + choice % db_pages`, or hostile.
    records: Vec<(u32, bool, u8)>,
    records_declared: Option<u32>,
    payload_len: Option<u64>,
    txid: Option<u64>,
    right_digest: bool,
}

fn commit_plan() -> impl Strategy<Value = CommitPlan> {
    (
        -3..4i8,
        prop_oneof![8 => Just(None), 1 => h_u32().prop_map(Some)],
        prop::collection::vec((any::<u32>(), prop::bool::weighted(0.1), any::<u8>()), 0..4),
        prop_oneof![8 => Just(None), 1 => h_u32().prop_map(Some)],
        prop_oneof![8 => Just(None), 1 => h_u64().prop_map(Some)],
        prop_oneof![12 => Just(None), 1 => h_u64().prop_map(Some)],
        prop::bool::weighted(0.9),
    )
        .prop_map(
            |(grow, db_pages, records, records_declared, payload_len, txid, right_digest)| {
                CommitPlan {
                    grow,
                    db_pages,
                    records,
                    records_declared,
                    payload_len,
                    txid,
                    right_digest,
                }
            },
        )
}

#[derive(Debug, Clone)]
struct SegPlan {
    legacy: bool,
    encrypted: bool,
    level: u8,
    truncate_to: Option<u32>,
    page_size: Option<u32>,
    commits: Vec<CommitPlan>,
    commit_count: Option<u32>,
    right_prev_link: bool,
    tweak: (JsonTweak, bool),
    muts: Vec<Mutation>,
    fix_hash: bool,
    /// Restore to a time: commits after it are read without being applied.
    stop_time: Option<i64>,
    skip: bool,
}

fn seg_plan() -> impl Strategy<Value = SegPlan> {
    (
        (any::<bool>(), prop::bool::weighted(0.15)),
        prop_oneof![6 => Just(0u8), 1 => 1..3u8, 1 => any::<u8>()],
        prop_oneof![1 => Just(None), 2 => (0..6u32).prop_map(Some), 1 => h_u32().prop_map(Some)],
        prop_oneof![10 => Just(None), 1 => h_page_size().prop_map(Some)],
        prop::collection::vec(commit_plan(), 0..4),
        prop_oneof![10 => Just(None), 1 => h_u32().prop_map(Some)],
        prop::bool::weighted(0.9),
        json_tweak(),
        prop_oneof![2 => Just(vec![]), 1 => mutations(3)],
        prop::bool::weighted(0.8),
        prop_oneof![3 => Just(None), 1 => (98..106i64).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(
                (legacy, enc),
                level,
                truncate_to,
                page_size,
                commits,
                commit_count,
                right_prev_link,
                tweak,
                muts,
                fix_hash,
                stop_time,
                skip,
            )| {
                let mut commits = commits;
                if level > 0 {
                    commits.truncate(1);
                }
                SegPlan {
                    legacy,
                    encrypted: enc && !legacy,
                    level,
                    truncate_to: if level > 0 { truncate_to } else { None },
                    page_size,
                    commits,
                    commit_count,
                    right_prev_link,
                    tweak,
                    muts,
                    fix_hash,
                    stop_time,
                    skip,
                }
            },
        )
}

/// The chain hostile segments continue: a valid 3-page snapshot at txid 1.
struct Base {
    chain: Chain,
    state: PageState,
}

fn base(legacy: bool) -> Base {
    let p = SnapPlan {
        legacy,
        encrypted: false,
        page_size: PS as u32,
        db_pages: 3,
        pages: vec![1, 2, 3],
        extra: vec![],
        right_digest: true,
        txid: 1,
        time_us: 100,
        tweak: (JsonTweak::None, false),
        muts: vec![],
        fix_hash: false,
    };
    let (entry, b) = build_snapshot(&p);
    let obj = Downloaded::Mem(b.obj.into());
    let chain = replay::apply_snapshot(&entry, &obj, &keys(false, legacy), None, None).unwrap();
    let mut state = PageState::new(PS);
    for (i, f) in p.pages.iter().enumerate() {
        state.set_page(i as u32 + 1, &page_bytes(PS as u32, *f));
    }
    assert_eq!(state.checksum().0, chain.digest());
    Base { chain, state }
}

/// Largest state the generator's own model replays (hostile sizes are
/// written with a wrong digest instead).
const MODEL_MAX_PAGES: u32 = 4096;

/// A segment continuing `base`, and the model's state after it (None: the
/// plan is hostile enough that the model did not follow it).
fn build_segment(base: &Base, p: &SegPlan) -> (SegmentEntry, BuiltObject, Option<[u8; 16]>) {
    let ps = p.page_size.unwrap_or(PS as u32);
    let first = base.chain.txid + 1;
    let n = p.commits.len() as u64;
    let last = if p.level > 0 {
        first + 1
    } else {
        (first + n).saturating_sub(1)
    };
    let mut model = Some(base.state.clone());
    let mut link = base.chain.link;
    let mut commits = Vec::new();
    let mut last_time = 100;
    for (i, c) in p.commits.iter().enumerate() {
        let txid = c
            .txid
            .unwrap_or(if p.level > 0 { last } else { first + i as u64 });
        let time_us = 101 + i as i64;
        last_time = time_us;
        let before = model.as_ref().map(|s| s.pages()).unwrap_or(3);
        let db_pages = c
            .db_pages
            .unwrap_or_else(|| (before as i64 + c.grow as i64).max(0) as u32);
        let records: Vec<(u32, u8)> = c
            .records
            .iter()
            .map(|&(choice, hostile, fill)| {
                let pgno = if hostile {
                    choice
                } else {
                    1 + choice % db_pages.max(1)
                };
                (pgno, fill)
            })
            .collect();
        // The generator's model, for sane sizes only.
        if let Some(st) = model.as_mut() {
            let sane = valid_page_size(ps)
                && ps as usize == PS
                && db_pages <= MODEL_MAX_PAGES
                && p.truncate_to.is_none_or(|t| t <= db_pages)
                && records.iter().all(|(g, _)| (1..=db_pages).contains(g))
                && records
                    .iter()
                    .map(|(g, _)| g)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
                    == records.len();
            if sane {
                if let Some(t) = p.truncate_to {
                    st.resize(t);
                }
                for (g, f) in &records {
                    st.set_page(*g, &page_bytes(ps, *f));
                }
                st.resize(db_pages);
            } else {
                model = None;
            }
        }
        let mut digest = model.as_ref().map(|s| s.checksum().0).unwrap_or([0xEE; 16]);
        if !c.right_digest {
            digest[1] ^= 1;
            model = None;
        }
        link = if p.legacy {
            Link(digest)
        } else {
            link.next(txid, time_us, &digest)
        };
        commits.push((txid, time_us, db_pages, records, digest, c));
    }
    if commits.is_empty() {
        model = None;
    }
    let prev_link = if p.right_prev_link {
        base.chain.link
    } else {
        Link([0x55; 16])
    };
    let (env, mut body) = if p.legacy {
        let env = legacy_envelope(ObjectKind::Segment, first, last);
        let mut h = json!({
            "kind": "segment",
            "payload": "sqlite-pages",
            "lineage": LINEAGE,
            "page_size": ps,
            "envelope_blake3": env.blake3_hex(),
            "first_txid": first,
            "last_txid": last,
            "commit_count": p.commit_count.unwrap_or(n as u32),
            "prev_checksum": prev_link.to_hex(),
            "level": p.level,
        });
        if let Some(t) = p.truncate_to {
            h["truncate_to"] = t.into();
        }
        let body = framed(&h, &p.tweak);
        (env, body)
    } else {
        let env = Envelope::new(
            ObjectKind::Segment,
            &seal(p.encrypted),
            meta(first, last, last_time, p.level, link.to_hex()),
        );
        let h = pages::segment_header(
            LINEAGE,
            env.blake3_hex(),
            (first, last),
            p.commit_count.unwrap_or(n as u32),
            p.level,
            prev_link,
            (p.level > 0).then_some(link),
            SegmentFields::new(ps, p.truncate_to),
        );
        let body = framed(&h, &p.tweak);
        (env, body)
    };
    for (txid, time_us, db_pages, records, digest, c) in &commits {
        let declared = c.records_declared.unwrap_or(records.len() as u32);
        body.extend_from_slice(&txid.to_le_bytes());
        body.extend_from_slice(&time_us.to_le_bytes());
        if !p.legacy {
            let len = c.payload_len.unwrap_or(commit_len(declared, ps));
            body.extend_from_slice(&len.to_le_bytes());
        }
        body.extend_from_slice(&db_pages.to_le_bytes());
        body.extend_from_slice(&declared.to_le_bytes());
        for (pgno, fill) in records {
            body.extend_from_slice(&pgno.to_le_bytes());
            body.extend_from_slice(&page_bytes(ps, *fill));
        }
        body.extend_from_slice(digest);
    }
    let (body, changed) = finish_body(body, &p.muts, p.fix_hash);
    let obj = if p.legacy {
        legacy_object(&env, &body)
    } else {
        signed_object(&env, &body, p.encrypted)
    };
    let entry = SegmentEntry {
        key: layout::segment_key(LINEAGE, p.level, first, last, last_time),
        lineage: LINEAGE.into(),
        level: p.level,
        first_txid: first,
        last_txid: last,
        last_time_us: last_time,
        size: obj.len() as u64,
    };
    // (The base snapshot is plaintext: an encrypted segment cannot follow.)
    let sane = !changed
        && !p.encrypted
        && matches!(p.tweak.0, JsonTweak::None)
        && p.right_prev_link
        && p.commit_count.is_none()
        && p.level == 0
        && p.commits
            .iter()
            .all(|c| c.records_declared.is_none() && c.payload_len.is_none() && c.txid.is_none());
    let model = model.filter(|_| sane).map(|s| s.checksum().0);
    (
        entry,
        BuiltObject {
            env,
            body,
            obj,
            changed,
        },
        model,
    )
}

/// With nothing hostile in the plan, the generators write exactly what the
/// writers write, so every mutation starts from a real object.
#[test]
fn generated_bodies_are_the_writers_bodies() {
    let p = SnapPlan {
        legacy: false,
        encrypted: false,
        page_size: PS as u32,
        db_pages: 2,
        pages: vec![7, 8],
        extra: vec![],
        right_digest: true,
        txid: 1,
        time_us: 100,
        tweak: (JsonTweak::None, false),
        muts: vec![],
        fix_hash: false,
    };
    let (_, b) = build_snapshot(&p);
    let digest = pages_digest(PS as u32, &[7, 8]).unwrap();
    let link = Link::genesis(LINEAGE, 1, 100, &digest);
    let header = pages::snapshot_header(
        LINEAGE,
        b.env.blake3_hex(),
        (1, 100),
        link,
        SnapshotFields::new(PS as u32, 2),
    );
    let mut w = SnapshotWriter::new(Vec::new(), &header).unwrap();
    w.write_data(&page_bytes(PS as u32, 7)).unwrap();
    w.write_data(&page_bytes(PS as u32, 8)).unwrap();
    assert_eq!(w.finish(&digest).unwrap(), b.body);

    let base = base(false);
    let c = CommitPlan {
        grow: 1,
        db_pages: None,
        records: vec![(3, false, 9), (0, false, 5)],
        records_declared: None,
        payload_len: None,
        txid: None,
        right_digest: true,
    };
    let p = SegPlan {
        legacy: false,
        encrypted: false,
        level: 0,
        truncate_to: None,
        page_size: None,
        commits: vec![c.clone(), c],
        commit_count: None,
        right_prev_link: true,
        tweak: (JsonTweak::None, false),
        muts: vec![],
        fix_hash: false,
        stop_time: None,
        skip: false,
    };
    let (entry, b, model) = build_segment(&base, &p);
    let header = pages::segment_header(
        LINEAGE,
        b.env.blake3_hex(),
        (2, 3),
        2,
        0,
        base.chain.link,
        None,
        SegmentFields::new(PS as u32, None),
    );
    let mut w = SegmentWriter::new(Vec::new(), &header).unwrap();
    let mut st = base.state.clone();
    // Commit i grows the database to 3 + i pages and writes pages
    // 1 + 3 % db_pages and 1.
    for (txid, db_pages) in [(2u64, 4u32), (3, 5)] {
        pages::begin_commit(&mut w, (txid, 99 + txid as i64), db_pages, 2, PS as u32).unwrap();
        for (pgno, fill) in [(1 + 3 % db_pages, 9), (1, 5)] {
            let page = page_bytes(PS as u32, fill);
            pages::write_record(&mut w, db_pages, pgno, &page).unwrap();
            st.set_page(pgno, &page);
        }
        st.resize(db_pages);
        w.end_commit(&st.checksum().0).unwrap();
    }
    assert_eq!(w.finish().unwrap(), b.body);
    assert_eq!(model, Some(st.checksum().0));
    let mut chain = base.chain.fork();
    let obj = Downloaded::Mem(b.obj.into());
    replay::apply_segment(&mut chain, Stop::NEVER, &entry, &obj, &keys(false, false)).unwrap();
    assert_eq!(chain.digest(), st.checksum().0);
}

#[test]
fn hostile_segments_are_refused_or_applied_exactly() {
    let bases = [base(false), base(true)];
    run("segment", 1536, seg_plan(), |p| {
        let base = &bases[p.legacy as usize];
        let (entry, b, model) = build_segment(base, &p);
        let keys = keys(p.encrypted, p.legacy);
        let obj = Downloaded::Mem(b.obj.clone().into());
        let stop = Stop {
            txid: u64::MAX,
            time_us: p.stop_time,
        };
        let mut chain = base.chain.fork();
        let applied = bounded(b.obj.len(), || {
            replay::apply_segment(&mut chain, stop, &entry, &obj, &keys)
        })?;
        let lone = bounded(b.obj.len(), || {
            replay::check_lone_segment(&entry, &obj, &keys)
        })?;
        let direct = bounded(b.body.len(), || drive_body(&b.env, &b.body, p.skip))?;
        if let Ok((last, _)) = &applied {
            if last.is_some() {
                accepted();
            }
            // (Past a stop time, commits are read and hashed, not parsed.)
            if p.stop_time.is_none() {
                prop_assert!(lone.is_ok(), "applied but refused alone: {lone:?}");
                prop_assert!(
                    direct.is_ok(),
                    "applied but refused by the reader: {direct:?}"
                );
            }
            if let Some((txid, _)) = last {
                prop_assert_eq!(chain.txid, *txid);
            }
        }
        if let Some(model) = model {
            // Written correctly with sane sizes: applied exactly as the
            // model says (a stop time only stops it early).
            let (last, _) = applied
                .map_err(|e| TestCaseError::fail(format!("a valid segment was refused: {e:#}")))?;
            if p.stop_time.is_none() {
                prop_assert_eq!(last.map(|l| l.0), Some(entry.last_txid));
                prop_assert_eq!(chain.digest(), model);
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// The page replay on its own: hostile engine fields and payloads

/// A payload whose declared length (`remaining`) need not match its bytes.
struct Declared<'a> {
    data: &'a [u8],
    declared: u64,
}

impl ExactRead for Declared<'_> {
    fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            buf.len() as u64 <= self.declared,
            "past the declared length"
        );
        anyhow::ensure!(buf.len() <= self.data.len(), "truncated");
        buf.copy_from_slice(&self.data[..buf.len()]);
        self.data = &self.data[buf.len()..];
        self.declared -= buf.len() as u64;
        Ok(())
    }
    fn remaining(&self) -> u64 {
        self.declared
    }
}

/// A commit for the page replay: database size, declared record count,
/// declared payload length, records (page number, fill), and a large size
/// that overrides the first three (see `replay_plan`).
type CommitSpec = (u32, Option<u32>, Option<u64>, Vec<(u32, u8)>, Option<u32>);

#[derive(Debug, Clone)]
struct ReplayPlan {
    snapshot: (u32, u32, Vec<u8>),
    segment_page_size: u32,
    truncate_to: Option<u32>,
    commits: Vec<CommitSpec>,
    check_only: bool,
}

fn replay_plan() -> impl Strategy<Value = ReplayPlan> {
    let record = (prop_oneof![4 => 1..8u32, 1 => h_u32()], any::<u8>());
    let commit = (
        prop_oneof![4 => 0..8u32, 1 => h_u32()],
        prop_oneof![3 => Just(None), 1 => h_u32().prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => h_u64().prop_map(Some)],
        prop::collection::vec(record, 0..4),
        // A large database size, record count and page numbers that agree
        // with each other (but not with the records carried).
        prop_oneof![4 => Just(None), 1 => ((1u32 << 12)..(1u32 << 22)).prop_map(Some)],
    );
    (
        (
            h_page_size(),
            prop_oneof![4 => 0..5u32, 1 => h_u32()],
            prop::collection::vec(any::<u8>(), 0..5),
        ),
        prop_oneof![6 => Just(512u32), 1 => h_page_size()],
        prop_oneof![3 => Just(None), 1 => h_u32().prop_map(Some), 1 => (0..8u32).prop_map(Some)],
        prop::collection::vec(commit, 0..4),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(snapshot, segment_page_size, truncate_to, commits, check_only)| ReplayPlan {
                snapshot,
                segment_page_size,
                truncate_to,
                commits,
                check_only,
            },
        )
}

#[test]
fn page_replay_refuses_hostile_sizes_without_allocating_for_them() {
    run("page replay", 2048, replay_plan(), |p| {
        let (ps, n, fills) = &p.snapshot;
        let mut data = Vec::new();
        for f in fills {
            data.extend_from_slice(&page_bytes(*ps, *f));
        }
        let header = SnapshotFields::new(*ps, *n).to_value();
        let mut replay = PageReplay::new(None);
        let snap = bounded(data.len(), || {
            replay.snapshot(
                &header,
                &mut Declared {
                    data: &data,
                    declared: u64::MAX,
                },
            )
        })?;
        if snap.is_ok() {
            // Only pages it was given: the state is their digest.
            prop_assert!(*n as usize <= fills.len());
            prop_assert_eq!(
                Some(replay.digest()),
                pages_digest(*ps, &fills[..*n as usize])
            );
        }
        let seg = SegmentFields::new(p.segment_page_size, p.truncate_to).to_value();
        if replay.begin_segment(&seg).is_err() {
            return Ok(());
        }
        let sps = p.segment_page_size;
        for (db_pages, declared, len, records, big) in &p.commits {
            let (db_pages, declared, records) = match *big {
                Some(b) => {
                    let r = records
                        .iter()
                        .enumerate()
                        .map(|(i, (_, f))| (b - i as u32, *f));
                    (b, b, r.collect::<Vec<_>>())
                }
                None => (
                    *db_pages,
                    declared.unwrap_or(records.len() as u32),
                    records.clone(),
                ),
            };
            let mut payload = Vec::new();
            payload.extend_from_slice(&db_pages.to_le_bytes());
            payload.extend_from_slice(&declared.to_le_bytes());
            for (pgno, fill) in &records {
                payload.extend_from_slice(&pgno.to_le_bytes());
                payload.extend_from_slice(&page_bytes(sps, *fill));
            }
            let before = replay.digest();
            let mut input = Declared {
                data: &payload,
                declared: len.unwrap_or(commit_len(declared, sps)),
            };
            let r = bounded(payload.len(), || {
                if p.check_only {
                    replay.check_commit(&mut input).map(|_| [0; 16])
                } else {
                    replay.commit(&mut input)
                }
            })?;
            match r {
                Ok(d) if !p.check_only => {
                    accepted();
                    prop_assert_eq!(d, replay.digest());
                    prop_assert_eq!(input.remaining(), 0, "commit left payload unread");
                }
                Ok(_) => prop_assert_eq!(replay.digest(), before),
                // A refused commit ends the replay (the state is not used).
                Err(_) => break,
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Envelopes and whole objects

/// Bytes shaped like an envelope: the magic, hostile fixed fields and
/// metadata (generated, then possibly damaged), and whatever follows.
fn envelope_bytes() -> impl Strategy<Value = Vec<u8>> {
    let meta = (
        h_u64(),
        h_u64(),
        h_i64(),
        any::<u8>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(first, last, time_us, level, signed, legacy)| {
            if legacy {
                serde_json::to_vec(&json!({
                    "lineage": LINEAGE, "first_txid": first, "last_txid": last,
                    "resume_at": 0, "resume_tag": "", "state_tag": "",
                }))
                .unwrap()
            } else {
                let mut m = meta(first, last, time_us, level, "00".repeat(16));
                if signed {
                    m.signer = signer().public().hex();
                    m.replica = REPLICA.into();
                }
                serde_json::to_vec(&m).unwrap()
            }
        });
    (
        prop_oneof![0..5u16, any::<u16>()],
        0..4u8,
        0..3u8,
        0..3u8,
        any::<u8>(),
        prop_oneof![3 => Just(None), 1 => any::<u16>().prop_map(Some)],
        meta,
        mutations(2),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(
            |(version, kind, enc, comp, reserved, len, json, muts, tail)| {
                let mut json = json;
                for m in &muts {
                    mutate(&mut json, m);
                }
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&version.to_le_bytes());
                b.extend_from_slice(&[kind, enc, comp, reserved]);
                b.extend_from_slice(&len.unwrap_or(json.len() as u16).to_le_bytes());
                b.extend_from_slice(&json);
                b.extend_from_slice(&tail);
                b
            },
        )
}

fn hostile_object_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..600),
        3 => envelope_bytes(),
        3 => (valid_object(), mutations(4)).prop_map(|((obj, _), muts)| {
            let mut obj = obj;
            for m in &muts {
                mutate(&mut obj, m);
            }
            obj
        }),
    ]
}

#[test]
fn envelopes_are_refused_or_read_consistently() {
    run(
        "envelope",
        2048,
        hostile_object_bytes().prop_map(Hostile),
        |Hostile(bytes)| {
            let r = bounded(bytes.len(), || Envelope::read_from(&mut &bytes[..]))?;
            if let Ok(env) = r {
                accepted();
                prop_assert!(env.raw.len() >= 16 && bytes.starts_with(&env.raw));
                prop_assert!((1..=3).contains(&env.version));
                prop_assert!(env.meta.first_txid <= env.meta.last_txid);
                prop_assert!(env.meta.last_txid <= MAX_TXID);
                let meta_len = u16::from_le_bytes([bytes[14], bytes[15]]) as usize;
                prop_assert_eq!(env.raw.len(), 16 + meta_len);
                if env.version < 3 {
                    prop_assert!(env.meta.signer.is_empty() && env.meta.replica.is_empty());
                }
            }
            Ok(())
        },
    );
}

/// Objects as hostile bytes, with a right or a wrong length, for
/// `authenticate` (strict and lax) and `open_object` (reading at most
/// 256 KiB of what it decodes: decompression bombs are the restore's
/// streaming's business, not a parser's).
#[test]
fn whole_objects_are_refused_or_authenticated_consistently() {
    let lens = prop_oneof![6 => Just(0i64), 1 => -100..100i64, 1 => Just(i64::MAX)];
    run(
        "object",
        1536,
        (
            hostile_object_bytes().prop_map(Hostile),
            lens,
            any::<bool>(),
        ),
        |(Hostile(bytes), delta, lax)| {
            let len = (bytes.len() as i64).saturating_add(delta).max(0) as u64;
            let mut t = trust();
            t.allow_unsigned = lax;
            let r = bounded(bytes.len(), || authenticate(&bytes[..], len, &t))?;
            if let Ok((env, auth, end)) = &r {
                accepted();
                prop_assert!(*end <= len);
                if env.has_footer() {
                    // (Format 1 and 2 have no footer: their length is not
                    // checked, nor used.)
                    prop_assert_eq!(len, bytes.len() as u64, "accepted under a wrong length");
                    prop_assert_eq!(*end, len - FOOTER_LEN as u64);
                }
                if !lax {
                    prop_assert_eq!(*auth, crate::codec::Authenticity::Signed(signer().public()));
                }
            }
            let ids = &age_keys().0;
            let opened = bounded(bytes.len(), || {
                open_object(&bytes[..], len, Some(ids)).and_then(|(_, body)| {
                    let mut out = Vec::new();
                    body.take(256 << 10).read_to_end(&mut out)?;
                    Ok(out)
                })
            })?;
            let _ = opened;
            Ok(())
        },
    );
}

/// A valid signed object (plain or encrypted) and its payload.
fn valid_object() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::collection::vec(any::<u8>(), 0..300),
        prop::bool::weighted(0.3),
        any::<bool>(),
        1..1000u64,
    )
        .prop_map(|(payload, encrypted, snapshot, txid)| {
            let kind = if snapshot {
                ObjectKind::Snapshot
            } else {
                ObjectKind::Segment
            };
            let env = Envelope::new(
                kind,
                &seal(encrypted),
                meta(txid, txid, 100, 0, "00".repeat(16)),
            );
            (signed_object(&env, &payload, encrypted), payload)
        })
}

fn refused(obj: &[u8], allow_unsigned: bool) -> bool {
    let mut t = trust();
    t.allow_unsigned = allow_unsigned;
    authenticate(obj, obj.len() as u64, &t).is_err()
}

#[test]
fn any_change_to_a_signed_object_is_refused() {
    let strategy = (valid_object(), prop::collection::vec(mutation(), 1..5));
    run(
        "signed object mutations",
        1024,
        strategy,
        |((obj, payload), muts)| {
            prop_assert!(!refused(&obj, false));
            let ids = &age_keys().0;
            let (_, mut body) = open_object(&obj[..], obj.len() as u64, Some(ids)).unwrap();
            let mut out = Vec::new();
            body.read_to_end(&mut out).unwrap();
            prop_assert_eq!(out, payload);
            let mut bad = obj.clone();
            for m in &muts {
                mutate(&mut bad, m);
            }
            if bad != obj {
                prop_assert!(refused(&bad, false), "a changed object was authenticated");
                prop_assert!(
                    refused(&bad, true),
                    "a changed object was accepted as unsigned"
                );
            }
            Ok(())
        },
    );
}

/// Every single-byte change (three values per position), insertion,
/// deletion and truncation of small signed objects, plain and encrypted.
#[test]
fn every_single_byte_change_to_a_signed_object_is_refused() {
    let start = Instant::now();
    let mut tried = 0;
    for encrypted in [false, true] {
        let env = Envelope::new(
            ObjectKind::Segment,
            &seal(encrypted),
            meta(7, 9, 123, 1, "ab".repeat(16)),
        );
        let obj = signed_object(&env, b"three commits", encrypted);
        assert!(!refused(&obj, false));
        let mut check = |bad: Vec<u8>, what: &str| {
            tried += 1;
            assert!(refused(&bad, false), "{what}: authenticated");
            assert!(refused(&bad, true), "{what}: accepted as unsigned");
        };
        for i in 0..obj.len() {
            for x in [0x01, 0x80, 0xff] {
                let mut bad = obj.clone();
                bad[i] ^= x;
                check(bad, &format!("byte {i} ^ {x:#x}"));
            }
            let mut bad = obj.clone();
            bad.insert(i, obj[i]);
            check(bad, &format!("byte {i} doubled"));
            let mut bad = obj.clone();
            bad.remove(i);
            check(bad, &format!("byte {i} deleted"));
            check(obj[..i].to_vec(), &format!("truncated to {i}"));
        }
        let mut longer = obj.clone();
        longer.push(0);
        check(longer, "one byte appended");
    }
    eprintln!(
        "fuzz single-byte changes: {tried} objects in {:.2?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------
// replica.json, head.json, lease.json

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// JSON records: a valid one damaged, a generated one with hostile
/// fields, or bytes.
fn record_bytes(valid: Vec<u8>, fields: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    let generated = prop::collection::vec((0..fields.len(), h_json()), 0..3).prop_map({
        let valid = valid.clone();
        move |sets| {
            let mut v: Value = serde_json::from_slice(&valid).unwrap();
            for (i, h) in sets {
                v[fields[i]] = h;
            }
            serde_json::to_vec(&v).unwrap()
        }
    });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..300),
        3 => mutations(3).prop_map(move |muts| {
            let mut b = valid.clone();
            for m in &muts {
                mutate(&mut b, m);
            }
            b
        }),
        2 => generated,
    ]
}

fn sig_bytes(hex: &str) -> Option<Vec<u8>> {
    hex::decode(hex).ok()
}

#[test]
fn replica_records_are_refused_or_verified_as_signed() {
    let rec = ReplicaRecord::new(Engine::Sqlite, REPLICA.into(), DB, &signer());
    let valid = serde_json::to_vec(&rec).unwrap();
    const FIELDS: &[&str] = &["format", "engine", "replica", "database", "signer", "sig"];
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    run(
        "replica.json",
        512,
        record_bytes(valid, FIELDS).prop_map(Hostile),
        |Hostile(bytes)| {
            let parsed = bounded(bytes.len(), || {
                serde_json::from_slice::<ReplicaRecord>(&bytes)
            })?;
            let t = Trust::with_keys(vec![signer().public()]);
            if let Ok(r) = &parsed {
                if let Ok(key) = bounded(bytes.len(), || r.check(&t))? {
                    accepted();
                    prop_assert_eq!(key, signer().public());
                    // What the signature covers is what was signed.
                    prop_assert_eq!(
                        (r.format, &r.engine, &r.replica, &r.database, &r.signer),
                        (
                            rec.format,
                            &rec.engine,
                            &rec.replica,
                            &rec.database,
                            &rec.signer
                        )
                    );
                    prop_assert_eq!(sig_bytes(&r.sig), sig_bytes(&rec.sig));
                }
            }
            // Through the store, as every command reads it.
            rt.block_on(store.put(crate::record::RECORD_KEY, Body::Bytes(bytes.clone().into())))
                .unwrap();
            let mut t = trust();
            t.replica = None;
            let opened = bounded(bytes.len(), || {
                rt.block_on(crate::record::open(&store, &mut t))
            })?;
            if opened.is_ok() {
                if let Some(id) = &t.replica {
                    prop_assert_eq!(id.as_str(), REPLICA);
                }
            }
            Ok(())
        },
    );
}

#[test]
fn head_records_are_refused_or_verified_as_signed() {
    let rec = crate::head::HeadRecord::new(REPLICA, LINEAGE, 42, 4242, &signer());
    let valid = serde_json::to_vec(&rec).unwrap();
    const FIELDS: &[&str] = &["replica", "lineage", "txid", "time_us", "signer", "sig"];
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    run(
        "head.json",
        384,
        record_bytes(valid, FIELDS).prop_map(Hostile),
        |Hostile(bytes)| {
            rt.block_on(store.put(crate::head::HEAD_KEY, Body::Bytes(bytes.clone().into())))
                .unwrap();
            let t = trust();
            let r = bounded(bytes.len(), || rt.block_on(crate::head::read(&store, &t)))?;
            if let Ok(Some(h)) = r {
                accepted();
                prop_assert_eq!(
                    (&h.replica, &h.lineage, h.txid, h.time_us, &h.signer),
                    (
                        &rec.replica,
                        &rec.lineage,
                        rec.txid,
                        rec.time_us,
                        &rec.signer
                    )
                );
                prop_assert_eq!(sig_bytes(&h.sig), sig_bytes(&rec.sig));
            }
            Ok(())
        },
    );
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[test]
fn hostile_leases_never_panic_the_shipper() {
    let valid = serde_json::to_vec(&json!({
        "shipper": "0123456789abcdef",
        "host": hostname(),
        "pid": 1,
        "started": 1,
        "db": "/other.db",
        "renewed_us": 1_000_000_000_000i64,
    }))
    .unwrap();
    const FIELDS: &[&str] = &["shipper", "host", "pid", "started", "db", "renewed_us"];
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    // The clock is ours (any time from 1970 to 2262); the lease is not.
    let strategy = (
        record_bytes(valid, FIELDS).prop_map(Hostile),
        0..i64::MAX / 1000,
    );
    run("lease.json", 256, strategy, |(Hostile(bytes), now_us)| {
        rt.block_on(store.put(crate::lease::LEASE_KEY, Body::Bytes(bytes.clone().into())))
            .unwrap();
        let mut lease = crate::lease::Lease::new(
            "/x.db",
            std::time::Duration::from_secs(300),
            std::time::Duration::ZERO,
        );
        let r = bounded(bytes.len(), || rt.block_on(lease.ensure(&store, now_us)))?;
        if r.is_ok() {
            accepted();
        }
        prop_assert_eq!(r.is_ok(), lease.held());
        Ok(())
    });
}

// ---------------------------------------------------------------------------
// Object names

fn key_strategy() -> impl Strategy<Value = String> {
    let hex16 = prop_oneof![
        6 => (1..=MAX_TXID).prop_map(|v| format!("{v:016x}")),
        2 => h_u64().prop_map(|v| format!("{v:016x}")),
        1 => h_u64().prop_map(|v| format!("{v:016X}")),
        1 => h_u64().prop_map(|v| format!("{v:x}")),
        1 => "[0-9a-fA-F+-]{0,18}",
    ];
    let time16 = prop_oneof![
        4 => (0..=i64::MAX as u64 / 1000).prop_map(|v| format!("{v:016x}")),
        1 => hex16.clone(),
    ];
    let lineage = prop_oneof![
        4 => (hex16.clone(), "[0-9a-f]{8}").prop_map(|(a, b)| format!("{a}-{b}")),
        1 => "[0-9a-z-]{0,30}",
    ];
    let level = prop_oneof![
        (0..300u32).prop_map(|l| l.to_string()),
        Just("00".to_string()),
        Just("+1".to_string()),
        Just(String::new()),
        "[0-9]{1,4}",
    ];
    let snapshot = (
        lineage.clone(),
        hex16.clone(),
        time16.clone(),
        prop_oneof![3 => Just(".snap"), 1 => Just(".seg"), 1 => Just("")],
    )
        .prop_map(|(l, a, b, ext)| format!("lineages/{l}/snapshots/{a}-{b}{ext}"));
    let segment = (
        lineage,
        level,
        hex16.clone(),
        hex16,
        time16,
        prop_oneof![3 => Just(".seg"), 1 => Just(".snap")],
    )
        .prop_map(|(l, lv, a, b, c, ext)| format!("lineages/{l}/segments/{lv}/{a}-{b}-{c}{ext}"));
    prop_oneof![
        3 => snapshot,
        3 => segment,
        1 => "lineages/[0-9a-f/.-]{0,80}",
        1 => any::<String>(),
    ]
}

#[test]
fn object_names_parse_back_to_themselves_or_not_at_all() {
    run(
        "parse_key",
        8192,
        (key_strategy(), any::<u64>()),
        |(key, size)| {
            let r = bounded(key.len(), || layout::parse_key(&key, size))?;
            if r.is_some() {
                accepted();
            }
            match r {
                None => {}
                Some(Entry::Snapshot(s)) => {
                    prop_assert!((1..=MAX_TXID).contains(&s.txid));
                    prop_assert!(s.time_us >= 0);
                    prop_assert_eq!(layout::snapshot_key(&s.lineage, s.txid, s.time_us), key);
                    prop_assert_eq!(s.size, size);
                }
                Some(Entry::Segment(s)) => {
                    prop_assert!(1 <= s.first_txid && s.first_txid <= s.last_txid);
                    prop_assert!(s.last_txid <= MAX_TXID);
                    prop_assert!(s.last_time_us >= 0);
                    prop_assert!((1..=MAX_TXID).contains(&layout::lineage_start(&s.lineage)));
                    prop_assert_eq!(
                        layout::segment_key(
                            &s.lineage,
                            s.level,
                            s.first_txid,
                            s.last_txid,
                            s.last_time_us
                        ),
                        key
                    );
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Regressions: inputs the properties above found

/// `hostile_leases_never_panic_the_shipper`: a lease renewed "at" i64::MIN
/// made its age overflow (a panic in debug builds). Expiry is now judged on
/// the local monotonic clock from the lease's last change, so such a lease
/// is waited for like any other holder's: refused now, never a panic.
#[test]
fn regression_lease_renewed_at_i64_min_is_stale_not_a_panic() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    let body = br#"{"shipper":"0123456789abcdef","host":"elsewhere","pid":1,"db":"/o.db","renewed_us":-9223372036854775808}"#;
    rt.block_on(store.put(crate::lease::LEASE_KEY, Body::Bytes(body[..].into())))
        .unwrap();
    let mut lease = crate::lease::Lease::new(
        "/x.db",
        std::time::Duration::from_secs(300),
        std::time::Duration::ZERO,
    );
    let r = rt.block_on(lease.ensure(&store, 1_700_000_000_000_000));
    assert!(r.is_err() && !lease.held(), "{r:?}");
}

/// A format-1 segment whose header declares a page size of u32::MAX and
/// whose commit declares u32::MAX records: the commit's payload length,
/// `8 + records × (4 + page_size)`, overflowed u64 in `read_commit_head` (a
/// panic in debug builds, a wrapped length in release ones).
#[test]
fn regression_legacy_commit_length_overflow_is_an_error() {
    let env = legacy_envelope(ObjectKind::Segment, 2, 2);
    let header = json!({
        "kind": "segment",
        "payload": "sqlite-pages",
        "lineage": LINEAGE,
        "page_size": u32::MAX,
        "envelope_blake3": env.blake3_hex(),
        "first_txid": 2,
        "last_txid": 2,
        "commit_count": 1,
        "prev_checksum": "00".repeat(16),
        "level": 0,
    });
    let mut body = framed(&header, &(JsonTweak::None, false));
    body.extend_from_slice(&2u64.to_le_bytes());
    body.extend_from_slice(&101i64.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let (mut br, _) = BodyReader::open(&body[..], &env).unwrap();
    let e = format!("{:#}", br.read_commit_head().unwrap_err());
    assert!(e.contains("payload length"), "{e}");
    assert!(drive_body(&env, &body, false).is_err());
}

/// A commit that declares 2^20 records and a database of 2^20 pages but
/// carries one record, for its last page, grew the page state to 2^20 pages
/// (16 MiB of terms, a million page hashes) before the missing records were
/// noticed: the growth bound counted declared records, not records read. A
/// compacted segment did the same with its `truncate_to` before reading any
/// record. With larger declared sizes that was up to half the memory, from
/// a few hundred bytes of input. Now the state grows only once every record
/// was read.
#[test]
fn regression_a_commit_grows_the_state_only_for_records_it_carries() {
    const N: u32 = 1 << 20;
    let page = page_bytes(PS as u32, 7);
    for (truncate_to, records) in [(None, vec![N]), (Some(N), vec![]), (Some(N), vec![N])] {
        let mut replay = PageReplay::new(None);
        let snapshot = SnapshotFields::new(PS as u32, 1).to_value();
        let mut data = Declared {
            data: &page,
            declared: u64::MAX,
        };
        replay.snapshot(&snapshot, &mut data).unwrap();
        replay
            .begin_segment(&SegmentFields::new(PS as u32, truncate_to).to_value())
            .unwrap();
        let mut payload = Vec::new();
        payload.extend_from_slice(&N.to_le_bytes());
        payload.extend_from_slice(&N.to_le_bytes());
        for pgno in &records {
            payload.extend_from_slice(&pgno.to_le_bytes());
            payload.extend_from_slice(&page);
        }
        let mut input = Declared {
            data: &payload,
            declared: pages::commit_len(N, PS as u32),
        };
        let (r, peak) = budget::measure(64 << 20, || replay.commit(&mut input));
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("truncated"), "{e}");
        assert!(
            peak < 1 << 20,
            "truncate_to {truncate_to:?}, records {records:?}: {peak} bytes for a {}-byte payload",
            payload.len()
        );
    }
}

/// The fix above applies the records past the old end after growing the
/// state, and no longer grows it to `truncate_to` first: the same state
/// (docs/FORMAT.md, "Applying a commit") for records in any order, checked
/// against applying them one by one as the format describes.
#[test]
fn a_commit_applies_as_the_format_describes_in_any_record_order() {
    let strategy = (
        prop::collection::vec(any::<u8>(), 0..6),
        prop_oneof![Just(None), (0..12u32).prop_map(Some)],
        0..3u32,
        prop::sample::subsequence((1..=16u32).collect::<Vec<_>>(), 0..8).prop_shuffle(),
        any::<u8>(),
    );
    run(
        "commit order",
        512,
        strategy,
        |(fills, truncate_to, extra, pgnos, fill)| {
            let ps = PS as u32;
            let mut data = Vec::new();
            let mut model = PageState::new(PS);
            for (i, f) in fills.iter().enumerate() {
                data.extend_from_slice(&page_bytes(ps, *f));
                model.set_page(i as u32 + 1, &page_bytes(ps, *f));
            }
            let mut replay = PageReplay::new(None);
            let header = SnapshotFields::new(ps, fills.len() as u32).to_value();
            replay
                .snapshot(
                    &header,
                    &mut Declared {
                        data: &data,
                        declared: u64::MAX,
                    },
                )
                .unwrap();
            let db_pages = pgnos.iter().copied().chain(truncate_to).max().unwrap_or(0) + extra;
            let mut payload = Vec::new();
            payload.extend_from_slice(&db_pages.to_le_bytes());
            payload.extend_from_slice(&(pgnos.len() as u32).to_le_bytes());
            if let Some(t) = truncate_to {
                model.resize(t);
            }
            for (i, g) in pgnos.iter().enumerate() {
                let page = page_bytes(ps, fill.wrapping_add(i as u8));
                payload.extend_from_slice(&g.to_le_bytes());
                payload.extend_from_slice(&page);
                model.set_page(*g, &page);
            }
            model.resize(db_pages);
            replay
                .begin_segment(&SegmentFields::new(ps, truncate_to).to_value())
                .unwrap();
            let mut input = Declared {
                data: &payload,
                declared: pages::commit_len(pgnos.len() as u32, ps),
            };
            let d = replay
                .commit(&mut input)
                .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
            accepted();
            prop_assert_eq!(d, model.checksum().0);
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Envelopes proven from two ranged reads (trusted::envelope)

/// What may steer restore planning and pruning is proven from the
/// envelope and the footer alone (the payload hash is checked when the
/// object is read). Damaged or foreign objects, listed with their size or
/// a wrong one, are refused or proven to be exactly what was signed.
#[test]
fn envelopes_proven_from_ranged_reads_are_what_was_signed() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::new(dir.path().to_path_buf()).unwrap();
    let lens = prop_oneof![6 => Just(0i64), 1 => -200..200i64];
    let strategy = (valid_object(), mutations(3), lens, any::<bool>());
    run(
        "ranged envelope",
        256,
        strategy,
        |((obj, _), muts, delta, lax)| {
            let mut bad = obj.clone();
            for m in &muts {
                mutate(&mut bad, m);
            }
            let key = "lineages/x/object";
            rt.block_on(store.put(key, Body::Bytes(bad.clone().into())))
                .unwrap();
            let size = (bad.len() as i64 + delta).max(0) as u64;
            let mut t = trust();
            t.allow_unsigned = lax;
            let r = bounded(bad.len(), || {
                rt.block_on(crate::trusted::envelope(&store, key, size, &t))
            })?;
            if let Ok((env, auth)) = r {
                accepted();
                let original = Envelope::read_from(&mut &obj[..]).unwrap();
                prop_assert_eq!(&env.raw, &original.raw);
                prop_assert_eq!(auth, crate::codec::Authenticity::Signed(signer().public()));
                let footer = &obj[obj.len() - FOOTER_LEN..];
                prop_assert!(size as usize <= bad.len());
                prop_assert_eq!(&bad[size as usize - FOOTER_LEN..size as usize], footer);
            }
            Ok(())
        },
    );
}
