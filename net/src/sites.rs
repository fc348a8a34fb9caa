//! The streams of a field site, and how the hub's streams name a site.
//!
//! A field site is a ground station's nats-server: a leaf node of the hub
//! with its own JetStream domain (the site's name). Its drones see the same
//! stream and bucket names as at the hub, so an agent never knows where it
//! is:
//!
//! - `PERCH_REPORTS_<site>` stores the site's reports (subjects
//!   `perch.report.>`, deduplicated by `Nats-Msg-Id` as at the hub). The
//!   hub's `PERCH_REPORTS` *sources* it: each report crosses the uplink once,
//!   when the uplink is up, and is stored there exactly once. Its name
//!   carries the site's, which is how the hub tells which site a report came
//!   through ([`site_of_source_header`]).
//! - `KV_PERCH_DESIRED` and `KV_PERCH_TRUST` *mirror* the hub's buckets:
//!   same sequences (so the same revisions), and direct gets answered at
//!   the site.
//! - `PERCH_CHUNKS` *sources* the hub's chunks: on nats-server 2.10 and
//!   later one source per bundle the fleet wants; on 2.9, whose sources
//!   cannot take two filters on one stream, the whole stream.
//!
//! Invariant: nothing here is written at the site by a client. Reports are
//! written by the drones, everything else arrives from the hub through
//! JetStream, so a site never diverges from the hub except by lag.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, External, Source, StorageType};
use perch_protocol::subjects;

use crate::streams;

/// Bytes of reports a site keeps by default: at some 300 bytes a report,
/// about 3.5 million reports, a week of 350 drones reporting every minute.
pub const DEFAULT_REPORTS_BYTES: i64 = 1 << 30;

/// How long a site keeps a report (the hub has long had it by then, unless
/// the uplink was down for all that time).
pub const REPORTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The JetStream API prefix of a domain: how one domain reaches another's
/// streams across a leaf node connection.
pub fn api_prefix(domain: &str) -> String {
    format!("$JS.{domain}.API")
}

/// The name of a site's reports stream.
pub fn reports_stream(site: &str) -> String {
    format!("{}_{site}", subjects::REPORTS_STREAM)
}

/// `PERCH_REPORTS_<site>`: the site's reports, kept at most `max_bytes`.
///
/// When it is full it refuses new reports rather than dropping old ones
/// the hub may not have yet: the drones keep refused reports in their own
/// outboxes and send them again, so none is lost.
pub fn site_reports(site: &str, max_bytes: i64) -> Config {
    Config {
        name: reports_stream(site),
        description: Some(format!("perch reports at field site {site}; the hub's PERCH_REPORTS sources it")),
        max_bytes,
        max_age: REPORTS_MAX_AGE,
        discard: DiscardPolicy::New,
        ..streams::reports()
    }
}

/// A site's mirror of the hub's KV bucket `bucket` (in domain `hub`).
pub fn bucket_mirror(bucket: streams::Bucket, hub: &str) -> Config {
    Config {
        name: format!("KV_{}", bucket.name),
        description: Some(format!("mirror of the hub's {}", bucket.name)),
        mirror: Some(Source {
            name: format!("KV_{}", bucket.name),
            external: Some(External { api_prefix: api_prefix(hub), delivery_prefix: None }),
            ..Default::default()
        }),
        max_messages_per_subject: bucket.history.max(1),
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// The hub's trust bucket, as a site mirrors it (one revision).
pub const TRUST: streams::Bucket =
    streams::Bucket { name: subjects::TRUST_BUCKET, description: "perch trust document", history: 1 };

/// The subject filter of one bundle's head and chunks.
pub fn bundle_filter(digest: &[u8; 32]) -> String {
    format!("perch.chunk.{}.>", hex::encode(digest))
}

/// Which bundles a site copies from the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkSources {
    /// Every bundle (nats-server 2.9: one source per origin stream).
    All,
    /// These bundles only (nats-server 2.10 and later), sorted.
    Bundles(Vec<[u8; 32]>),
}

impl ChunkSources {
    /// What a site server of `version` (`2.9.10`) can do with `wanted`.
    pub fn for_server(version: &str, mut wanted: Vec<[u8; 32]>) -> Self {
        if !filters_per_source(version) {
            return ChunkSources::All;
        }
        wanted.sort_unstable();
        wanted.dedup();
        ChunkSources::Bundles(wanted)
    }

    fn sources(&self, hub: &str) -> Vec<Source> {
        let source = |filter: Option<String>| Source {
            name: subjects::CHUNKS_STREAM.into(),
            filter_subject: filter,
            external: Some(External { api_prefix: api_prefix(hub), delivery_prefix: None }),
            ..Default::default()
        };
        match self {
            ChunkSources::All => vec![source(None)],
            ChunkSources::Bundles(ds) => ds.iter().map(|d| source(Some(bundle_filter(d)))).collect(),
        }
    }
}

/// Whether a server takes several sources of one stream with different
/// filters. Before 2.10 a source is indexed by stream name and API prefix
/// only, so a second filter on the same stream replaces the first.
pub fn filters_per_source(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let major = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok()).unwrap_or(0);
    (major, minor) >= (2, 10)
}

/// `PERCH_CHUNKS` at a site: the bundles in `wanted`, copied from the hub,
/// kept at most `max_bytes`.
pub fn site_chunks(hub: &str, wanted: &ChunkSources, max_bytes: i64) -> Config {
    Config {
        description: Some("perch bundle chunks, copied from the hub".into()),
        subjects: vec![],
        sources: Some(wanted.sources(hub)),
        max_bytes,
        ..streams::chunks()
    }
}

/// How the hub's `PERCH_REPORTS` takes a site's reports.
pub fn hub_reports_source(site: &str) -> Source {
    Source {
        name: reports_stream(site),
        external: Some(External { api_prefix: api_prefix(site), delivery_prefix: None }),
        ..Default::default()
    }
}

/// The site a report stored at the hub came through, from its
/// `Nats-Stream-Source` header (`PERCH_REPORTS_<site>:<hash> <seq> ...`,
/// the form of nats-server 2.9 and later). `None` for a report sent to the
/// hub directly, or a header of another form.
pub fn site_of_source_header(header: &str) -> Option<&str> {
    let stream = header.split([' ', ':']).next()?;
    let site = stream.strip_prefix(subjects::REPORTS_STREAM)?.strip_prefix('_')?;
    is_site_name(site).then_some(site)
}

/// The site of a source of the hub's `PERCH_REPORTS` (its stream's name).
pub fn site_of_source_name(name: &str) -> Option<&str> {
    site_of_source_header(name)
}

/// Longest site name.
pub const MAX_SITE_NAME: usize = 32;

/// A site name: 1 to 32 of `a-z 0-9 -`, not starting or ending with `-`.
/// It is a JetStream domain, a server name and part of a stream name.
pub fn is_site_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SITE_NAME
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_site_is_read_back_from_both_header_forms() {
        // nats-server 2.9: "<iname> <seq>"; 2.10+: the same first token.
        assert_eq!(site_of_source_header("PERCH_REPORTS_alpha:Xy12ab34 17"), Some("alpha"));
        assert_eq!(site_of_source_header("PERCH_REPORTS_field-2:abcdefgh 9 > >"), Some("field-2"));
        assert_eq!(site_of_source_name(&reports_stream("ridge")), Some("ridge"));
        assert_eq!(site_of_source_header("PERCH_REPORTS:abc 1"), None);
        assert_eq!(site_of_source_header("OTHER_alpha:abc 1"), None);
        assert_eq!(site_of_source_header("PERCH_REPORTS_Alpha:abc 1"), None);
        assert_eq!(site_of_source_header(""), None);
    }

    #[test]
    fn chunk_sources_fit_the_server() {
        let (a, b) = ([2u8; 32], [1u8; 32]);
        assert_eq!(ChunkSources::for_server("2.9.10", vec![a]), ChunkSources::All);
        assert_eq!(ChunkSources::for_server("2.15.1", vec![a, b, a]), ChunkSources::Bundles(vec![b, a]));
        assert_eq!(ChunkSources::for_server("v2.10.0-beta", vec![]), ChunkSources::Bundles(vec![]));
        assert_eq!(ChunkSources::for_server("garbage", vec![a]), ChunkSources::All);
        let c = site_chunks("hub", &ChunkSources::Bundles(vec![a]), 1 << 20);
        let s = c.sources.unwrap();
        assert_eq!(s[0].filter_subject.as_deref(), Some(bundle_filter(&a).as_str()));
        assert_eq!(s[0].external.as_ref().unwrap().api_prefix, "$JS.hub.API");
        assert!(c.subjects.is_empty() && c.allow_direct);
    }

    proptest::proptest! {
        #[test]
        fn any_source_header_gives_a_valid_site_or_none(h in "\\PC{0,80}") {
            if let Some(site) = site_of_source_header(&h) {
                proptest::prop_assert!(is_site_name(site));
            }
        }
    }

    #[test]
    fn site_names_are_domains_and_stream_suffixes() {
        assert!(is_site_name("alpha") && is_site_name("ridge-7"));
        for bad in ["", "-a", "a-", "A", "a.b", "a b", "a*", &"x".repeat(33)] {
            assert!(!is_site_name(bad), "{bad}");
        }
    }
}
