//! The healthy host set the filter ranks over, and host addresses.
//!
//! A [`HostSet`] is built once per change of the set (static configuration, or a
//! discovery poll that saw a different set) and then shared read-only by every request:
//! host hashes, node ids, the weight classes of the ranking and the lookup tables (by
//! node id, by address) are all computed here, never per request.
//!
//! Routing types know nothing of metrics: a node is named by its host key and `h64`,
//! and the metrics layer ([`crate::metrics`]) derives counter names from the key.
//!
//! Host keys follow DESIGN section 5: `ip:port` as Envoy prints it (`[2001:db8::1]:8080`
//! for IPv6) unless a static host sets its own `key`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use crate::affinity::{self, Candidate, WeightClasses};

/// A host as configured or discovered, before hashing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostSpec {
    /// `ip:port` in Envoy's canonical form; what goes into the override header.
    pub address: String,
    /// The key hashed by the affinity function (the address unless configured).
    pub key: String,
    /// Rendezvous weight, at least 1.
    pub weight: u32,
    /// Envoy lists it `DRAINING` (kept in the set only under `placement.drain`): it serves
    /// the sessions pinned to it and takes no new ones.
    pub draining: bool,
}

/// One host of a [`HostSet`].
#[derive(Clone, Debug)]
pub struct Host {
    pub address: String,
    pub key: String,
    pub weight: u32,
    /// `h64(key)`: the node's identity in tickets.
    pub h64: u64,
    /// Lowercase hex of `h64`, 16 digits: the node id clients and nodes see.
    pub node_id: String,
    /// See [`HostSpec::draining`].
    pub draining: bool,
}

impl Candidate for Host {
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

/// An immutable set of hosts, ready for ranking. Two sets are equal when they hold the
/// same hosts (address, key, weight), whatever order they were listed in.
#[derive(Clone, Debug, Default)]
pub struct HostSet {
    specs: Vec<HostSpec>,
    hosts: Vec<Host>,
    classes: WeightClasses,
    by_node: HashMap<u64, usize>,
    by_address: HashMap<String, usize>,
}

impl PartialEq for HostSet {
    fn eq(&self, other: &HostSet) -> bool {
        self.specs == other.specs
    }
}

impl Eq for HostSet {}

/// Why a list of hosts cannot form a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostSetError {
    DuplicateAddress(String),
    DuplicateKey(String),
}

impl fmt::Display for HostSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostSetError::DuplicateAddress(a) => write!(f, "duplicate host address {a}"),
            HostSetError::DuplicateKey(k) => write!(f, "duplicate host key {k}"),
        }
    }
}

impl HostSet {
    /// Builds a set. The order of `specs` does not matter: the set is kept sorted so that
    /// two polls listing the same hosts in another order compare equal.
    pub fn new(mut specs: Vec<HostSpec>) -> Result<HostSet, HostSetError> {
        specs.sort();
        let mut hosts = Vec::with_capacity(specs.len());
        let mut by_node = HashMap::with_capacity(specs.len());
        let mut by_address = HashMap::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if by_address.insert(spec.address.clone(), i).is_some() {
                return Err(HostSetError::DuplicateAddress(spec.address.clone()));
            }
            let h = affinity::h64(spec.key.as_bytes());
            if by_node.insert(h, i).is_some() {
                return Err(HostSetError::DuplicateKey(spec.key.clone()));
            }
            hosts.push(Host {
                address: spec.address.clone(),
                key: spec.key.clone(),
                weight: spec.weight,
                h64: h,
                node_id: node_id(h),
                draining: spec.draining,
            });
        }
        let classes = WeightClasses::new(&hosts);
        Ok(HostSet { specs, hosts, classes, by_node, by_address })
    }

    /// The specs the set was built from, sorted.
    pub fn specs(&self) -> &[HostSpec] {
        &self.specs
    }

    /// The hosts, in the set's (sorted) order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// True when `specs` describe exactly this set (in any order).
    pub fn same_as(&self, specs: &[HostSpec]) -> bool {
        if specs.len() != self.specs.len() {
            return false;
        }
        let mut sorted: Vec<&HostSpec> = specs.iter().collect();
        sorted.sort();
        sorted.into_iter().eq(self.specs.iter())
    }

    /// Index of the host whose `h64(key)` is `node`.
    pub fn by_node(&self, node: u64) -> Option<usize> {
        self.by_node.get(&node).copied()
    }

    /// Index of the host at `address` (`ip:port` as Envoy prints it).
    pub fn by_address(&self, address: &str) -> Option<usize> {
        self.by_address.get(address).copied()
    }

    /// The best `k` hosts for a session hash, best first (see [`affinity::top_k`]).
    pub fn top_k(&self, session_h64: u64, k: usize, out: &mut Vec<usize>) {
        affinity::top_k(session_h64, &self.hosts, &self.classes, k, out);
    }

    /// The full ranking (reference form, for tests and tools).
    pub fn rank(&self, session: &[u8]) -> Vec<usize> {
        affinity::rank(session, &self.hosts)
    }
}

/// Lowercase, zero-padded hex of a node hash: the node id of DESIGN section 4.
pub fn node_id(h64: u64) -> String {
    format!("{h64:016x}")
}

/// Parses a node id (1 to 16 lowercase hex digits).
pub fn parse_node_id(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Parses `ip:port` (IPv6 in brackets) and returns Envoy's canonical spelling of it, or
/// `None` when it is not a literal socket address (host names are not allowed: the
/// override header needs addresses).
pub fn canonical_address(s: &str) -> Option<String> {
    let addr: SocketAddr = s.parse().ok()?;
    if let SocketAddr::V6(v6) = &addr {
        if v6.scope_id() != 0 || v6.flowinfo() != 0 {
            return None;
        }
    }
    Some(addr.to_string())
}

/// Formats an IP literal and a port as Envoy prints a host address.
pub fn join_address(ip: &str, port: u32) -> Option<String> {
    let port = u16::try_from(port).ok()?;
    let ip: std::net::IpAddr = ip.parse().ok()?;
    Some(SocketAddr::new(ip, port).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(a: &str, w: u32) -> HostSpec {
        HostSpec { address: a.into(), key: a.into(), weight: w, draining: false }
    }

    #[test]
    fn canonical_addresses() {
        assert_eq!(canonical_address("127.0.0.1:8001").as_deref(), Some("127.0.0.1:8001"));
        assert_eq!(canonical_address("[2001:DB8:0:0::1]:8080").as_deref(), Some("[2001:db8::1]:8080"));
        assert_eq!(canonical_address("localhost:80"), None);
        assert_eq!(canonical_address("127.0.0.1"), None);
        assert_eq!(canonical_address("127.0.0.1:99999"), None);
        assert_eq!(join_address("::1", 9000).as_deref(), Some("[::1]:9000"));
        assert_eq!(join_address("10.0.0.1", 70000), None);
    }

    #[test]
    fn node_ids_round_trip() {
        assert_eq!(node_id(0xd512c4e7211fade9), "d512c4e7211fade9");
        assert_eq!(node_id(1), "0000000000000001");
        assert_eq!(parse_node_id("d512c4e7211fade9"), Some(0xd512c4e7211fade9));
        assert_eq!(parse_node_id("D512"), None);
        assert_eq!(parse_node_id(""), None);
        assert_eq!(parse_node_id("0123456789abcdef0"), None);
        assert_eq!(parse_node_id("+1"), None);
    }

    #[test]
    fn duplicates_are_refused_and_order_does_not_matter() {
        assert_eq!(
            HostSet::new(vec![spec("1.1.1.1:1", 1), spec("1.1.1.1:1", 2)]).err(),
            Some(HostSetError::DuplicateAddress("1.1.1.1:1".into()))
        );
        let dup_key = vec![
            HostSpec { address: "1.1.1.1:1".into(), key: "k".into(), weight: 1, draining: false },
            HostSpec { address: "1.1.1.1:2".into(), key: "k".into(), weight: 1, draining: false },
        ];
        assert_eq!(HostSet::new(dup_key).err(), Some(HostSetError::DuplicateKey("k".into())));
        let a = HostSet::new(vec![spec("1.1.1.1:1", 1), spec("1.1.1.1:2", 1)]).unwrap();
        assert!(a.same_as(&[spec("1.1.1.1:2", 1), spec("1.1.1.1:1", 1)]));
        assert!(!a.same_as(&[spec("1.1.1.1:2", 2), spec("1.1.1.1:1", 1)]));
        assert!(!a.same_as(&[spec("1.1.1.1:2", 1)]));
        assert_eq!(a.by_address("1.1.1.1:2"), Some(1));
        assert_eq!(a.by_node(affinity::h64(b"1.1.1.1:1")), Some(0));
    }
}
