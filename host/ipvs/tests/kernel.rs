//! The netlink layer against a real kernel's IPVS: what ipvsadm (a tool
//! nobody here wrote) sees, real connections through virtual services,
//! idempotence and errors.
//!
//! Needs ip_vs and root: `make test-kernel` runs this in the test VM
//! (tests/vm); on a Linux host with ip_vs, `cargo test --release -p ipvs
//! --features kernel-tests` as root runs it directly. Each test works in
//! network namespaces of its own.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use ipvs::{
    AddressFamily, DesiredService, Destination, ForwardMethod, IpvsClient, IpvsError, Protocol, Service,
    ServiceEntry, ServiceKey, SockoptTable, TunnelType, Write, plan, render_ipvsadm, OwnedPlan, OwnedService, plan_owned,
};
use support::{NetNs, link, load_ip_vs, project_binary};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn client_in(ns: &NetNs) -> IpvsClient {
    ns.enter(|| IpvsClient::new().expect("opening an IPVS client"))
}

/// `ipvsadm -Sn` (the rules, one per line), sorted.
fn saved_rules(ns: &NetNs) -> Vec<String> {
    let mut lines: Vec<String> = ns.ipvsadm(&["-Sn"]).lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// Zeroes what changes by itself (counters), so two dumps compare on configuration.
fn configuration(mut entries: Vec<ServiceEntry>) -> Vec<ServiceEntry> {
    for entry in &mut entries {
        entry.service.stats = Default::default();
        for d in &mut entry.destinations {
            d.stats = Default::default();
            d.active_connections = 0;
            d.inactive_connections = 0;
            d.persistent_connections = 0;
        }
        entry.destinations.sort_by_key(|d| d.socket_addr());
    }
    entries.sort_by_key(|e| e.service.key);
    entries
}

#[test]
fn our_dump_equals_ipvsadm_and_ipvsadm_sees_exactly_our_writes() {
    load_ip_vs();
    let ns = NetNs::new("k-ipvsadm");
    // ipvsadm builds a mix: IPv4 TCP, IPv6 UDP, SCTP, a fwmark service;
    // rr, wrr, wlc; masquerade, direct routing, tunnel; thresholds;
    // persistence; assorted weights. Ports 8080 and 8443 are not
    // byte-symmetric, so a byte-order bug shows.
    for rule in [
        "-A -t 10.10.0.1:80 -s rr",
        "-a -t 10.10.0.1:80 -r 10.10.1.1:8080 -m -w 1",
        "-a -t 10.10.0.1:80 -r 10.10.1.2:8080 -m -w 5",
        "-A -t 10.10.0.2:8443 -s wrr -p 300 -M 255.255.255.0",
        "-a -t 10.10.0.2:8443 -r 10.10.2.1:8443 -g -w 3 -x 100 -y 10",
        "-a -t 10.10.0.2:8443 -r 10.10.2.2:8443 -i -w 2",
        "-A -u [fd00::10]:53 -s wlc",
        "-a -u [fd00::10]:53 -r [fd00::1:1]:5353 -m -w 7",
        // Direct routing and tunnels keep the service's port: the kernel
        // forces it, so the destination is given that port.
        "-a -u [fd00::10]:53 -r [fd00::1:2]:53 -g -w 65535",
        "--add-service --sctp-service 10.10.0.3:3868 -s wrr",
        "-a --sctp-service 10.10.0.3:3868 -r 10.10.3.1:3868 -m -w 4",
        "-A -f 42 -s rr",
        "-a -f 42 -r 10.10.4.1:0 -g -w 1",
    ] {
        ns.ipvsadm(&rule.split(' ').collect::<Vec<_>>());
    }

    let mut client = client_in(&ns);
    let info = client.info().unwrap();
    let before = client.dump().unwrap();
    assert_eq!(render_ipvsadm(Some(&info), &before), ns.ipvsadm(&["-Ln"]), "our dump, printed as ipvsadm prints it");

    // What ipvsadm -Ln does not print, checked field by field.
    let find = |entries: &[ServiceEntry], key: ServiceKey| -> ServiceEntry {
        entries.iter().find(|e| e.service.key == key).cloned().unwrap_or_else(|| panic!("{key} not dumped"))
    };
    let persistent = find(&before, ServiceKey::tcp(addr("10.10.0.2:8443")));
    assert_eq!(persistent.service.timeout, 300);
    assert_eq!(persistent.service.netmask, 0xffff_ff00);
    let routed = persistent.destinations.iter().find(|d| d.port == 8443 && d.forward == ForwardMethod::DirectRoute);
    let routed = routed.expect("the direct-routing destination");
    assert_eq!((routed.upper_threshold, routed.lower_threshold, routed.weight), (100, 10, 3));
    let tunnel = persistent.destinations.iter().find(|d| d.forward == ForwardMethod::Tunnel).expect("tunnel");
    assert_eq!(tunnel.tunnel.map(|t| t.kind), Some(TunnelType::Ipip));
    let udp6 = find(&before, ServiceKey::udp(addr("[fd00::10]:53")));
    assert_eq!(udp6.service.family(), AddressFamily::Inet6);
    assert_eq!(udp6.service.netmask, 128);
    let fwmark = find(&before, ServiceKey::fwmark(AddressFamily::Inet, 42));
    assert_eq!(fwmark.destinations.len(), 1);
    let sctp = find(&before, ServiceKey::sctp(addr("10.10.0.3:3868")));
    assert_eq!(sctp.service.protocol(), Some(Protocol::Sctp));

    // Our writes: weights (one at 65535 goes to 0) and schedulers.
    let rules_before = saved_rules(&ns);
    let thresholds_before = ns.ipvsadm(&["-Ln", "--thresholds"]);
    let tcp80 = find(&before, ServiceKey::tcp(addr("10.10.0.1:80")));
    let dest = |entry: &ServiceEntry, a: &str| -> Destination {
        entry.destinations.iter().find(|d| d.socket_addr() == addr(a)).cloned().expect(a)
    };
    let writes = vec![
        Write::set_weight(tcp80.service.key, &dest(&tcp80, "10.10.1.2:8080"), 9),
        Write::set_weight(persistent.service.key, routed, 30),
        Write::set_weight(persistent.service.key, tunnel, 6),
        Write::set_weight(udp6.service.key, &dest(&udp6, "[fd00::1:2]:53"), 0),
        Write::set_scheduler(&persistent.service, "wlc"),
        Write::set_scheduler(&sctp.service, "rr"),
    ];
    let results = client.apply(&writes);
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let mut expected: Vec<String> = rules_before
        .iter()
        .map(|line| {
            line.replace("-r 10.10.1.2:8080 -m -w 5", "-r 10.10.1.2:8080 -m -w 9")
                .replace("-r 10.10.2.1:8443 -g -w 3", "-r 10.10.2.1:8443 -g -w 30")
                .replace("-r 10.10.2.2:8443 -i -w 2", "-r 10.10.2.2:8443 -i -w 6")
                .replace("-r [fd00::1:2]:53 -g -w 65535", "-r [fd00::1:2]:53 -g -w 0")
                .replace("-A -t 10.10.0.2:8443 -s wrr", "-A -t 10.10.0.2:8443 -s wlc")
                .replace("--sctp-service 10.10.0.3:3868 -s wrr", "--sctp-service 10.10.0.3:3868 -s rr")
        })
        .collect();
    expected.sort();
    assert_ne!(expected, rules_before, "the expected rules differ from the old ones");
    assert_eq!(saved_rules(&ns), expected, "ipvsadm sees exactly our writes, nothing else changed");
    let thresholds_expected = thresholds_before
        .replace("TCP  10.10.0.2:8443 wrr", "TCP  10.10.0.2:8443 wlc")
        .replace("SCTP 10.10.0.3:3868 wrr", "SCTP 10.10.0.3:3868 rr");
    assert_eq!(ns.ipvsadm(&["-Ln", "--thresholds"]), thresholds_expected, "thresholds kept");

    // And our own dump agrees: only the written fields changed.
    let mut want = configuration(before);
    for entry in &mut want {
        let key = entry.service.key;
        if key == persistent.service.key {
            entry.service.scheduler = "wlc".into();
        }
        if key == sctp.service.key {
            entry.service.scheduler = "rr".into();
        }
        for d in &mut entry.destinations {
            match (key, d.socket_addr()) {
                (k, a) if k == tcp80.service.key && a == addr("10.10.1.2:8080") => d.weight = 9,
                (k, a) if k == persistent.service.key && a == addr("10.10.2.1:8443") => d.weight = 30,
                (k, a) if k == persistent.service.key && a == addr("10.10.2.2:8443") => d.weight = 6,
                (k, a) if k == udp6.service.key && a == addr("[fd00::1:2]:53") => d.weight = 0,
                _ => {}
            }
        }
    }
    assert_eq!(configuration(client.dump().unwrap()), want);
}

/// Each IPv4 service of `entries` with its scheduler and destination weights,
/// and each of `table`'s, both sorted: what the sweep compares.
type Weights = Vec<(ServiceKey, String, Vec<(SocketAddr, u32)>)>;

fn ipv4_weights(entries: &[ServiceEntry]) -> Weights {
    let mut out: Weights = entries
        .iter()
        .filter(|e| e.service.family() == AddressFamily::Inet)
        .map(|e| {
            let mut d: Vec<_> = e.destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
            d.sort();
            (e.service.key, e.service.scheduler.clone(), d)
        })
        .collect();
    out.sort();
    out
}

fn sockopt_weights(table: &SockoptTable) -> Weights {
    let mut out: Weights = table
        .services()
        .map(|(s, d)| {
            let mut d = d.to_vec();
            d.sort();
            (s.key, s.scheduler().to_string(), d)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_sockopt_table_reads_what_netlink_dumps_for_ipv4() {
    load_ip_vs();
    let ns = NetNs::new("k-sockopt");
    for rule in [
        "-A -t 10.20.0.1:80 -s wrr",
        "-a -t 10.20.0.1:80 -r 10.20.1.1:8080 -m -w 1",
        "-a -t 10.20.0.1:80 -r 10.20.1.2:8080 -m -w 65535",
        "-a -t 10.20.0.1:80 -r 10.20.1.3:8080 -m -w 0",
        "-A -u 10.20.0.2:53 -s sh",
        "--add-service --sctp-service 10.20.0.3:3868 -s rr",
        "-a --sctp-service 10.20.0.3:3868 -r 10.20.3.1:3868 -g -w 4",
        "-A -f 7 -s lc",
        "-a -f 7 -r 10.20.4.1:0 -g -w 2",
    ] {
        ns.ipvsadm(&rule.split(' ').collect::<Vec<_>>());
    }
    let mut client = client_in(&ns);
    let mut table = ns.enter(|| SockoptTable::new().expect("a UDP socket"));
    let read_all = |table: &mut SockoptTable| {
        table.list_services().expect("listing");
        // In pieces of one service, as the agent reads between changes.
        while !table.read_destinations(1).expect("reading destinations") {}
    };
    read_all(&mut table);
    let want = ipv4_weights(&client.dump().unwrap());
    assert_eq!(want.len(), 4);
    assert_eq!(sockopt_weights(&table), want);

    // Our writes show in the next read.
    let entries = client.dump().unwrap();
    let tcp = entries.iter().find(|e| e.service.key == ServiceKey::tcp(addr("10.20.0.1:80"))).unwrap();
    let results = client.apply(&[
        Write::set_weight(tcp.service.key, &tcp.destinations[0], 9),
        Write::set_scheduler(&tcp.service, "wlc"),
    ]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    read_all(&mut table);
    let changed = sockopt_weights(&table);
    assert_ne!(changed, want);
    assert_eq!(changed, ipv4_weights(&client.dump().unwrap()));

    // IPv6 services are not shown here, and do not disturb the IPv4 ones.
    ns.ipvsadm(&["-A", "-t", "[fd00::20]:80", "-s", "rr"]);
    ns.ipvsadm(&["-a", "-t", "[fd00::20]:80", "-r", "[fd00::2:1]:80", "-m", "-w", "3"]);
    read_all(&mut table);
    assert_eq!(sockopt_weights(&table), ipv4_weights(&client.dump().unwrap()));

    // A service deleted between the listing and its destinations is dropped;
    // a destination deleted meanwhile is not read as a zeroed one.
    ns.ipvsadm(&["-D", "-t", "[fd00::20]:80"]);
    table.list_services().expect("listing");
    ns.ipvsadm(&["-D", "-u", "10.20.0.2:53"]);
    ns.ipvsadm(&["-d", "-t", "10.20.0.1:80", "-r", "10.20.1.3:8080"]);
    while !table.read_destinations(100).expect("reading destinations") {}
    assert_eq!(sockopt_weights(&table), ipv4_weights(&client.dump().unwrap()));
}

#[test]
fn ipvsadm_sees_what_we_add_in_every_family_and_protocol() {
    load_ip_vs();
    let ns = NetNs::new("k-add");
    let mut client = client_in(&ns);
    let tcp = ServiceKey::tcp(addr("10.11.0.1:8080"));
    let udp6 = ServiceKey::udp(addr("[fd00::11]:5353"));
    let sctp = ServiceKey::sctp(addr("10.11.0.2:3868"));
    let mut persistent = Service::new(ServiceKey::tcp(addr("10.11.0.3:443")), "sh");
    persistent.flags = ipvs::constants::IP_VS_SVC_F_PERSISTENT;
    persistent.timeout = 60;
    persistent.netmask = 0xffff_0000;
    let mut thresholds = Destination::new(addr("10.11.1.3:443"), ForwardMethod::DirectRoute, 2);
    thresholds.upper_threshold = 50;
    thresholds.lower_threshold = 5;
    let writes = vec![
        Write::AddService(Service::new(tcp, "wrr")),
        Write::AddService(Service::new(udp6, "wlc")),
        Write::AddService(Service::new(sctp, "rr")),
        Write::AddService(persistent.clone()),
        Write::AddDestination {
            service: tcp,
            destination: Destination::new(addr("10.11.1.1:8081"), ForwardMethod::Masquerade, 300),
        },
        Write::AddDestination {
            service: udp6,
            destination: Destination::new(addr("[fd00::1:11]:5353"), ForwardMethod::Tunnel, 65535),
        },
        Write::AddDestination {
            service: sctp,
            destination: Destination::new(addr("10.11.1.2:3869"), ForwardMethod::Masquerade, 0),
        },
        Write::AddDestination { service: persistent.key, destination: thresholds },
    ];
    let results = client.apply(&writes);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut expected = [
        "-A -t 10.11.0.1:8080 -s wrr",
        "-a -t 10.11.0.1:8080 -r 10.11.1.1:8081 -m -w 300",
        "-A -u [fd00::11]:5353 -s wlc",
        "-a -u [fd00::11]:5353 -r [fd00::1:11]:5353 -i -w 65535 --tun-type ipip",
        "-A --sctp-service 10.11.0.2:3868 -s rr",
        "-a --sctp-service 10.11.0.2:3868 -r 10.11.1.2:3869 -m -w 0",
        "-A -t 10.11.0.3:443 -s sh -p 60 -M 255.255.0.0",
        "-a -t 10.11.0.3:443 -r 10.11.1.3:443 -g -w 2",
    ];
    expected.sort();
    assert_eq!(saved_rules(&ns), expected);
    assert!(ns.ipvsadm(&["-Ln", "--thresholds"]).contains("-> 10.11.1.3:443                50         5"));

    // Deleting: a destination, then a service with its destinations.
    let results = client.apply(&[
        Write::DeleteDestination { service: tcp, destination: addr("10.11.1.1:8081") },
        Write::DeleteService(udp6),
    ]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let rules = saved_rules(&ns);
    assert!(!rules.iter().any(|l| l.contains("10.11.1.1:8081") || l.contains("fd00::11")), "{rules:?}");
    assert!(rules.iter().any(|l| l == "-A -t 10.11.0.1:8080 -s wrr"), "{rules:?}");
    client.flush().unwrap();
    assert_eq!(saved_rules(&ns), Vec::<String>::new());
}

#[test]
fn connections_follow_the_weights_and_their_changes() {
    load_ip_vs();
    // client ns --veth-- load balancer ns (IPVS, VIP on a dummy) --veth-- 3 backend ns
    let lb = NetNs::new("k-tr-lb");
    let cl = NetNs::new("k-tr-cl");
    link(&cl, "eth0", "10.20.0.2/24", &lb, "to-cl", "10.20.0.1/24");
    cl.exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);
    lb.exec(&["ip", "link", "add", "ipvs0", "type", "dummy"]);
    lb.exec(&["ip", "addr", "add", "10.20.0.100/32", "dev", "ipvs0"]);
    lb.exec(&["ip", "link", "set", "ipvs0", "up"]);
    lb.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
    let server = project_binary("traffic-server");
    let server = server.to_str().expect("a UTF-8 path");
    let mut backends = Vec::new();
    for i in 1..=3 {
        let mut be = NetNs::new(&format!("k-tr-b{i}"));
        link(&be, "eth0", &format!("10.30.{i}.2/24"), &lb, &format!("to-b{i}"), &format!("10.30.{i}.1/24"));
        be.exec(&["ip", "route", "add", "default", "via", &format!("10.30.{i}.1")]);
        let name = format!("backend-{i}");
        let line = be.spawn_until_line(&[server, "--listen", "0.0.0.0:8080", "--name", &name, "--udp"]);
        assert!(line.starts_with("listening"), "{line}");
        backends.push(be);
    }

    let mut client = client_in(&lb);
    let vip = ServiceKey::tcp(addr("10.20.0.100:80"));
    let backend = |i: u8| addr(&format!("10.30.{i}.2:8080"));
    let mut writes = vec![Write::AddService(Service::new(vip, "wrr"))];
    for (i, weight) in [(1, 10), (2, 10), (3, 1)] {
        writes.push(Write::AddDestination {
            service: vip,
            destination: Destination::new(backend(i), ForwardMethod::Masquerade, weight),
        });
    }
    assert!(client.apply(&writes).iter().all(Result::is_ok));

    let traffic_client = project_binary("traffic-client");
    let count = |cl: &NetNs, vip: &str, connections: usize, udp: bool| -> BTreeMap<String, f64> {
        let started = Instant::now();
        let connections_arg = connections.to_string();
        let mut command = vec![
            traffic_client.to_str().expect("a UTF-8 path"),
            "--connect",
            vip,
            "--connections",
            &connections_arg,
            "--concurrency",
            "8",
        ];
        if udp {
            command.push("--udp");
        }
        let json = cl.exec(&command);
        let report: serde_json::Value = serde_json::from_str(&json).expect("the client's JSON");
        assert_eq!(report["errors"], 0, "{report}");
        let counts = report["counts"].as_object().expect("counts");
        let total: f64 = counts.values().filter_map(|v| v.as_f64()).sum();
        assert_eq!(total as usize, connections, "{report}");
        eprintln!("{connections} to {vip} in {:?}: {}", started.elapsed(), report["counts"]);
        counts.iter().map(|(name, n)| (name.clone(), n.as_f64().unwrap_or(0.0) / total)).collect()
    };
    let assert_split = |shares: &BTreeMap<String, f64>, weights: [f64; 3]| {
        let sum: f64 = weights.iter().sum();
        for (i, weight) in weights.iter().enumerate() {
            let name = format!("backend-{}", i + 1);
            let share = shares.get(&name).copied().unwrap_or(0.0);
            let expected = weight / sum;
            assert!(
                (share - expected).abs() <= 0.02,
                "{name}: share {:.2}% where weights {weights:?} give {:.2}% (all: {shares:?})",
                share * 100.0,
                expected * 100.0
            );
        }
    };

    let shares = count(&cl, "10.20.0.100:80", 5250, false);
    assert_split(&shares, [10.0, 10.0, 1.0]);

    // New weights on the fly, as the agent writes them: new connections follow.
    let entry = client.dump().unwrap().into_iter().find(|e| e.service.key == vip).expect("the VIP");
    let desired = [DesiredService::new(vip).with_weight(backend(1), 1).with_weight(backend(2), 2).with_weight(backend(3), 5)];
    let plan = plan(&desired, std::slice::from_ref(&entry));
    assert_eq!(plan.writes.len(), 3);
    assert!(client.apply(&plan.writes).iter().all(Result::is_ok));
    let shares = count(&cl, "10.20.0.100:80", 5000, false);
    assert_split(&shares, [1.0, 2.0, 5.0]);

    // UDP: every datagram comes from a fresh socket, so (bar the odd reused
    // source port, which hits its existing IPVS connection) a new connection.
    let dns = ServiceKey::udp(addr("10.20.0.100:53"));
    let mut writes = vec![Write::AddService(Service::new(dns, "wrr"))];
    for (i, weight) in [(1, 1), (2, 2), (3, 3)] {
        writes.push(Write::AddDestination {
            service: dns,
            destination: Destination::new(backend(i), ForwardMethod::Masquerade, weight),
        });
    }
    assert!(client.apply(&writes).iter().all(Result::is_ok));
    let shares = count(&cl, "10.20.0.100:53", 600, true);
    assert_split(&shares, [1.0, 2.0, 3.0]);
}

#[test]
fn a_second_pass_over_the_same_desired_state_writes_nothing() {
    load_ip_vs();
    let ns = NetNs::new("k-idem");
    let mut client = client_in(&ns);
    let mut setup = Vec::new();
    let mut desired = Vec::new();
    for s in 0..5u8 {
        let key = ServiceKey::tcp(addr(&format!("10.12.0.{}:80", s + 1)));
        setup.push(Write::AddService(Service::new(key, "rr")));
        let mut want = DesiredService::new(key).with_scheduler("wrr");
        for d in 0..4u8 {
            let dest = addr(&format!("10.12.{}.{}:8080", s + 1, d + 1));
            setup.push(Write::AddDestination {
                service: key,
                destination: Destination::new(dest, ForwardMethod::Masquerade, 1),
            });
            want = want.with_weight(dest, u16::from(d) * 100 + 1);
        }
        desired.push(want);
    }
    assert!(client.apply(&setup).iter().all(Result::is_ok));

    let first = plan(&desired, &client.dump().unwrap());
    // 5 schedulers, and 15 weights (the first destination of each has weight 1 already).
    assert_eq!(first.writes.len(), 20, "{first:?}");
    let before = client.counters().writes;
    assert!(client.apply(&first.writes).iter().all(Result::is_ok));
    assert_eq!(client.counters().writes - before, 20);

    // The agent dumps only its own services: one dump of the service list
    // plus one per service it picks.
    let dumps = client.counters().dumps;
    let mine = client.dump_services(|s| s.key == desired[0].service).unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].destinations.len(), 4);
    assert_eq!(client.counters().dumps - dumps, 2);
    assert!(plan(&desired[..1], &mine).is_converged());

    let second = plan(&desired, &client.dump().unwrap());
    assert!(second.is_converged(), "{second:?}");
    let before = client.counters().writes;
    assert!(client.apply(&second.writes).is_empty());
    assert_eq!(client.counters().writes, before, "the second pass sent no write");
}

#[test]
fn a_scheduler_change_keeps_what_another_writer_changed_since_a_listing() {
    load_ip_vs();
    let ns = NetNs::new("k-sched");
    let mut client = client_in(&ns);
    let key = ServiceKey::tcp(addr("10.13.0.1:80"));
    client.add_service(&Service::new(key, "rr")).unwrap();
    // A listing, as a sweep keeps one across its chunks.
    let listed = client.services().unwrap().into_iter().find(|s| s.key == key).expect("listed");
    // Meanwhile kube-proxy turns on session affinity (persistence, 3 h).
    let mut affinity = listed.clone();
    affinity.flags |= 0x0001;
    affinity.timeout = 10_800;
    client.edit_service(&affinity).unwrap();
    assert!(client.change_scheduler(&key, "wrr").unwrap());
    let now = client.service(&key).unwrap();
    assert_eq!(now.scheduler, "wrr");
    assert_eq!((now.flags & 0x0001, now.timeout), (0x0001, 10_800), "kube-proxy's session affinity stays");
    assert!(!client.change_scheduler(&key, "wrr").unwrap(), "nothing to change");
    // What a write built from the stale listing does instead: affinity lost.
    client.set_scheduler(&listed, "sh").unwrap();
    assert_eq!(client.service(&key).unwrap().timeout, 0, "the stale listing reverts the timeout");
    assert!(matches!(client.change_scheduler(&ServiceKey::tcp(addr("10.13.0.9:80")), "wrr"), Err(IpvsError::ServiceNotFound { .. })));
}

#[test]
fn a_write_to_a_missing_service_fails_alone() {
    load_ip_vs();
    let ns = NetNs::new("k-errors");
    for rule in [
        "-A -t 10.13.0.1:80 -s wrr",
        "-a -t 10.13.0.1:80 -r 10.13.1.1:80 -m -w 1",
        "-A -t 10.13.0.2:80 -s wrr",
        "-a -t 10.13.0.2:80 -r 10.13.2.1:80 -m -w 1",
    ] {
        ns.ipvsadm(&rule.split(' ').collect::<Vec<_>>());
    }
    let mut client = client_in(&ns);
    let entries = client.dump().unwrap();
    let first = entries.iter().find(|e| e.service.key == ServiceKey::tcp(addr("10.13.0.1:80"))).unwrap();
    let second = entries.iter().find(|e| e.service.key == ServiceKey::tcp(addr("10.13.0.2:80"))).unwrap();
    let missing = ServiceKey::tcp(addr("10.13.0.9:80"));
    let writes = vec![
        Write::set_weight(first.service.key, &first.destinations[0], 7),
        Write::set_weight(missing, &first.destinations[0], 7),
        Write::set_weight(second.service.key, &second.destinations[0], 8),
        Write::set_weight(
            second.service.key,
            &Destination::new(addr("10.13.2.99:80"), ForwardMethod::Masquerade, 1),
            3,
        ),
        Write::set_scheduler(&second.service, "nosuch"),
    ];
    let results = client.apply(&writes);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let Err(e @ IpvsError::ServiceNotFound { .. }) = &results[1] else { panic!("{:?}", results[1]) };
    assert_eq!(e.to_string(), "updating destination 10.13.1.1:80 of TCP 10.13.0.9:80: the service does not exist");
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert!(matches!(results[3], Err(IpvsError::DestinationNotFound { .. })), "{:?}", results[3]);
    let Err(e @ IpvsError::SchedulerNotFound { .. }) = &results[4] else { panic!("{:?}", results[4]) };
    assert!(e.to_string().contains("\"nosuch\""), "{e}");

    let rules = saved_rules(&ns);
    assert!(rules.contains(&"-a -t 10.13.0.1:80 -r 10.13.1.1:80 -m -w 7".to_owned()), "{rules:?}");
    assert!(rules.contains(&"-a -t 10.13.0.2:80 -r 10.13.2.1:80 -m -w 8".to_owned()), "{rules:?}");
    assert!(rules.contains(&"-A -t 10.13.0.2:80 -s wrr".to_owned()), "{rules:?}");

    // The kernel's destination dump ends empty for an unknown service; a
    // single get says it is not there.
    assert_eq!(client.destinations(&missing).unwrap(), vec![]);
    assert!(matches!(client.service(&missing), Err(IpvsError::ServiceNotFound { .. })));
    assert_eq!(client.service(&first.service.key).unwrap().scheduler, "wrr");
}

#[test]
fn without_cap_net_admin_the_error_says_so() {
    load_ip_vs();
    let ns = NetNs::new("k-eperm");
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter(|| {
                    support::drop_cap_net_admin();
                    IpvsClient::new().and_then(|mut c| c.services())
                })
            })
            .join()
            .expect("the thread")
    });
    let Err(e @ IpvsError::PermissionDenied { .. }) = &result else { panic!("{result:?}") };
    assert_eq!(e.to_string(), "listing IPVS services: permission denied: needs CAP_NET_ADMIN (run as root or grant the capability)");
}

#[test]
fn the_cli_lists_what_ipvsadm_lists() {
    load_ip_vs();
    let ns = NetNs::new("k-cli");
    for rule in [
        "-A -t 10.14.0.1:80 -s wrr",
        "-a -t 10.14.0.1:80 -r 10.14.1.1:8080 -m -w 3",
        "-A -u [fd00::14]:53 -s rr",
        "-a -u [fd00::14]:53 -r [fd00::1:14]:53 -g -w 1",
    ] {
        ns.ipvsadm(&rule.split(' ').collect::<Vec<_>>());
    }
    let cli = project_binary("ipvs-operator");
    let cli = cli.to_str().expect("a UTF-8 path");
    assert_eq!(ns.exec(&[cli, "ipvs", "list"]), ns.ipvsadm(&["-Ln"]));
    let json: serde_json::Value = serde_json::from_str(&ns.exec(&[cli, "ipvs", "list", "-o", "json"])).unwrap();
    let services = json["services"].as_array().expect("services");
    assert_eq!(services.len(), 2, "{json}");
    let tcp = services.iter().find(|s| s["protocol"] == "TCP").expect("the TCP service");
    assert_eq!((tcp["address"].as_str(), tcp["port"].as_u64()), (Some("10.14.0.1"), Some(80)));
    assert_eq!(tcp["scheduler"], "wrr");
    assert_eq!(tcp["destinations"][0]["address"], "10.14.1.1");
    assert_eq!(tcp["destinations"][0]["port"], 8080);
    assert_eq!(tcp["destinations"][0]["weight"], 3);
    assert_eq!(tcp["destinations"][0]["forward"], "masquerade");
    let udp = services.iter().find(|s| s["protocol"] == "UDP").expect("the UDP service");
    assert_eq!(udp["family"], "ipv6");
    assert_eq!(udp["destinations"][0]["forward"], "route");
}

#[test]
fn an_owned_table_is_made_whole_from_nothing_and_a_second_pass_writes_nothing() {
    load_ip_vs();
    let ns = NetNs::new("k-owned");
    let mut client = client_in(&ns);
    // Someone else's service: never touched.
    let theirs = ServiceKey::tcp(addr("10.13.9.9:443"));
    assert!(client.apply(&[Write::AddService(Service::new(theirs, "rr"))]).iter().all(Result::is_ok));

    let tcp = ServiceKey::tcp(addr("10.13.0.1:80"));
    let udp = ServiceKey::udp(addr("10.13.0.1:53"));
    let v6 = ServiceKey::tcp(addr("[fd00:13::1]:80"));
    let mut sticky = Service::new(tcp, "wrr");
    sticky.flags = ipvs::constants::IP_VS_SVC_F_PERSISTENT;
    sticky.timeout = 10_800;
    let owned = |key: ServiceKey, service: Service, destinations: &[(&str, u16)]| {
        assert_eq!(service.key, key);
        OwnedService { service, destinations: destinations.iter().map(|(a, w)| (addr(a), *w)).collect() }
    };
    let mut desired = vec![
        owned(tcp, sticky.clone(), &[("10.13.1.1:8080", 90), ("10.13.1.2:8080", 10)]),
        owned(udp, Service::new(udp, "wrr"), &[("10.13.1.1:53", 1), ("10.13.1.2:53", 1)]),
        owned(v6, Service::new(v6, "sh"), &[("[fd00:13:1::1]:8080", 3)]),
    ];
    let ours = |k: &ServiceKey| *k != theirs;
    let never = |_: &ServiceKey, _: SocketAddr| false;
    let first = plan_owned(&desired, &client.dump().unwrap(), ours, never);
    assert_eq!(first.writes.len(), 8, "{first:?}");
    assert!(client.apply(&first.writes).iter().all(Result::is_ok));
    // The kernel's own additions (the hashed flag) are no difference.
    let second = plan_owned(&desired, &client.dump().unwrap(), ours, never);
    assert_eq!(second, OwnedPlan::default());
    let rules = saved_rules(&ns);
    assert!(rules.iter().any(|r| r.starts_with("-A -t 10.13.0.1:80 -s wrr -p 10800")), "{rules:?}");
    assert!(rules.iter().any(|r| r.contains("-t 10.13.0.1:80 -r 10.13.1.1:8080 -m -w 90")), "{rules:?}");

    // A TCP destination removed without connections, and a UDP one: both go
    // at once (nothing holds them); a weight changes; affinity is dropped.
    desired[0] = owned(tcp, Service::new(tcp, "wrr"), &[("10.13.1.1:8080", 50)]);
    desired[1].destinations.remove(&addr("10.13.1.2:53"));
    let third = plan_owned(&desired, &client.dump().unwrap(), ours, never);
    assert!(third.draining.is_empty(), "{third:?}");
    assert!(client.apply(&third.writes).iter().all(Result::is_ok));
    let dump = client.dump().unwrap();
    let of = |key: ServiceKey| dump.iter().find(|e| e.service.key == key).expect("still there").clone();
    let left: Vec<(SocketAddr, u32)> = of(tcp).destinations.iter().map(|d| (d.socket_addr(), d.weight)).collect();
    assert_eq!(left, [(addr("10.13.1.1:8080"), 50)]);
    assert_eq!((of(tcp).service.timeout, of(tcp).service.flags & ipvs::constants::IP_VS_SVC_F_PERSISTENT), (0, 0), "affinity dropped");
    assert_eq!(of(udp).destinations.len(), 1);
    assert_eq!(plan_owned(&desired, &dump, ours, never), OwnedPlan::default());

    // Nothing wanted: every owned service goes, theirs stays.
    let last = plan_owned(&[], &client.dump().unwrap(), ours, never);
    assert!(client.apply(&last.writes).iter().all(Result::is_ok));
    let left: Vec<ServiceKey> = client.dump().unwrap().iter().map(|e| e.service.key).collect();
    assert_eq!(left, [theirs]);
}
