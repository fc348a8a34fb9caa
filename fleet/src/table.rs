//! The fleet view as a compact terminal table (what `perch status` and
//! `perch status --watch` print).

use std::fmt::Write;

use crate::rollout::{self, Outcome, Rollout, State};
use crate::view::{Accounting, DeviceView, FleetView, Liveness, SiteView, TransferReport};

/// A Unix time as RFC 3339 (`2026-12-01T04:12:47Z`), or `after
/// 9999-12-31T23:59:59Z` for one the format cannot show: a signed bundle
/// may say it expires in the year 500 billion, and that must print, not
/// panic.
pub fn rfc3339(unix: u64) -> String {
    let at = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(unix));
    let mut out = String::new();
    match at.map(|at| write!(out, "{}", humantime::format_rfc3339_seconds(at))) {
        Some(Ok(())) => out,
        _ => "after 9999-12-31T23:59:59Z".into(),
    }
}

/// `text` cut to about `max` characters, keeping its start and its end
/// (where a failure usually says what went wrong).
pub fn shorten(text: &str, max: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= max {
        return text.to_string();
    }
    let head: String = chars[..max / 3].iter().collect();
    let tail: String = chars[chars.len() - (max - max / 3 - 1)..].iter().collect();
    format!("{head}…{tail}")
}

/// A duration in its largest whole unit: `42s`, `7m`, `3h`, `2d`.
pub fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn link(v: &DeviceView, now: u64) -> String {
    let state = match (v.liveness, v.last_seen) {
        (Liveness::Online, Some(t)) => format!("online {}", age(now.saturating_sub(t))),
        // Loud on purpose: a silent device must not read as a healthy one.
        (Liveness::Stale, Some(t)) => format!("STALE {}", age(now.saturating_sub(t))),
        _ => "silent".into(),
    };
    match &v.site {
        Some(site) => format!("{state} @{site}"),
        None => state,
    }
}

fn running(v: &DeviceView) -> String {
    match (&v.running_slot, &v.running_bundle) {
        (Some(s), Some(b)) => format!("{s}: {}#{}", b.name, b.counter),
        (Some(s), None) => format!("{s}: -"),
        _ => "-".into(),
    }
}

fn deploy(v: &DeviceView) -> String {
    let mut out = v.journal_state.clone().unwrap_or_else(|| "-".into());
    if let Some((done, count)) = v.progress {
        let _ = write!(out, " {done}/{count}");
    }
    if let Some(d) = &v.last_deploy {
        if Some(&d.state) != v.journal_state.as_ref() {
            let _ = write!(out, " (last: {}", d.state);
            if let Some(r) = &d.reason {
                let _ = write!(out, ": {}", shorten(r, 60));
            }
            out.push(')');
        } else if let Some(r) = &d.reason {
            let _ = write!(out, ": {}", shorten(r, 60));
        }
    }
    out
}

fn transfer(t: &TransferReport) -> String {
    format!(
        "bundle {}: {} reused from the device ({} chunks), {} fetched ({} chunks)",
        &t.bundle[..t.bundle.len().min(16)],
        perch_support::mib(t.reused_bytes),
        t.reused_chunks,
        perch_support::mib(t.fetched_bytes),
        t.fetched_chunks
    )
}

fn accounting(a: &Accounting) -> String {
    let mut out = format!("{} stored, seq {}..{}", a.stored, a.first, a.last);
    if a.dropped > 0 {
        let _ = write!(out, ", {} telemetry dropped over budget (reported)", a.dropped);
    }
    if a.exact() {
        out.push_str(": each once, no gaps");
    } else {
        if a.duplicates > 0 {
            let _ = write!(out, ", {} stored twice", a.duplicates);
        }
        for (x, y) in &a.gaps {
            let _ = write!(out, ", missing {x}..{y}");
        }
    }
    if a.earlier > 0 {
        let _ = write!(out, " (and {} from before its state was wiped)", a.earlier);
    }
    out
}

/// The whole table, one line per device (and the report account, if read).
pub fn render(view: &FleetView) -> String {
    let rows: Vec<[String; 5]> = view
        .devices
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.registry.clone().unwrap_or_else(|| "?".into()),
                link(v, view.now),
                running(v),
                deploy(v),
            ]
        })
        .collect();
    let head = ["DEVICE", "REGISTRY", "LINK", "RUNNING", "DEPLOY"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 5]| {
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                let _ = writeln!(out, "{c}");
            } else {
                let _ = write!(out, "{c:<w$}  ", w = width[i]);
            }
        }
    };
    line(&mut out, head);
    for (r, v) in rows.iter().zip(&view.devices) {
        line(&mut out, [&r[0], &r[1], &r[2], &r[3], &r[4]]);
        if let Some(a) = &v.reports {
            let _ = writeln!(out, "  reports: {}", accounting(a));
            if let Some(t) = &v.transfer {
                let _ = writeln!(out, "  last staging: {}", transfer(t));
            }
        }
    }
    if view.devices.is_empty() {
        out.push_str("(no devices: none enrolled, none reporting)\n");
    }
    for s in &view.sites {
        let _ = writeln!(out, "{}", site_line(s, &view.devices));
    }
    out
}

/// One field site: its devices and how fresh the hub's view of it is.
fn site_line(s: &SiteView, devices: &[DeviceView]) -> String {
    let n = devices.iter().filter(|d| d.site.as_deref() == Some(&s.name)).count();
    let heard = match s.last_heard_secs {
        Some(t) => format!("last heard {} ago", crate::table::age(t)),
        None => "never heard from".into(),
    };
    let lag = if s.lag > 0 { format!(", {} reports still to come", s.lag) } else { String::new() };
    format!("site {}: {n} devices reporting through it; {heard}{lag}", s.name)
}

/// A rollout and each wave's progress, a few lines.
pub fn render_rollout(r: &Rollout, view: &FleetView) -> String {
    let mut out = format!(
        "rollout {}: {}@{} to {}, {}",
        r.id,
        r.release.name,
        r.release.counter,
        r.scope,
        r.state.name()
    );
    if let State::Paused { reason } = &r.state {
        let _ = write!(out, " ({reason})");
    }
    out.push('\n');
    for (i, w) in r.waves.iter().enumerate() {
        let _ = write!(out, "  wave {} ({:>3}%) {:>4} devices: ", i + 1, w.percent, r.wave_devices(i).len());
        if w.started_at.is_none() {
            out.push_str("not started\n");
            continue;
        }
        let outcomes = rollout::wave_outcomes(r, i, view);
        let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| f(o)).count();
        let committed = count(|o| *o == Outcome::Committed);
        let failed = count(|o| matches!(o, Outcome::Failed { .. }));
        let pending = outcomes.len() - committed - failed;
        let _ = write!(out, "{committed} committed, {failed} failed, {pending} pending");
        let failures: Vec<String> = outcomes
            .iter()
            .filter_map(|(id, o)| match o {
                Outcome::Failed { reason } => Some(format!("{id}: {}", shorten(reason, 60))),
                _ => None,
            })
            .collect();
        // A few by name: a wave of thousands can fail by the hundred.
        const NAMED: usize = 5;
        if !failures.is_empty() {
            let _ = write!(out, " [{}", failures[..failures.len().min(NAMED)].join("; "));
            if failures.len() > NAMED {
                let _ = write!(out, "; and {} more: `perch status --json`", failures.len() - NAMED);
            }
            out.push(']');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{build, Stored};
    use perch_protocol::report::{Report, ReportKind};

    #[test]
    fn a_table_says_what_each_device_does() {
        let r = |seq, state: &str, kind| Stored {
            report: Report {
                device: "drone-1".into(),
                epoch: 1,
                seq,
                boot_id: "b".into(),
                agent_version: "0.1.0".into(),
                at: 0,
                running_slot: Some("a".into()),
                running_bundle: None,
                journal_state: state.into(),
                kind,
            },
            stored_at: 100,
            stream_seq: seq,
            site: None,
        };
        let reasons = ReportKind::Deploy {
            state: "rolled_back".into(),
            reason: Some("health check failed".into()),
            bundle: None,
        };
        let v = build(&[], vec![r(1, "idle", ReportKind::Heartbeat), r(2, "idle", reasons)], 130, 60, true);
        let t = render(&v);
        assert!(t.starts_with("DEVICE"), "{t}");
        assert!(t.contains("drone-1"), "{t}");
        assert!(t.contains("online 30s"), "{t}");
        assert!(t.contains("idle (last: rolled_back: health check failed)"), "{t}");
        assert!(t.contains("2 stored, seq 1..2: each once, no gaps"), "{t}");
        let stale = build(&[], vec![r(1, "idle", ReportKind::Heartbeat)], 100 + 600, 60, false);
        assert!(render(&stale).contains("STALE 10m"));
        assert_eq!(age(59), "59s");
        assert_eq!(shorten("abcdefghij", 10), "abcdefghij");
        assert_eq!(
            shorten("health: command `sh /very/long/path/check` exited 1", 24),
            "health: …check` exited 1"
        );
        assert_eq!(age(3 * 86_400), "3d");
    }

    #[test]
    fn a_device_shows_the_site_it_reports_through_and_the_site_its_freshness() {
        let report = Report {
            device: "drone-2".into(),
            epoch: 1,
            seq: 1,
            boot_id: "b".into(),
            agent_version: "0.1.0".into(),
            at: 0,
            running_slot: None,
            running_bundle: None,
            journal_state: "idle".into(),
            kind: ReportKind::Heartbeat,
        };
        let mut v = build(
            &[],
            vec![Stored { report, stored_at: 100, stream_seq: 1, site: Some("ridge".into()) }],
            105,
            60,
            false,
        );
        v.sites = vec![
            SiteView { name: "ridge".into(), last_heard_secs: Some(300), lag: 12 },
            SiteView { name: "quarry".into(), last_heard_secs: None, lag: 0 },
        ];
        let t = render(&v);
        assert!(t.contains("online 5s @ridge"), "{t}");
        assert!(
            t.contains(
                "site ridge: 1 devices reporting through it; last heard 5m ago, 12 reports still to come"
            ),
            "{t}"
        );
        assert!(t.contains("site quarry: 0 devices reporting through it; never heard from"), "{t}");
    }
}
