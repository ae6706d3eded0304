//! `ipvs-operator node-setup` in a fresh test VM (`make test-kernel`), where
//! nothing has loaded `ip_vs` — as on a node whose kube-proxy is not in IPVS
//! mode: it loads every module standalone mode needs from the module tree
//! with the kernel's loader, sets the sysctls, and a second run finds nothing
//! to do. `--check` reports what is missing before, and nothing after.

use std::path::Path;
use std::process::{Command, Output};

use ipvs_operator::node_setup::{MODULES, SYSCTLS};
use traffic::netns::project_binary;

fn node_setup(args: &[&str]) -> Output {
    Command::new(project_binary("ipvs-operator")).arg("node-setup").args(args).output().expect("ipvs-operator runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn node_setup_loads_the_modules_and_sets_the_sysctls_once() {
    assert!(!Path::new("/sys/module/ip_vs").exists(), "a fresh VM has not loaded ip_vs");

    let before = node_setup(&["--check"]);
    let said = text(&before);
    assert!(!before.status.success(), "{said}");
    assert!(said.contains("module ip_vs: not loaded") && said.contains("module nft_masq: not loaded"), "{said}");

    let setup = node_setup(&[]);
    let said = text(&setup);
    assert!(setup.status.success(), "{said}");
    assert!(said.contains("module ip_vs: loaded from /lib/modules/"), "{said}");
    assert!(said.contains("module nft_masq: loaded from /lib/modules/"), "{said}");
    for module in MODULES {
        assert!(Path::new("/sys/module").join(module).exists(), "{module} not loaded: {said}");
    }
    for (name, value) in SYSCTLS {
        let is = std::fs::read_to_string(Path::new("/proc/sys").join(name)).expect("the sysctl exists now");
        assert_eq!(is.trim(), *value, "{name}");
    }
    assert!(said.contains("sysctl net.ipv4.vs.conntrack: set (was 0)"), "{said}");

    let again = node_setup(&[]);
    let said = text(&again);
    assert!(again.status.success(), "{said}");
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), MODULES.len() + SYSCTLS.len(), "{said}");
    assert!(lines.iter().all(|l| l.ends_with("already there") || l.ends_with("already set")), "nothing to do: {said}");
    let after = node_setup(&["--check"]);
    assert!(after.status.success(), "{}", text(&after));
}
