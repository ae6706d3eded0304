//! Helpers of the kernel tests: network namespaces, ipvsadm, the traffic
//! binaries (shared with the end-to-end tests in the `traffic` crate).

#![allow(dead_code, unused_imports)]

pub use traffic::netns::{NetNs, drop_cap_net_admin, link, output, project_binary, run};

use std::process::Command;

/// Loads ip_vs (the VM boots without it) and checks the kernel has it.
pub fn load_ip_vs() {
    // Built in, or loaded already: modprobe may fail, /proc tells.
    let _ = Command::new("modprobe").arg("ip_vs").status();
    assert!(
        std::path::Path::new("/proc/net/ip_vs").exists(),
        "this kernel has no IPVS: run these tests with `make test-kernel` (in the VM), \
         or as root on a Linux host with the ip_vs module"
    );
}
