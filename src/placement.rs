//! Placement under load (DESIGN section 10, a public contract): how far down its ranking
//! a session that needs a node goes, and when a pinned session leaves a saturated node.
//!
//! The ranking stays the contract's (section 5); placement only chooses a position in
//! it. Everything here is a pure function of the ranking and of a [`NodeView`] per host
//! (its load, weight, and whether it is saturated or draining), so the rules are tested
//! natively against the formula.
//!
//! Rules, for a session that needs a node (new, or its ticket's node is not usable):
//!
//! 1. **Candidates** (the usable nodes): the ranking without draining hosts (a draining
//!    host takes no new session). If every host drains, the draining ones are candidates
//!    after all: a session is better placed on a leaving node than refused.
//! 2. **Bounded loads** (`balance_factor` c): with L the total load and W the total
//!    weight of the candidates, a node *fits* when `load + 1 ≤ ⌈c/100 × (L + 1) × w / W⌉`
//!    (w its weight). Without `balance_factor` every node fits.
//! 3. **Saturation**: the first candidate in ranking order that fits and is not saturated
//!    (each saturated candidate ranked before it counts a `saturated_skip`). If every
//!    candidate that fits is saturated, bounded placement alone decides: the first one
//!    that fits. If none fits (only possible with unequal weights), the ranking's first
//!    candidate.
//!
//! The bound is over all candidates, saturated or not: a node that is not saturated
//! but carries far more than its share never takes every session that needs a node (a
//! node too slow to send fresh load reports would otherwise look unsaturated exactly
//! because it is slow, and draw everything). A placement on the first candidate of the
//! ranking is a `FirstChoice`; anything further down (because of load or saturation) is
//! `Bounded`.

/// What placement knows of one host of the set (indexed like the host set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Requests in flight to the node, as this VM sees them (see [`crate::load`]).
    pub load: u32,
    /// Rendezvous weight, at least 1.
    pub weight: u32,
    /// Its last load report says it is saturated (and the report is fresh).
    pub saturated: bool,
    /// Envoy lists it `DRAINING` (and `placement.drain` is on).
    pub draining: bool,
}

/// How a session was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// On the first candidate of its ranking.
    FirstChoice,
    /// Further down, because of load or saturation.
    Bounded,
}

/// The outcome of [`place`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The chosen host (an index into the host set).
    pub host: usize,
    pub placed: Placed,
    /// Saturated candidates ranked before the chosen host and passed over.
    pub saturated_skips: u32,
}

/// The bound of a node of weight `w`: `⌈c/100 × (L + 1) × w / W⌉`, in integers (no
/// rounding surprises at the boundary). `total_weight` is at least 1.
pub fn bound(balance_factor: u32, total_load: u64, weight: u32, total_weight: u64) -> u64 {
    let num = u128::from(balance_factor) * (u128::from(total_load) + 1) * u128::from(weight);
    let den = 100 * u128::from(total_weight.max(1));
    let q = num.div_ceil(den);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// Chooses the node for a session that needs one. `ranking` lists host indices best
/// first (the full ranking over the set); `nodes[i]` describes host `i`. `None` only when
/// the ranking is empty.
pub fn place(ranking: &[usize], nodes: &[NodeView], balance_factor: Option<u32>) -> Option<Choice> {
    let view = |i: usize| nodes.get(i).copied().unwrap_or_default();
    let not_draining = ranking.iter().any(|&i| !view(i).draining);
    let candidate = |i: usize| !not_draining || !view(i).draining;
    let first_candidate = ranking.iter().copied().find(|&i| candidate(i))?;

    let (mut total_load, mut total_weight) = (0u64, 0u64);
    for &i in ranking.iter().filter(|&&i| candidate(i)) {
        total_load += u64::from(view(i).load);
        total_weight += u64::from(view(i).weight.max(1));
    }
    // The contract's `load + 1 ≤ bound`.
    let fits = |i: usize| {
        let n = view(i);
        balance_factor.is_none_or(|c| u64::from(n.load) < bound(c, total_load, n.weight.max(1), total_weight))
    };
    let unsaturated = ranking.iter().copied().find(|&i| candidate(i) && fits(i) && !view(i).saturated);
    let chosen =
        unsaturated.or_else(|| ranking.iter().copied().find(|&i| candidate(i) && fits(i))).unwrap_or(first_candidate);
    let saturated_skips = match unsaturated {
        Some(_) => {
            ranking.iter().take_while(|&&i| i != chosen).filter(|&&i| candidate(i) && view(i).saturated).count() as u32
        }
        None => 0,
    };
    let placed = if chosen == first_candidate { Placed::FirstChoice } else { Placed::Bounded };
    Some(Choice { host: chosen, placed, saturated_skips })
}

/// Whether a pinned session leaves its node `pinned` because the node is saturated
/// (`saturation.spill`): only to a candidate that is not saturated and fits the balance
/// bound, so a session never moves when every node is saturated, nor onto a node that
/// already carries more than its share. Returns the placement to move to.
pub fn spill(ranking: &[usize], nodes: &[NodeView], pinned: usize, balance_factor: Option<u32>) -> Option<Choice> {
    let view = |i: usize| nodes.get(i).copied().unwrap_or_default();
    if !view(pinned).saturated {
        return None;
    }
    let choice = place(ranking, nodes, balance_factor)?;
    (choice.host != pinned && !view(choice.host).saturated).then_some(choice)
}

/// The fallbacks of a request placed on `chosen`: the ranking's next `n` hosts other than
/// `chosen`, never a draining one (a draining host serves only its pinned sessions).
pub fn fallbacks(ranking: &[usize], nodes: &[NodeView], chosen: usize, n: usize, out: &mut Vec<usize>) {
    let draining = |i: usize| nodes.get(i).is_some_and(|v| v.draining);
    out.extend(ranking.iter().copied().filter(|&i| i != chosen && !draining(i)).take(n));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(load: u32) -> NodeView {
        NodeView { load, weight: 1, saturated: false, draining: false }
    }

    fn sat(load: u32) -> NodeView {
        NodeView { saturated: true, ..n(load) }
    }

    fn drain(load: u32) -> NodeView {
        NodeView { draining: true, ..n(load) }
    }

    fn w(load: u32, weight: u32) -> NodeView {
        NodeView { weight, ..n(load) }
    }

    #[test]
    fn the_bound_is_the_formula() {
        // (c, L, w, W) -> ⌈c/100 × (L+1) × w / W⌉
        for (c, l, wt, tw, want) in [
            (150, 0, 1, 3, 1),    // 1.5 × 1 / 3 = 0.5 -> 1
            (150, 5, 1, 3, 3),    // 1.5 × 6 / 3 = 3 exactly
            (150, 6, 1, 3, 4),    // 1.5 × 7 / 3 = 3.5 -> 4
            (125, 11, 1, 4, 4),   // 1.25 × 12 / 4 = 3.75 -> 4
            (101, 99, 1, 1, 101), // one node: always qualifies (load ≤ L)
            (150, 9, 2, 4, 8),    // weight 2 of 4: 1.5 × 10 × 2 / 4 = 7.5 -> 8
            (1000, 0, 1, 1000, 1),
            (1000, u64::MAX - 1, 1, 1, u64::MAX),
        ] {
            assert_eq!(bound(c, l, wt, tw), want, "c={c} L={l} w={wt} W={tw}");
        }
    }

    #[test]
    fn bounded_placement_table() {
        // (nodes by host index, ranking, balance factor) -> (chosen, placed)
        use Placed::*;
        type Case = (Vec<NodeView>, Vec<usize>, Option<u32>, usize, Placed);
        let cases: Vec<Case> = vec![
            // Idle cluster: the ranking's first.
            (vec![n(0), n(0), n(0)], vec![2, 0, 1], Some(150), 2, FirstChoice),
            // Without a balance factor load does not matter.
            (vec![n(9), n(0), n(0)], vec![0, 1, 2], None, 0, FirstChoice),
            // L = 9, bound = ⌈1.5 × 10 / 3⌉ = 5: load 9 + 1 > 5, load 0 + 1 ≤ 5.
            (vec![n(9), n(0), n(0)], vec![0, 1, 2], Some(150), 1, Bounded),
            // Exactly at the bound qualifies: L = 5, bound ⌈1.5 × 6 / 3⌉ = 3, load 2 + 1 ≤ 3.
            (vec![n(2), n(2), n(1)], vec![0, 1, 2], Some(150), 0, FirstChoice),
            // One over the bound does not: L = 6, bound ⌈1.5 × 7 / 3⌉ = 4, load 4 + 1 > 4.
            (vec![n(4), n(1), n(1)], vec![0, 1, 2], Some(150), 1, Bounded),
            // A tighter factor moves earlier: c = 125, L = 6, bound ⌈1.25 × 7 / 3⌉ = 3.
            (vec![n(3), n(2), n(1)], vec![0, 1, 2], Some(125), 1, Bounded),
            (vec![n(3), n(2), n(1)], vec![0, 1, 2], Some(150), 0, FirstChoice),
            // Down the ranking past two loaded nodes: L = 16, W = 4, bound ⌈1.5 × 17 / 4⌉ = 7.
            (vec![n(8), n(8), n(0), n(0)], vec![0, 1, 2, 3], Some(150), 2, Bounded),
            // With three nodes two equally loaded ones never both exceed 1.5× the mean.
            (vec![n(9), n(9), n(0)], vec![0, 1, 2], Some(150), 0, FirstChoice),
            // Weights: w = 3 of W = 4 has bound ⌈1.5 × 9 × 3 / 4⌉ = 11; w = 1 has ⌈3.375⌉ = 4.
            (vec![w(7, 3), w(1, 1)], vec![0, 1], Some(150), 0, FirstChoice),
            (vec![w(1, 1), w(7, 3)], vec![0, 1], Some(150), 0, FirstChoice),
            (vec![w(4, 1), w(4, 3)], vec![0, 1], Some(150), 1, Bounded),
            // Ties of load: the ranking decides (first qualifying in ranking order).
            (vec![n(1), n(1), n(1)], vec![1, 2, 0], Some(150), 1, FirstChoice),
            // Nobody qualifies: impossible with c > 100 unless loads are huge; still the
            // ranking's first. (Single node: always qualifies.)
            (vec![n(1000)], vec![0], Some(101), 0, FirstChoice),
        ];
        for (i, (nodes, ranking, c, want, placed)) in cases.into_iter().enumerate() {
            let got = place(&ranking, &nodes, c).unwrap();
            assert_eq!((got.host, got.placed, got.saturated_skips), (want, placed, 0), "case {i}");
        }
    }

    #[test]
    fn some_node_always_qualifies_when_the_factor_is_over_100() {
        // The average node is at most L/n ≤ (L+1) w / W with equal weights, and c > 1:
        // the least loaded node always fits, so "none qualifies" needs unequal weights.
        for loads in [[0, 0, 0], [5, 5, 5], [100, 0, 3], [7, 8, 9]] {
            let nodes: Vec<NodeView> = loads.iter().map(|&l| n(l)).collect();
            let got = place(&[0, 1, 2], &nodes, Some(101)).unwrap();
            let total: u64 = loads.iter().map(|&l| u64::from(l)).sum();
            assert!(u64::from(loads[got.host]) < bound(101, total, 1, 3), "{loads:?} -> {got:?}");
        }
    }

    #[test]
    fn saturated_nodes_are_passed_over_and_counted() {
        let nodes = vec![sat(0), n(0), sat(0), n(0)];
        let got = place(&[0, 2, 1, 3], &nodes, Some(150)).unwrap();
        assert_eq!(got, Choice { host: 1, placed: Placed::Bounded, saturated_skips: 2 });
        // Without a balance factor too.
        let got = place(&[0, 2, 1, 3], &nodes, None).unwrap();
        assert_eq!(got, Choice { host: 1, placed: Placed::Bounded, saturated_skips: 2 });
        // A saturated node after the chosen one is not counted.
        let got = place(&[1, 0, 3], &nodes, Some(150)).unwrap();
        assert_eq!(got, Choice { host: 1, placed: Placed::FirstChoice, saturated_skips: 0 });
        // The bound is over the unsaturated nodes only: L = 2 + 0 (node 3), W = 2, bound
        // ⌈1.5 × 3 / 2⌉ = 3: node 1 (load 2) fits.
        let nodes = vec![sat(50), n(2), sat(50), n(0)];
        assert_eq!(place(&[0, 1, 3], &nodes, Some(150)).unwrap().host, 1);
    }

    #[test]
    fn an_unsaturated_node_over_its_bound_takes_nothing() {
        // A node too slow to send fresh reports looks unsaturated while the busy fast
        // ones report saturation: it must not draw every session. L = 45, W = 4, bound
        // ⌈1.5 × 46 / 4⌉ = 18: node 3 (42) does not fit; the saturated ones that fit
        // decide by the ranking, bounded placement alone.
        let nodes = vec![sat(1), sat(1), sat(1), n(42)];
        assert_eq!(
            place(&[3, 0, 1, 2], &nodes, Some(150)).unwrap(),
            Choice { host: 0, placed: Placed::Bounded, saturated_skips: 0 }
        );
        // ...and no pinned session spills onto it.
        assert_eq!(spill(&[0, 3, 1, 2], &nodes, 0, Some(150)), None);
        // Within its bound it is preferred over the saturated ones.
        let nodes = vec![sat(1), sat(1), sat(1), n(2)];
        assert_eq!(place(&[0, 3, 1, 2], &nodes, Some(150)).unwrap().host, 3);
        assert_eq!(spill(&[0, 3, 1, 2], &nodes, 0, Some(150)).map(|c| c.host), Some(3));
    }

    #[test]
    fn when_every_node_is_saturated_bounded_placement_alone_decides() {
        let nodes = vec![sat(9), sat(0), sat(0)];
        assert_eq!(
            place(&[0, 1, 2], &nodes, Some(150)).unwrap(),
            Choice { host: 1, placed: Placed::Bounded, saturated_skips: 0 }
        );
        assert_eq!(place(&[0, 1, 2], &nodes, None).unwrap().host, 0);
    }

    #[test]
    fn draining_nodes_take_no_new_session_and_are_no_fallback() {
        let nodes = vec![drain(0), n(0), n(0)];
        // Draining is not a placement "because of load": the first candidate is node 1.
        assert_eq!(
            place(&[0, 1, 2], &nodes, Some(150)).unwrap(),
            Choice { host: 1, placed: Placed::FirstChoice, saturated_skips: 0 }
        );
        let mut out = vec![];
        fallbacks(&[0, 1, 2], &nodes, 1, 2, &mut out);
        assert_eq!(out, vec![2]);
        // Every host draining: better a leaving node than a refusal.
        let all = vec![drain(3), drain(0)];
        assert_eq!(place(&[0, 1], &all, None).unwrap().host, 0);
        assert_eq!(place(&[0, 1], &all, Some(150)).unwrap().host, 1);
        // The load of draining hosts is not in L: L = 0, bound ⌈1.5 × 1 / 2⌉ = 1, so the
        // idle nodes qualify however busy the draining one is.
        let nodes = vec![drain(100), n(0), n(0)];
        assert_eq!(place(&[0, 2, 1], &nodes, Some(150)).unwrap().host, 2);
        assert!(place(&[], &nodes, Some(150)).is_none());
    }

    #[test]
    fn spill_moves_only_off_a_saturated_node_to_an_unsaturated_one() {
        let nodes = vec![sat(3), n(0), n(0)];
        assert_eq!(spill(&[0, 1, 2], &nodes, 0, Some(150)).map(|c| c.host), Some(1));
        assert_eq!(spill(&[0, 2, 1], &nodes, 0, None).map(|c| c.host), Some(2));
        // Not saturated: stays.
        assert_eq!(spill(&[1, 0, 2], &nodes, 1, Some(150)), None);
        // Everyone saturated: stays.
        let all = vec![sat(3), sat(0), sat(0)];
        assert_eq!(spill(&[0, 1, 2], &all, 0, Some(150)), None);
    }

    #[test]
    fn fallbacks_follow_the_ranking_without_the_chosen_node() {
        let nodes = vec![n(0); 5];
        let mut out = vec![];
        fallbacks(&[3, 1, 4, 0, 2], &nodes, 4, 2, &mut out);
        assert_eq!(out, vec![3, 1]);
        out.clear();
        fallbacks(&[3, 1, 4, 0, 2], &nodes, 3, 9, &mut out);
        assert_eq!(out, vec![1, 4, 0, 2]);
    }
}
