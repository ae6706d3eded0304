//! The README is the user guide: what it shows must be what the code does.
//! Its example WeightedService, the commands it tells users to run, the flags
//! and make targets it names, and the condition and Event reasons it explains
//! are checked here against the real binary and sources. (Its metrics table is
//! checked in host/src/metrics.rs; `deploy/` in tests/deploy.rs; the demo's
//! output by `make test-demo`.)

use std::path::{Path, PathBuf};
use std::process::Command;

const README: &str = include_str!("../../README.md");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository").to_path_buf()
}

fn ipvs_operator() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/release/deps");
    let binary = dir.join("ipvs-operator");
    assert!(binary.exists(), "{} is missing: cargo build --release -p ipvs-operator", binary.display());
    binary
}

/// The fenced code blocks of the README with their language.
fn code_blocks() -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in README.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(lang)) => current = Some((lang.trim().to_string(), String::new())),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// Shell commands from `sh` blocks, continuation lines joined, comments dropped.
fn shell_commands() -> Vec<String> {
    let mut commands = Vec::new();
    for (_, body) in code_blocks().into_iter().filter(|(lang, _)| lang == "sh") {
        let joined = body.replace("\\\n", " ");
        for line in joined.lines() {
            let command = line.split(" #").next().unwrap_or_default().trim();
            if !command.is_empty() && !command.starts_with('#') {
                commands.push(command.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
    }
    commands
}

#[test]
fn the_readme_weighted_service_is_the_example_file() {
    let yaml = code_blocks()
        .into_iter()
        .find(|(lang, body)| lang == "yaml" && body.contains("kind: WeightedService"))
        .map(|(_, body)| body)
        .expect("the README shows a WeightedService");
    let in_readme: serde_json::Value = serde_saphyr::from_str(&yaml).expect("the README's WeightedService is YAML");
    let file = std::fs::read_to_string(repo().join("examples/seed-canary.yaml")).expect("examples/seed-canary.yaml");
    let in_file: serde_json::Value = serde_saphyr::from_str(&file).expect("examples/seed-canary.yaml is YAML");
    assert_eq!(in_readme, in_file, "the README's WeightedService differs from examples/seed-canary.yaml");
    let typed: ipvs_operator::crd::WeightedService = serde_saphyr::from_str(&yaml).expect("it decodes as a WeightedService");
    assert_eq!(typed.spec.weights.len(), 2);
}

#[test]
fn the_eval_commands_in_the_readme_run() {
    let evals: Vec<String> = shell_commands().into_iter().filter(|c| c.starts_with("ipvs-operator eval")).collect();
    assert!(!evals.is_empty(), "the README shows ipvs-operator eval");
    for command in evals {
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(ipvs_operator()).args(&args).current_dir(repo()).output().expect("ipvs-operator runs");
        assert!(out.status.success(), "`{command}` failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("WEIGHT") && stdout.contains("SHARE"), "`{command}` printed:\n{stdout}");
    }
}

#[test]
fn every_flag_the_readme_names_exists() {
    let mut help = String::new();
    for sub in ["eval", "controller", "agent", "ipvs", "crd", "node-setup"] {
        let out = Command::new(ipvs_operator()).args([sub, "--help"]).output().expect("ipvs-operator runs");
        help += &String::from_utf8_lossy(&out.stdout);
    }
    // The README also shows the test API server (Development).
    let test_apiserver = ipvs_operator().with_file_name("test-apiserver");
    let out = Command::new(&test_apiserver).arg("--help").output().expect("test-apiserver runs");
    help += &String::from_utf8_lossy(&out.stdout);
    let flags: std::collections::BTreeSet<String> = README
        .split(|c: char| c.is_whitespace() || "`(),".contains(c))
        .filter(|w| w.starts_with("--") && w.len() > 2 && w[2..].chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .map(String::from)
        .collect();
    // Flags of other programs the README quotes.
    let foreign = ["--field-selector", "--cascade", "--prefix", "--for", "--list", "--as", "--target", "--release", "--workspace", "--ipvs-exclude-cidrs"];
    let missing: Vec<&String> =
        flags.iter().filter(|f| !foreign.contains(&f.as_str()) && !help.contains(f.as_str())).collect();
    assert!(missing.is_empty(), "the README names flags ipvs-operator does not have: {missing:?}");
}

#[test]
fn every_make_target_the_readme_names_exists() {
    let makefiles = [
        std::fs::read_to_string(repo().join("Makefile")).expect("Makefile"),
        std::fs::read_to_string(repo().join("tests/vm/vm.mk")).expect("tests/vm/vm.mk"),
    ]
    .join("\n");
    let targets: Vec<&str> = README
        .split('`')
        .filter_map(|span| span.strip_prefix("make "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|t| !t.contains('='))
        .collect();
    assert!(targets.contains(&"demo") && targets.contains(&"test"), "{targets:?}");
    for target in targets {
        assert!(makefiles.lines().any(|l| l.starts_with(&format!("{target}:"))), "the README names make {target}, which the Makefiles lack");
    }
}

#[test]
fn every_reason_the_troubleshooting_tables_explain_is_one_the_code_uses() {
    let sources = [
        include_str!("../../host/src/controller.rs"),
        include_str!("../../host/src/status.rs"),
        include_str!("../../host/src/agent/mod.rs"),
        include_str!("../../host/src/agent/evaluate.rs"),
        include_str!("../../host/src/events.rs"),
    ]
    .join("\n");
    let section = README.split("## Troubleshooting").nth(1).expect("a Troubleshooting section");
    let section = section.split("### The kernel's view").next().unwrap_or(section);
    let reasons: std::collections::BTreeSet<&str> = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .flat_map(|l| l.split('`').skip(1).step_by(2))
        .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .filter(|w| !["True", "False"].contains(w))
        .collect();
    assert!(reasons.len() >= 15, "{reasons:?}");
    let unknown: Vec<&&str> = reasons.iter().filter(|r| !sources.contains(&format!("\"{r}\""))).collect();
    assert!(unknown.is_empty(), "the README explains reasons the code never uses: {unknown:?}");
}
