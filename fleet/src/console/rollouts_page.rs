//! The Rollouts page: start one from the catalog, pause, resume or abort
//! one, and each wave's committed, failed and pending devices, with the
//! reasons of the failures. Rendered from the live picture; the script
//! fetches the list again (`/rollouts/body`) when a rollout or a device
//! changes.

use std::collections::BTreeSet;

use maud::{html, Markup};

use super::auth::Session;
use super::html::{button, csrf, when};
use crate::catalog::Published;
use crate::rollout::{wave_outcomes, Outcome, Rollout, State};
use crate::view::FleetView;

/// Failed devices listed per wave (the rest are counted).
const FAILED_LISTED: usize = 20;

pub fn body(s: &Session, rollouts: &[Rollout], view: &FleetView) -> Markup {
    html! {
        div #rollouts-body {
            @if rollouts.is_empty() { p.empty { "No rollout yet." } }
            @for r in rollouts.iter().rev() { (rollout(s, r, view)) }
        }
    }
}

fn rollout(s: &Session, r: &Rollout, view: &FleetView) -> Markup {
    let id = &r.id;
    html! {
        section.rollout data-rollout=(id) {
            h2 {
                (r.release.name) "@" (r.release.counter) " → " (r.scope) " "
                span class=(format!("state {}", r.state.name())) { (r.state.name()) }
            }
            p.meta {
                "Rollout " code { (id) } " · created " (when(r.created_at))
                " · pauses past " (r.max_failures.to_string()) " failure(s) per wave"
                @if r.wave_wait_secs > 0 { " · waves soak " (r.wave_wait_secs) " s" }
            }
            @if let State::Paused { reason } = &r.state { p.note.err { "Paused: " (reason) } }
            div.actions {
                @match r.state {
                    State::Running => {
                        (button(s, &format!("/rollouts/{id}/pause"), "Pause", Some(&format!("Pause rollout {id}? No new wave starts.")), ""))
                        (button(s, &format!("/rollouts/{id}/abort"), "Abort", Some(&format!("Abort rollout {id}? The devices it reached are pointed back at what they ran before.")), "danger"))
                    }
                    State::Paused { .. } => {
                        (button(s, &format!("/rollouts/{id}/resume"), "Resume", Some(&format!("Resume rollout {id}? Its failures so far are accepted.")), "primary"))
                        (button(s, &format!("/rollouts/{id}/abort"), "Abort", Some(&format!("Abort rollout {id}? The devices it reached are pointed back at what they ran before.")), "danger"))
                    }
                    State::Done | State::Aborted => {}
                }
            }
            div.scroll { table.waves {
                thead { tr { th { "Wave" } th { "Devices" } th { "Committed" } th { "Failed" } th { "Pending" } th { "Started" } } }
                tbody {
                    @for (i, w) in r.waves.iter().enumerate() {
                        @let size = r.wave_devices(i).len();
                        @if w.started_at.is_some() {
                            @let outcomes = wave_outcomes(r, i, view);
                            @let committed = outcomes.iter().filter(|(_, o)| *o == Outcome::Committed).count();
                            @let failed: Vec<(&String, &str)> = outcomes.iter().filter_map(|(d, o)| match o {
                                Outcome::Failed { reason } => Some((d, reason.as_str())), _ => None }).collect();
                            tr data-wave=(i) {
                                td { (i + 1) " (" (w.percent) "%)" }
                                td { (size) }
                                td.committed { (committed) }
                                td.failed {
                                    (failed.len())
                                    @if !failed.is_empty() {
                                        ul.reasons { @for (d, why) in failed.iter().take(FAILED_LISTED) {
                                            li { a href=(format!("/device/{d}")) { (d) } ": " span.reason { (why) } }
                                        } }
                                    }
                                }
                                td.pending { (size - committed - failed.len()) }
                                td { (w.started_at.map(when).unwrap_or_default()) }
                            }
                        } @else {
                            tr data-wave=(i) {
                                td { (i + 1) " (" (w.percent) "%)" } td { (size) } td { "—" } td { "—" } td { "—" } td { "not started" }
                            }
                        }
                    }
                }
            } }
        }
    }
}

/// The form that starts a rollout.
pub fn start_form(s: &Session, catalog: &[Published], groups: &BTreeSet<String>) -> Markup {
    html! {
        details.start open {
            summary { "Start a rollout" }
            @if catalog.is_empty() {
                p.empty { "No bundle is published yet (`perch publish`)." }
            } @else {
                form.stack method="post" action="/rollouts" data-confirm="Start this rollout?" {
                    (csrf(s))
                    label { "Bundle "
                        select name="bundle" required {
                            @for p in catalog.iter().rev() {
                                option value=(format!("{}@{}", p.name, p.counter)) {
                                    (p.name) "@" (p.counter) " (" (p.version) ")"
                                }
                            }
                        }
                    }
                    fieldset {
                        legend { "Scope" }
                        label { "Group "
                            select name="group" {
                                option value="" { "— devices below —" }
                                @for g in groups { option value=(g) { (g) } }
                            }
                        }
                        label { "or devices " input type="text" name="devices" placeholder="d1, d2, d3"; }
                    }
                    label { "Waves " input type="text" name="waves" value="100%" required
                        title="cumulative shares, e.g. 10%,50%,100%"; }
                    label { "Failures per wave before it pauses " input type="text" name="max_failures" value="0" required
                        title="a count (2) or a share (10%)"; }
                    label { "Soak between waves " input type="text" name="wave_wait" value="0s" required title="e.g. 10m"; }
                    button.primary type="submit" { "Start" }
                }
            }
        }
    }
}
