//! The frame every page shares, and small pieces of markup. Every string
//! goes through maud's escaping (device ids, reasons, names): nothing a
//! device or a record says is ever markup.

use maud::{html, Markup, DOCTYPE};

use super::auth::Session;

/// The console's pages, for the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Rollouts,
    Enrollment,
    Bundles,
    None,
}

/// Whose credentials the console acts with, shown on every page.
#[derive(Debug, Clone)]
pub struct Who {
    /// The NATS user's name (from its JWT), or the creds file's name.
    pub user: String,
    pub creds: String,
    pub urls: String,
    /// The org directory, if the console may revoke and issue tokens.
    pub org: Option<String>,
}

/// A whole page.
pub fn page(title: &str, nav: Nav, who: &Who, s: &Session, note: Option<&Note>, body: Markup) -> Markup {
    let link = |n: Nav, href: &str, label: &str| {
        html! { a href=(href) aria-current=[(n == nav).then_some("page")] { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf" content=(s.csrf);
                title { (title) " · perch console" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    span.brand { "perch" }
                    nav {
                        (link(Nav::Fleet, "/", "Fleet"))
                        (link(Nav::Rollouts, "/rollouts", "Rollouts"))
                        (link(Nav::Enrollment, "/enrollment", "Enrollment"))
                        (link(Nav::Bundles, "/bundles", "Bundles"))
                    }
                    span #live.live title="live updates" { "connecting" }
                    form.logout method="post" action="/logout" {
                        (csrf(s))
                        button type="submit" { "Log out" }
                    }
                }
                p.who {
                    "Acting as " strong #who { (who.user) } " (" (who.creds) ") on " (who.urls)
                    @if let Some(org) = &who.org { " · org keys from " (org) }
                }
                main {
                    h1 { (title) }
                    @if let Some(n) = note { (n.render()) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field every form carries.
pub fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf); }
}

/// A one-button form that POSTs to `action`, asking `confirm` first (the
/// script asks; see console.js).
pub fn button(s: &Session, action: &str, label: &str, confirm: Option<&str>, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) data-confirm=[confirm] {
            (csrf(s))
            button type="submit" class=(class) { (label) }
        }
    }
}

/// What an action did, or why it failed, shown above a page.
#[derive(Debug, Clone)]
pub enum Note {
    Done(String),
    Failed(String),
}

impl Note {
    fn render(&self) -> Markup {
        match self {
            Note::Done(m) => html! { p.note.ok role="status" { (m) } },
            Note::Failed(m) => html! { p.note.err role="alert" { (m) } },
        }
    }
}

/// "12 s ago", "3 min ago"...
pub fn ago(now: u64, t: u64) -> String {
    let d = now.saturating_sub(t);
    match d {
        0..=119 => format!("{d} s ago"),
        120..=7199 => format!("{} min ago", d / 60),
        7200..=172_799 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

/// Bytes as B, kB, MB, GB (powers of 1000).
pub fn bytes(n: u64) -> String {
    match n {
        0..=999 => format!("{n} B"),
        1_000..=999_999 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// A UTC date and time, to the second (humantime's RFC 3339, as `perch
/// bundle inspect` prints, with a space and "UTC" for people); a time past
/// the year 9999, which it cannot write, as that bound.
pub fn when(t: u64) -> String {
    match crate::table::rfc3339(t) {
        s if s.starts_with("after") => "after 9999-12-31 UTC".into(),
        s => s.replacen('T', " ", 1).replacen('Z', " UTC", 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_as_people_say_them() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(1_764_547_200), "2025-12-01 00:00:00 UTC");
        assert_eq!(when(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(when(u64::MAX), "after 9999-12-31 UTC");
        assert_eq!(ago(100, 95), "5 s ago");
        assert_eq!(ago(10_000, 0), "2 h ago");
        assert_eq!(bytes(1_500_000), "1.5 MB");
    }

    #[test]
    fn a_string_from_a_device_is_text_never_markup() {
        let s = Session { csrf: "c".into() };
        let m = button(&s, "/x", "<script>alert(1)</script>", Some("\"><img src=x onerror=alert(1)>"), "b");
        let out = m.into_string();
        assert!(!out.contains("<script>") && !out.contains("<img"), "{out}");
        assert!(out.contains("&lt;script&gt;"), "{out}");
    }
}
