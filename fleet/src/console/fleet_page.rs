//! The Fleet page: every device, filtered, sorted and paged (100 rows a
//! page, so 10,000 devices are 100 pages, and a page is rendered from the
//! live picture, not read from NATS). The script keeps the rows on screen
//! current: an event names a device, and only the rows on the page are
//! fetched again (`/fleet/rows`).

use std::collections::BTreeSet;

use maud::{html, Markup};
use serde::Deserialize;

use super::html::{ago, bytes};
use crate::view::{DeviceView, Liveness};

/// Rows on a page.
pub const PAGE: usize = 100;

/// The page's query: filters, order, page.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Query {
    /// Part of a device id.
    pub q: String,
    pub group: String,
    pub site: String,
    /// online, stale or silent.
    pub link: String,
    /// A deploy state (staging, trial, committed, failed, ...), or a
    /// registry status (pending, approved, revoked...).
    pub state: String,
    pub sort: String,
    /// "1": descending.
    pub desc: String,
    /// From 1.
    pub page: usize,
}

/// The columns one can sort by, with their headings.
const COLUMNS: [(&str, &str); 8] = [
    ("id", "Device"),
    ("site", "Site"),
    ("registry", "Registry"),
    ("link", "Link"),
    ("slot", "Running"),
    ("state", "Deploy"),
    ("transfer", "Reused / fetched"),
    ("seen", "Last seen"),
];

pub fn matches(d: &DeviceView, q: &Query) -> bool {
    (q.q.is_empty() || d.id.contains(q.q.as_str()))
        && (q.group.is_empty() || d.groups.contains(&q.group))
        && (q.site.is_empty() || d.site.as_deref().unwrap_or("hub") == q.site)
        && (q.link.is_empty() || d.liveness.to_string() == q.link)
        && (q.state.is_empty()
            || d.last_deploy.as_ref().is_some_and(|l| l.state == q.state)
            || d.journal_state.as_deref() == Some(q.state.as_str())
            || d.registry.as_deref() == Some(q.state.as_str()))
}

pub fn sort(devices: &mut [DeviceView], q: &Query) {
    let link_rank = |l: Liveness| match l {
        Liveness::Online => 0,
        Liveness::Stale => 1,
        Liveness::Silent => 2,
    };
    match q.sort.as_str() {
        "site" => devices.sort_by(|a, b| a.site.cmp(&b.site)),
        "registry" => devices.sort_by(|a, b| a.registry.cmp(&b.registry)),
        "link" => devices.sort_by_key(|d| link_rank(d.liveness)),
        "slot" => devices.sort_by(|a, b| {
            (a.running_slot.as_deref(), a.running_bundle.as_ref().map(|b| (&b.name, b.counter)))
                .cmp(&(b.running_slot.as_deref(), b.running_bundle.as_ref().map(|b| (&b.name, b.counter))))
        }),
        "state" => devices.sort_by(|a, b| {
            a.last_deploy.as_ref().map(|d| &d.state).cmp(&b.last_deploy.as_ref().map(|d| &d.state))
        }),
        "transfer" => devices.sort_by_key(|d| d.transfer.as_ref().map(|t| t.fetched_bytes)),
        "seen" => devices.sort_by_key(|d| d.last_seen),
        // Stable sorts on a list sorted by id: ties stay in id order.
        _ => {}
    }
    if q.desc == "1" {
        devices.reverse();
    }
}

/// The page's body (the frame is added by the caller).
pub fn body(all: Vec<DeviceView>, q: &Query, now: u64) -> Markup {
    let groups: BTreeSet<&str> = all.iter().flat_map(|d| d.groups.iter().map(String::as_str)).collect();
    let sites: BTreeSet<&str> = all.iter().map(|d| d.site.as_deref().unwrap_or("hub")).collect();
    let states: BTreeSet<&str> = all
        .iter()
        .flat_map(|d| {
            d.last_deploy.as_ref().map(|l| l.state.as_str()).into_iter().chain(d.registry.as_deref())
        })
        .collect();
    let mut shown: Vec<DeviceView> = all.iter().filter(|d| matches(d, q)).cloned().collect();
    sort(&mut shown, q);
    let pages = shown.len().div_ceil(PAGE).max(1);
    let page = q.page.clamp(1, pages);
    let rows = &shown[(page - 1) * PAGE..(page * PAGE).min(shown.len())];
    let select = |name: &str, label: &str, options: &BTreeSet<&str>, current: &str| {
        html! {
            label { (label) " "
                select name=(name) {
                    option value="" { "any" }
                    @for o in options { option value=(o) selected[*o == current] { (o) } }
                }
            }
        }
    };
    let links: BTreeSet<&str> = ["online", "stale", "silent"].into_iter().collect();
    html! {
        (summary(&all))
        p.newer #newer hidden { a href="" { "Devices came or changed off this page: reload" } }
        form.filters method="get" action="/" {
            label { "Device " input type="search" name="q" value=(q.q) placeholder="id contains"; }
            (select("group", "Group", &groups, &q.group))
            (select("site", "Site", &sites, &q.site))
            (select("link", "Link", &links, &q.link))
            (select("state", "State", &states, &q.state))
            input type="hidden" name="sort" value=(q.sort);
            input type="hidden" name="desc" value=(q.desc);
            button type="submit" { "Filter" }
        }
        div.scroll {
            table.fleet #fleet {
                thead { tr {
                    @for (key, label) in COLUMNS {
                        th { a href=(sort_link(q, key)) { (label) (arrow(q, key)) } }
                    }
                } }
                tbody {
                    @for d in rows { (row(d, now)) }
                }
            }
        }
        @if shown.is_empty() { p.empty { "No device matches." } }
        nav.pager {
            span { (shown.len()) " shown · page " (page) " of " (pages) }
            @if page > 1 { " " a rel="prev" href=(page_link(q, page - 1)) { "← previous" } }
            @if page < pages { " " a rel="next" href=(page_link(q, page + 1)) { "next →" } }
        }
    }
}

/// How many devices, and how many of them are heard from (the script
/// fetches it again as devices report: `/fleet/summary`).
pub fn summary(all: &[DeviceView]) -> Markup {
    let count = |l: Liveness| all.iter().filter(|d| d.liveness == l).count();
    html! {
        p.summary #summary {
            (all.len()) " devices: "
            span.badge.online { (count(Liveness::Online)) " online" } " "
            span.badge.stale { (count(Liveness::Stale)) " stale" } " "
            span.badge.silent { (count(Liveness::Silent)) " silent" }
        }
    }
}

/// One device's row; `data-device` is how the script finds it.
pub fn row(d: &DeviceView, now: u64) -> Markup {
    let link = d.liveness.to_string();
    html! {
        tr data-device=(d.id) {
            td { a href=(format!("/device/{}", d.id)) { (d.id) } }
            td { (d.site.as_deref().unwrap_or("hub")) }
            td { (d.registry.as_deref().unwrap_or("—")) }
            td { span class=(format!("badge {link}")) { (link) } }
            td {
                @if let Some(slot) = &d.running_slot { (slot) }
                @if let Some(b) = &d.running_bundle { " · " (b.name) "@" (b.counter) " (" (b.version) ")" }
                @if d.running_slot.is_none() && d.running_bundle.is_none() { "—" }
            }
            td.deploy {
                @match &d.last_deploy {
                    Some(l) => {
                        span class=(format!("state {}", l.state)) { (l.state) }
                        @if let Some(r) = &l.reason { " " span.reason { (r) } }
                    }
                    None => { (d.journal_state.as_deref().unwrap_or("—")) }
                }
                @if let Some((done, of)) = d.progress {
                    " " progress max=(of) value=(done) { (done) "/" (of) }
                }
            }
            td {
                @match &d.transfer {
                    Some(t) => { (bytes(t.reused_bytes)) " / " (bytes(t.fetched_bytes)) }
                    None => { "—" }
                }
            }
            td { @match d.last_seen { Some(t) => { (ago(now, t)) }, None => { "never" } } }
        }
    }
}

fn sort_link(q: &Query, key: &str) -> String {
    let current = if q.sort.is_empty() { "id" } else { q.sort.as_str() };
    let desc = if current == key && q.desc != "1" { "1" } else { "" };
    link(q, key, desc, 1)
}

fn page_link(q: &Query, page: usize) -> String {
    link(q, &q.sort, &q.desc, page)
}

fn arrow(q: &Query, key: &str) -> &'static str {
    match (q.sort == key || (q.sort.is_empty() && key == "id"), q.desc == "1") {
        (true, false) => " ▲",
        (true, true) => " ▼",
        _ => "",
    }
}

fn link(q: &Query, sort: &str, desc: &str, page: usize) -> String {
    let mut s = form_urlencoded_pairs(&[
        ("q", &q.q),
        ("group", &q.group),
        ("site", &q.site),
        ("link", &q.link),
        ("state", &q.state),
        ("sort", sort),
        ("desc", desc),
    ]);
    if page > 1 {
        s.push_str(&format!("&page={page}"));
    }
    format!("/?{s}")
}

/// `k=v&...` of the non-empty pairs, percent-encoded.
fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{empty, DeployReport};

    fn device(id: &str, state: &str, reason: &str) -> DeviceView {
        let mut d = empty(id);
        d.groups = vec!["drones".into()];
        d.last_deploy = Some(DeployReport {
            state: state.into(),
            reason: Some(reason.into()),
            bundle: None,
            at_seq: 1,
            stored_seq: 1,
        });
        d
    }

    #[test]
    fn a_reason_holding_markup_is_shown_as_text() {
        let d = device("d1", "failed", "<script>alert('x')</script>");
        let out = row(&d, 0).into_string();
        assert!(!out.contains("<script>"), "{out}");
        assert!(out.contains("&lt;script&gt;alert('x')&lt;/script&gt;"), "{out}");
    }

    #[test]
    fn ten_thousand_devices_are_filtered_sorted_and_paged() {
        let all: Vec<DeviceView> = (0..10_000)
            .map(|i| device(&format!("d{i:05}"), if i % 10 == 0 { "failed" } else { "committed" }, "r"))
            .collect();
        let q = Query {
            state: "failed".into(),
            sort: "id".into(),
            desc: "1".into(),
            page: 3,
            ..Query::default()
        };
        let out = body(all, &q, 0).into_string();
        assert_eq!(out.matches("<tr data-device").count(), PAGE);
        assert!(out.contains("1000 shown · page 3 of 10"), "{out}");
        // Descending: page 3 starts at the 201st from the end.
        assert!(out.contains("data-device=\"d07990\""), "{out}");
        assert!(!out.contains("data-device=\"d07991\""));
    }

    #[test]
    fn links_keep_the_filters_and_encode_them() {
        let q = Query { q: "a b&c".into(), group: "g".into(), ..Query::default() };
        assert_eq!(page_link(&q, 2), "/?q=a%20b%26c&group=g&page=2");
        assert_eq!(sort_link(&q, "seen"), "/?q=a%20b%26c&group=g&sort=seen");
    }
}
