//! The `perch-bootstrap` commands that talk to a running fleet or answer
//! requests offline: their I/O and output, over the library's logic.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use perch_bootstrap::admin;
use perch_bootstrap::issue::Issuer;
use perch_bootstrap::registry::{DeviceRecord, Registry, Status};
use perch_protocol::enroll::SignedRequest;
use perch_support::durable::{self, read_bounded, Replace};
use perch_support::exit::SecurityError;
use perch_support::now_unix;
use serde_json::json;

/// Logs go to stderr; `PERCH_LOG` (error, warn, info, debug, trace) overrides `default`.
pub fn init_logging(default: tracing::Level) {
    perch_net::init_logging(default);
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// As whom a registry command acts.
pub enum Access {
    /// With the org's keys: a FLEET service user minted on the spot.
    Org { dir: PathBuf, urls: Vec<String> },
    /// As the operator whose FLEET creds file this is.
    Creds(perch_net::operator::Target),
}

impl Access {
    async fn registry(&self, now: u64) -> Result<Registry> {
        match self {
            Access::Org { dir, urls } => Ok(admin::registry(dir, urls, now).await?),
            Access::Creds(target) => {
                let client = target.connect("perch-bootstrap").await?;
                Ok(Registry::open(&async_nats::jetstream::new(client)).await?)
            }
        }
    }
}

pub fn list(access: &Access, json: bool, pending_only: bool) -> Result<()> {
    init_logging(tracing::Level::WARN);
    let devices = runtime()?.block_on(async {
        let reg = access.registry(now_unix()).await?;
        Ok::<_, anyhow::Error>(reg.devices().await?)
    })?;
    let shown: Vec<&DeviceRecord> = devices
        .iter()
        .filter(|d| {
            !pending_only || d.status == Status::Pending || d.rekey.as_ref().is_some_and(|r| !r.approved)
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = shown.iter().map(|d| device_json(d)).collect();
        println!("{}", json!({ "devices": list }));
        return Ok(());
    }
    if shown.is_empty() {
        println!("{}", if pending_only { "no device is waiting for approval" } else { "no devices" });
        return Ok(());
    }
    println!("{:<24} {:<9} {:<20} {:<16} NOTE", "DEVICE", "STATUS", "GROUPS", "KEY");
    for d in shown {
        let note = match &d.rekey {
            Some(r) if !r.approved => format!("asks to re-enroll with key {}", key_id(&r.key)),
            Some(_) => "re-enrollment approved".into(),
            None => format!("via {}", d.via),
        };
        println!("{:<24} {:<9} {:<20} {:<16} {note}", d.id, d.status, d.groups.join(","), key_id(&d.key));
    }
    Ok(())
}

/// The key id operators see everywhere (`perch-agent status` shows the
/// device's own): the first 16 hex digits of SHA-256 of the public key.
fn key_id(key_hex: &str) -> String {
    let mut raw = [0u8; 32];
    match hex::decode_to_slice(key_hex, &mut raw)
        .ok()
        .and_then(|()| perch_protocol::PublicKey::from_bytes(&raw).ok())
    {
        Some(k) => k.id().to_string(),
        None => "(bad key)".into(),
    }
}

fn device_json(d: &DeviceRecord) -> serde_json::Value {
    json!({
        "id": d.id, "status": d.status, "key": d.key, "key_id": key_id(&d.key), "nats_user": d.nats_user, "groups": d.groups,
        "target": d.target, "agent_version": d.agent_version, "token": d.token, "via": d.via,
        "created_at": d.created_at, "updated_at": d.updated_at, "enrolled_at": d.enrolled_at,
        "rekey": d.rekey.as_ref().map(|r| json!({ "key": r.key, "requested_at": r.requested_at, "approved": r.approved })),
    })
}

#[derive(Clone, Copy)]
pub enum Action {
    Approve,
    Reject,
    Revoke,
}

pub fn act(access: &Access, action: Action, id: &str) -> Result<()> {
    init_logging(tracing::Level::WARN);
    let now = now_unix();
    if let (Action::Revoke, Access::Creds(_)) = (action, access) {
        return Err(perch_support::exit::UsageError(
            "revoke needs the org's keys (--dir ORG_DIR or PERCH_ORG): it signs the FLEET account's revocation list"
                .into(),
        )
        .into());
    }
    let rec = runtime()?.block_on(async {
        let reg = access.registry(now).await?;
        let done = match (action, access) {
            (Action::Approve, _) => admin::approve(&reg, id, now).await,
            (Action::Reject, _) => admin::reject(&reg, id, now).await,
            (Action::Revoke, Access::Org { dir, urls }) => admin::revoke(dir, urls, &reg, id, now).await,
            (Action::Revoke, Access::Creds(_)) => unreachable!("refused above"),
        };
        Ok::<_, anyhow::Error>(done?)
    })?;
    match action {
        Action::Approve if rec.rekey.is_some() => {
            println!("approved re-enrollment of {id}; it enrolls with its new key the next time it asks")
        }
        Action::Approve => println!("approved {id}; it enrolls the next time it asks"),
        Action::Reject => println!("rejected {id} ({})", rec.status),
        Action::Revoke => println!("revoked {id}: NATS user {} is cut off", rec.nats_user),
    }
    Ok(())
}

pub fn sign_request(
    dir: &Path,
    file: &Path,
    out: &Path,
    groups: &[String],
    fleet_urls: &[String],
    ttl: Duration,
) -> Result<()> {
    let now = now_unix();
    let text =
        String::from_utf8_lossy(&read_bounded(file, perch_protocol::enroll::MAX_MESSAGE * 2)?).into_owned();
    let request = SignedRequest::from_text(&text)
        .and_then(SignedRequest::verify_possession)
        .map_err(|e| SecurityError(format!("{}: {e}", file.display())))?;
    let b = request.body();
    if let Some(g) = groups.iter().find(|g| !perch_protocol::subjects::is_token(g)) {
        return Err(perch_support::exit::UsageError(format!("--group '{g}': use A-Z a-z 0-9 - _")).into());
    }
    let issuer = Issuer::load(dir, now)?;
    let enrollment =
        issuer.enrollment(&b.device_id, b.device_key, groups, fleet_urls, now, now + ttl.as_secs().max(1))?;
    durable::write_bytes(out, 0o644, Replace::Refuse, enrollment.to_text().as_bytes())?;
    println!(
        "wrote {} for device {} (key {}), groups [{}]; import it with `perch-agent enroll --import {}`",
        out.display(),
        b.device_id,
        b.device_key.id(),
        groups.join(", "),
        out.display()
    );
    Ok(())
}

/// A QR code of `text` for a terminal (two modules per character cell).
pub fn qr(text: &str) -> Result<String> {
    use qrcode::{render::unicode::Dense1x2, EcLevel, QrCode};
    let code =
        QrCode::with_error_correction_level(text.as_bytes(), EcLevel::L).context("making the QR code")?;
    Ok(code.render::<Dense1x2>().quiet_zone(true).build() + "\n")
}
