//! Admin `/clusters?format=json` parse on arbitrary bytes (untrusted as far as the VM is
//! concerned: a proxied or broken admin can answer anything).
//!
//! Invariants: deterministic; every host kept has Envoy's canonical `ip:port` spelling,
//! its address as key and a weight of at least 1; a list that forms a host set gives a
//! set of that size whose every address can be looked up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_affinity::admin;
use session_affinity::hosts::{self, HostSet};

fuzz_target!(|data: &[u8]| {
    let got = admin::healthy_hosts(data, "chat_nodes");
    assert_eq!(got, admin::healthy_hosts(data, "chat_nodes"));
    let Ok(specs) = got else { return };
    for s in &specs {
        assert_eq!(hosts::canonical_address(&s.address).as_deref(), Some(s.address.as_str()));
        assert_eq!(s.key, s.address);
        assert!(s.weight >= 1);
    }
    if let Ok(set) = HostSet::new(specs.clone()) {
        assert_eq!(set.len(), specs.len());
        assert!(set.same_as(&specs));
        for s in &specs {
            assert!(set.by_address(&s.address).is_some());
        }
    }
});
