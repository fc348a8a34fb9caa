//! `perch streams`: each of the fleet's streams and buckets, its copies and
//! whether every copy is current. What an operator checks before taking
//! another server of a cluster down (after one lost its disk, during a
//! rolling restart): a copy that is not current yet is the stream's spare
//! only once it is.

use async_nats::jetstream;
use perch_protocol::subjects;
use serde::Serialize;

/// Every stream and bucket the fleet keeps.
pub const ALL: [&str; 6] = [
    subjects::REPORTS_STREAM,
    subjects::CHUNKS_STREAM,
    "KV_PERCH_DESIRED",
    "KV_PERCH_BUNDLES",
    "KV_PERCH_ROLLOUTS",
    "KV_PERCH_REGISTRY",
];

/// One copy that follows the leader.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Follower {
    pub server: String,
    pub current: bool,
    pub offline: bool,
    /// Operations it is behind the leader.
    pub lag: u64,
}

/// One stream as its leader sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Health {
    pub stream: String,
    /// False if the fleet has no such stream (yet).
    pub exists: bool,
    pub replicas: usize,
    pub messages: u64,
    /// Bytes stored (on each copy).
    pub bytes: u64,
    /// None: no leader (no quorum, or an election under way).
    pub leader: Option<String>,
    pub followers: Vec<Follower>,
}

impl Health {
    /// Why this stream has no full set of current copies, if it has not.
    pub fn problem(&self) -> Option<String> {
        if !self.exists {
            return Some(format!("{}: no such stream", self.stream));
        }
        if self.leader.is_none() {
            // No answer at all is the same thing to an operator.
            return Some(format!("{}: no leader", self.stream));
        }
        let behind: Vec<String> = self
            .followers
            .iter()
            .filter(|f| f.offline || !f.current)
            .map(|f| {
                if f.offline {
                    format!("{} offline", f.server)
                } else if f.lag > 0 {
                    format!("{} not current ({} behind)", f.server, f.lag)
                } else {
                    format!("{} not current", f.server)
                }
            })
            .collect();
        let missing = self.replicas.saturating_sub(1 + self.followers.len());
        let mut all = behind;
        if missing > 0 {
            all.push(format!("{missing} of {} copies not placed", self.replicas));
        }
        (!all.is_empty()).then(|| format!("{}: {}", self.stream, all.join(", ")))
    }
}

/// The health of `stream`. A stream that does not answer (no leader) is
/// reported as such, not as an error.
pub async fn health(js: &jetstream::Context, stream: &str) -> Health {
    let mut h = Health {
        stream: stream.into(),
        exists: true,
        replicas: 0,
        messages: 0,
        bytes: 0,
        leader: None,
        followers: vec![],
    };
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) => {
            if let jetstream::context::GetStreamErrorKind::JetStream(j) = e.kind() {
                h.exists = j.error_code() != jetstream::ErrorCode::STREAM_NOT_FOUND;
            }
            return h;
        }
    };
    let Ok(info) = s.info().await else { return h };
    h.replicas = info.config.num_replicas;
    h.messages = info.state.messages;
    h.bytes = info.state.bytes;
    if let Some(c) = &info.cluster {
        h.leader = c.leader.clone().filter(|l| !l.is_empty());
        h.followers = c
            .replicas
            .iter()
            .map(|p| Follower {
                server: p.name.clone(),
                current: p.current,
                offline: p.offline,
                lag: p.lag.unwrap_or(0),
            })
            .collect();
    } else if h.replicas <= 1 {
        // A single server gives no cluster section: it is its own leader.
        h.leader = Some(String::new());
    }
    h
}

/// Every stream's health, in [`ALL`]'s order.
pub async fn all(js: &jetstream::Context) -> Vec<Health> {
    let mut out = Vec::with_capacity(ALL.len());
    for s in ALL {
        out.push(health(js, s).await);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(leader: Option<&str>, followers: &[(&str, bool, bool, u64)]) -> Health {
        Health {
            stream: "PERCH_REPORTS".into(),
            exists: true,
            replicas: 3,
            messages: 10,
            bytes: 1000,
            leader: leader.map(String::from),
            followers: followers
                .iter()
                .map(|(s, current, offline, lag)| Follower {
                    server: s.to_string(),
                    current: *current,
                    offline: *offline,
                    lag: *lag,
                })
                .collect(),
        }
    }

    #[test]
    fn only_a_leader_with_every_copy_current_is_healthy() {
        assert_eq!(h(Some("n1"), &[("n2", true, false, 0), ("n3", true, false, 0)]).problem(), None);
        assert_eq!(h(None, &[]).problem().unwrap(), "PERCH_REPORTS: no leader");
        assert_eq!(
            h(Some("n1"), &[("n2", false, false, 40), ("n3", true, true, 0)]).problem().unwrap(),
            "PERCH_REPORTS: n2 not current (40 behind), n3 offline"
        );
        assert_eq!(
            h(Some("n1"), &[("n2", false, false, 0), ("n3", true, false, 0)]).problem().unwrap(),
            "PERCH_REPORTS: n2 not current"
        );
        assert_eq!(
            h(Some("n1"), &[("n2", true, false, 0)]).problem().unwrap(),
            "PERCH_REPORTS: 1 of 3 copies not placed"
        );
    }
}
