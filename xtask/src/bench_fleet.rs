//! `cargo xtask bench fleet [--devices N] [--servers 1|3] [--sites S]
//! [--agents K] [--chunk-share F] [--bundle-kib K]`: a fleet of N simulated
//! devices (default 10,000; `fleet-sim`, the agent's own link, outbox and
//! desired-state follower without slots) and K real `perch-agent`s
//! (default 3) on a three-server cluster (or one server), with a real
//! provisioner, driven by the real `perch` commands. With `--sites S`, the
//! simulated devices are split over S field sites (leaf servers of the
//! cluster, each with its `site run` daemon) and connect there. It prints:
//!
//! - desired-state propagation, p50 / p99 / max, from the moment before
//!   `perch desired set --group` to each simulated device acting on it:
//!   once for a bundle the devices already run (what it costs the fleet to
//!   hear a change), once for a new one (they hear it while the first ones
//!   already fetch and report on the same two cores), and the time until
//!   every device has committed it;
//! - a 3-wave rollout (1%, 10%, 100%) whose second wave trips the failure
//!   limit: the wall and CPU time of `perch deploy` until it pauses and of
//!   `perch deploy resume` until it is done;
//! - `perch status` time and peak memory for the whole fleet, and for
//!   `--device` on a device with 10,000 stored reports;
//! - the servers' RSS and CPU time, and the streams' sizes;
//! - the provisioner's enrollment rate while the fleet is live.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::fleet::LocalFleet;
use crate::util::step;

const USAGE: &str = "usage: cargo xtask bench fleet [--devices N] [--servers 1|3] [--sites S] [--agents K] [--chunk-share F] [--bundle-kib K]";
/// The group every device is in.
const GROUP: &str = "fleet";
/// Devices of the second wave that roll the new bundle back, at most.
const FAILING: usize = 20;
/// Stored reports of the device `perch status --device` is timed on.
const DEVICE_REPORTS: u64 = 10_000;
/// Devices enrolled while the fleet is live, to time the provisioner.
const LATE: usize = 500;

struct Opts {
    devices: usize,
    servers: usize,
    sites: usize,
    agents: usize,
    chunk_share: f64,
    bundle_kib: usize,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut o =
        Opts { devices: 10_000, servers: 3, sites: 0, agents: 3, chunk_share: 0.05, bundle_kib: 1024 };
    for (flag, value) in crate::util::flag_pairs(args, USAGE)? {
        match flag {
            "--devices" => o.devices = value.parse().context("--devices takes a number")?,
            "--servers" => o.servers = value.parse().context("--servers takes 1 or 3")?,
            "--sites" => o.sites = value.parse().context("--sites takes a number")?,
            "--agents" => o.agents = value.parse().context("--agents takes a number")?,
            "--chunk-share" => o.chunk_share = value.parse().context("--chunk-share takes 0.0 to 1.0")?,
            "--bundle-kib" => o.bundle_kib = value.parse().context("--bundle-kib takes a number")?,
            _ => bail!(USAGE),
        }
    }
    if o.devices < 100 || !(o.servers == 1 || o.servers == 3) {
        bail!("--devices must be at least 100 (the first wave is 1%), --servers 1 or 3");
    }
    if o.sites > 0 && o.servers != 3 {
        // The cluster's servers have leafnode listeners; a single one here does not.
        bail!("--sites needs --servers 3 (field sites connect to the cluster's leafnode listeners)");
    }
    let bin = crate::util::release_bins("fleet", &["perch-fleet", "perch-bootstrap", "perch-agent"])?;
    let tools = crate::util::bench_tools(&["fleet-sim", "enroll-load", "link-bench"])?;
    let dir = crate::util::fresh_dir("bench-fleet")?;
    // State directories on tmpfs where there is one: the outboxes fsync,
    // and 10,000 of them on a disk would measure the disk.
    let shm = Path::new("/dev/shm");
    let sim_root = if shm.is_dir() {
        shm.join(format!("perch-bench-fleet-{}", std::process::id()))
    } else {
        dir.join("sim")
    };
    let result = bench(&o, &bin, &tools, &dir, &sim_root);
    let _ = fs::remove_dir_all(&sim_root);
    if result.is_ok() && std::env::var_os("PERCH_BENCH_KEEP").is_none() {
        fs::remove_dir_all(&dir)?;
    }
    result
}

/// `perch` with the bench's FLEET credential and every server's URL.
struct Perch<'a> {
    dir: &'a Path,
    bin: PathBuf,
    conn: Vec<String>,
}

impl Perch<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args).args(&self.conn).current_dir(self.dir);
        c
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args).output()?;
        if !out.status.success() {
            bail!("perch {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs under `/usr/bin/time`: (exit code, stdout, stderr, wall s, CPU s, peak RSS KiB).
    fn timed(&self, args: &[&str]) -> Result<Timed> {
        let times = self.dir.join("time.out");
        let mut c = Command::new("/usr/bin/time");
        c.arg("-o").arg(&times).args(["-f", "%e %U %S %M"]).arg(&self.bin).args(args).args(&self.conn);
        let out = c.current_dir(self.dir).output().context("running /usr/bin/time (Debian package time)")?;
        let t = fs::read_to_string(&times)?;
        let f: Vec<f64> =
            t.lines().last().unwrap_or("").split_whitespace().filter_map(|v| v.parse().ok()).collect();
        let [wall, user, sys, rss] = f[..] else { bail!("/usr/bin/time said {t:?}") };
        Ok(Timed {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            wall,
            cpu: user + sys,
            rss_kib: rss as u64,
        })
    }
}

struct Timed {
    code: i32,
    stdout: String,
    stderr: String,
    wall: f64,
    cpu: f64,
    rss_kib: u64,
}

/// The simulated fleet's process and what it says.
struct Sim {
    children: Vec<(Child, Option<ChildStdin>)>,
    lines: Receiver<serde_json::Value>,
    /// How many simulated devices there are.
    devices: usize,
}

/// Simulated devices per `fleet-sim` process: each holds about three file
/// descriptors, and a process may have 20,000 on a stock Debian machine.
const PER_PROCESS: usize = 4000;

impl Sim {
    fn next(&self, limit: Duration, what: &str) -> Result<serde_json::Value> {
        match self.lines.recv_timeout(limit) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => {
                bail!("fleet-sim: nothing in {limit:?} while waiting for {what}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("fleet-sim ended while waiting for {what} (see sim-*.log)")
            }
        }
    }

    /// Waits until every simulated device's outbox is empty (JetStream
    /// acknowledged every report), so what is measured next is not
    /// competing with a backlog.
    fn drained(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            for (_, stdin) in &mut self.children {
                if let Some(s) = stdin {
                    writeln!(s, "backlog")?;
                }
            }
            let (processes, mut total, mut answers) = (self.children.len(), 0, 0);
            self.until(limit, "the outboxes' backlog", |v| {
                total += v["backlog"].as_u64().unwrap_or(0);
                answers += usize::from(v["backlog"].is_u64());
                answers == processes
            })?;
            if total == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{total} reports still queued after {limit:?}");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Reads lines until `done` is true for one; fails on a device failure.
    fn until(
        &self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next(left, what)?;
            if v.get("failed").is_some() {
                bail!("a simulated device failed: {v}");
            }
            if done(&v) {
                return Ok(());
            }
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for (child, stdin) in &mut self.children {
            drop(stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process's resident memory (KiB) and CPU seconds so far, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    // utime and stime are fields 14 and 15 of stat(5); `after` starts at 3.
    let field =
        |i: usize| after.split_whitespace().nth(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // In clock ticks: 100 a second on Linux.
    (rss, (field(14) + field(15)) as f64 / 100.0)
}

/// Writes `digest` to the group's key and collects each simulated device's
/// notice, in ms after the write, sorted; with `commits`, also waits for
/// that many commits and says how long the last took (s).
fn propagate(perch: &Perch, sim: &Sim, digest: &str, commits: Option<usize>) -> Result<(Vec<u64>, f64)> {
    let devices = sim.devices;
    let t0 = now_ms();
    perch.ok(&["desired", "set", "--group", GROUP, "--digest", digest])?;
    let (mut latencies, mut committed) = (vec![], 0usize);
    let key = format!("group.{GROUP}");
    sim.until(Duration::from_secs(600), "every simulated device to act on the group's key", |v| {
        if v["key"] == key.as_str() {
            latencies.push(v["at_ms"].as_u64().unwrap_or(t0).saturating_sub(t0));
        }
        if v["ended"].is_string() && v["committed"] == true {
            committed += 1;
        }
        latencies.len() == devices && commits.is_none_or(|n| committed == n)
    })?;
    latencies.sort_unstable();
    Ok((latencies, (now_ms() - t0) as f64 / 1000.0))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn bench(o: &Opts, bin: &Path, tools: &Path, dir: &Path, sim_root: &Path) -> Result<()> {
    let quiet = |program: &str, args: &[&str]| crate::util::run_in(dir, &bin.join(program), args);
    quiet("perch", &["keygen", "--out", "k1"])?;
    quiet("perch-bootstrap", &["init", "--dir", "org", "--release-key", "k1.pub", "--threshold", "1"])?;
    step(&format!("bench fleet: {} server(s)", o.servers));
    let mut fleet = if o.servers == 1 {
        LocalFleet::start(dir, bin)?
    } else {
        LocalFleet::start_cluster(dir, bin, o.servers)?
    };
    fleet.provisioner()?;
    quiet(
        "perch-bootstrap",
        &["nats", "creds", "--dir", "org", "--account", "fleet", "--name", "bench", "--out", "bench.creds"],
    )?;
    let mut conn: Vec<String> =
        ["--creds", "bench.creds", "--ca", "org/tls/ca.pem"].map(String::from).to_vec();
    for u in &fleet.urls {
        conn.extend(["--url".into(), u.clone()]);
    }
    let perch = Perch { dir, bin: bin.join("perch"), conn };

    // Two releases of one bundle.
    fs::create_dir_all(dir.join("payload"))?;
    crate::demo::write_image(&dir.join("payload/data.bin"), o.bundle_kib << 10)?;
    let mut digests = vec![];
    for counter in ["1", "2"] {
        let out = format!("app-{counter}.perch");
        quiet(
            "perch",
            &[
                "bundle",
                "build",
                "--name",
                "app",
                "--counter",
                counter,
                "--kind",
                "archive",
                "--input",
                "payload",
                "--out",
                &out,
            ],
        )?;
        quiet("perch", &["bundle", "sign", "--key", "k1.key", &out])?;
        perch.ok(&["publish", "--trust", "org/trust.doc", &out])?;
        let v: serde_json::Value =
            serde_json::from_str(&quiet("perch", &["bundle", "inspect", "--json", &out])?)?;
        digests.push(v["digest"].as_str().context("bundle inspect gave no digest")?.to_string());
    }

    // Where the simulated devices connect: the hub's servers, or one
    // field site each (an even share of them), leaf nodes of the cluster.
    let mut places: Vec<(String, Vec<String>)> = vec![];
    if o.sites == 0 {
        places.push(("hub".into(), fleet.urls.clone()));
    }
    for k in 1..=o.sites {
        let site = crate::site::Site::new(&format!("site-{k}"))?;
        let init = site.init_args(&fleet.leaf_urls);
        quiet("perch-bootstrap", &init.iter().map(String::as_str).collect::<Vec<_>>())?;
        site.start(&mut fleet)?;
        places.push((site.name.clone(), vec![site.url.clone()]));
    }
    if o.sites > 0 {
        println!("  {} field sites, leaf nodes of the cluster", o.sites);
    }
    let servers_before: Vec<(String, u32, f64)> =
        fleet.servers().into_iter().map(|(n, pid)| (n, pid, usage(pid).1)).collect();
    let token = |group: &str, uses: usize, urls: &[String]| -> Result<String> {
        let uses = uses.to_string();
        let mut args = vec!["token", "issue", "--dir", "org", "--group", group, "--uses", &uses];
        for u in urls {
            args.extend(["--url", u.as_str()]);
        }
        quiet("perch-bootstrap", &args)
    };
    fs::write(dir.join("fleet.token"), token(GROUP, o.agents.max(1), &fleet.urls)?.trim())?;

    // The second wave: sorted ids from ⌈n/100⌉ to ⌈n/10⌉, real agents
    // ("agent-…") sorting first. A tenth of it (2 to FAILING) fails.
    let total = o.devices + o.agents;
    let first_sim_in_wave_2 = total.div_ceil(100).saturating_sub(o.agents);
    let failing = ((total.div_ceil(10) - total.div_ceil(100)) / 10).clamp(2, FAILING);
    let fail = format!("{}:{}..{}", digests[1], first_sim_in_wave_2, first_sim_in_wave_2 + failing);
    step(&format!("bench fleet: {} simulated devices enroll and start", o.devices));
    let share = o.chunk_share.to_string();
    let sim_root_s = sim_root.display().to_string();
    let (tx, lines) = std::sync::mpsc::channel();
    let mut children = vec![];
    for (k, (place, urls)) in places.iter().enumerate() {
        // Devices [from, to) are at this place.
        let (from, to) = (k * o.devices / places.len(), (k + 1) * o.devices / places.len());
        let token_file = format!("{place}.token");
        fs::write(dir.join(&token_file), token(GROUP, to - from, urls)?.trim())?;
        let mut first = from;
        while first < to {
            let count = PER_PROCESS.min(to - first);
            let mut c = Command::new(tools.join("fleet-sim"));
            c.args(["--token", &token_file, "--devices", &count.to_string(), "--first", &first.to_string()])
                .args(["--prefix", "sim", "--group", GROUP, "--root", &sim_root_s])
                .args(["--chunk-share", &share, "--heartbeat", "60", "--resync", "60", "--fail", &fail]);
            if o.sites > 0 {
                // Connected to the site's server, not the hub's its enrollment names.
                for u in urls {
                    c.args(["--url", u]);
                }
            }
            let log = fs::File::create(dir.join(format!("sim-{}.log", children.len())))?;
            let mut child =
                c.current_dir(dir).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log).spawn()?;
            let stdout = child.stdout.take().context("fleet-sim stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                }
            });
            let stdin = child.stdin.take();
            children.push((child, stdin));
            first += count;
        }
    }
    let processes = children.len();
    drop(tx);
    let mut sim = Sim { children, lines, devices: o.devices };
    // Each process says "enrolled", then "ready": one may be ready before
    // another has enrolled, so both are counted in one pass.
    let started = Instant::now();
    let (mut enrolled, mut ready, mut enrolled_secs) = (0, 0, 0.0);
    sim.until(
        Duration::from_secs(240 + o.devices as u64 / 5),
        "the simulated devices to enroll and start",
        |v| {
            if v["enrolled"].is_u64() {
                enrolled += 1;
                enrolled_secs = started.elapsed().as_secs_f64();
            }
            ready += usize::from(v["ready"].is_u64());
            enrolled == processes && ready == processes
        },
    )?;
    println!("  enrolled {} simulated devices in {enrolled_secs:.1} s ({processes} processes)", o.devices);

    let agents = real_agents(dir, bin, &mut fleet, o.agents)?;
    step("bench fleet: waiting for every device to be online");
    crate::util::wait_every(
        "every device online in perch status",
        Duration::from_secs(300),
        Duration::from_secs(5),
        || {
            // Ten thousand devices connecting keep the cluster busy: a
            // status that fails now is asked again at the next poll.
            let shown = match perch.ok(&["status", "--json"]) {
                Ok(s) => s,
                Err(e) => {
                    println!("  (again: {e})");
                    return Ok(false);
                }
            };
            let v: serde_json::Value = serde_json::from_str(&shown)?;
            let online =
                v["devices"].as_array().map_or(0, |a| a.iter().filter(|d| d["liveness"] == "online").count());
            Ok(online >= total)
        },
    )?;

    step(&format!("bench fleet: enrollment while the fleet is live ({LATE} devices)"));
    fs::write(dir.join("late.token"), token("late", LATE, &places[0].1)?.trim())?;
    let out = crate::bench_wait::run_within(
        dir,
        &tools.join("enroll-load"),
        &["late.token", &LATE.to_string(), "100", "late"],
        Duration::from_secs(300),
        "enrolling while the fleet is live",
    )?;
    let late: serde_json::Value = serde_json::from_str(out.trim()).context("enroll-load output")?;

    step("bench fleet: release 1 to the group (perch desired set --group)");
    let (installing, converged_s) = propagate(&perch, &sim, &digests[0], Some(o.devices))?;
    sim.drained(Duration::from_secs(600))?;
    step("bench fleet: propagation alone: the same release written again (every device already runs it)");
    let (latencies, _) = propagate(&perch, &sim, &digests[0], None)?;
    sim.drained(Duration::from_secs(600))?;

    step("bench fleet: perch status");
    let status = perch.timed(&["status", "--json"])?;
    if status.code != 0 {
        bail!("perch status: {}", status.stderr);
    }
    let listed =
        serde_json::from_str::<serde_json::Value>(&status.stdout)?["devices"].as_array().map_or(0, Vec::len);
    let table = perch.timed(&["status"])?;
    step(&format!("bench fleet: one device with {DEVICE_REPORTS} stored reports"));
    crate::bench_link::drain(dir, bin, &tools.join("link-bench"), &mut fleet, "bench.creds", DEVICE_REPORTS)?;
    let one = perch.timed(&["status", "--device", "bench-1", "--json"])?;
    if one.code != 0 {
        bail!("perch status --device: {}", one.stderr);
    }

    step("bench fleet: a rollout in waves of 1%, 10%, 100%; the second wave trips the limit");
    let limit = (failing - 1).to_string();
    let deploy = perch.timed(&[
        "deploy",
        "--bundle",
        "app@2",
        "--group",
        GROUP,
        "--waves",
        "1%,10%,100%",
        "--max-failures",
        &limit,
    ])?;
    if deploy.code == 0 || !deploy.stderr.contains("paused") {
        bail!("the rollout did not pause: {}\n{}", deploy.stdout, deploy.stderr);
    }
    let id = deploy.stdout.split_whitespace().nth(1).unwrap_or("").trim_end_matches(':').to_string();
    let resume = perch.timed(&["deploy", "resume", &id])?;
    if resume.code != 0 {
        bail!("perch deploy resume: {}\n{}", resume.stdout, resume.stderr);
    }

    // When each wave started and settled, from the rollout's record.
    let record: serde_json::Value = serde_json::from_str(&perch.ok(&["deploy", "list", "--json"])?)?;
    let rollout = record
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == id.as_str()))
        .cloned()
        .unwrap_or_default();
    let created = rollout["created_at"].as_u64().unwrap_or(0);
    let mut waves = vec![];
    for w in rollout["waves"].as_array().into_iter().flatten() {
        let at =
            |k: &str| w[k].as_u64().map_or("-".to_string(), |t| format!("{}", t.saturating_sub(created)));
        waves.push(format!(
            "{}% started {} s, settled {} s",
            w["percent"],
            at("started_at"),
            at("settled_at")
        ));
    }
    let servers_after: Vec<(String, u64, f64)> = servers_before
        .iter()
        .map(|(n, pid, cpu0)| {
            let (rss, cpu) = usage(*pid);
            (n.clone(), rss, cpu - cpu0)
        })
        .collect();
    let streams: serde_json::Value =
        serde_json::from_str(&perch.ok(&["streams", "--json"]).or_else(|e| {
            // `perch streams` exits 1 when a copy lags; its JSON is still the answer.
            let out = perch.command(&["streams", "--json"]).output()?;
            if out.stdout.is_empty() {
                Err(e)
            } else {
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            }
        })?)?;
    let sim_usage =
        sim.children.iter().map(|(c, _)| usage(c.id())).fold((0, 0.0), |a, u| (a.0 + u.0, a.1 + u.1));
    drop(agents);
    drop(sim);

    println!();
    let at_sites =
        if o.sites > 0 { format!(" (the simulated ones at {} field sites)", o.sites) } else { String::new() };
    println!("fleet: {} simulated devices + {} perch-agents on {} server(s){at_sites}, {} KiB bundle, {:.0}% fetched per device",
        o.devices, o.agents, o.servers, o.bundle_kib, o.chunk_share * 100.0);
    println!(
        "enrollment (fleet live):  {:.0} devices/s ({} in {:.1} s)",
        late["per_second"].as_f64().unwrap_or(0.0),
        late["enrolled"],
        late["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "propagation:              p50 {} ms, p99 {} ms, max {} ms over {} devices; all committed in {converged_s:.1} s",
        percentile(&latencies, 0.5), percentile(&latencies, 0.99), latencies.last().copied().unwrap_or(0), latencies.len()
    );
    println!(
        "perch status --json:      {:.2} s, {:.2} s CPU, {} MiB peak ({listed} devices)",
        status.wall,
        status.cpu,
        status.rss_kib / 1024
    );
    println!(
        "perch status (table):     {:.2} s, {:.2} s CPU, {} MiB peak",
        table.wall,
        table.cpu,
        table.rss_kib / 1024
    );
    println!(
        "perch status --device:    {:.2} s, {:.2} s CPU, {} MiB peak ({DEVICE_REPORTS} stored reports)",
        one.wall,
        one.cpu,
        one.rss_kib / 1024
    );
    println!(
        "rollout to pause:         {:.1} s wall, {:.2} s CPU of perch deploy (waves 1-2; {failing} failures)",
        deploy.wall, deploy.cpu
    );
    println!(
        "rollout resume to done:   {:.1} s wall, {:.2} s CPU of perch deploy resume (wave 3)",
        resume.wall, resume.cpu
    );
    // The driver looks at the fleet every 2 s.
    let steps = ((deploy.wall + resume.wall) / 2.0).max(1.0);
    println!(
        "  controller per step:    {:.2} s CPU (one read of the whole fleet, every 2 s)",
        (deploy.cpu + resume.cpu) / steps
    );
    println!("  waves (from creation):  {}", waves.join("; "));
    for (n, rss, cpu) in &servers_after {
        println!("{n:<26}{} MiB RSS, {cpu:.1} s CPU over the bench", rss / 1024);
    }
    println!("fleet-sim processes:      {} MiB RSS, {:.1} s CPU", sim_usage.0 / 1024, sim_usage.1);
    for s in streams.as_array().into_iter().flatten() {
        println!(
            "{:<26}{} messages, {} MiB",
            s["stream"].as_str().unwrap_or("?"),
            s["messages"],
            s["bytes"].as_u64().unwrap_or(0) >> 20
        );
    }
    let summary = serde_json::json!({
        "devices": o.devices, "agents": o.agents, "servers": o.servers, "sites": o.sites,
        "propagation_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99), "max": latencies.last()},
        "status_s": status.wall, "status_mib": status.rss_kib / 1024,
        "status_device_s": one.wall, "status_device_mib": one.rss_kib / 1024,
        "rollout_pause_s": deploy.wall, "rollout_pause_cpu_s": deploy.cpu,
        "rollout_resume_s": resume.wall, "rollout_resume_cpu_s": resume.cpu, "waves": waves,
        "propagation_installing_ms": {"p50": percentile(&installing, 0.5), "p99": percentile(&installing, 0.99), "max": installing.last()},
        "converged_s": converged_s,
        "enroll_per_s": late["per_second"],
    });
    fs::write(dir.join("summary.json"), summary.to_string())?;
    println!("{summary}");
    Ok(())
}

/// K real agents (dir slots) in the fleet's group, running.
fn real_agents(dir: &Path, bin: &Path, fleet: &mut LocalFleet, k: usize) -> Result<Vec<String>> {
    let quiet = |program: &str, args: &[&str]| crate::util::run_in(dir, &bin.join(program), args);
    let mut names = vec![];
    for i in 1..=k {
        let name = format!("agent-{i}");
        let d = dir.join(&name);
        fs::create_dir_all(d.join("slots"))?;
        fs::copy(dir.join("org/trust.doc"), d.join("trust.doc"))?;
        fs::write(
            d.join("agent.toml"),
            format!(
                "target = \"bench\"\ntrust = \"{}\"\n[device]\nid = \"{name}\"\n[slots]\nbackend = \"dir\"\nroot = \"{}\"\n",
                d.join("trust.doc").display(),
                d.join("slots").display()
            ),
        )?;
        let (config, state) = (format!("{name}/agent.toml"), format!("{name}/state"));
        quiet(
            "perch-agent",
            &["--config", &config, "--state-dir", &state, "enroll", "--token-file", "fleet.token"],
        )?;
        let child = Command::new(bin.join("perch-agent"))
            .args(["--config", &config, "--state-dir", &state, "run"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join(format!("{name}.log")))?)
            .spawn()?;
        fleet.adopt(&name, child);
        names.push(name);
    }
    Ok(names)
}
