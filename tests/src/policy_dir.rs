//! Policy modules as users deliver them: a directory laid out as the kubelet
//! mounts a ConfigMap, and components made distinct without changing what they
//! do. For end-to-end tests and the `policy-dir` benchmark.

use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

use k8s_openapi::jiff::Timestamp;

/// A policy directory laid out as the kubelet mounts a ConfigMap: the files in
/// a timestamped directory, `..data` pointing at it, `NAME` → `..data/NAME`.
/// Removed on drop.
pub struct ConfigMapDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl ConfigMapDir {
    /// A new directory holding `files` (name, bytes).
    pub fn new(files: &[(&str, &[u8])]) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("policies-").tempdir()?;
        let mut config_map = ConfigMapDir { dir, generation: 0 };
        config_map.update(files)?;
        Ok(config_map)
    }

    /// The directory (what `--policy-dir` names).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Updates it as the kubelet does: writes a new timestamped directory,
    /// swaps `..data` to it atomically (a rename over the old link), adds
    /// missing links, removes the old directory.
    pub fn update(&mut self, files: &[(&str, &[u8])]) -> io::Result<()> {
        self.generation += 1;
        let root = self.dir.path();
        let old = std::fs::read_link(root.join("..data")).ok();
        let version = format!(
            "..{}.{}",
            Timestamp::now().strftime("%Y_%m_%d_%H_%M_%S"),
            self.generation
        );
        std::fs::create_dir(root.join(&version))?;
        for (file, bytes) in files {
            std::fs::write(root.join(&version).join(file), bytes)?;
        }
        let _ = std::fs::remove_file(root.join("..data_tmp"));
        symlink(&version, root.join("..data_tmp"))?;
        std::fs::rename(root.join("..data_tmp"), root.join("..data"))?;
        for (file, _) in files {
            let link = root.join(file);
            if link.symlink_metadata().is_err() {
                symlink(format!("..data/{file}"), &link)?;
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(root.join(old));
        }
        Ok(())
    }
}

/// `bytes` with a custom section appended: the same component, other bytes —
/// another sha256, and nothing any process has compiled (and cached) before.
/// `padding` zero bytes in the section make it as large as a test needs.
pub fn with_custom_section(bytes: &[u8], tag: &str, padding: usize) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"ipvs-operator-test";
    let mut payload = Vec::new();
    leb128(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    payload.resize(payload.len() + padding, 0);
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    leb128(payload.len(), &mut out);
    out.extend(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_swaps_data_and_leaves_one_version() {
        let mut dir = ConfigMapDir::new(&[("a.wasm", b"one")]).expect("a directory");
        dir.update(&[("a.wasm", b"two"), ("b.wasm", b"three")])
            .expect("an update");
        assert_eq!(std::fs::read(dir.path().join("a.wasm")).expect("a"), b"two");
        assert_eq!(
            std::fs::read(dir.path().join("b.wasm")).expect("b"),
            b"three"
        );
        let versions = std::fs::read_dir(dir.path())
            .expect("listing")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir() && !t.is_symlink()))
            .count();
        assert_eq!(versions, 1, "the old version directory is removed");
    }

    #[test]
    fn a_custom_section_has_the_asked_size() {
        let base = b"\0asm\x0d\0\x01\0".to_vec();
        let out = with_custom_section(&base, "t", 1 << 20);
        assert!(
            out.len() > (1 << 20) && out.len() < (1 << 20) + 64,
            "{}",
            out.len()
        );
        assert_eq!(&out[..base.len()], &base[..]);
    }
}
