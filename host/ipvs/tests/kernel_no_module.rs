//! What the client says when the ip_vs module is not loaded. Its own test
//! binary, so its own VM boot: the other kernel tests load the module.
//!
//! Runs only in the test VM (IPVS_TEST_VM=1, set by tests/vm/run): on any
//! other machine unloading ip_vs could break a running kube-proxy.

mod support;

use ipvs::{IpvsClient, IpvsError};

#[test]
fn without_the_module_the_error_says_to_load_it() {
    if std::env::var("IPVS_TEST_VM").as_deref() != Ok("1") {
        eprintln!("skipped: only runs in the test VM (make test-kernel), where unloading ip_vs harms nothing");
        return;
    }
    // The VM boots without ip_vs; make sure nothing loaded it since.
    let loaded = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    for module in loaded.lines().filter_map(|l| l.split(' ').next()).filter(|m| m.starts_with("ip_vs")) {
        support::run("rmmod", &[module]);
    }
    assert!(!std::path::Path::new("/proc/net/ip_vs").exists(), "ip_vs is still loaded");

    // Looking the family up makes the kernel try `modprobe ip_vs` itself:
    // with on-demand loading off, as on a host without the module, it fails.
    let modprobe = std::fs::read_to_string("/proc/sys/kernel/modprobe").expect("kernel.modprobe");
    std::fs::write("/proc/sys/kernel/modprobe", "/bin/false\n").expect("turning on-demand loading off");
    let err = IpvsClient::new().expect_err("no IPVS family without the module");
    assert!(matches!(err, IpvsError::FamilyNotFound), "{err:?}");
    assert!(err.to_string().starts_with("the ip_vs kernel module is not loaded"), "{err}");
    assert!(!std::path::Path::new("/proc/net/ip_vs").exists(), "looking the family up must not load the module");

    let cli = support::project_binary("ipvs-operator");
    let output = support::output(cli.to_str().expect("a UTF-8 path"), &["ipvs", "list"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the ip_vs kernel module is not loaded"), "{stderr}");

    // With on-demand loading back, the lookup itself loads ip_vs, and the
    // family id is found at run time.
    std::fs::write("/proc/sys/kernel/modprobe", modprobe).expect("restoring kernel.modprobe");
    let client = IpvsClient::new().expect("a client once ip_vs can be loaded");
    assert_ne!(client.family_id(), 0);
    assert!(std::path::Path::new("/proc/net/ip_vs").exists(), "the lookup loaded ip_vs");
}
