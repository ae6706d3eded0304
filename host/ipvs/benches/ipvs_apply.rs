//! Benchmark: new weights on 10,000 destinations (100 services × 100
//! destinations), our pipelined `apply` against `ipvsadm -R` fed the same
//! edits, in the same kernel; and the time of our full dump of that table.
//!
//! `make bench-ipvs` runs it in the test VM. It works in a network namespace
//! of its own, so on a host with ip_vs (as root) it leaves the host's table
//! alone. Writes target/bench/ipvs-apply.json:
//! `{"name", "ours", "baseline", "unit", "ratio" (ours / baseline), "n", …}`.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipvs::{DesiredService, Destination, ForwardMethod, IpvsClient, Service, ServiceKey, Write, plan};

const SERVICES: u16 = 100;
const DESTINATIONS: u16 = 100;
/// Rounds of each measurement; the median is reported.
const ROUNDS: usize = 3;

fn vip(s: u16) -> ServiceKey {
    ServiceKey::tcp(format!("10.99.{}.{}:80", s / 256, s % 256 + 1).parse().expect("a VIP"))
}

fn backend(s: u16, d: u16) -> std::net::SocketAddr {
    format!("10.{}.{}.{}:8080", 100 + s / 100, s % 100, d + 1).parse().expect("a backend")
}

/// The weight every destination gets in round `round` (never the same twice in a row).
fn weight(round: usize, s: u16, d: u16) -> u16 {
    ((usize::from(s) * 7 + usize::from(d) * 3 + round * 13) % 200 + 2) as u16
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ipvsadm(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("ipvsadm")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .spawn()
        .expect("running ipvsadm");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("feeding ipvsadm");
    }
    let output = child.wait_with_output().expect("ipvsadm's output");
    assert!(output.status.success(), "ipvsadm {args:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ipvsadm -Sn`, sorted: the table's configuration as text.
fn rules() -> Vec<String> {
    let mut lines: Vec<String> = ipvsadm(&["-Sn"], None).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let _ = Command::new("modprobe").arg("ip_vs").status();
    // A network namespace of our own (single-threaded here, so the whole
    // process moves, and ipvsadm with it).
    // SAFETY: plain syscall; fails cleanly without CAP_SYS_ADMIN.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {} (run as root)", std::io::Error::last_os_error());
    // Without an address the namespace has no local routing table, and the
    // kernel refuses IPv4 destinations (EINVAL): bring loopback up.
    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("running ip");
    assert!(up.success(), "ip link set lo up");

    let mut client = IpvsClient::new().expect("an IPVS client (is ip_vs available?)");
    let mut setup = Vec::new();
    for s in 0..SERVICES {
        setup.push(Write::AddService(Service::new(vip(s), "wrr")));
        for d in 0..DESTINATIONS {
            setup.push(Write::AddDestination {
                service: vip(s),
                destination: Destination::new(backend(s, d), ForwardMethod::Masquerade, 1),
            });
        }
    }
    let failed: Vec<_> = client.apply(&setup).into_iter().filter_map(Result::err).collect();
    assert!(failed.is_empty(), "setting up the table: {} writes failed, first: {}", failed.len(), failed[0]);
    let n = usize::from(SERVICES) * usize::from(DESTINATIONS);

    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    let mut dumps = Vec::new();
    for round in 0..ROUNDS {
        // ipvsadm -R: one edit line per destination.
        let mut script = String::with_capacity(n * 48);
        for s in 0..SERVICES {
            let ServiceKey::Address { address, port, .. } = vip(s) else { unreachable!() };
            for d in 0..DESTINATIONS {
                script.push_str(&format!(
                    "-e -t {address}:{port} -r {} -m -w {}\n",
                    backend(s, d),
                    weight(2 * round, s, d)
                ));
            }
        }
        let started = Instant::now();
        ipvsadm(&["-R"], Some(&script));
        baseline.push(started.elapsed());
        let after_ipvsadm = rules();

        // Ours: the same kind of edits, to the next round's weights, from a
        // dump as the agent does; the writes are timed.
        let started = Instant::now();
        let table = client.dump().expect("dumping");
        dumps.push(started.elapsed());
        assert_eq!(table.iter().map(|e| e.destinations.len()).sum::<usize>(), n);
        let desired: Vec<DesiredService> = (0..SERVICES)
            .map(|s| {
                (0..DESTINATIONS)
                    .fold(DesiredService::new(vip(s)), |want, d| want.with_weight(backend(s, d), weight(2 * round + 1, s, d)))
            })
            .collect();
        let writes = plan(&desired, &table).writes;
        assert_eq!(writes.len(), n, "every weight changes");
        let started = Instant::now();
        let results = client.apply(&writes);
        ours.push(started.elapsed());
        assert!(results.iter().all(Result::is_ok), "our writes failed");

        // Both set what they were asked: check through ipvsadm.
        let after_ours = rules();
        let changed = after_ours.iter().zip(&after_ipvsadm).filter(|(a, b)| a != b).count();
        assert_eq!(changed, n, "ours changed every destination line and nothing else");
        let sample = format!("-r {} -m -w {}", backend(0, 0), weight(2 * round + 1, 0, 0));
        assert!(after_ours.iter().any(|l| l.ends_with(&sample)), "ipvsadm sees our weights");
    }

    let (ours, baseline, dump) = (median(ours), median(baseline), median(dumps));
    let ratio = ours.as_secs_f64() / baseline.as_secs_f64();
    eprintln!(
        "ipvs-apply: {n} weight changes: ours {:.1} ms ({:.0}/s), ipvsadm -R {:.1} ms ({:.0}/s), ratio {ratio:.3}; \
         our dump of {n} destinations {:.1} ms (median of {ROUNDS})",
        ms(ours),
        n as f64 / ours.as_secs_f64(),
        ms(baseline),
        n as f64 / baseline.as_secs_f64(),
        ms(dump)
    );
    let report = serde_json::json!({
        "name": "ipvs-apply",
        "ours": ms(ours),
        "baseline": ms(baseline),
        "unit": "ms",
        "ratio": ratio,
        "n": n,
        "dump_ms": ms(dump),
        "rounds": ROUNDS,
        "what": "weights of 100 services x 100 destinations: ipvs::IpvsClient::apply vs ipvsadm -R with -e lines; \
                 dump_ms: ipvs::IpvsClient::dump of the same table",
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&dir).expect("creating target/bench");
    let path = dir.join("ipvs-apply.json");
    std::fs::write(&path, format!("{report:#}\n")).expect("writing the report");
    println!("{report}");
}
