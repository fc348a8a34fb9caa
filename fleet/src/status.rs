//! Reading the fleet for `perch status`: the registry records and the
//! reports, handed to [`crate::view`].
//!
//! - The whole fleet: the last report of each device and lane
//!   (`DeliverPolicy::LastPerSubject`), so the cost is two messages per
//!   device however long the stream is.
//! - One device (`--device`): every report it has stored, so its sequence
//!   numbers can be accounted for (gaps, duplicates).
//!
//! A report is believed only if it came in on its own device's subject:
//! the server lets a device publish only there, so a device cannot speak
//! for another by writing another id into the payload.

use async_nats::jetstream;
use perch_net::read::{self, Which};
use perch_protocol::registry::DeviceRecord;
use perch_protocol::report::Report;
use perch_protocol::subjects::{self, REGISTRY_BUCKET, REPORTS_ALL, REPORTS_STREAM};
use perch_support::exit::{Class, Classify};

use crate::view::{self, FleetView, SiteView, Stored};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("registry record {key} is not readable: {detail}")]
    Registry { key: String, detail: String },
    /// `--device` names a device neither enrolled nor reporting.
    #[error("no device '{0}': not in the registry and no reports from it (see `perch status`)")]
    UnknownDevice(String),
}

impl Classify for StatusError {
    fn class(&self) -> Option<Class> {
        Some(match self {
            StatusError::UnknownDevice(_) => Class::Usage,
            StatusError::Nats(_) | StatusError::Registry { .. } => Class::Runtime,
        })
    }
}

fn nats(e: impl std::fmt::Display) -> StatusError {
    StatusError::Nats(e.to_string())
}

/// What to read.
#[derive(Debug, Clone)]
pub struct Query {
    /// One device, with every report it stored; None: the whole fleet.
    pub device: Option<String>,
    /// A device silent for longer is shown as stale.
    pub stale_after_secs: u64,
}

/// What was read, and what was set aside.
pub struct Read {
    pub view: FleetView,
    /// The registry records the view was built from.
    pub registry: Vec<DeviceRecord>,
    /// Reports that did not parse, or claimed another device's id.
    pub refused: Vec<String>,
}

pub async fn read(client: &async_nats::Client, q: &Query, now: u64) -> Result<Read, StatusError> {
    let js = jetstream::new(client.clone());
    let mut registry = registry_records(&js).await?;
    if let Some(d) = &q.device {
        registry.retain(|r| &r.id == d);
    }
    let (reports, refused) = reports(&js, q.device.as_deref()).await?;
    if let Some(d) = &q.device {
        if registry.is_empty() && reports.is_empty() && refused.is_empty() {
            return Err(StatusError::UnknownDevice(d.clone()));
        }
    }
    let mut view = view::build(&registry, reports, now, q.stale_after_secs, q.device.is_some());
    view.sites = sites(&js).await?;
    Ok(Read { view, registry, refused })
}

/// Every device record, sorted by id; none if the bucket does not exist
/// yet. One pass over the bucket's stream, however many devices.
pub async fn registry_records(js: &jetstream::Context) -> Result<Vec<DeviceRecord>, StatusError> {
    let entries = read::kv_entries(js, REGISTRY_BUCKET, "device.").await.map_err(StatusError::Nats)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let rec: DeviceRecord = serde_json::from_slice(&e.value)
            .map_err(|err| StatusError::Registry { key: e.key.clone(), detail: err.to_string() })?;
        out.push(rec);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The reports to show: every one of `device`'s, or the last per subject;
/// and those refused.
pub async fn reports(
    js: &jetstream::Context,
    device: Option<&str>,
) -> Result<(Vec<Stored>, Vec<String>), StatusError> {
    let (filter, which) = match device {
        Some(d) => (format!("{}.>", subjects::reports(d)), Which::All),
        None => (REPORTS_ALL.to_string(), Which::LastPerSubject),
    };
    let (mut out, mut refused) = (vec![], vec![]);
    read::each(js, REPORTS_STREAM, &filter, which, |m| {
        match stored(&m)? {
            Ok(s) => out.push(s),
            Err(why) => refused.push(why),
        }
        Ok(())
    })
    .await
    .map_err(StatusError::Nats)?;
    Ok((out, refused))
}

/// A report as stored in `PERCH_REPORTS`; Ok(Err(why)) if it is refused
/// (unreadable, or claiming another device's id); Err if the message is
/// not a JetStream one.
pub fn stored(m: &jetstream::Message) -> Result<Result<Stored, String>, String> {
    let info = m.info().map_err(|e| e.to_string())?;
    let (stream_seq, stored_at) = (info.stream_sequence, info.published.unix_timestamp().max(0) as u64);
    let on = m.subject.split('.').nth(2).unwrap_or_default();
    let site = m
        .headers
        .as_ref()
        .and_then(|h| h.get(SOURCE_HEADER))
        .and_then(|v| perch_net::sites::site_of_source_header(v.as_str()))
        .map(String::from);
    Ok(match Report::from_bytes(&m.payload) {
        Ok(report) if report.device == on => Ok(Stored { report, stored_at, stream_seq, site }),
        Ok(report) => Err(format!("{}: claims to be from {}", m.subject, report.device)),
        Err(e) => Err(format!("{}: {e}", m.subject)),
    })
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The header JetStream gives a message it copied from another stream.
const SOURCE_HEADER: &str = "Nats-Stream-Source";

/// The field sites the hub's `PERCH_REPORTS` takes reports from, and how
/// long since it heard from each; none if the stream does not exist yet.
pub async fn sites(js: &jetstream::Context) -> Result<Vec<SiteView>, StatusError> {
    // Only a stream that is not there yet is no sites; anything else is an error.
    let stream = match read::again(|| js.get_stream(REPORTS_STREAM)).await {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => return Ok(vec![]),
        Err(e) => return Err(nats(e)),
    };
    let info = read::again(|| {
        let mut s = stream.clone();
        async move { s.info().await.cloned() }
    })
    .await
    .map_err(nats)?;
    let mut out: Vec<SiteView> = info
        .sources
        .iter()
        .filter_map(|s| {
            let name = perch_net::sites::site_of_source_name(&s.name)?;
            Some(SiteView { name: name.into(), last_heard_secs: s.active.map(|d| d.as_secs()), lag: s.lag })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
