//! What `make image` produced: the image's entrypoint and user, its size, and
//! that it holds the static binary and nothing else (no shell, no libc).
//!
//! `make image` builds the image, exports it as an OCI layout directory and
//! runs this test (feature `image-tests`) with `IPVS_OPERATOR_IMAGE_OCI`
//! pointing at it. `make test` does not build the image (no podman or
//! buildah is needed there), but it runs the binary the image holds
//! (`make musl-binary`) in the VM: `make test-demo`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Largest acceptable image, uncompressed: the stripped static binary is about
/// 33 MB (wasmtime's compiler and the built-in policies are most of it).
const MAX_UNCOMPRESSED: u64 = 48 << 20;

/// The OCI layout directory to check.
fn layout() -> PathBuf {
    let dir = std::env::var_os("IPVS_OPERATOR_IMAGE_OCI")
        .map(PathBuf::from)
        .expect("IPVS_OPERATOR_IMAGE_OCI names the OCI layout directory `make image` exported (run `make image`)");
    assert!(dir.join("index.json").is_file(), "{} is not an OCI layout directory (no index.json)", dir.display());
    dir
}

/// A blob of the layout by digest (`sha256:…`).
fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest.split_once(':').unwrap_or_else(|| panic!("{digest:?} is not a digest"));
    layout.join("blobs").join(algorithm).join(hex)
}

fn json(path: &Path) -> Value {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The image's manifest and config.
fn manifest_and_config(layout: &Path) -> (Value, Value) {
    let index = json(&layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("index.json lists manifests");
    assert_eq!(manifests.len(), 1, "one image in the layout: {index}");
    let digest = manifests[0]["digest"].as_str().expect("a manifest digest");
    let manifest = json(&blob(layout, digest));
    let config_digest = manifest["config"]["digest"].as_str().expect("a config digest");
    (manifest.clone(), json(&blob(layout, config_digest)))
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP segment).
fn has_interpreter(elf: &[u8]) -> bool {
    assert!(elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP)
}

#[test]
fn the_image_is_the_static_binary_alone_run_unprivileged() {
    let layout = layout();
    let (manifest, config) = manifest_and_config(&layout);

    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/ipvs-operator"]), "{config}");
    assert!(config["config"]["Cmd"].is_null(), "no default command: the role is the first argument");
    assert_eq!(config["config"]["User"], "65532:65532", "not root by default");

    // One layer, holding /ipvs-operator and nothing else.
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "FROM scratch plus one COPY: {manifest}");
    let layer = blob(&layout, layers[0]["digest"].as_str().expect("a layer digest"));
    let unpacked = std::env::temp_dir().join(format!("ipvs-operator-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::create_dir_all(&unpacked).expect("a temporary directory");
    // GNU tar finds the compression (gzip, zstd or none) by itself.
    let listing = Command::new("tar").arg("-tvf").arg(&layer).output().expect("tar runs");
    assert!(listing.status.success(), "tar -t: {}", String::from_utf8_lossy(&listing.stderr));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let names: Vec<&str> = listing.lines().filter_map(|l| l.split_whitespace().last()).collect();
    let files: Vec<&str> = names.iter().map(|n| n.trim_start_matches("./")).filter(|n| !n.is_empty()).collect();
    assert_eq!(files, ["ipvs-operator"], "the layer holds only the binary (so no shell):\n{listing}");

    let extracted = Command::new("tar").arg("-xf").arg(&layer).arg("-C").arg(&unpacked).status().expect("tar runs");
    assert!(extracted.success());
    let binary = unpacked.join("ipvs-operator");
    let bytes = std::fs::read(&binary).expect("the binary");
    let size = bytes.len() as u64;
    assert!(size <= MAX_UNCOMPRESSED, "the binary is {size} bytes, over {MAX_UNCOMPRESSED}");
    assert!(!has_interpreter(&bytes), "the binary is dynamically linked: an image from scratch has no loader");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&binary).expect("metadata").permissions());
    assert!(mode & 0o005 == 0o005, "user 65532 can run it (mode {mode:o})");

    // It runs with nothing around it.
    let version = Command::new(&binary).arg("--version").env_clear().output().expect("the binary runs");
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("ipvs-operator "));

    let compressed: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    println!("image: {size} bytes uncompressed, {compressed} bytes compressed");
    let _ = std::fs::remove_dir_all(&unpacked);
}

#[test]
fn an_elf_interpreter_is_found() {
    // This test binary is dynamically linked (glibc): it has an interpreter.
    let me = std::fs::read(std::env::current_exe().expect("the test's path")).expect("reading the test binary");
    assert!(has_interpreter(&me));
}
