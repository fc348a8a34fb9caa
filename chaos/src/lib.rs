//! A fault-injecting TCP proxy between an agent and nats-server.
//!
//! Scriptable while it runs: pass, blackhole (bytes stop moving, no RST:
//! the peers only notice through their own pings), reset (every connection is
//! closed with an RST), latency, a bandwidth cap, and flapping between pass
//! and blackhole every N seconds. It counts the bytes it delivered each way.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the link does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Pass,
    /// Bytes stop moving (held, not dropped: TCP does not lose the middle
    /// of a stream); connections stay open.
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Added to every chunk forwarded, one way.
    pub latency: Duration,
    /// Bytes per second each way; 0 = unlimited.
    pub bandwidth: u64,
}

struct State {
    mode: Mutex<Mode>,
    shape: Mutex<Shape>,
    /// Flap period: pass for this long, then blackhole for this long.
    flap: Mutex<Option<Duration>>,
    flap_epoch: Mutex<Instant>,
    conns: Mutex<Vec<TcpStream>>,
    /// Bytes delivered server → agent, and agent → server.
    down: AtomicU64,
    up: AtomicU64,
    accepted: AtomicU64,
    stop: AtomicBool,
}

impl State {
    fn mode(&self) -> Mode {
        if let Some(period) = *lock(&self.flap) {
            let t = lock(&self.flap_epoch).elapsed().as_millis() / period.as_millis().max(1);
            return if t % 2 == 0 { Mode::Pass } else { Mode::Blackhole };
        }
        *lock(&self.mode)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The proxy; stops (and drops every connection) when dropped.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(State {
            mode: Mutex::new(Mode::Pass),
            shape: Mutex::new(Shape { latency: Duration::ZERO, bandwidth: 0 }),
            flap: Mutex::new(None),
            flap_epoch: Mutex::new(Instant::now()),
            conns: Mutex::new(vec![]),
            down: AtomicU64::new(0),
            up: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::spawn(move || accept_loop(listener, upstream, st));
        Proxy { port, state }
    }

    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.flap) = None;
        *lock(&self.state.mode) = mode;
    }

    pub fn set_shape(&self, shape: Shape) {
        *lock(&self.state.shape) = shape;
    }

    /// Alternates pass and blackhole every `period`, starting with pass.
    pub fn flap(&self, period: Duration) {
        *lock(&self.state.flap_epoch) = Instant::now();
        *lock(&self.state.flap) = Some(period);
    }

    /// Closes every open connection with an RST.
    pub fn reset(&self) {
        for c in lock(&self.state.conns).drain(..) {
            rst(&c);
        }
    }

    /// Bytes delivered (server → agent, agent → server).
    pub fn bytes(&self) -> (u64, u64) {
        (self.state.down.load(Ordering::Relaxed), self.state.up.load(Ordering::Relaxed))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.reset();
    }
}

/// Closes a socket with an RST: linger on, zero timeout.
fn rst(s: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        s,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger { l_onoff: 1, l_linger: 0 },
    );
    let _ = s.shutdown(Shutdown::Both);
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, st: Arc<State>) {
    while !st.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let Ok(server) = TcpStream::connect(upstream) else {
                    rst(&client);
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nonblocking(false);
                {
                    let mut conns = lock(&st.conns);
                    for s in [&client, &server] {
                        if let Ok(c) = s.try_clone() {
                            conns.push(c);
                        }
                    }
                }
                for (from, to, down) in [
                    (client.try_clone(), server.try_clone(), false),
                    (server.try_clone(), client.try_clone(), true),
                ] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let st = st.clone();
                        std::thread::spawn(move || pump(from, to, st, down));
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<State>, down: bool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 16 * 1024];
    let counter = if down { &st.down } else { &st.up };
    loop {
        if st.stop.load(Ordering::Relaxed) {
            return;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                continue
            }
            Err(_) => break,
        };
        // Held, like a radio link out of range: TCP never loses bytes from
        // the middle of a stream, it stalls until the path returns or a
        // peer gives up (its pings go unanswered) and closes the socket.
        while st.mode() == Mode::Blackhole {
            if st.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let shape = *lock(&st.shape);
        if !shape.latency.is_zero() {
            std::thread::sleep(shape.latency);
        }
        let mut sent = 0;
        while sent < n {
            // A bandwidth cap: at most 1/20 s worth of bytes per write.
            let step = if shape.bandwidth == 0 {
                n - sent
            } else {
                ((shape.bandwidth / 20).max(1) as usize).min(n - sent)
            };
            // Counted before the write: once written, the bytes (or the
            // peer's answer to them) may be seen before a count after it.
            counter.fetch_add(step as u64, Ordering::Relaxed);
            if to.write_all(&buf[sent..sent + step]).is_err() {
                counter.fetch_sub(step as u64, Ordering::Relaxed);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            sent += step;
            if shape.bandwidth > 0 {
                std::thread::sleep(Duration::from_secs_f64(step as f64 / shape.bandwidth as f64));
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_blackholes_and_resets() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = Proxy::start(addr);
        let mut c = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut b = [0u8; 5];
        c.write_all(b"hello").unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        p.set_mode(Mode::Blackhole);
        c.write_all(b"held!").unwrap();
        assert!(c.read_exact(&mut b).is_err(), "a blackhole delivers nothing");
        p.set_mode(Mode::Pass);
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"held!", "and the stream resumes intact when the path returns");
        p.reset();
        let mut one = [0u8; 1];
        let r = c.read(&mut one);
        assert!(matches!(r, Ok(0)) || r.is_err(), "reset closes the connection");
        assert_eq!(p.bytes(), (10, 10));
        let mut again = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        again.write_all(b"again").unwrap();
        again.read_exact(&mut b).unwrap();
        assert_eq!(p.connections(), 2);
    }
}
