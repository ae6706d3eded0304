//! The two binaries together, as the VM tests and the demo use them.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};

#[test]
fn the_client_counts_what_the_server_answers() {
    // A free port: bind, read it, release it for the server.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_traffic-server"))
        .args(["--listen", &address, "--name", "backend-7", "--udp"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), format!("listening on {address} as backend-7"));

    for extra in [&[][..], &["--udp"][..]] {
        let output = Command::new(env!("CARGO_BIN_EXE_traffic-client"))
            .args(["--connect", &address, "--connections", "300", "--concurrency", "4"])
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(report["connections"], 300);
        assert_eq!(report["counts"]["backend-7"], 300, "{report}");
        assert_eq!(report["errors"], 0);
    }
    server.kill().unwrap();
    server.wait().unwrap();
}
