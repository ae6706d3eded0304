//! The kubectl the tests run (`tests/tests/kubectl.rs`, `walkthrough.rs`,
//! `deploy.rs`): `$KUBECTL`, else the one `make setup` installs into
//! `target/tools/kubectl`, else `kubectl` on `PATH`. A test that needs kubectl
//! fails without one, never skips: `make setup` installs it. The one found must
//! be within one minor version of the test API server's
//! ([`Config::default`](crate::apiserver::Config)`.version`), kubectl's
//! supported version skew; else the test fails and names both versions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::apiserver::Config;

/// The workspace's root, where `make` and `cargo` run (cargo runs the tests in `tests/`).
fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace")
}

/// Where `make setup` installs kubectl: `target/tools/kubectl` in the workspace.
pub fn installed_path() -> PathBuf {
    workspace().join("target/tools/kubectl")
}

/// The file `name` in a directory of `PATH`.
fn on_path(name: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// The kubectl to run, checked as the module says; panics (the test fails)
/// with what to do when there is none or it is too far from the server's version.
/// Looked up once per test binary.
pub fn path() -> PathBuf {
    static FOUND: OnceLock<PathBuf> = OnceLock::new();
    FOUND.get_or_init(|| find().unwrap_or_else(|e| panic!("{e}"))).clone()
}

/// The kubectl to run, or why there is none to use.
pub fn find() -> Result<PathBuf, String> {
    let (major, minor) = Config::default().version;
    let bin = locate()?;
    let (client_major, client_minor) = client_version(&bin)?;
    if client_major != major || client_minor.abs_diff(minor) > 1 {
        return Err(format!(
            "{} is kubectl {client_major}.{client_minor}, but the test API server reports Kubernetes {major}.{minor} \
             (Config::default().version) and kubectl supports only one minor version of skew: run `make setup`, which \
             installs the matching kubectl into {}, or set KUBECTL to a kubectl {major}.{}..={major}.{}",
            bin.display(),
            installed_path().display(),
            minor.saturating_sub(1),
            minor + 1
        ));
    }
    Ok(bin)
}

/// `$KUBECTL` (which must exist when set: a relative path is the workspace's,
/// as typed where `cargo test` runs, a bare name is looked up on `PATH`), else
/// `target/tools/kubectl`, else `PATH`.
fn locate() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|k| !k.is_empty()) {
        let given = PathBuf::from(&k);
        let found = if given.components().count() == 1 && !given.is_absolute() {
            on_path(&k)
        } else {
            Some(workspace().join(&given)).filter(|p| p.is_file())
        };
        return found.ok_or_else(|| {
            format!("KUBECTL={} is not a file: unset it, or run `make setup`, which installs kubectl into {}", given.display(), installed_path().display())
        });
    }
    let installed = installed_path();
    if installed.is_file() {
        return Ok(installed);
    }
    on_path("kubectl".as_ref()).ok_or_else(|| {
        format!(
            "no kubectl: KUBECTL is not set, {} does not exist and there is none on PATH. This test runs kubectl; \
             run `make setup`, which installs it there",
            installed.display()
        )
    })
}

/// `kubectl version --client`: major and minor (a build's `"37+"` counts as 37).
fn client_version(bin: &Path) -> Result<(u32, u32), String> {
    let out = Command::new(bin)
        .args(["version", "--client", "-o", "json"])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .map_err(|e| format!("running {} version --client: {e} (run `make setup` to install kubectl into {})", bin.display(), installed_path().display()))?;
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
    let number = |field: &str| -> Option<u32> {
        let text = parsed.as_ref()?["clientVersion"][field].as_str()?;
        text.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()
    };
    match (out.status.success(), number("major"), number("minor")) {
        (true, Some(major), Some(minor)) => Ok((major, minor)),
        _ => Err(format!(
            "{} version --client -o json did not print a client version ({}): is it kubectl? Run `make setup`, which installs kubectl into {}\n{}{}",
            bin.display(),
            out.status,
            installed_path().display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}
