//! `cargo xtask bench smoke`: every benchmark at a small size, so that CI
//! notices when one stops finishing (as `bench link` did when the filled
//! outbox outgrew the telemetry budget). The numbers are not the point; a
//! bench that ends with a result or a reason is. So the benches run the
//! debug builds the tests made (`util::use_smoke_builds`), not release.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::util::step;

/// Each bench with its small size.
const BENCHES: &[(&str, &[&str])] = &[
    ("verify", &["--size-mib", "8"]),
    ("install", &["--size-mib", "8"]),
    ("enroll", &["--devices", "50"]),
    ("link", &["--records", "2000", "--bundle-mib", "4"]),
    ("cluster", &["--records", "2000", "--devices", "50"]),
    ("footprint", &["--seconds", "5"]),
    ("site", &["--drones", "3", "--bundle-mib", "8"]),
    ("fleet", &["--devices", "200", "--servers", "1", "--agents", "1", "--bundle-kib", "256"]),
    ("delta", &["--image-mib", "32"]),
];

pub fn run() -> Result<()> {
    let started = Instant::now();
    crate::util::use_smoke_builds();
    let mut took: Vec<(&str, Duration)> = vec![];
    for (name, size) in BENCHES {
        step(&format!("bench smoke: {name} {}", size.join(" ")));
        let t = Instant::now();
        let mut args = vec![name.to_string()];
        args.extend(size.iter().map(|s| s.to_string()));
        crate::bench::run(&args).with_context(|| format!("bench smoke: bench {name} failed"))?;
        took.push((name, t.elapsed()));
    }
    for (name, d) in &took {
        println!("bench {name:<10} {:>6.1} s", d.as_secs_f64());
    }
    step(&format!("bench smoke: every bench finished in {:.0?}", started.elapsed()));
    Ok(())
}
