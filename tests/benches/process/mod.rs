//! The real `ipvs-operator` binary as the footprint benchmarks run it: a
//! process against the test API server, its metrics page on loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipvs_operator_tests::project_binary;

/// The number in environment variable `name`, or `default` when it is unset.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(text) => text.parse().with_context(|| format!("{name}={text} is not a number")),
        Err(_) => Ok(default),
    }
}

/// A free port on loopback (bound, read, released).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// GET `path` from `addr` with HTTP/1.0; the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// The value of the sample `series` (name and labels, as printed) on a metrics page.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A running `ipvs-operator`; killed on drop.
pub struct Process {
    pub child: Child,
    pub metrics: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts `ipvs-operator ARGS` as node-1 against `kubeconfig`, its log in `log`.
    #[allow(dead_code)] // the policy-dir bench's; footprint's names its binaries
    pub fn start(args: &[&str], kubeconfig: &Path, log: &Path) -> Result<Process> {
        Process::start_binary(&project_binary("ipvs-operator")?, args, kubeconfig, log)
    }

    /// [`Process::start`] with another build of `ipvs-operator` (the shipped
    /// musl one, say).
    pub fn start_binary(program: &Path, args: &[&str], kubeconfig: &Path, log: &Path) -> Result<Process> {
        let port = free_port()?;
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(program)
            .args(args)
            .arg(format!("--listen={metrics}"))
            .env("KUBECONFIG", kubeconfig)
            .env("NODE_NAME", "node-1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Process { child, metrics })
    }

    /// Its metrics page (empty while it does not answer).
    pub fn metrics(&self) -> String {
        http_get(self.metrics, "/metrics").unwrap_or_default()
    }

    /// Waits up to `timeout` until `done` holds for its metrics page.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let page = self.metrics();
            if done(&page) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: not within {} s (metrics: {page})",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
