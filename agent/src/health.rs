//! Trial health checks: shell commands, systemd units, local HTTP URLs.
//! Each check has a timeout; a round passes when every check passes; rounds
//! repeat until one passes or the trial deadline comes.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::config::Health;
use crate::decision::Decision;

/// Runs every configured check once. Returns the first failure.
pub fn round(cfg: &Health, limit: Duration) -> Result<(), String> {
    let timeout = cfg.timeout.min(limit.max(Duration::from_millis(100)));
    for cmd in &cfg.commands {
        let mut c = Command::new("sh");
        c.arg("-c").arg(cmd);
        run_with_timeout(&mut c, timeout).map_err(|e| format!("command `{cmd}` {e}"))?;
    }
    for unit in &cfg.units {
        let mut c = Command::new("systemctl");
        c.args(["is-active", "--quiet", unit]);
        run_with_timeout(&mut c, timeout).map_err(|e| format!("unit {unit} is not active ({e})"))?;
    }
    for url in &cfg.urls {
        http_ok(url, timeout).map_err(|e| format!("{url}: {e}"))?;
    }
    Ok(())
}

/// How a trial ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TrialEnd {
    Passed,
    /// Still failing when the deadline came: the last failure.
    Failed(String),
    /// A technician decided (`perch-agent commit` / `rollback`).
    Decided(Decision),
}

/// Repeats [`round`] until it passes or `deadline` (Unix seconds) passes,
/// or until `decided` (asked before every round) has a decision.
pub fn trial(
    cfg: &Health,
    deadline: u64,
    mut note: impl FnMut(&str),
    mut decided: impl FnMut() -> Option<Decision>,
) -> TrialEnd {
    loop {
        if let Some(d) = decided() {
            return TrialEnd::Decided(d);
        }
        let now = perch_support::now_unix();
        let left = Duration::from_secs(deadline.saturating_sub(now));
        match round(cfg, left) {
            Ok(()) => return TrialEnd::Passed,
            Err(e) => {
                if perch_support::now_unix() + cfg.interval.as_secs().max(1) > deadline {
                    return TrialEnd::Failed(e);
                }
                note(&format!("health check failed, retrying: {e}"));
                sleep(cfg.interval);
            }
        }
    }
}

/// Runs a command, killing it after `timeout`. Ok only for exit status 0.
pub fn run_with_timeout(c: &mut Command, timeout: Duration) -> Result<(), String> {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("failed ({st})")),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {}", perch_support::duration(timeout)));
            }
            Ok(None) => sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A minimal HTTP/1.0 GET for local health endpoints: Ok for a 2xx status.
pub fn http_ok(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("resolve: {e}"))?
        .next()
        .ok_or("resolves to no address")?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: perch-agent\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match s.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..got]);
    let status =
        line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).ok_or("no HTTP status line")?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve(status: u16) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
                let _ = write!(c, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            }
        });
        format!("http://127.0.0.1:{port}/health")
    }

    #[test]
    fn http_status_decides() {
        assert!(http_ok(&serve(204), Duration::from_secs(2)).is_ok());
        assert_eq!(http_ok(&serve(503), Duration::from_secs(2)).unwrap_err(), "HTTP 503");
    }

    #[test]
    fn an_inactive_unit_fails_the_round() {
        let cfg = Health { units: vec!["perch-no-such-unit.service".into()], ..Health::default() };
        let e = round(&cfg, Duration::from_secs(5)).unwrap_err();
        assert!(e.starts_with("unit perch-no-such-unit.service is not active"), "{e}");
    }

    #[test]
    fn commands_time_out() {
        let mut c = Command::new("sleep");
        c.arg("5");
        let e = run_with_timeout(&mut c, Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("timed out"));
        assert!(run_with_timeout(&mut Command::new("true"), Duration::from_secs(1)).is_ok());
    }
}
