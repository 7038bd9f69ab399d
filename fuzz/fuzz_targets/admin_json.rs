//! Admin `/clusters?format=json` parse on structured input: documents shaped like Envoy's
//! output (several clusters, hosts with every health flag, IPv4/IPv6/pipe addresses,
//! weights, priorities, extra fields), checked against an independent implementation of
//! the health rule of DESIGN section 6.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use session_affinity::admin::{self, AdminError};

#[derive(Debug, Arbitrary)]
struct HostIn {
    addr: u8,
    port: Option<u32>,
    eds: Option<u8>,
    failed_active: Option<bool>,
    failed_outlier: Option<bool>,
    pending_removal: Option<bool>,
    excluded: Option<bool>,
    no_health: bool,
    weight: Option<u32>,
    priority: Option<u8>,
    stats: bool,
}

#[derive(Debug, Arbitrary)]
struct ClusterIn {
    name: u8,
    no_hosts_key: bool,
    hosts: Vec<HostIn>,
}

/// (address JSON, canonical ip, or None when not a socket address / not an IP literal).
const ADDRS: &[(&str, Option<&str>)] = &[
    ("127.0.0.1", Some("127.0.0.1")),
    ("127.0.0.2", Some("127.0.0.2")),
    ("10.0.0.7", Some("10.0.0.7")),
    ("::1", Some("[::1]")),
    ("2001:DB8:0::1", Some("[2001:db8::1]")),
    ("example.com", None),
    ("", None),
];
const EDS: &[&str] = &["HEALTHY", "DEGRADED", "UNHEALTHY", "DRAINING", "TIMEOUT", "UNKNOWN"];
const NAMES: &[&str] = &["chat_nodes", "other", "chat_nodes_2"];

enum Want {
    Hosts(Vec<(String, u32)>),
    BadHost,
    NoSuchCluster,
}

fn build(clusters: &[ClusterIn]) -> (Value, Want) {
    let mut want: Option<Want> = None;
    let mut out = Vec::new();
    for c in clusters {
        let name = NAMES[usize::from(c.name) % NAMES.len()];
        let mut hosts = Vec::new();
        let mut kept: Vec<(u32, String, u32)> = Vec::new();
        let mut bad = false;
        for h in &c.hosts {
            let mut m = Map::new();
            // addr >= 200: a pipe, or no address at all.
            let sock = if h.addr >= 200 {
                if h.addr % 2 == 0 {
                    m.insert("address".into(), json!({"pipe": {"path": "/tmp/x"}}));
                }
                None
            } else {
                let (text, canon) = ADDRS[usize::from(h.addr) % ADDRS.len()];
                let mut sa = Map::new();
                sa.insert("address".into(), json!(text));
                if let Some(p) = h.port {
                    sa.insert("port_value".into(), json!(p));
                }
                m.insert("address".into(), json!({"socket_address": sa}));
                Some((canon, h.port.unwrap_or(0)))
            };
            let mut hs = Map::new();
            if let Some(e) = h.eds {
                hs.insert("eds_health_status".into(), json!(EDS[usize::from(e) % EDS.len()]));
            }
            for (k, v) in [
                ("failed_active_health_check", h.failed_active),
                ("failed_outlier_check", h.failed_outlier),
                ("pending_dynamic_removal", h.pending_removal),
                ("excluded_via_immediate_hc_fail", h.excluded),
            ] {
                if let Some(v) = v {
                    hs.insert(k.into(), json!(v));
                }
            }
            if !h.no_health {
                m.insert("health_status".into(), Value::Object(hs));
            }
            if let Some(w) = h.weight {
                m.insert("weight".into(), json!(w));
            }
            if let Some(p) = h.priority {
                m.insert("priority".into(), json!(p));
            }
            if h.stats {
                m.insert(
                    "stats".into(),
                    json!([{"name": "cx_total", "value": "7"}, {"name": "rq_error", "type": "COUNTER"}]),
                );
                m.insert("locality".into(), json!({}));
            }
            hosts.push(Value::Object(m));

            // The rule, independently.
            let eds_ok =
                h.no_health || h.eds.is_none_or(|e| matches!(EDS[usize::from(e) % EDS.len()], "HEALTHY" | "DEGRADED"));
            let flags = !h.no_health
                && [h.failed_active, h.failed_outlier, h.pending_removal, h.excluded].contains(&Some(true));
            if !eds_ok || flags {
                continue;
            }
            let Some((canon, port)) = sock else { continue };
            match (canon, u16::try_from(port)) {
                (Some(ip), Ok(p)) => {
                    kept.push((u32::from(h.priority.unwrap_or(0)), format!("{ip}:{p}"), h.weight.unwrap_or(1).max(1)))
                }
                _ => bad = true,
            }
        }
        let mut cm = Map::new();
        cm.insert("name".into(), json!(name));
        if c.no_hosts_key {
            // No `host_statuses` at all: a cluster without hosts.
            kept.clear();
            bad = false;
        } else {
            cm.insert("host_statuses".into(), Value::Array(hosts));
        }
        out.push(Value::Object(cm));
        if name == "chat_nodes" && want.is_none() {
            want = Some(if bad {
                Want::BadHost
            } else {
                let best = kept.iter().map(|k| k.0).min();
                Want::Hosts(kept.into_iter().filter(|k| Some(k.0) == best).map(|k| (k.1, k.2)).collect())
            });
        }
    }
    (json!({"cluster_statuses": out}), want.unwrap_or(Want::NoSuchCluster))
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(clusters) = Vec::<ClusterIn>::arbitrary(&mut u) else { return };
    let (doc, want) = build(&clusters);
    let body = serde_json::to_vec(&doc).unwrap();
    let got = admin::healthy_hosts(&body, "chat_nodes");
    match (want, got) {
        (Want::Hosts(w), Ok(specs)) => {
            let g: Vec<(String, u32)> = specs.into_iter().map(|s| (s.address, s.weight)).collect();
            assert_eq!(g, w, "{doc}");
        }
        (Want::BadHost, Err(AdminError::BadHost(_))) => {}
        (Want::NoSuchCluster, Err(AdminError::NoSuchCluster)) => {}
        (_, got) => panic!("unexpected result {got:?} for {doc}"),
    }
});
