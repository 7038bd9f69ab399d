//! Live host discovery: the healthy hosts of one cluster, read from Envoy's admin
//! `GET /clusters?format=json`.
//!
//! The body is untrusted input as far as the VM is concerned: any malformed, oversized,
//! deeply nested or unexpected document is an [`AdminError`] (a failed poll that keeps
//! the last good set), never a panic.
//!
//! Health rule (DESIGN section 6): a host is healthy when `eds_health_status` is
//! `HEALTHY` or `DEGRADED` (or absent) and none of `failed_active_health_check`,
//! `failed_outlier_check`, `pending_dynamic_removal`, `excluded_via_immediate_hc_fail` is
//! set. Its weight is the admin `weight` (at least 1). When the cluster has several
//! priorities, the hosts of the lowest priority that has a healthy host are used, as
//! Envoy's own priority failover would.
//!
//! With `placement.drain` (DESIGN section 10), a host whose `eds_health_status` is
//! `DRAINING` (and that has none of the failure flags) is listed too, marked draining.
//! Each listed host also brings its `rq_active` gauge (requests in flight to it, summed
//! over Envoy's workers), the base of the load placement uses.

use std::fmt;

use serde::Deserialize;

use crate::hosts::{self, HostSpec};

/// Bodies larger than this are refused (an admin listing of ~20k hosts fits).
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminError {
    TooLarge(usize),
    Json(String),
    NoSuchCluster,
    BadHost(String),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::TooLarge(n) => write!(f, "admin body of {n} bytes is over the limit"),
            AdminError::Json(e) => write!(f, "admin body is not the expected JSON: {e}"),
            AdminError::NoSuchCluster => write!(f, "cluster not found in the admin output"),
            AdminError::BadHost(e) => write!(f, "unusable host in the admin output: {e}"),
        }
    }
}

#[derive(Deserialize)]
struct Clusters {
    #[serde(default)]
    cluster_statuses: Vec<ClusterStatus>,
}

#[derive(Deserialize)]
struct ClusterStatus {
    name: String,
    #[serde(default)]
    host_statuses: Vec<HostStatus>,
}

#[derive(Deserialize)]
struct HostStatus {
    #[serde(default)]
    address: Option<Address>,
    #[serde(default)]
    health_status: Option<HealthStatus>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    stats: Vec<Stat>,
}

/// One of a host's `stats` (`{"name": "rq_active", "type": "GAUGE", "value": "3"}`; a
/// proto3 uint64 is a JSON string, and a zero value is left out).
#[derive(Deserialize)]
struct Stat {
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: Option<StatValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StatValue {
    Number(u64),
    Text(String),
}

impl StatValue {
    fn get(&self) -> u64 {
        match self {
            StatValue::Number(n) => *n,
            StatValue::Text(t) => t.parse().unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct Address {
    #[serde(default)]
    socket_address: Option<SocketAddress>,
}

#[derive(Deserialize)]
struct SocketAddress {
    address: String,
    #[serde(default)]
    port_value: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HealthStatus {
    eds_health_status: Option<String>,
    failed_active_health_check: bool,
    failed_outlier_check: bool,
    pending_dynamic_removal: bool,
    excluded_via_immediate_hc_fail: bool,
}

impl HealthStatus {
    fn flags_clear(&self) -> bool {
        !self.failed_active_health_check
            && !self.failed_outlier_check
            && !self.pending_dynamic_removal
            && !self.excluded_via_immediate_hc_fail
    }

    fn healthy(&self) -> bool {
        matches!(self.eds_health_status.as_deref(), None | Some("HEALTHY") | Some("DEGRADED")) && self.flags_clear()
    }

    fn draining(&self) -> bool {
        self.eds_health_status.as_deref() == Some("DRAINING") && self.flags_clear()
    }
}

/// What one poll lists for the cluster: its usable hosts and their `rq_active`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub hosts: Vec<HostSpec>,
    /// `(address, rq_active)` of each host of `hosts`.
    pub rq_active: Vec<(String, u32)>,
}

/// The healthy hosts of `cluster` in an admin `/clusters?format=json` body.
pub fn healthy_hosts(body: &[u8], cluster: &str) -> Result<Vec<HostSpec>, AdminError> {
    listing(body, cluster, false).map(|l| l.hosts)
}

/// The hosts of `cluster` the filter can use, with their loads; with `drain`, draining
/// hosts are listed (marked) too.
pub fn listing(body: &[u8], cluster: &str, drain: bool) -> Result<Listing, AdminError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(AdminError::TooLarge(body.len()));
    }
    let doc: Clusters = serde_json::from_slice(body).map_err(|e| AdminError::Json(e.to_string()))?;
    let status = doc.cluster_statuses.into_iter().find(|c| c.name == cluster).ok_or(AdminError::NoSuchCluster)?;
    let mut by_priority: Vec<(u32, HostSpec, u32)> = Vec::new();
    for h in status.host_statuses {
        let health = h.health_status.unwrap_or_default();
        let draining = drain && health.draining();
        if !health.healthy() && !draining {
            continue;
        }
        // Pipes and internal addresses cannot be override targets: skip them.
        let Some(sa) = h.address.and_then(|a| a.socket_address) else { continue };
        let port = sa.port_value.unwrap_or(0);
        let address = hosts::join_address(&sa.address, port)
            .ok_or_else(|| AdminError::BadHost(format!("{}:{port}", truncate(&sa.address))))?;
        let weight = h.weight.unwrap_or(1).max(1);
        let rq_active = h
            .stats
            .iter()
            .find(|s| s.name == "rq_active")
            .and_then(|s| s.value.as_ref())
            .map_or(0, |v| u32::try_from(v.get()).unwrap_or(u32::MAX));
        by_priority.push((
            h.priority.unwrap_or(0),
            HostSpec { key: address.clone(), address, weight, draining },
            rq_active,
        ));
    }
    let Some(best) = by_priority.iter().map(|(p, _, _)| *p).min() else { return Ok(Listing::default()) };
    let mut out = Listing::default();
    for (_, h, active) in by_priority.into_iter().filter(|(p, _, _)| *p == best) {
        out.rq_active.push((h.address.clone(), active));
        out.hosts.push(h);
    }
    Ok(out)
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"cluster_statuses":[
      {"name":"other","host_statuses":[{"address":{"socket_address":{"address":"10.0.0.1","port_value":1}}}]},
      {"name":"chat","host_statuses":[
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8001}},
         "stats":[{"name":"cx_total","value":"7"}],
         "health_status":{"eds_health_status":"HEALTHY"},"weight":3,"locality":{}},
        {"address":{"socket_address":{"address":"::1","port_value":8002}},
         "health_status":{"eds_health_status":"DEGRADED"}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8003}},
         "health_status":{"failed_active_health_check":true,"eds_health_status":"HEALTHY"}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8004}},
         "health_status":{"failed_outlier_check":true}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8005}},
         "health_status":{"eds_health_status":"UNHEALTHY"}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8006}},
         "health_status":{"pending_dynamic_removal":true}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8007}},
         "health_status":{"excluded_via_immediate_hc_fail":true}},
        {"address":{"socket_address":{"address":"127.0.0.1","port_value":8008}},"weight":0},
        {"address":{"pipe":{"path":"/tmp/x"}}}
      ]}]}"#;

    #[test]
    fn keeps_only_healthy_hosts_with_weights() {
        let hosts = healthy_hosts(BODY.as_bytes(), "chat").unwrap();
        let got: Vec<(&str, u32)> = hosts.iter().map(|h| (h.address.as_str(), h.weight)).collect();
        assert_eq!(got, vec![("127.0.0.1:8001", 3), ("[::1]:8002", 1), ("127.0.0.1:8008", 1)]);
    }

    #[test]
    fn draining_hosts_and_loads_under_placement() {
        let body = r#"{"cluster_statuses":[{"name":"c","host_statuses":[
          {"address":{"socket_address":{"address":"10.0.0.1","port_value":1}},
           "stats":[{"name":"cx_active","type":"GAUGE","value":"9"},{"name":"rq_active","type":"GAUGE","value":"3"}]},
          {"address":{"socket_address":{"address":"10.0.0.2","port_value":1}},"health_status":{"eds_health_status":"DRAINING"},
           "stats":[{"name":"rq_active","type":"GAUGE","value":7}]},
          {"address":{"socket_address":{"address":"10.0.0.3","port_value":1}},
           "health_status":{"eds_health_status":"DRAINING","failed_active_health_check":true}},
          {"address":{"socket_address":{"address":"10.0.0.4","port_value":1}},"stats":[{"name":"rq_active","type":"GAUGE"}]},
          {"address":{"socket_address":{"address":"10.0.0.5","port_value":1}},"stats":[{"name":"rq_active","value":"x"}]}]}]}"#;
        let l = listing(body.as_bytes(), "c", false).unwrap();
        let got: Vec<(&str, bool)> = l.hosts.iter().map(|h| (h.address.as_str(), h.draining)).collect();
        assert_eq!(got, vec![("10.0.0.1:1", false), ("10.0.0.4:1", false), ("10.0.0.5:1", false)]);
        assert_eq!(l.rq_active, vec![("10.0.0.1:1".into(), 3), ("10.0.0.4:1".into(), 0), ("10.0.0.5:1".into(), 0)]);
        let l = listing(body.as_bytes(), "c", true).unwrap();
        let got: Vec<(&str, bool)> = l.hosts.iter().map(|h| (h.address.as_str(), h.draining)).collect();
        assert_eq!(
            got,
            vec![("10.0.0.1:1", false), ("10.0.0.2:1", true), ("10.0.0.4:1", false), ("10.0.0.5:1", false)]
        );
        assert_eq!(l.rq_active[1], ("10.0.0.2:1".into(), 7));
        // Without placement.drain, the same listing as before: healthy hosts only.
        assert_eq!(healthy_hosts(body.as_bytes(), "c").unwrap().len(), 3);
    }

    #[test]
    fn lowest_healthy_priority_wins() {
        let body = r#"{"cluster_statuses":[{"name":"c","host_statuses":[
          {"address":{"socket_address":{"address":"10.0.0.1","port_value":1}},"health_status":{"failed_active_health_check":true}},
          {"address":{"socket_address":{"address":"10.0.0.2","port_value":1}},"priority":1},
          {"address":{"socket_address":{"address":"10.0.0.3","port_value":1}},"priority":2}]}]}"#;
        let hosts = healthy_hosts(body.as_bytes(), "c").unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].address, "10.0.0.2:1");
    }

    #[test]
    fn hostile_bodies_are_errors() {
        let deep = "[".repeat(100_000);
        for body in [
            "",
            "null",
            "{",
            "[]",
            r#"{"cluster_statuses":{}}"#,
            r#"{"cluster_statuses":[{"name":"chat","host_statuses":[{"weight":-1}]}]}"#,
            r#"{"cluster_statuses":[{"name":"chat","host_statuses":[{"address":{"socket_address":{"address":"nope","port_value":1}}}]}]}"#,
            r#"{"cluster_statuses":[{"name":"chat","host_statuses":[{"address":{"socket_address":{"address":"1.2.3.4","port_value":70000}}}]}]}"#,
            r#"{"cluster_statuses":[{"name":"other"}]}"#,
            deep.as_str(),
        ] {
            assert!(healthy_hosts(body.as_bytes(), "chat").is_err(), "{:.60}", body);
        }
        assert_eq!(healthy_hosts(br#"{"cluster_statuses":[{"name":"chat"}]}"#, "chat"), Ok(vec![]));
    }
}
