//! What `make image` produced: an OCI image index with one image per platform
//! (linux/amd64 and linux/arm64 by default), each the static binary of its
//! architecture alone (no shell, no libc), with its entrypoint and user; and
//! that each binary runs and evaluates a built-in policy correctly — the other
//! architecture's under qemu-user, so that Cranelift's backend for it compiles
//! and runs a real policy.
//!
//! `make image` builds the image, exports it as an OCI layout directory and
//! runs this test (feature `image-tests`) with `IPVS_OPERATOR_IMAGE_OCI`
//! pointing at it, `IPVS_OPERATOR_IMAGE_PLATFORMS` listing the platforms it
//! built and `IPVS_OPERATOR_IMAGE_BINARIES` the directory of the binaries it
//! put in (target/image/<arch>/ipvs-operator). `make test` does not build the
//! image (no podman or buildah is needed there), but it runs the amd64 binary
//! the image holds in the VM: `make test-demo`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Largest acceptable binary: it is about 42 MB (wasmtime's compiler, its
/// Cranelift backend for the architecture and the built-in policies are most
/// of it).
const MAX_UNCOMPRESSED: u64 = 48 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The OCI layout directory to check.
fn layout() -> PathBuf {
    let dir = std::env::var_os("IPVS_OPERATOR_IMAGE_OCI")
        .map(PathBuf::from)
        .expect("IPVS_OPERATOR_IMAGE_OCI names the OCI layout directory `make image` exported (run `make image`)");
    assert!(dir.join("index.json").is_file(), "{} is not an OCI layout directory (no index.json)", dir.display());
    dir
}

/// The architectures (OCI names: amd64, arm64) `make image` built, in order.
fn architectures() -> Vec<String> {
    let platforms = std::env::var("IPVS_OPERATOR_IMAGE_PLATFORMS").unwrap_or_else(|_| "linux/amd64 linux/arm64".into());
    platforms
        .split_whitespace()
        .map(|p| p.strip_prefix("linux/").unwrap_or_else(|| panic!("platform {p:?} is not linux/<arch>")).to_owned())
        .collect()
}

/// The architectures an image is built for: the OCI name, the machine's name
/// (Rust's `std::env::consts::ARCH`, qemu-user's), and ELF's e_machine.
const MACHINES: [(&str, &str, u16); 2] = [("amd64", "x86_64", 62), ("arm64", "aarch64", 183)];

/// An architecture's machine name and ELF e_machine, by its OCI name.
fn machine(architecture: &str) -> (&'static str, u16) {
    let &(_, name, elf) = MACHINES
        .iter()
        .find(|(oci, _, _)| *oci == architecture)
        .unwrap_or_else(|| panic!("no machine known for {architecture}"));
    (name, elf)
}

/// This machine's architecture, as OCI names it.
fn host_architecture() -> &'static str {
    let host = MACHINES.iter().find(|(_, name, _)| *name == std::env::consts::ARCH);
    host.map(|(oci, _, _)| *oci).unwrap_or(std::env::consts::ARCH)
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

/// The image index's manifests by architecture, checking the index on the way.
fn manifests_by_architecture(layout: &Path) -> BTreeMap<String, Value> {
    let top = json(&layout.join("index.json"));
    let entries = top["manifests"].as_array().expect("index.json lists manifests");
    assert_eq!(entries.len(), 1, "one image index in the layout: {top}");
    assert_eq!(entries[0]["mediaType"], OCI_INDEX, "the layout holds an OCI image index: {top}");
    let index = json(&blob(layout, entries[0]["digest"].as_str().expect("the index's digest")));
    assert_eq!(index["mediaType"], OCI_INDEX, "{index}");
    let mut by_architecture = BTreeMap::new();
    for entry in index["manifests"].as_array().expect("the index lists manifests") {
        assert_eq!(entry["mediaType"], OCI_MANIFEST, "{entry}");
        assert_eq!(entry["platform"]["os"], "linux", "{entry}");
        let architecture = entry["platform"]["architecture"].as_str().expect("a platform architecture").to_owned();
        let manifest = json(&blob(layout, entry["digest"].as_str().expect("a manifest digest")));
        assert!(by_architecture.insert(architecture.clone(), manifest).is_none(), "{architecture} twice: {index}");
    }
    let mut expected = architectures();
    expected.sort();
    assert_eq!(by_architecture.keys().cloned().collect::<Vec<_>>(), expected, "one image per platform: {index}");
    by_architecture
}

/// Whether an ELF file asks for a dynamic loader (has a PT_INTERP segment),
/// and its machine (e_machine).
fn elf_interpreter_and_machine(elf: &[u8]) -> (bool, u16) {
    assert!(elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes")) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36) as usize, u16_at(0x38) as usize);
    const PT_INTERP: u32 = 3;
    ((0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP), u16_at(0x12))
}

/// A command running `binary`: directly when it is this machine's
/// architecture, else under qemu-user (`qemu-<arch>` or `qemu-<arch>-static`,
/// Debian's qemu-user and qemu-user-static). Not through binfmt_misc, which a
/// test cannot count on, so the binary cannot start a child process of its
/// own: policies are compiled in process.
fn command(architecture: &str, binary: &Path) -> Command {
    if architecture == host_architecture() {
        return Command::new(binary);
    }
    let (qemu_machine, _) = machine(architecture);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let qemu = [format!("qemu-{qemu_machine}"), format!("qemu-{qemu_machine}-static")]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("no qemu-{qemu_machine} in PATH to run the {architecture} binary (Debian: qemu-user)"));
    let mut command = Command::new(qemu);
    command.arg(binary);
    command
}

fn succeeded(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("{what}: output is not UTF-8: {e}"))
}

/// The examples evaluated on every architecture: the default policy and one
/// whose arithmetic depends on time.
const EVALUATIONS: [(&str, &str, Option<&str>); 2] = [
    ("label-selector-share.yaml", "label-selector-share-pods.yaml", None),
    ("gradual-rollout.yaml", "gradual-rollout-pods.yaml", Some("2026-11-26T10:15:00Z")),
];

/// `eval -o json` of one of EVALUATIONS by the binary, compiling in process.
fn evaluate(architecture: &str, binary: &Path, (service, pods, now): (&str, &str, Option<&str>)) -> Value {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut eval = command(architecture, binary);
    eval.args(["eval", "--policy-compiler", "in-process", "-o", "json"])
        .arg("--weighted-service")
        .arg(examples.join(service))
        .arg("--pods")
        .arg(examples.join(pods))
        // Emulation is slower than the node it stands for: the limit is not what
        // this checks.
        .args(["--policy-timeout", "5s"])
        .env_clear();
    if let Some(now) = now {
        eval.args(["--now", now]);
    }
    let output = succeeded(&format!("{architecture}: eval {service}"), eval.output().expect("eval runs"));
    serde_json::from_str(&output).unwrap_or_else(|e| panic!("{architecture}: eval {service}: not JSON ({e}):\n{output}"))
}

/// Each pod's weight in an `eval -o json` output.
fn weights(evaluation: &Value) -> BTreeMap<String, u64> {
    let rows = evaluation["weights"].as_array().unwrap_or_else(|| panic!("no weights in {evaluation}"));
    rows.iter()
        .map(|row| (row["pod"].as_str().expect("a pod").to_owned(), row["weight"].as_u64().expect("a weight")))
        .collect()
}

#[test]
fn the_image_index_holds_each_architectures_static_binary_alone_and_each_evaluates_policies() {
    let layout = layout();
    let unpacked = std::env::temp_dir().join(format!("ipvs-operator-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&unpacked);
    let mut evaluations: Vec<(String, Vec<Value>)> = Vec::new();

    for (architecture, manifest) in manifests_by_architecture(&layout) {
        let config = json(&blob(&layout, manifest["config"]["digest"].as_str().expect("a config digest")));
        assert_eq!(config["os"], "linux", "{architecture}: {config}");
        assert_eq!(config["architecture"], architecture.as_str(), "{config}");
        assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/ipvs-operator"]), "{config}");
        assert!(config["config"]["Cmd"].is_null(), "no default command: the role is the first argument");
        assert_eq!(config["config"]["User"], "65532:65532", "not root by default");

        // One layer, holding /ipvs-operator and nothing else.
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "{architecture}: FROM scratch plus one COPY: {manifest}");
        let layer = blob(&layout, layers[0]["digest"].as_str().expect("a layer digest"));
        // GNU tar finds the compression (gzip, zstd or none) by itself.
        let listing = succeeded("tar -t", Command::new("tar").arg("-tvf").arg(&layer).output().expect("tar runs"));
        let names: Vec<&str> = listing.lines().filter_map(|l| l.split_whitespace().last()).collect();
        let files: Vec<&str> = names.iter().map(|n| n.trim_start_matches("./")).filter(|n| !n.is_empty()).collect();
        assert_eq!(files, ["ipvs-operator"], "{architecture}: the layer holds only the binary (so no shell):\n{listing}");

        let directory = unpacked.join(&architecture);
        std::fs::create_dir_all(&directory).expect("a temporary directory");
        let extracted = Command::new("tar").arg("-xf").arg(&layer).arg("-C").arg(&directory).status().expect("tar runs");
        assert!(extracted.success());
        let binary = directory.join("ipvs-operator");
        let bytes = std::fs::read(&binary).expect("the binary");
        let size = bytes.len() as u64;
        assert!(size <= MAX_UNCOMPRESSED, "{architecture}: the binary is {size} bytes, over {MAX_UNCOMPRESSED}");
        let (interpreter, e_machine) = elf_interpreter_and_machine(&bytes);
        assert!(!interpreter, "{architecture}: the binary is dynamically linked: an image from scratch has no loader");
        assert_eq!(e_machine, machine(&architecture).1, "{architecture}: the binary is for another machine");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&binary).expect("metadata").permissions());
        assert!(mode & 0o005 == 0o005, "{architecture}: user 65532 can run it (mode {mode:o})");
        if let Some(shipped) = std::env::var_os("IPVS_OPERATOR_IMAGE_BINARIES") {
            let shipped = PathBuf::from(shipped).join(&architecture).join("ipvs-operator");
            let same = std::fs::read(&shipped).unwrap_or_else(|e| panic!("reading {}: {e}", shipped.display())) == bytes;
            assert!(same, "{architecture}: the image's binary is not {}", shipped.display());
        }

        // It runs with nothing around it.
        let version = command(&architecture, &binary).arg("--version").env_clear().output().expect("it runs");
        let version = succeeded(&format!("{architecture}: --version"), version);
        assert!(version.starts_with("ipvs-operator "), "{architecture}: --version printed {version:?}");

        evaluations.push((architecture.clone(), EVALUATIONS.iter().map(|&e| evaluate(&architecture, &binary, e)).collect()));
        let compressed: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
        println!("linux/{architecture}: {size} bytes uncompressed, {compressed} bytes compressed, {}", version.trim());
    }

    // The weights are right: the original's arithmetic in share mode (prod 90 %
    // over 4 pods, canary 10 % over 1, in lowest terms), and the rollout's
    // second step (canary 25 %) at the time given.
    for (architecture, results) in &evaluations {
        let share = weights(&results[0]);
        assert_eq!(share.get("shop-canary-1"), Some(&4), "{architecture}: {share:?}");
        assert!(share.iter().filter(|(pod, _)| pod.starts_with("shop-prod-")).all(|(_, &w)| w == 9), "{architecture}: {share:?}");
        let rollout = weights(&results[1]);
        let canary: u64 = rollout.iter().filter(|(pod, _)| pod.contains("canary")).map(|(_, w)| w).sum();
        let total: u64 = rollout.values().sum();
        assert_eq!((canary * 100) / total, 25, "{architecture}: {rollout:?}");
    }
    // And every architecture's output is the same, to the byte of its JSON
    // (the policy's digest included: the same built-in module).
    for pair in evaluations.windows(2) {
        assert_eq!(pair[0].1, pair[1].1, "{} and {} evaluate differently", pair[0].0, pair[1].0);
    }
    let _ = std::fs::remove_dir_all(&unpacked);
}

#[test]
fn an_elf_interpreter_is_found() {
    // This test binary is dynamically linked (glibc) for this machine.
    let me = std::fs::read(std::env::current_exe().expect("the test's path")).expect("reading the test binary");
    let (interpreter, e_machine) = elf_interpreter_and_machine(&me);
    assert!(interpreter);
    assert_eq!(e_machine, machine(host_architecture()).1);
}
