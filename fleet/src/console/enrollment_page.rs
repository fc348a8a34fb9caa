//! The Enrollment page: devices waiting for approval (approve, reject),
//! revoking a device, and issuing an enrollment token shown as a QR code
//! for a technician's phone or a printed label. Revoking and issuing need
//! the org's keys (`perch console --org DIR`), as with `perch-bootstrap`.

use maud::{html, Markup, PreEscaped};
use perch_protocol::registry::{DeviceRecord, Status};

use super::auth::Session;
use super::html::{button, csrf, when};

/// What an issued token looks like on the page.
pub struct Issued {
    pub text: String,
    /// The QR code, as SVG made by the qrcode crate from `text` alone.
    pub svg: String,
    pub expires_at: u64,
    pub uses: u32,
    pub groups: Vec<String>,
}

/// `org_urls`: with the org's keys, the servers a token names by default.
pub fn body(
    s: &Session,
    registry: &[DeviceRecord],
    org_urls: Option<&[String]>,
    issued: Option<&Issued>,
) -> Markup {
    let has_org = org_urls.is_some();
    html! {
        div #enrollment-body {
            h2 { "Waiting for approval" }
            (pending(s, registry))
            h2 { "Revoke a device" }
            @if has_org {
                form.inline-form method="post" action="/enrollment/revoke"
                    data-confirm="Revoke this device? The server cuts it off at once and refuses it from then on." {
                    (csrf(s))
                    label { "Device " input type="text" name="id" required pattern="[A-Za-z0-9_-]{1,64}"; }
                    button.danger type="submit" { "Revoke" }
                }
            } @else {
                p.empty { "Revoking signs the fleet account's revocation list: start the console with "
                    code { "--org DIR" } " to do it here." }
            }
            h2 { "Issue an enrollment token" }
            @if let Some(t) = issued {
                div.token #token {
                    div.qr { (PreEscaped(&t.svg)) }
                    div {
                        p { "Good for " (t.uses) " device(s) of " (if t.groups.is_empty() { "no group".to_string() } else { t.groups.join(", ") })
                            ", until " (when(t.expires_at)) "." }
                        textarea readonly rows="4" #token-text { (t.text) }
                        p.hint { "Scan it with the technician's phone, or print this page as a label." }
                    }
                }
            }
            @if has_org {
                form.stack method="post" action="/enrollment/token" {
                    (csrf(s))
                    label { "Groups " input type="text" name="groups" placeholder="drones, field"; }
                    label { "Devices it may enroll " input type="number" name="uses" value="1" min="1" max="100000" required; }
                    label { "Valid for " input type="text" name="ttl" value="24h" required; }
                    label { "Approval "
                        select name="approval" {
                            option value="auto" { "automatic" }
                            option value="manual" { "by an operator" }
                        }
                    }
                    label { "Device ids must match " input type="text" name="id_pattern" placeholder="drone-*"; }
                    label { "Servers devices enroll through "
                        input type="text" name="urls" value=(org_urls.unwrap_or_default().join(", "));
                    }
                    button.primary type="submit" { "Issue token" }
                }
            } @else {
                p.empty { "Tokens are signed with the org's issuing key: start the console with "
                    code { "--org DIR" } " to issue them here." }
            }
        }
    }
}

/// The devices waiting for approval (the script fetches it again when the
/// registry changes).
pub fn pending(s: &Session, registry: &[DeviceRecord]) -> Markup {
    let pending: Vec<&DeviceRecord> = registry
        .iter()
        .filter(|d| d.status == Status::Pending || d.rekey.as_ref().is_some_and(|r| !r.approved))
        .collect();
    html! {
        div #pending-section {
            @if pending.is_empty() {
                p.empty #no-pending { "No device is waiting." }
            } @else {
                div.scroll { table.pending #pending {
                    thead { tr { th { "Device" } th { "Groups" } th { "Asked" } th { "Why" } th {} } }
                    tbody {
                        @for d in &pending {
                            tr data-device=(d.id) {
                                td { a href=(format!("/device/{}", d.id)) { (d.id) } }
                                td { (d.groups.join(", ")) }
                                td { (when(d.updated_at)) }
                                td { @if d.rekey.is_some() { "re-enrollment with a new key" } @else { "first enrollment" } }
                                td.actions {
                                    (button(s, &format!("/enrollment/{}/approve", d.id), "Approve", None, "primary"))
                                    (button(s, &format!("/enrollment/{}/reject", d.id), "Reject", Some(&format!("Reject {}?", d.id)), ""))
                                }
                            }
                        }
                    }
                } }
            }
        }
    }
}

/// A QR code of `text`, as SVG.
pub fn qr_svg(text: &str) -> Result<String, String> {
    use qrcode::{render::svg, EcLevel, QrCode};
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::L).map_err(|e| e.to_string())?;
    Ok(code.render::<svg::Color<'_>>().min_dimensions(240, 240).quiet_zone(true).build())
}
