//! Network namespaces for tests that need hosts: a backend, a client, a
//! node with its own IPVS table. Every test works in namespaces of its own,
//! so tests run in parallel without seeing each other's IPVS tables.
//!
//! These helpers panic with the command and its output when something fails:
//! they are for tests, where that is the most useful thing to do.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

/// Runs a command, panicking with its output unless it succeeds; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = output(program, args);
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command and returns its output, whatever its status.
pub fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// A project binary from the directory cargo builds into (`target/release`):
/// next to the running executable, or one up from a test's `deps/`. The VM
/// runner puts them at the same paths in the guest.
pub fn project_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable's path");
    let dir = exe.parent().expect("the executable's directory");
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is not built (looked in {} and its parent): `cargo build --release --workspace` first",
            dir.display()
        )
    })
}

/// A named network namespace (`ip netns add`), deleted on drop together with
/// the processes started in it.
pub struct NetNs {
    pub name: String,
    children: Vec<Child>,
}

impl NetNs {
    /// Creates the namespace, replacing a leftover of the same name.
    pub fn new(name: &str) -> Self {
        let _ = output("ip", &["netns", "del", name]);
        run("ip", &["netns", "add", name]);
        let ns = Self { name: name.to_owned(), children: Vec::new() };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command in the namespace; returns stdout, panics on failure.
    pub fn exec(&self, command: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        run("ip", &args)
    }

    /// Runs a command in the namespace; returns its output whatever its status.
    pub fn exec_output(&self, command: &[&str]) -> Output {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        output("ip", &args)
    }

    /// Runs a shell command line in the namespace.
    pub fn sh(&self, script: &str) -> String {
        self.exec(&["sh", "-c", script])
    }

    /// Sets sysctls of the namespace (`net.ipv6.conf.all.forwarding`, `1`), in
    /// one shell.
    pub fn sysctls(&self, settings: &[(&str, &str)]) {
        let script: Vec<String> =
            settings.iter().map(|(key, value)| format!("echo {value} > /proc/sys/{}", key.replace('.', "/"))).collect();
        self.sh(&script.join(" && "));
    }

    /// Turns IPv6 duplicate address detection off for the interfaces made in
    /// the namespace from now on (and its `all` switch): their addresses are
    /// usable at once, not after a second or more of DAD. Addresses added with
    /// `nodad` skip it anyway; this covers the automatic link-local ones.
    pub fn no_dad(&self) {
        self.sysctls(&[("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0")]);
    }

    /// `ipvsadm ARGS` in the namespace.
    pub fn ipvsadm(&self, args: &[&str]) -> String {
        let mut command = vec!["ipvsadm"];
        command.extend_from_slice(args);
        self.exec(&command)
    }

    /// Starts a long-running command in the namespace and waits for its first
    /// line of output (servers print when they listen).
    pub fn spawn_until_line(&mut self, command: &[&str]) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout).read_line(&mut line).expect("reading the first line");
        self.children.push(child);
        assert!(!line.is_empty(), "{command:?} exited without output");
        line
    }

    /// Calls `f` with this thread in the namespace, then moves it back: a
    /// netlink socket opened in `f` stays in the namespace.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> T {
        let original = File::open("/proc/thread-self/ns/net").expect("the thread's network namespace");
        let target = File::open(format!("/run/netns/{}", self.name)).expect("the namespace's file");
        setns(&target);
        let result = f();
        setns(&original);
        result
    }
}

fn setns(file: &File) {
    // SAFETY: a valid namespace fd; CLONE_NEWNET moves only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = output("ip", &["netns", "del", &self.name]);
    }
}

/// Connects two namespaces with a veth pair and addresses (CIDR) on each end.
pub fn link(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    a.exec(&["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name]);
    a.exec(&["ip", "addr", "add", a_addr, "dev", a_if]);
    a.exec(&["ip", "link", "set", a_if, "up"]);
    b.exec(&["ip", "addr", "add", b_addr, "dev", b_if]);
    b.exec(&["ip", "link", "set", b_if, "up"]);
}

/// Drops `CAP_NET_ADMIN` from this thread's effective capabilities
/// (capabilities are per thread on Linux).
pub fn drop_cap_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data structs, as the ABI says.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()), 0, "capget");
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0, "capset");
    }
}
