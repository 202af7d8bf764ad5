//! The heuristic: from a repository's [`Stats`] and [`State`], which maintenance tasks to run and
//! why. Pure (no I/O), so every rule is unit-tested. docs/HOUSEKEEPING.md gives the reasons for
//! each threshold.

use super::state::State;
use super::stats::Stats;
use crate::config::HousekeepingConfig;

/// How to repack, if at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repack {
    /// Roll small packs (and loose objects) into a geometric sequence and write a multi-pack-index
    /// with a bitmap: cost proportional to what is new, not to the repository.
    Geometric,
    /// One pack of everything reachable with a bitmap, unreachable objects in a cruft pack.
    Full,
}

/// What one maintenance run does, with a reason per task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub clean_stale: bool,
    pub pack_refs: bool,
    pub repack: Option<Repack>,
    pub commit_graph: bool,
    pub reasons: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        !self.clean_stale && !self.pack_refs && self.repack.is_none() && !self.commit_graph
    }
}

/// Decides the tasks; `full` is an explicit request (admin, gRPC) for a full repack. `now` and
/// `state` times are Unix seconds.
pub fn decide(c: &HousekeepingConfig, s: &Stats, st: &State, now: u64, full: bool) -> Plan {
    let mut p = Plan::default();
    let mut why = |text: String| p.reasons.push(text);
    let has_objects = s.loose_objects > 0 || !s.packs.is_empty();

    let clean_stale = !s.stale.is_empty();
    if clean_stale {
        why(format!("{} stale temporary or lock files", s.stale.len()));
    }
    let pack_refs = s.loose_refs >= c.loose_refs_limit;
    if pack_refs {
        why(format!(
            "{} loose refs (limit {})",
            s.loose_refs, c.loose_refs_limit
        ));
    }

    let cooled = now.saturating_sub(st.last_full) >= c.full_repack_cooldown.as_secs();
    let repack = if full {
        why("full repack requested".into());
        Some(Repack::Full)
    } else if cooled && s.packs.len() > c.max_packs {
        why(format!("{} packs (limit {})", s.packs.len(), c.max_packs));
        Some(Repack::Full)
    } else if cooled && has_objects && st.pushes_since_full >= c.full_repack_pushes {
        why(format!(
            "{} pushes since the last full repack",
            st.pushes_since_full
        ));
        Some(Repack::Full)
    } else if s.loose_objects >= c.loose_objects_limit {
        why(format!(
            "{} loose objects (limit {})",
            s.loose_objects, c.loose_objects_limit
        ));
        Some(Repack::Geometric)
    } else if has_objects && st.pushes_since_repack >= c.repack_pushes {
        why(format!(
            "{} pushes since the last repack (their objects are outside the bitmap)",
            st.pushes_since_repack
        ));
        Some(Repack::Geometric)
    } else if !s.has_bitmap && !s.packs.is_empty() {
        why("no bitmap".into());
        Some(Repack::Geometric)
    } else if s.new_pack_objects() >= c.big_push_objects {
        why(format!(
            "{} objects pushed in new packs",
            s.new_pack_objects()
        ));
        Some(Repack::Geometric)
    } else if !is_geometric(&s.packs, c.geometric_factor) {
        why(format!("{} packs out of geometric order", s.packs.len()));
        Some(Repack::Geometric)
    } else {
        None
    };

    let commit_graph = if repack.is_some() {
        true
    } else if !s.has_commit_graph && has_objects {
        why("no commit-graph".into());
        true
    } else if st.pushes_since_graph >= c.commit_graph_pushes {
        why(format!(
            "{} pushes since the last commit-graph",
            st.pushes_since_graph
        ));
        true
    } else {
        false
    };
    p.clean_stale = clean_stale;
    p.pack_refs = pack_refs;
    p.repack = repack;
    p.commit_graph = commit_graph;
    p
}

/// Whether the packs already form a geometric progression by object count (each at least
/// `factor` times the sum of all smaller ones), i.e. `git repack --geometric` would roll nothing
/// up. A single pack, or none, is trivially geometric.
pub fn is_geometric(packs: &[super::stats::Pack], factor: u32) -> bool {
    let mut counts: Vec<u64> = packs.iter().map(|p| p.objects).collect();
    counts.sort_unstable();
    let mut smaller = 0u64;
    for (i, n) in counts.iter().enumerate() {
        if i > 0 && *n < smaller.saturating_mul(u64::from(factor)) {
            return false;
        }
        smaller = smaller.saturating_add(*n);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HousekeepingSection;
    use crate::housekeeping::stats::Pack;

    fn config() -> HousekeepingConfig {
        HousekeepingConfig::build(HousekeepingSection::default(), 2).unwrap()
    }

    fn pack(objects: u64, new: bool) -> Pack {
        Pack {
            bytes: objects * 100,
            objects,
            new,
        }
    }

    fn maintained() -> Stats {
        Stats {
            packs: vec![pack(5000, false)],
            has_bitmap: true,
            has_commit_graph: true,
            ..Stats::default()
        }
    }

    #[test]
    fn a_maintained_repository_needs_nothing() {
        assert!(decide(&config(), &maintained(), &State::default(), 1 << 30, false).is_empty());
    }

    #[test]
    fn a_mirror_push_gets_a_bitmap_and_a_commit_graph() {
        let s = Stats {
            packs: vec![pack(5000, true)],
            ..Stats::default()
        };
        let p = decide(&config(), &s, &State::default(), 1 << 30, false);
        assert_eq!(p.repack, Some(Repack::Geometric));
        assert!(p.commit_graph);
    }

    #[test]
    fn loose_objects_and_big_pushes_trigger_a_geometric_repack() {
        let c = config();
        let mut s = maintained();
        s.loose_objects = c.loose_objects_limit - 1;
        assert_eq!(
            decide(&c, &s, &State::default(), 1 << 30, false).repack,
            None
        );
        s.loose_objects = c.loose_objects_limit;
        assert_eq!(
            decide(&c, &s, &State::default(), 1 << 30, false).repack,
            Some(Repack::Geometric)
        );
        let mut s = maintained();
        s.packs.push(pack(c.big_push_objects, true));
        s.packs[0].objects = c.big_push_objects * 3;
        assert_eq!(
            decide(&c, &s, &State::default(), 1 << 30, false).repack,
            Some(Repack::Geometric)
        );
    }

    #[test]
    fn small_pushes_are_packed_every_repack_pushes() {
        let c = config();
        let mut s = maintained();
        s.loose_objects = 3 * (c.repack_pushes - 1);
        let mut st = State {
            pushes_since_repack: c.repack_pushes - 1,
            ..State::default()
        };
        assert_eq!(decide(&c, &s, &st, 1 << 30, false).repack, None);
        st.pushes_since_repack = c.repack_pushes;
        let p = decide(&c, &s, &st, 1 << 30, false);
        assert_eq!(p.repack, Some(Repack::Geometric));
        assert!(p.commit_graph);
    }

    #[test]
    fn many_packs_or_pushes_trigger_a_full_repack_after_the_cooldown() {
        let c = config();
        let mut s = maintained();
        s.packs = (0..=c.max_packs as u64)
            .map(|i| pack(1 << (i + 1), false))
            .collect();
        let now = 10 * c.full_repack_cooldown.as_secs();
        let st = State {
            last_full: now - 1,
            ..State::default()
        };
        assert_eq!(
            decide(&c, &s, &st, now, false).repack,
            Some(Repack::Geometric)
        );
        assert_eq!(
            decide(&c, &s, &State::default(), now, false).repack,
            Some(Repack::Full)
        );
        let st = State {
            pushes_since_full: c.full_repack_pushes,
            ..State::default()
        };
        assert_eq!(
            decide(&c, &maintained(), &st, now, false).repack,
            Some(Repack::Full)
        );
        assert_eq!(
            decide(&c, &maintained(), &State::default(), 0, true).repack,
            Some(Repack::Full)
        );
    }

    #[test]
    fn commit_graph_and_refs_have_their_own_thresholds() {
        let c = config();
        let st = State {
            pushes_since_graph: c.commit_graph_pushes,
            ..State::default()
        };
        let p = decide(&c, &maintained(), &st, 1 << 30, false);
        assert!(p.commit_graph && p.repack.is_none());
        let mut s = maintained();
        s.has_commit_graph = false;
        assert!(decide(&c, &s, &State::default(), 1 << 30, false).commit_graph);
        s.loose_refs = c.loose_refs_limit;
        assert!(decide(&c, &s, &State::default(), 1 << 30, false).pack_refs);
        s.stale.push("x.lock".into());
        assert!(decide(&c, &s, &State::default(), 1 << 30, false).clean_stale);
        // An empty repository has nothing to maintain.
        assert!(decide(&c, &Stats::default(), &State::default(), 1 << 30, false).is_empty());
    }

    #[test]
    fn geometric_order() {
        assert!(is_geometric(&[], 2));
        assert!(is_geometric(&[pack(7, false)], 2));
        assert!(is_geometric(
            &[pack(1, false), pack(2, false), pack(6, false)],
            2
        ));
        assert!(!is_geometric(
            &[pack(1, false), pack(2, false), pack(5, false)],
            2
        ));
        assert!(!is_geometric(&[pack(10, false), pack(10, false)], 2));
    }
}
