//! The affinity function (DESIGN section 5, a public contract): weighted rendezvous
//! hashing of a session id over a host set.
//!
//! ```text
//! h64(bytes)  = first 8 bytes of SHA-256(bytes), big-endian u64
//! mix(s, h)   = fmix64(h64(session) XOR h64(host key))
//! u           = ((mix >> 11) + 0.5) / 2^53                  in (0, 1)
//! score       = weight / -ln(u)
//! ranking     = score descending; ties by larger mix, then smaller host key (bytewise)
//! ```
//!
//! Invariants the request path relies on:
//! - `h64` of every host is computed once, when a [`HostSet`](crate::hosts::HostSet) is
//!   built; a request hashes only its session id.
//! - Within hosts of equal weight the score is a non-decreasing function of `mix`, so the
//!   order "score, then mix, then key" equals the order "mix, then key". [`top_k`] uses this
//!   to take the best `k` hosts of each weight class by integer comparison alone and to
//!   compute `ln` only for those few candidates: the result is exactly the head of
//!   [`rank`], at a cost of one `fmix64` per host.

use std::cmp::Ordering;

use sha2::{Digest, Sha256};

/// First 8 bytes of SHA-256 of `bytes`, read as a big-endian `u64`.
pub fn h64(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// MurmurHash3's 64-bit finalizer (wrapping arithmetic).
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The per-(session, host) hash.
pub fn mix(session_h64: u64, host_h64: u64) -> u64 {
    fmix64(session_h64 ^ host_h64)
}

/// Maps a mix onto the open interval (0, 1) using its top 53 bits.
pub fn unit(mix: u64) -> f64 {
    ((mix >> 11) as f64 + 0.5) / 9_007_199_254_740_992.0 // 2^53
}

/// The rendezvous score of a host of `weight` for a session, given their mix.
///
/// In f64, `(2^53 - 1) + 0.5` rounds to `2^53`, so the single largest value of
/// `mix >> 11` gives `u = 1.0` and `-ln(u) = 0`. That is the limit of the best possible
/// score, so it scores `+inf` (never a division by zero or a negative score).
pub fn score(weight: u32, mix: u64) -> f64 {
    let d = -unit(mix).ln();
    if d > 0.0 {
        f64::from(weight) / d
    } else {
        f64::INFINITY
    }
}

/// A host as the affinity function sees it: its key, `h64(key)` (computed once) and its
/// weight.
pub trait Candidate {
    fn key(&self) -> &str;
    fn h64(&self) -> u64;
    fn weight(&self) -> u32;
}

/// A plain [`Candidate`], for tests and tools.
#[derive(Clone, Debug)]
pub struct Plain {
    pub key: String,
    pub h64: u64,
    pub weight: u32,
}

impl Plain {
    pub fn new(key: &str, weight: u32) -> Plain {
        Plain { key: key.to_string(), h64: h64(key.as_bytes()), weight }
    }
}

impl Candidate for Plain {
    fn key(&self) -> &str {
        &self.key
    }
    fn h64(&self) -> u64 {
        self.h64
    }
    fn weight(&self) -> u32 {
        self.weight
    }
}

/// Orders two scored hosts best first: score descending, then mix descending, then key
/// ascending (bytewise).
fn better(a: (f64, u64, &str), b: (f64, u64, &str)) -> Ordering {
    b.0.total_cmp(&a.0).then_with(|| b.1.cmp(&a.1)).then_with(|| a.2.as_bytes().cmp(b.2.as_bytes()))
}

/// The full ranking of `hosts` for a session (indices into `hosts`, best first).
///
/// This is the reference form of the function, used by tests and tools; the request path
/// uses [`top_k`], which returns the same head without scoring every host.
pub fn rank<C: Candidate>(session: &[u8], hosts: &[C]) -> Vec<usize> {
    let s = h64(session);
    let mut scored: Vec<(f64, u64, usize)> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let m = mix(s, h.h64());
            (score(h.weight(), m), m, i)
        })
        .collect();
    scored.sort_by(|a, b| better((a.0, a.1, key_str(hosts, a.2)), (b.0, b.1, key_str(hosts, b.2))));
    scored.into_iter().map(|(_, _, i)| i).collect()
}

/// Hosts grouped by weight, the shape [`top_k`] needs. Built once per host set.
#[derive(Clone, Debug, Default)]
pub struct WeightClasses {
    classes: Vec<Class>,
}

/// The hosts of one weight, with their hashes stored contiguously so that the scan of
/// [`top_k`] reads one dense array.
#[derive(Clone, Debug, Default)]
struct Class {
    weight: u32,
    /// Indices into the host slice.
    members: Vec<usize>,
    /// `h64` of each member, in the same order.
    h64s: Vec<u64>,
}

impl WeightClasses {
    pub fn new<C: Candidate>(hosts: &[C]) -> Self {
        let mut classes: Vec<Class> = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            let w = h.weight();
            let pos = match classes.iter().position(|c| c.weight == w) {
                Some(p) => p,
                None => {
                    classes.push(Class { weight: w, ..Class::default() });
                    classes.len() - 1
                }
            };
            if let Some(c) = classes.get_mut(pos) {
                c.members.push(i);
                c.h64s.push(h.h64());
            }
        }
        WeightClasses { classes }
    }
}

/// The best `k` hosts for a session, best first, exactly as the head of [`rank`] would
/// give them, written into `out` (cleared first). `hosts` and `classes` describe the same
/// host set.
///
/// Cost: one SHA-256 of the session id, one `fmix64` per host, and `ln` for at most
/// `k` hosts per weight class. No allocation beyond `out` and a `k`-sized scratch per class.
pub fn top_k<C: Candidate>(session_h64: u64, hosts: &[C], classes: &WeightClasses, k: usize, out: &mut Vec<usize>) {
    out.clear();
    if k == 0 {
        return;
    }
    // Candidates: (score, mix, index). At most k per weight class.
    let mut finalists: Vec<(f64, u64, usize)> = Vec::with_capacity(k * classes.classes.len());
    let mut best: Vec<(u64, usize)> = Vec::with_capacity(k + 1);
    for class in &classes.classes {
        best.clear();
        // Once `best` holds k hosts, a mix below its last one cannot enter: most hosts
        // are rejected by this one comparison.
        let mut floor = 0u64;
        for (&hh, &i) in class.h64s.iter().zip(&class.members) {
            let m = mix(session_h64, hh);
            if best.len() == k && m < floor {
                continue;
            }
            let Some(host) = hosts.get(i) else { continue };
            // Keep `best` sorted by (mix desc, key asc), length <= k.
            if best.len() == k {
                if let Some(&(last_m, last_i)) = best.last() {
                    let beats_last = m > last_m || (m == last_m && host.key().as_bytes() < key_of(hosts, last_i));
                    if !beats_last {
                        continue;
                    }
                }
            }
            let pos = best
                .iter()
                .position(|&(bm, bi)| m > bm || (m == bm && host.key().as_bytes() < key_of(hosts, bi)))
                .unwrap_or(best.len());
            best.insert(pos, (m, i));
            best.truncate(k);
            if best.len() == k {
                floor = best.last().map_or(0, |b| b.0);
            }
        }
        finalists.extend(best.iter().map(|&(m, i)| (score(class.weight, m), m, i)));
    }
    finalists.sort_by(|a, b| better((a.0, a.1, key_str(hosts, a.2)), (b.0, b.1, key_str(hosts, b.2))));
    out.extend(finalists.iter().take(k).map(|&(_, _, i)| i));
}

fn key_of<C: Candidate>(hosts: &[C], i: usize) -> &[u8] {
    key_str(hosts, i).as_bytes()
}

fn key_str<C: Candidate>(hosts: &[C], i: usize) -> &str {
    hosts.get(i).map_or("", |h| h.key())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(keys: &[(&str, u32)]) -> Vec<Plain> {
        keys.iter().map(|(k, w)| Plain::new(k, *w)).collect()
    }

    #[test]
    fn fmix64_known_values() {
        assert_eq!(fmix64(0), 0);
        // From affinity-steps.json: alice on 127.0.0.1:8001.
        assert_eq!(mix(0x2bd806c97f0e00af, 0xd512c4e7211fade9), 0x871733198c7b9980);
    }

    #[test]
    fn unit_is_inside_open_interval() {
        assert!(unit(0) > 0.0);
        assert!(unit(u64::MAX) <= 1.0);
        assert!(unit(u64::MAX - (1 << 11)) < 1.0);
        assert_eq!(score(1, u64::MAX), f64::INFINITY);
        assert!(score(1, u64::MAX - (1 << 11)).is_finite());
        assert!(score(1, 0) > 0.0);
        assert!(score(1, u64::MAX - (1 << 11)) > score(1, u64::MAX >> 1));
    }

    #[test]
    fn top_k_equals_head_of_rank_for_many_sessions_and_weights() {
        let owned: Vec<(String, u32)> =
            (0..40).map(|i| (format!("10.0.{}.{}:80", i / 7, i), 1 + (i % 4) as u32)).collect();
        let keys: Vec<(&str, u32)> = owned.iter().map(|(k, w)| (k.as_str(), *w)).collect();
        let hosts = cands(&keys);
        let classes = WeightClasses::new(&hosts);
        let mut out = Vec::new();
        for s in 0..500 {
            let session = format!("session-{s}");
            let full = rank(session.as_bytes(), &hosts);
            for k in [1, 3, 7, 40, 60] {
                top_k(h64(session.as_bytes()), &hosts, &classes, k, &mut out);
                assert_eq!(out[..], full[..k.min(full.len())], "session {session} k {k}");
            }
        }
    }

    #[test]
    fn equal_hashes_break_ties_by_key() {
        // Two hosts with the same h64 (forced) have the same mix and score: smaller key wins.
        let hosts =
            vec![Plain { key: "b:1".into(), h64: 7, weight: 1 }, Plain { key: "a:1".into(), h64: 7, weight: 1 }];
        assert_eq!(rank(b"x", &hosts), vec![1, 0]);
        let classes = WeightClasses::new(&hosts);
        let mut out = Vec::new();
        top_k(h64(b"x"), &hosts, &classes, 1, &mut out);
        assert_eq!(out, vec![1]);
    }
}
