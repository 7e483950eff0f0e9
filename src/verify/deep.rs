//! `--deep`: real restores, with `integrity_check`, of sampled points.

use std::path::Path;

use super::{err_text, DeepSample, Problem, VerifyReport};
use crate::layout::{self, Target};
use crate::replay::Keys;
use crate::restore;
use crate::storage::Storage;

/// A small deterministic generator (splitmix64) for choosing sample points.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub(super) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next();
        }
        lo + self.next() % (span + 1)
    }
}
pub(super) fn lr_problem(report: &mut VerifyReport, lineage: &str, s: &DeepSample) {
    if let Some(lr) = report.lineages.iter_mut().find(|l| l.lineage == lineage) {
        lr.problems.push(Problem {
            key: format!("{}{lineage}/", layout::LINEAGES),
            problem: format!(
                "deep restore to {} failed: {}",
                s.target,
                s.error.clone().unwrap_or_default()
            ),
        });
    }
}

/// Restore one point into `dir` with `integrity_check`, then delete it.
pub(super) async fn sample(
    store: &dyn Storage,
    keys: &Keys,
    dir: &Path,
    kind: &str,
    target: Target,
) -> DeepSample {
    let out = dir.join(format!("sample-{:08x}.db", rand::random::<u32>()));
    let r = restore::restore(
        store,
        restore::RestoreOptions {
            identities: keys.ids.clone(),
            trust: keys.trust.clone(),
            ..restore::RestoreOptions::new(target, out.clone())
        },
    )
    .await;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = out.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    let target = match target {
        Target::Txid(t) => format!("txid {t}"),
        Target::Time(t) => layout::fmt_time_us(t),
        Target::Latest => "latest".into(),
    };
    match r {
        Ok(r) => DeepSample {
            kind: kind.into(),
            target,
            lineage: Some(r.lineage),
            txid: Some(r.txid),
            time: Some(layout::fmt_time_us(r.time_us)),
            time_us: Some(r.time_us),
            objects: Some(r.objects),
            ok: true,
            error: None,
        },
        Err(e) => DeepSample {
            kind: kind.into(),
            target,
            lineage: None,
            txid: None,
            time: None,
            time_us: None,
            objects: None,
            ok: false,
            error: Some(err_text(&e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_ranges() {
        let mut r = Rng(7);
        for _ in 0..1000 {
            let v = r.range(5, 9);
            assert!((5..=9).contains(&v));
        }
        assert_eq!(r.range(3, 3), 3);
    }
}
