//! The Device page: what one device is and runs, its deploy timeline, and
//! every report it stored with the exactly-once accounting `perch status
//! --device` prints. Read from `PERCH_REPORTS` when shown (one device's
//! reports), and again when the device changes.

use maud::{html, Markup};
use perch_protocol::report::ReportKind;

use super::auth::Session;
use super::html::{ago, button, bytes, when};
use crate::view::{DeviceView, Stored};

/// The newest reports listed; the accounting covers them all.
const LISTED: usize = 200;

pub struct Shown<'a> {
    pub view: &'a DeviceView,
    /// Its reports in stream order.
    pub reports: &'a [Stored],
    pub refused: &'a [String],
    pub now: u64,
    /// Revoke is offered only with the org's keys.
    pub can_revoke: bool,
}

pub fn body(s: &Session, d: &Shown<'_>) -> Markup {
    let v = d.view;
    let id = &v.id;
    let pending = v.registry.as_deref() == Some("pending");
    html! {
        div #device-body data-device=(id) {
            dl.facts {
                dt { "Registry" } dd { (v.registry.as_deref().unwrap_or("not in the registry")) }
                dt { "Groups" } dd { @if v.groups.is_empty() { "—" } @else { (v.groups.join(", ")) } }
                dt { "Link" } dd { span class=(format!("badge {}", v.liveness)) { (v.liveness.to_string()) }
                    @if let Some(t) = v.last_seen { " · last report stored " (ago(d.now, t)) } }
                dt { "Site" } dd { (v.site.as_deref().unwrap_or("hub")) }
                dt { "Running" } dd {
                    (v.running_slot.as_deref().unwrap_or("—"))
                    @if let Some(b) = &v.running_bundle { " · " (b.name) "@" (b.counter) " (" (b.version) ") " code { (hex::encode(&b.digest[..8])) } }
                }
                dt { "Journal" } dd { (v.journal_state.as_deref().unwrap_or("—")) }
                dt { "Last deploy" } dd {
                    @match &v.last_deploy {
                        Some(l) => { span class=(format!("state {}", l.state)) { (l.state) }
                            @if let Some(r) = &l.reason { " " span.reason { (r) } } }
                        None => { "—" }
                    }
                }
                @if let Some(t) = &v.transfer {
                    dt { "Last transfer" } dd {
                        (bytes(t.reused_bytes)) " reused (" (t.reused_chunks) " chunks), "
                        (bytes(t.fetched_bytes)) " fetched (" (t.fetched_chunks) " chunks)"
                    }
                }
                dt { "Agent" } dd { (v.agent_version.as_deref().unwrap_or("—")) " · boot " (v.boot_id.as_deref().unwrap_or("—")) }
            }
            div.actions {
                @if pending {
                    (button(s, &format!("/enrollment/{id}/approve"), "Approve", None, "primary"))
                    (button(s, &format!("/enrollment/{id}/reject"), "Reject", Some(&format!("Reject {id}?")), ""))
                }
                @if d.can_revoke && v.registry.as_deref().is_some_and(|r| r != "revoked") {
                    (button(s, &format!("/enrollment/{id}/revoke"), "Revoke",
                        Some(&format!("Revoke {id}? The server cuts it off at once and refuses it from then on.")), "danger"))
                }
            }
            h2 { "Deploy timeline" }
            (timeline(d))
            h2 { "Reports" }
            (accounting(v))
            @if !d.refused.is_empty() {
                p.note.err { (d.refused.len()) " stored message(s) on this device's subjects were refused: "
                    (d.refused.iter().take(3).cloned().collect::<Vec<_>>().join("; ")) }
            }
            div.scroll { table.reports {
                thead { tr { th { "Seq" } th { "Stored" } th { "Report" } th { "Journal" } th { "Slot" } } }
                tbody {
                    @for r in d.reports.iter().rev().take(LISTED) {
                        tr {
                            td { (r.report.seq) }
                            td { (when(r.stored_at)) }
                            td { (kind(&r.report.kind)) }
                            td { (r.report.journal_state) }
                            td { (r.report.running_slot.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            } }
            @if d.reports.len() > LISTED { p { "The newest " (LISTED) " of " (d.reports.len()) " are listed." } }
        }
    }
}

fn accounting(v: &DeviceView) -> Markup {
    let Some(a) = &v.reports else { return html! {} };
    let gaps: Vec<String> =
        a.gaps.iter().map(|(x, y)| if x == y { x.to_string() } else { format!("{x}–{y}") }).collect();
    html! {
        p.accounting #accounting {
            @if a.exact() { span.badge.online { "exactly once" } } @else { span.badge.stale { "not exact" } }
            " " (a.stored) " stored, " (a.distinct) " distinct, seq " (a.first) "–" (a.last)
            ", " (a.duplicates) " duplicate(s), " (a.dropped) " dropped by the device"
            @if a.earlier > 0 { ", " (a.earlier) " from an earlier epoch" }
            @if !gaps.is_empty() { ", missing: " (gaps.join(", ")) }
        }
    }
}

/// The deploy reports of the current epoch, a run of progress reports
/// shown as its last.
fn timeline(d: &Shown<'_>) -> Markup {
    let epoch = d.reports.last().map(|r| r.report.epoch);
    let mut steps: Vec<&Stored> = vec![];
    for r in d.reports.iter().filter(|r| Some(r.report.epoch) == epoch) {
        match r.report.kind {
            ReportKind::Deploy { .. } | ReportKind::Transfer { .. } => steps.push(r),
            ReportKind::Progress { .. } => {
                if steps.last().is_some_and(|p| matches!(p.report.kind, ReportKind::Progress { .. })) {
                    steps.pop();
                }
                steps.push(r);
            }
            _ => {}
        }
    }
    if steps.is_empty() {
        return html! { p.empty { "No deploy reported." } };
    }
    html! {
        ol.timeline #timeline {
            @for r in steps {
                li { span.when { (when(r.stored_at)) } " " (kind(&r.report.kind)) }
            }
        }
    }
}

fn kind(k: &ReportKind) -> Markup {
    match k {
        ReportKind::Heartbeat => html! { "heartbeat" },
        ReportKind::Deploy { state, reason, bundle } => html! {
            span class=(format!("state {state}")) { (state) }
            @if let Some(b) = bundle { " " code { (hex::encode(&b[..8])) } }
            @if let Some(r) = reason { " " span.reason { (r) } }
        },
        ReportKind::Progress { chunks_done, chunk_count } => html! {
            "staging " progress max=(chunk_count) value=(chunks_done) {} " " (chunks_done) "/" (chunk_count) " chunks"
        },
        ReportKind::Dropped { first, last, count } => html! {
            "dropped " (count) " report(s), seq " (first) "–" (last)
        },
        ReportKind::Note(n) => html! { "note: " (n) },
        ReportKind::Transfer { reused_bytes, fetched_bytes, .. } => html! {
            "transfer: " (bytes(*reused_bytes)) " reused, " (bytes(*fetched_bytes)) " fetched"
        },
    }
}
