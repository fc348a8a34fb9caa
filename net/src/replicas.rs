//! How many copies of each stream and KV bucket the fleet keeps: three on
//! a cluster of three or more servers, one on a single server, or what
//! the operator asks for.

use std::num::NonZeroU8;
use std::str::FromStr;

use async_nats::ServerInfo;

/// JetStream's own limit on replicas.
pub const MAX: u8 = 5;

/// A replica count: chosen from the cluster, or fixed by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// R3 on a cluster of three or more, else R1. Existing streams are
    /// scaled up to it, never down.
    #[default]
    Auto,
    /// Exactly this many (1..=5); existing streams are scaled to it.
    Fixed(NonZeroU8),
}

impl FromStr for Replicas {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Replicas::Auto);
        }
        s.parse::<u8>()
            .ok()
            .filter(|n| *n <= MAX)
            .and_then(NonZeroU8::new)
            .map(Replicas::Fixed)
            .ok_or_else(|| format!("replicas must be auto or 1 to {MAX}, not '{s}'"))
    }
}

impl Replicas {
    /// The count for a stream on the server that sent `info`.
    pub fn count(self, info: &ServerInfo) -> usize {
        match self {
            Replicas::Fixed(n) => usize::from(n.get()),
            Replicas::Auto if cluster_size(info) >= 3 => 3,
            Replicas::Auto => 1,
        }
    }

    /// What an existing stream with `current` replicas should become, if
    /// anything: Auto only scales up (a server down at start must not
    /// shrink the fleet's copies).
    pub fn rescale(self, current: usize, want: usize) -> Option<usize> {
        let change = match self {
            Replicas::Auto => want > current,
            Replicas::Fixed(_) => want != current,
        };
        change.then_some(want)
    }
}

/// How many servers the cluster has, as the server tells its clients:
/// INFO's `connect_urls` lists the client URL of every server in the
/// cluster, its own included (nats-server 2.9 and later). A server with
/// no cluster name is alone.
pub fn cluster_size(info: &ServerInfo) -> usize {
    if info.cluster.as_deref().is_none_or(str::is_empty) {
        return 1;
    }
    let mut urls: Vec<&str> = info.connect_urls.iter().map(String::as_str).collect();
    urls.sort_unstable();
    urls.dedup();
    urls.len().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(cluster: Option<&str>, urls: &[&str]) -> ServerInfo {
        ServerInfo {
            cluster: cluster.map(Into::into),
            connect_urls: urls.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn auto_is_r3_on_three_servers_or_more_and_r1_alone() {
        let three = info(Some("perch"), &["a:4222", "b:4222", "c:4222"]);
        assert_eq!(Replicas::Auto.count(&three), 3);
        let five = info(Some("perch"), &["a:1", "b:1", "c:1", "d:1", "e:1"]);
        assert_eq!(Replicas::Auto.count(&five), 3);
        assert_eq!(Replicas::Auto.count(&info(Some("perch"), &["a:1", "b:1", "a:1"])), 1);
        assert_eq!(Replicas::Auto.count(&info(None, &["a:1", "b:1", "c:1"])), 1);
        assert_eq!(Replicas::Auto.count(&info(Some(""), &[])), 1);
        assert_eq!("5".parse::<Replicas>().unwrap().count(&info(None, &[])), 5);
    }

    #[test]
    fn auto_only_scales_up_and_fixed_scales_both_ways() {
        assert_eq!(Replicas::Auto.rescale(1, 3), Some(3));
        assert_eq!(Replicas::Auto.rescale(3, 1), None);
        assert_eq!(Replicas::Auto.rescale(3, 3), None);
        let one = "1".parse::<Replicas>().unwrap();
        assert_eq!(one.rescale(3, 1), Some(1));
        assert_eq!(one.rescale(1, 1), None);
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_to_a_count_from_one_to_five_or_is_refused(s in "\\PC{0,12}") {
            if let Ok(r) = s.parse::<Replicas>() {
                let n = r.count(&ServerInfo::default());
                proptest::prop_assert!((1..=usize::from(MAX)).contains(&n));
            }
        }
    }

    #[test]
    fn replica_counts_parse_auto_or_one_to_five() {
        assert_eq!("auto".parse::<Replicas>(), Ok(Replicas::Auto));
        assert_eq!("3".parse::<Replicas>().unwrap().count(&ServerInfo::default()), 3);
        for bad in ["0", "6", "-1", "three", "", "Auto", "3 "] {
            assert!(bad.parse::<Replicas>().is_err(), "{bad} accepted");
        }
    }
}
