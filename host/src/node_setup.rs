//! `ipvs-operator node-setup`: what a node needs before the agent can serve
//! Services itself (standalone mode) — kernel modules and sysctls — done once
//! by a short-lived privileged init container, so that the agent keeps only
//! `NET_ADMIN`. On nodes whose kube-proxy is in IPVS mode kube-proxy has done
//! most of it; elsewhere nothing has loaded `ip_vs`.
//!
//! Modules are loaded by the kernel's own loader (`finit_module(2)`) from the
//! host's module tree (`/lib/modules/<release>`, mounted into the container),
//! dependencies first as `modules.dep` lists them: no `modprobe` binary in the
//! image. A module built into the kernel (`modules.builtin`) or already
//! loaded is left alone. The sysctls are those kube-proxy's IPVS mode sets.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The modules standalone mode needs: IPVS and its schedulers, nftables'
/// NAT and masquerade (and conntrack, which they need), and the dummy
/// interface.
pub const MODULES: &[&str] = &[
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_lblc",
    "ip_vs_lblcr",
    "ip_vs_dh",
    "ip_vs_sh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_mh",
    "nf_conntrack",
    "nf_tables",
    "nft_ct",
    "nft_chain_nat",
    "nft_masq",
    "dummy",
];

/// The sysctls, with their values, as kube-proxy's IPVS proxier sets them:
/// netfilter must see IPVS connections to masquerade them (`vs.conntrack`);
/// connections to a deleted destination or a quiescent template expire; the
/// node forwards; and with Service addresses on a dummy interface on every
/// node, no node answers ARP for them (strict ARP).
pub const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// `finit_module` flag: the file is compressed, the kernel decompresses it (Linux 6.4+).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// What was done about one module or sysctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded now (from this file).
    Loaded(PathBuf),
    /// Already loaded, or built into the kernel.
    AlreadyThere,
    /// Set now (it was this).
    Set { was: String },
    /// Already had the value.
    Unchanged,
}

/// Why node setup failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The kernel's release could not be read.
    #[error("reading the kernel release: {0}")]
    Release(std::io::Error),
    /// The module tree has no such module.
    #[error("module {module}: not in {dep} (is the host's /lib/modules mounted at {root}?)")]
    NoModule {
        /// The module.
        module: String,
        /// The modules.dep read.
        dep: String,
        /// The module root.
        root: String,
    },
    /// A file of the module tree could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused to load a module.
    #[error("loading {path}: {source}{hint}")]
    Load {
        /// The module file.
        path: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
        /// What it usually means.
        hint: &'static str,
    },
    /// A sysctl could not be read or written.
    #[error("sysctl {name}: {source}")]
    Sysctl {
        /// Its name (dotted).
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The module tree of the running kernel under `root` (e.g. `/lib/modules`).
pub struct ModuleTree {
    dir: PathBuf,
    /// Module name -> (its file, relative to `dir`; its dependencies' files).
    deps: BTreeMap<String, (String, Vec<String>)>,
    builtin: Vec<String>,
}

/// `ip_vs` from `kernel/net/netfilter/ipvs/ip_vs.ko.xz`: module names use `_` for `-`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleTree {
    /// The tree of the running kernel under `root`.
    pub fn open(root: &Path) -> Result<Self, SetupError> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(SetupError::Release)?;
        Self::at(root.join(release.trim()))
    }

    /// The tree in `dir` (`<root>/<release>`).
    pub fn at(dir: PathBuf) -> Result<Self, SetupError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| SetupError::Read { path: path.display().to_string(), source })
        };
        let deps = Self::parse_dep(&read("modules.dep")?);
        // modules.builtin may be missing on trees that have no built-in list.
        let builtin = read("modules.builtin").map(|t| t.lines().map(module_name).collect()).unwrap_or_default();
        Ok(ModuleTree { dir, deps, builtin })
    }

    /// `modules.dep`: `path: dep-path dep-path…`, each module's dependencies
    /// in the order modprobe loads them last to first.
    fn parse_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
        text.lines()
            .filter_map(|line| {
                let (path, deps) = line.split_once(':')?;
                let path = path.trim().to_string();
                Some((module_name(&path), (path, deps.split_whitespace().map(String::from).collect())))
            })
            .collect()
    }

    /// The files to load for `module`, dependencies first; none for a built-in one.
    pub fn load_order(&self, module: &str) -> Result<Vec<PathBuf>, SetupError> {
        let name = module.replace('-', "_");
        if self.builtin.contains(&name) {
            return Ok(Vec::new());
        }
        let (path, deps) = self.deps.get(&name).ok_or_else(|| SetupError::NoModule {
            module: module.into(),
            dep: self.dir.join("modules.dep").display().to_string(),
            root: self.dir.parent().unwrap_or(&self.dir).display().to_string(),
        })?;
        Ok(deps.iter().rev().chain(std::iter::once(path)).map(|p| self.dir.join(p)).collect())
    }
}

/// Whether module `name` is loaded (or built in with parameters): `/sys/module/NAME`.
fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name.replace('-', "_")).exists()
}

/// Load one module file with the kernel's loader; `Ok(false)` if it was loaded already.
fn finit_module(path: &Path) -> Result<bool, SetupError> {
    let file = File::open(path).map_err(|source| SetupError::Read { path: path.display().to_string(), source })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let compressed = [".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|ext| name.ends_with(ext));
    let flags = if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 };
    let params = CString::default();
    // SAFETY: finit_module reads the open file and a NUL-terminated parameter
    // string; both outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), flags) };
    if rc == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        code => Err(SetupError::Load {
            path: path.display().to_string(),
            source: error,
            hint: match code {
                Some(libc::EPERM) => " (the container needs CAP_SYS_MODULE: run node-setup as a privileged init container)",
                Some(libc::EINVAL) if compressed => " (this kernel cannot decompress modules itself: Linux 6.4 or later does)",
                Some(libc::ENOEXEC) => " (the module is not for the running kernel: is the host's /lib/modules mounted?)",
                _ => "",
            },
        }),
    }
}

/// Load `modules` (dependencies first) from `tree`, each unless it is there already.
pub fn load_modules(tree: &ModuleTree, modules: &[&str]) -> Vec<(String, Result<Outcome, SetupError>)> {
    modules
        .iter()
        .map(|module| {
            let outcome = (|| {
                if is_loaded(module) {
                    return Ok(Outcome::AlreadyThere);
                }
                let files = tree.load_order(module)?;
                let Some(own) = files.last().cloned() else { return Ok(Outcome::AlreadyThere) };
                for file in &files {
                    if !is_loaded(&module_name(&file.display().to_string())) {
                        finit_module(file)?;
                    }
                }
                Ok(Outcome::Loaded(own))
            })();
            (module.to_string(), outcome)
        })
        .collect()
}

/// Set `sysctls` under `proc_sys` (`/proc/sys`), each unless it has the value.
pub fn set_sysctls(proc_sys: &Path, sysctls: &[(&str, &str)]) -> Vec<(String, Result<Outcome, SetupError>)> {
    sysctls
        .iter()
        .map(|(name, value)| {
            let dotted = name.replace('/', ".");
            let path = proc_sys.join(name);
            let outcome = (|| {
                let error = |source| SetupError::Sysctl { name: dotted.clone(), source };
                let was = std::fs::read_to_string(&path).map_err(error)?.trim().to_string();
                if was == *value {
                    return Ok(Outcome::Unchanged);
                }
                std::fs::write(&path, value).map_err(error)?;
                Ok(Outcome::Set { was })
            })();
            (dotted, outcome)
        })
        .collect()
}

/// The sysctls of [`SYSCTLS`] that do not have their value here (for the
/// agent to report): name, wanted value, and what it is (or why it cannot be read).
pub fn missing_sysctls(proc_sys: &Path) -> Vec<(String, &'static str, String)> {
    SYSCTLS
        .iter()
        .filter_map(|(name, value)| {
            let is = match std::fs::read_to_string(proc_sys.join(name)) {
                Ok(text) if text.trim() == *value => return None,
                Ok(text) => text.trim().to_string(),
                Err(e) => format!("unreadable: {e}"),
            };
            Some((name.replace('/', "."), *value, is))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_dep_gives_dependencies_first_and_names_use_underscores() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/net/netfilter/ipvs/ip_vs_wrr.ko.xz: kernel/net/netfilter/ipvs/ip_vs.ko.xz kernel/net/netfilter/nf_conntrack.ko.xz kernel/lib/libcrc32c.ko\n\
             kernel/net/netfilter/nf_conntrack.ko.xz: kernel/lib/libcrc32c.ko\n\
             kernel/drivers/net/dummy.ko:\n",
        )
        .expect("written");
        std::fs::write(dir.path().join("modules.builtin"), "kernel/net/netfilter/nf_tables.ko\n").expect("written");
        let tree = ModuleTree::at(dir.path().to_path_buf()).expect("read");
        let order: Vec<String> = tree
            .load_order("ip_vs_wrr")
            .expect("known")
            .iter()
            .map(|p| p.strip_prefix(dir.path()).expect("in the tree").display().to_string())
            .collect();
        assert_eq!(
            order,
            [
                "kernel/lib/libcrc32c.ko",
                "kernel/net/netfilter/nf_conntrack.ko.xz",
                "kernel/net/netfilter/ipvs/ip_vs.ko.xz",
                "kernel/net/netfilter/ipvs/ip_vs_wrr.ko.xz"
            ]
        );
        assert_eq!(tree.load_order("dummy").expect("known").len(), 1);
        assert!(tree.load_order("nf_tables").expect("built in").is_empty());
        let missing = tree.load_order("ip_vs_twos").expect_err("not in the tree").to_string();
        assert!(missing.contains("ip_vs_twos") && missing.contains("modules.dep"), "{missing}");
    }

    #[test]
    fn sysctls_are_written_only_when_they_differ() {
        let dir = tempfile::tempdir().expect("a temp dir");
        for (name, value) in [("net/ipv4/ip_forward", "0\n"), ("net/ipv4/vs/conntrack", "1\n")] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("dirs");
            std::fs::write(path, value).expect("written");
        }
        let done = set_sysctls(dir.path(), &[("net/ipv4/ip_forward", "1"), ("net/ipv4/vs/conntrack", "1"), ("net/ipv4/vs/nope", "1")]);
        assert_eq!(done[0].0, "net.ipv4.ip_forward");
        assert!(matches!(&done[0].1, Ok(Outcome::Set { was }) if was == "0"), "{:?}", done[0]);
        assert!(matches!(done[1].1, Ok(Outcome::Unchanged)), "{:?}", done[1]);
        let error = done[2].1.as_ref().expect_err("no such sysctl").to_string();
        assert!(error.contains("net.ipv4.vs.nope"), "{error}");
        assert_eq!(std::fs::read_to_string(dir.path().join("net/ipv4/ip_forward")).expect("read"), "1");
        let missing: Vec<String> = missing_sysctls(dir.path()).into_iter().map(|(n, _, _)| n).collect();
        assert!(missing.contains(&"net.ipv4.vs.expire_nodest_conn".to_string()) && !missing.contains(&"net.ipv4.ip_forward".to_string()));
    }
}
