//! The replicator's state: one value says what it is doing, and the source,
//! lineage and replicated page state exist only while it ships. Every change
//! goes through `transition`, which exports it (`offsite_replica_state`);
//! `Replicator::enter` logs it once.

use crate::engine::Source;
use crate::segment::Link;
use crate::status::{ReplicaState, ReplicaStatus};

/// An open lineage: the database followed, the lineage it ships to, the
/// page state the replica holds (checked against the next commits), and
/// the open compaction windows.
pub(super) struct Shipping {
    /// The engine's source: the database followed, the state the replica
    /// holds and the open compaction windows.
    pub(super) source: Box<dyn Source>,
    pub(super) lineage: String,
    /// The chain link after the newest shipped commit (docs/FORMAT.md, "Chain link").
    pub(super) link: Link,
}

/// What the replicator is doing (see `ReplicaState` for each state).
pub(super) enum Phase {
    Starting,
    WaitingForDatabase,
    Shipping(Box<Shipping>),
    Fenced,
    OverWalBound,
    Restarting,
    Stopped,
}

impl Phase {
    pub(super) fn kind(&self) -> ReplicaState {
        match self {
            Phase::Starting => ReplicaState::Starting,
            Phase::WaitingForDatabase => ReplicaState::WaitingForDatabase,
            Phase::Shipping(_) => ReplicaState::Shipping,
            Phase::Fenced => ReplicaState::Fenced,
            Phase::OverWalBound => ReplicaState::OverWalBound,
            Phase::Restarting => ReplicaState::Restarting,
            Phase::Stopped => ReplicaState::Stopped,
        }
    }

    pub(super) fn shipping(&self) -> Option<&Shipping> {
        match self {
            Phase::Shipping(s) => Some(&**s),
            _ => None,
        }
    }

    pub(super) fn shipping_mut(&mut self) -> Option<&mut Shipping> {
        match self {
            Phase::Shipping(s) => Some(&mut **s),
            _ => None,
        }
    }
}

/// Replace `phase` by `to`. The old phase is dropped here (a source's read
/// lock with it). When the state changes, it is exported to `status` and
/// returned as (from, to) for the caller to log; entering the state the
/// replicator is already in (another lineage while shipping, another
/// failed attempt while fenced) is no transition.
pub(super) fn transition(
    phase: &mut Phase,
    to: Phase,
    status: &ReplicaStatus,
) -> Option<(ReplicaState, ReplicaState)> {
    let (from, next) = (phase.kind(), to.kind());
    *phase = to;
    if from == next {
        return None;
    }
    status.set_state(next);
    Some((from, next))
}

/// Transitions into these are logged as warnings (the replica is not
/// being kept up to date meanwhile); the others at info.
pub(super) fn is_trouble(s: ReplicaState) -> bool {
    matches!(
        s,
        ReplicaState::Fenced | ReplicaState::OverWalBound | ReplicaState::Restarting
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipping(dir: &std::path::Path) -> Phase {
        let db = dir.join("t.db");
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute_batch("create table if not exists t(x); insert into t values (1);")
            .unwrap();
        let source = crate::engine::Engine::Sqlite
            .open_source(&db, &[], dir.to_path_buf())
            .unwrap();
        Phase::Shipping(Box::new(Shipping {
            source,
            lineage: "l".into(),
            link: Link::default(),
        }))
    }

    #[test]
    fn each_change_of_state_is_one_transition_and_exported() {
        let status = ReplicaStatus::detached();
        let mut p = Phase::Starting;
        let steps = [
            (Phase::WaitingForDatabase, true),
            (Phase::WaitingForDatabase, false),
            (Phase::Starting, true),
            (Phase::Fenced, true),
            (Phase::Fenced, false),
            (Phase::Restarting, true),
            (Phase::OverWalBound, true),
            (Phase::Restarting, true),
            (Phase::Stopped, true),
        ];
        for (to, changes) in steps {
            let (from, want) = (p.kind(), to.kind());
            let t = transition(&mut p, to, &status);
            assert_eq!(t.is_some(), changes, "{from} → {want}");
            if let Some(t) = t {
                assert_eq!(t, (from, want));
            }
            assert_eq!(p.kind(), want);
            assert_eq!(status.state(), want);
            assert_eq!(status.state_series().filter(|(_, v)| *v == 1).count(), 1);
        }
    }

    #[test]
    fn shipping_holds_the_source_and_leaving_it_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let status = ReplicaStatus::detached();
        let mut p = Phase::Restarting;
        assert!(p.shipping().is_none());
        let t = transition(&mut p, shipping(dir.path()), &status);
        assert_eq!(t, Some((ReplicaState::Restarting, ReplicaState::Shipping)));
        assert_eq!(p.shipping().unwrap().lineage, "l");
        p.shipping_mut().unwrap().lineage = "m".into();
        // A new lineage while shipping: no transition, the new one holds.
        assert_eq!(transition(&mut p, shipping(dir.path()), &status), None);
        assert_eq!(p.shipping().unwrap().lineage, "l");
        assert_eq!(status.state(), ReplicaState::Shipping);
        let t = transition(&mut p, Phase::OverWalBound, &status);
        assert_eq!(
            t,
            Some((ReplicaState::Shipping, ReplicaState::OverWalBound))
        );
        assert!(p.shipping().is_none() && p.shipping_mut().is_none());
        assert!(is_trouble(ReplicaState::OverWalBound));
        assert!(!is_trouble(ReplicaState::Shipping) && !is_trouble(ReplicaState::Stopped));
    }
}
