//! NATS subject names, stream and bucket names, and the permissions each
//! kind of user gets. Both sides build subjects only through this module, so
//! a device's grant and the subjects it uses cannot drift apart.

/// Devices send enrollment requests here (PROVISIONING account).
pub const ENROLL_REQUEST: &str = "perch.enroll.request";
/// The provisioners' queue group: one instance answers each request.
pub const ENROLL_QUEUE: &str = "perch-provisioner";
/// JetStream KV bucket (FLEET) holding the device registry and token use counters.
pub const REGISTRY_BUCKET: &str = "PERCH_REGISTRY";
/// JetStream KV bucket (FLEET) with the desired state: `device.<id>`, `group.<g>`.
pub const DESIRED_BUCKET: &str = "PERCH_DESIRED";
/// JetStream KV bucket (FLEET): the published bundles, `<name>.<counter>`.
pub const BUNDLES_BUCKET: &str = "PERCH_BUNDLES";
/// JetStream KV bucket (FLEET): rollouts and their waves, by rollout id.
pub const ROLLOUTS_BUCKET: &str = "PERCH_ROLLOUTS";
/// JetStream KV bucket (FLEET): the org's current trust document, under
/// [`TRUST_KEY`], pushed by `perch-bootstrap trust push`. Devices take it
/// only by a valid rotation chain, so who may write here decides nothing.
pub const TRUST_BUCKET: &str = "PERCH_TRUST";
pub const TRUST_KEY: &str = "doc";

/// The subject the pushed trust document is stored under.
pub fn trust_doc() -> String {
    format!("$KV.{TRUST_BUCKET}.{TRUST_KEY}")
}

/// JetStream stream (FLEET) holding bundle chunks.
pub const CHUNKS_STREAM: &str = "PERCH_CHUNKS";
/// JetStream stream (FLEET) holding device reports.
pub const REPORTS_STREAM: &str = "PERCH_REPORTS";
/// Every report subject: `perch.report.<device>.<lane>`.
pub const REPORTS_ALL: &str = "perch.report.>";
/// How long `PERCH_REPORTS` remembers message ids: a report resent after a
/// link outage up to this long is stored once.
pub const REPORTS_DUPLICATE_WINDOW_SECS: u64 = 24 * 3600;
/// Every chunk subject: `perch.chunk.<bundle digest hex>.<index>`, and
/// `perch.chunk.<bundle digest hex>.m` for the head (manifest and signatures).
pub const CHUNKS_ALL: &str = "perch.chunk.>";

/// The subject of chunk `index` of a bundle; `None` is the head.
pub fn chunk(digest: &[u8; 32], index: Option<u32>) -> String {
    match index {
        Some(i) => format!("perch.chunk.{}.{i}", hex::encode(digest)),
        None => format!("perch.chunk.{}.m", hex::encode(digest)),
    }
}

/// The JetStream domain of the fleet's hub (the cluster or single server
/// field sites connect to as leaf nodes), unless the operator names another.
pub const HUB_DOMAIN: &str = "hub";

/// Subjects that never cross a field site's FLEET leaf connection as plain
/// messages, either way (the site's `deny_imports` and `deny_exports`).
/// Reports reach the hub only through a JetStream source of the site's
/// reports stream, and desired state, trust and chunks reach the site only
/// through mirrors: a plain copy as well would store each report twice at
/// the hub (breaking exactly-once), and a put at one end would echo back
/// through the other end's stream (a loop).
pub const SITE_LEAF_DENY: [&str; 4] = ["$KV.PERCH_DESIRED.>", "$KV.PERCH_TRUST.>", REPORTS_ALL, CHUNKS_ALL];

/// Where the SYS account takes account JWT updates (full resolver).
pub const CLAIMS_UPDATE: &str = "$SYS.REQ.CLAIMS.UPDATE";

/// Longest device id (it is a subject token and a file name).
pub const MAX_DEVICE_ID: usize = 64;

/// Whether `s` can stand as one subject token, a device id or a group name:
/// 1 to 64 of `A-Z a-z 0-9 - _`. No dots or wildcards, so an id can never
/// widen a permission it is put into.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_DEVICE_ID
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Subjects a device publishes its reports on: `perch.report.<id>.<kind>`.
pub fn reports(device: &str) -> String {
    format!("perch.report.{device}")
}

/// The device announces itself (its signed credential) here on every
/// connect; the provisioner learns of offline-enrolled devices this way.
pub fn hello(device: &str) -> String {
    format!("perch.hello.{device}")
}

/// Wildcard the provisioner listens on for [`hello`].
pub const HELLO_ALL: &str = "perch.hello.*";

/// A device sends its Choria lifecycle events here; the provisioner checks
/// that each names this device and republishes it to
/// [`crate::lifecycle::subject`], where the device itself may not publish.
pub fn lifecycle(device: &str) -> String {
    format!("perch.lifecycle.{device}")
}

/// Wildcard the provisioner listens on for [`lifecycle`].
pub const LIFECYCLE_ALL: &str = "perch.lifecycle.*";

/// A field site's daemon announces the site here (`perch.site.<name>`),
/// through the site's leaf node; the provisioner at the hub then makes the
/// hub's `PERCH_REPORTS` take the site's reports.
pub fn site_hello(site: &str) -> String {
    format!("perch.site.{site}")
}

/// Wildcard the provisioner listens on for [`site_hello`].
pub const SITE_HELLO_ALL: &str = "perch.site.*";

/// A device's private inbox prefix; its replies arrive under `<prefix>.>`.
pub fn inbox_prefix(device: &str) -> String {
    format!("_INBOX_{device}")
}

/// The desired-state KV key of a device.
pub fn desired_device_key(device: &str) -> String {
    format!("device.{device}")
}

/// The desired-state KV key of a group.
pub fn desired_group_key(group: &str) -> String {
    format!("group.{group}")
}

/// A NATS permission grant: the subjects a user may publish and subscribe to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What an enrolled device may do in the FLEET account, and nothing more:
/// publish its own reports, hello and lifecycle events (never on the shared
/// Choria subjects: the provisioner republishes them there, so no device
/// can speak for another); read its own and its groups'
/// desired-state keys (direct get) and hear their puts live (a plain
/// subscription to the keys' subjects: no consumer, so no server-side
/// state per device); read bundle chunks; receive on its own inbox.
pub fn device_grant(device: &str, groups: &[String]) -> Grant {
    let kv_stream = format!("KV_{DESIRED_BUCKET}");
    let mut keys = vec![desired_device_key(device)];
    keys.extend(groups.iter().map(|g| desired_group_key(g)));
    let mut publish = vec![format!("{}.>", reports(device)), hello(device), lifecycle(device)];
    let mut subscribe = vec![format!("{}.>", inbox_prefix(device))];
    for k in &keys {
        let subject = format!("$KV.{DESIRED_BUCKET}.{k}");
        publish.push(format!("$JS.API.DIRECT.GET.{kv_stream}.{subject}"));
        subscribe.push(subject);
    }
    publish.push(format!("$JS.API.DIRECT.GET.{CHUNKS_STREAM}.perch.chunk.>"));
    // The pushed trust document: read and watched, never written.
    publish.push(format!("$JS.API.DIRECT.GET.KV_{TRUST_BUCKET}.{}", trust_doc()));
    subscribe.push(trust_doc());
    Grant { publish, subscribe }
}

/// The inbox prefix of the devices enrolling with one token. Holders of
/// one token share it; holders of another token cannot listen in.
pub fn token_inbox_prefix(token_id: &[u8; 16]) -> String {
    format!("_INBOX_ENROLL_{}", hex::encode(token_id))
}

/// What an enrollment token's PROVISIONING credential may do: send an
/// enrollment request and receive the reply on the token's own inboxes.
pub fn token_grant(token_id: &[u8; 16]) -> Grant {
    Grant {
        publish: vec![ENROLL_REQUEST.into()],
        subscribe: vec![format!("{}.>", token_inbox_prefix(token_id))],
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_site_leaf_deny_list_names_the_buckets_and_streams_it_guards() {
        assert_eq!(SITE_LEAF_DENY[0], format!("$KV.{DESIRED_BUCKET}.>"));
        assert_eq!(SITE_LEAF_DENY[1], format!("$KV.{TRUST_BUCKET}.>"));
        assert!(SITE_LEAF_DENY.contains(&REPORTS_ALL) && SITE_LEAF_DENY.contains(&CHUNKS_ALL));
    }

    use super::*;

    #[test]
    fn ids_cannot_smuggle_wildcards_or_levels() {
        for bad in ["", "a.b", "a*", ">", "a b", "ä", &"x".repeat(65)] {
            assert!(!is_token(bad), "{bad:?}");
        }
        assert!(is_token("drone-07_A"));
    }

    #[test]
    fn device_grant_is_specific_to_the_device() {
        let g = device_grant("d1", &["north".into()]);
        assert!(g.publish.contains(&"perch.report.d1.>".to_string()));
        assert!(g.publish.iter().any(|s| s.ends_with("$KV.PERCH_DESIRED.group.north")));
        assert!(g.publish.iter().all(|s| !s.contains("d2")));
        assert_eq!(
            g.subscribe,
            [
                "_INBOX_d1.>",
                "$KV.PERCH_DESIRED.device.d1",
                "$KV.PERCH_DESIRED.group.north",
                "$KV.PERCH_TRUST.doc"
            ]
            .map(String::from)
        );
        assert!(g.publish.iter().all(|s| !s.contains("CONSUMER")), "a device creates no consumers");
        assert!(g.publish.contains(&"perch.lifecycle.d1".to_string()));
        assert!(g.publish.iter().all(|s| !s.starts_with("choria.")), "Choria subjects are the fleet's");
    }
}
