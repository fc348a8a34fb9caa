//! The Bundles page: the published catalog (`PERCH_BUNDLES`), newest
//! first, with who signed each bundle, the threshold it met, the device
//! classes it is for, its size and when devices stop accepting it.

use maud::{html, Markup};

use super::html::{bytes, when};
use crate::catalog::Published;

pub fn body(catalog: &[Published], now: u64) -> Markup {
    html! {
        @if catalog.is_empty() {
            p.empty { "No bundle is published yet. " code { "perch publish --trust TRUST BUNDLE" } " adds one." }
        } @else {
            div.scroll { table.bundles #bundles {
                thead { tr {
                    th { "Bundle" } th { "Version" } th { "Kind" } th { "Targets" } th { "Size" }
                    th { "Signed by" } th { "Expires" } th { "Published" } th { "Digest" }
                } }
                tbody {
                    @for p in catalog.iter().rev() {
                        tr data-bundle=(format!("{}@{}", p.name, p.counter)) {
                            td { (p.name) "@" (p.counter) }
                            td { (p.version) }
                            td { (if p.kind.is_empty() { "—" } else { p.kind.as_str() }) }
                            td { (if p.targets.is_empty() { "—".to_string() } else { p.targets.join(", ") }) }
                            td {
                                (bytes(p.payload_len))
                                @if p.stored_len > 0 && p.stored_len != p.payload_len {
                                    " (" (bytes(p.stored_len)) " sent)"
                                }
                                " · " (p.chunks) " chunks"
                            }
                            td {
                                @if p.signers.is_empty() { "not recorded" } @else {
                                    (p.signers.len()) " of threshold " (p.threshold) ": "
                                    @for (i, k) in p.signers.iter().enumerate() {
                                        @if i > 0 { ", " }
                                        code title=(k) { (k.get(..16).unwrap_or(k)) }
                                    }
                                }
                            }
                            td {
                                @match p.expires_at {
                                    Some(t) if t <= now => { span.badge.stale { "expired" } " " (when(t)) }
                                    Some(t) => { (when(t)) }
                                    None => { "never" }
                                }
                            }
                            td { (when(p.published_at)) }
                            td { code title=(p.digest) { (p.digest.get(..16).unwrap_or(&p.digest)) } }
                        }
                    }
                }
            } }
        }
    }
}
