//! Rollouts on the fleet's NATS: kept in the KV bucket `PERCH_ROLLOUTS`
//! and changed only by compare-and-swap, so the operator's laptop can
//! disconnect and another operator can take over (`perch deploy resume`).
//!
//! A rollout advances while a driver runs ([`drive`]: `perch deploy`
//! without `--detach`, or `perch deploy resume`). With no driver it stays
//! where it is: the devices already told finish their install, no new wave
//! starts. A driver that takes over first re-applies what the rollout has
//! written so far; every write is idempotent (a key already naming the
//! bundle is left alone, so no device sees a spurious new revision, which
//! it would take as a retry).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use perch_protocol::registry::Status;
use perch_protocol::subjects;
use perch_support::exit::{Class, Classify};

use crate::desired::{self, DesiredError, Scope};
use crate::rollout::{self, Action, Limit, Release, Rollout, State};
use crate::status::{self, Query};
use crate::view::FleetView;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("no rollout '{0}'")]
    Unknown(String),
    #[error("rollout record {id} is not readable: {detail}")]
    Corrupt { id: String, detail: String },
    #[error("{0}")]
    Plan(String),
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Status(#[from] crate::status::StatusError),
}

impl Classify for RolloutError {
    fn class(&self) -> Option<Class> {
        match self {
            RolloutError::Unknown(_) | RolloutError::Plan(_) => Some(Class::Usage),
            RolloutError::Nats(_) | RolloutError::Corrupt { .. } => Some(Class::Runtime),
            // Transparent: their chain skips them, so they are asked here.
            RolloutError::Catalog(e) => e.class(),
            RolloutError::Desired(e) => e.class(),
            RolloutError::Status(e) => e.class(),
        }
    }
}

fn nats(e: impl std::fmt::Display) -> RolloutError {
    RolloutError::Nats(e.to_string())
}

/// Who a rollout is for.
#[derive(Debug, Clone)]
pub enum Target {
    Group(String),
    Devices(Vec<String>),
}

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Plan {
    pub bundle: (String, u64),
    pub target: Target,
    pub waves: Vec<u8>,
    pub max_failures: Limit,
    pub wave_wait: Duration,
}

async fn store(js: &jetstream::Context) -> Result<kv::Store, RolloutError> {
    perch_net::streams::rollouts(js).await.map_err(RolloutError::Nats)
}

/// A rollout and the revision it was read at.
pub async fn load(js: &jetstream::Context, id: &str) -> Result<(Rollout, u64), RolloutError> {
    let kv = store(js).await?;
    let e = kv.entry(id).await.map_err(nats)?.ok_or_else(|| RolloutError::Unknown(id.into()))?;
    if e.operation != kv::Operation::Put {
        return Err(RolloutError::Unknown(id.into()));
    }
    Ok((parse(id, &e.value)?, e.revision))
}

/// A rollout record as the bucket holds it.
pub fn parse(id: &str, bytes: &[u8]) -> Result<Rollout, RolloutError> {
    let mut r: Rollout = serde_json::from_slice(bytes)
        .map_err(|err| RolloutError::Corrupt { id: id.into(), detail: err.to_string() })?;
    r.normalize();
    Ok(r)
}

/// Every rollout, oldest first: one pass over the bucket.
pub async fn list(js: &jetstream::Context) -> Result<Vec<Rollout>, RolloutError> {
    let entries = perch_net::read::kv_entries(js, subjects::ROLLOUTS_BUCKET, "").await.map_err(nats)?;
    let mut out = entries.iter().map(|e| parse(&e.key, &e.value)).collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|r| (r.created_at, r.id.clone()));
    Ok(out)
}

/// Writes `r` if nobody changed it since `revision`; false if someone did.
async fn save(js: &jetstream::Context, r: &Rollout, revision: u64) -> Result<bool, RolloutError> {
    let kv = store(js).await?;
    let json = serde_json::to_vec(r).map_err(nats)?;
    match kv.update(&r.id, json.into(), revision).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Err(e) => Err(nats(e)),
    }
}

/// The whole fleet, as a rollout sees it.
async fn fleet(client: &async_nats::Client, now: u64) -> Result<FleetView, RolloutError> {
    let q = Query { device: None, stale_after_secs: 180 };
    Ok(status::read(client, &q, now).await?.view)
}

/// Creates a rollout (it starts with the first driver step).
pub async fn create(client: &async_nats::Client, plan: &Plan, now: u64) -> Result<Rollout, RolloutError> {
    let js = jetstream::new(client.clone());
    let (name, counter) = &plan.bundle;
    let published = crate::catalog::lookup(&js, name, *counter).await?;
    let view = fleet(client, now).await?;
    let (scope, devices) = match &plan.target {
        Target::Group(g) => {
            let registry = status::registry_records(&js).await?;
            let ids: Vec<String> = registry
                .into_iter()
                .filter(|r| r.status == Status::Enrolled && r.groups.contains(g))
                .map(|r| r.id)
                .collect();
            (format!("group:{g}"), ids)
        }
        Target::Devices(d) => ("devices".to_string(), d.clone()),
    };
    for d in &devices {
        if !subjects::is_token(d) {
            return Err(RolloutError::Plan(format!("'{d}' is not a valid device id")));
        }
    }
    let (devices, waves) = rollout::plan_waves(&devices, &plan.waves).map_err(RolloutError::Plan)?;
    // What abort puts back: a device with its own key, that key's bundle;
    // without one, the group's (restored with the group's key) or, with
    // no group key either, the bundle it runs.
    let keys: BTreeMap<String, String> =
        desired::list(&js).await?.into_iter().map(|e| (e.key, e.bundle)).collect();
    let group_before = match &plan.target {
        Target::Group(g) => keys.get(&subjects::desired_group_key(g)).cloned(),
        Target::Devices(_) => None,
    };
    let running: BTreeMap<&str, String> = view
        .devices
        .iter()
        .filter_map(|v| Some((v.id.as_str(), hex::encode(v.running_bundle.as_ref()?.digest))))
        .collect();
    let (mut pinned, mut restore) = (vec![], BTreeMap::<String, Vec<u32>>::new());
    for (i, d) in devices.iter().enumerate() {
        let own = keys.get(&subjects::desired_device_key(d));
        if own.is_some() {
            pinned.push(i as u32);
        }
        let back = match (&plan.target, own, &group_before) {
            (_, Some(own), _) => Some(own.clone()),
            (Target::Group(_), None, Some(_)) => None,
            _ => running.get(d.as_str()).cloned(),
        };
        if let Some(digest) = back {
            restore.entry(digest).or_default().push(i as u32);
        }
    }
    let mut rnd = [0u8; 3];
    getrandom::getrandom(&mut rnd).map_err(|e| RolloutError::Nats(format!("no randomness: {e}")))?;
    let r = Rollout {
        id: format!("{name}-{counter}-{}", hex::encode(rnd)),
        release: Release { name: name.clone(), counter: *counter, digest: published.digest },
        scope,
        devices,
        waves,
        max_failures: plan.max_failures,
        wave_wait_secs: plan.wave_wait.as_secs(),
        state: State::Running,
        created_at: now,
        updated_at: now,
        group_key: matches!(plan.target, Target::Group(_)),
        group_before,
        pinned,
        restore,
        previous: BTreeMap::new(),
    };
    let kv = store(&js).await?;
    kv.create(&r.id, serde_json::to_vec(&r).map_err(nats)?.into()).await.map_err(nats)?;
    Ok(r)
}

/// Writes the actions to the desired state, each only if it changes
/// something ([`desired::apply`]). A previous bundle that is no longer
/// published cannot be named: its key is cleared instead (its devices
/// keep what they run, or follow their group).
pub async fn apply(js: &jetstream::Context, actions: &[Action]) -> Result<Vec<String>, RolloutError> {
    use desired::Write;
    let mut notes = vec![];
    // Each bundle's publication is checked once, however many devices name it.
    let mut published: BTreeMap<[u8; 32], bool> = BTreeMap::new();
    let mut writes = Vec::with_capacity(actions.len());
    for a in actions {
        let (scope, digest) = match a {
            Action::Desire { device, digest } => (Scope::Device(device.clone()), Some(digest)),
            Action::DesireGroup { group, digest } => (Scope::Group(group.clone()), Some(digest)),
            Action::Clear { device } => (Scope::Device(device.clone()), None),
            Action::ClearGroup { group } => (Scope::Group(group.clone()), None),
        };
        let Some(digest) = digest else {
            writes.push(Write::Clear(scope));
            continue;
        };
        let d = perch_protocol::digest_from_hex(digest)
            .ok_or_else(|| RolloutError::Plan(format!("'{digest}' is not a digest")))?;
        let is_published = match published.get(&d) {
            Some(p) => *p,
            None => {
                let p = match desired::check_published(js, &d).await {
                    Ok(()) => true,
                    Err(DesiredError::NotPublished(_)) => false,
                    Err(e) => return Err(e.into()),
                };
                published.insert(d, p);
                p
            }
        };
        if !is_published {
            notes.push(format!(
                "{}: its previous bundle {} is not published; key cleared",
                scope_name(&scope),
                &digest[..16]
            ));
            writes.push(Write::Clear(scope));
        } else {
            writes.push(Write::Set(scope, d));
        }
    }
    desired::apply(js, &writes).await?;
    Ok(notes)
}

fn scope_name(s: &Scope) -> String {
    match s {
        Scope::Device(d) => d.clone(),
        Scope::Group(g) => format!("group {g}"),
    }
}

/// Changes a rollout by `f` (pause, resume, abort), applying its actions;
/// retried if another operator changed it meanwhile.
pub async fn change(
    client: &async_nats::Client,
    id: &str,
    now: u64,
    f: impl Fn(&Rollout, &FleetView) -> Result<(Rollout, Vec<Action>), String>,
) -> Result<(Rollout, Vec<String>), RolloutError> {
    let js = jetstream::new(client.clone());
    loop {
        let (r, rev) = load(&js, id).await?;
        let view = fleet(client, now).await?;
        let (next, actions) = f(&r, &view).map_err(RolloutError::Plan)?;
        if save(&js, &next, rev).await? {
            let notes = apply(&js, &actions).await?;
            return Ok((next, notes));
        }
    }
}

/// Pauses a running rollout: no new wave starts; devices already told
/// finish their install.
pub async fn pause(client: &async_nats::Client, id: &str, now: u64) -> Result<Rollout, RolloutError> {
    let (r, _) = change(client, id, now, |r, _| match &r.state {
        State::Running => {
            let mut next = r.clone();
            next.state = State::Paused { reason: "paused by the operator".into() };
            next.updated_at = now;
            Ok((next, vec![]))
        }
        other => Err(format!("rollout {id} is {}, not running", other.name())),
    })
    .await?;
    Ok(r)
}

/// Resumes a paused rollout (its failures so far accepted); a running one
/// is taken over as it is. It then needs a driver ([`drive`]).
pub async fn resume(client: &async_nats::Client, id: &str, now: u64) -> Result<Rollout, RolloutError> {
    let (r, _) = change(client, id, now, |r, view| match &r.state {
        State::Paused { .. } => Ok((rollout::resume(r, view, now)?, vec![])),
        State::Running => Ok((r.clone(), vec![])),
        other => Err(format!("rollout {id} is {}; it cannot resume", other.name())),
    })
    .await?;
    Ok(r)
}

/// Aborts a rollout: the devices it reached are pointed back at what they
/// ran before. Returns the notes of applying that.
pub async fn abort(
    client: &async_nats::Client,
    id: &str,
    now: u64,
) -> Result<(Rollout, Vec<String>), RolloutError> {
    change(client, id, now, |r, _| match &r.state {
        State::Aborted => Err(format!("rollout {id} is already aborted")),
        _ => Ok(rollout::abort(r, now)),
    })
    .await
}

/// How long a driver rides out NATS failures in a row before it gives up.
/// A cluster electing a new leader for a bucket, or a client moving to
/// another server, takes seconds; a driver that gave up leaves the rollout
/// where it is, for `perch deploy resume`.
pub const RIDE_OUT: Duration = Duration::from_secs(120);

impl RolloutError {
    /// A failure to reach NATS or JetStream, which may pass; the others
    /// (an unknown rollout, a corrupt record, a plan error) will not.
    pub fn is_transient(&self) -> bool {
        use crate::catalog::CatalogError;
        use crate::status::StatusError;
        matches!(
            self,
            RolloutError::Nats(_)
                | RolloutError::Status(StatusError::Nats(_))
                | RolloutError::Desired(DesiredError::Nats(_))
                | RolloutError::Catalog(CatalogError::Nats(_))
        )
    }
}

/// Drives a rollout until it is done, paused or aborted, every `tick`;
/// `show` is called after each step, with notes (a NATS failure ridden
/// out is one). NATS failures are tried again for up to [`RIDE_OUT`].
pub async fn drive(
    client: &async_nats::Client,
    id: &str,
    tick: Duration,
    now: impl Fn() -> u64,
    mut show: impl FnMut(&Rollout, &FleetView, &[String]),
) -> Result<Rollout, RolloutError> {
    let js = jetstream::new(client.clone());
    // Taking over, or after a failure: re-establish what the rollout
    // wrote so far (a step may have been claimed but not applied).
    let mut ensured = false;
    let mut notes = vec![];
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        match step(&js, client, id, &now, &mut ensured, &mut notes).await {
            // Another driver changed it meanwhile: look again at once.
            Ok(None) => continue,
            Ok(Some((next, view))) => {
                failing_since = None;
                show(&next, &view, &notes);
                notes.clear();
                if next.state != State::Running {
                    return Ok(next);
                }
            }
            Err(e) if e.is_transient() => {
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= RIDE_OUT {
                    return Err(e);
                }
                if notes.last().is_none_or(|n| !n.starts_with("riding out")) {
                    notes.push(format!("riding out a NATS failure (up to {} s): {e}", RIDE_OUT.as_secs()));
                }
                ensured = false;
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(tick).await;
    }
}

/// One driver step; None if another driver changed the rollout first.
async fn step(
    js: &jetstream::Context,
    client: &async_nats::Client,
    id: &str,
    now: &impl Fn() -> u64,
    ensured: &mut bool,
    notes: &mut Vec<String>,
) -> Result<Option<(Rollout, FleetView)>, RolloutError> {
    if !*ensured {
        let (r, _) = load(js, id).await?;
        notes.extend(apply(js, &rollout::ensure(&r)).await?);
        *ensured = true;
    }
    let (r, rev) = load(js, id).await?;
    let view = fleet(client, now()).await?;
    let (next, actions) = rollout::advance(&r, &view, now());
    // The step is claimed first: a driver that loses the race does
    // nothing, and one that dies (or fails) after claiming is repaired
    // by the next step's `ensure`.
    if next != r && !save(js, &next, rev).await? {
        return Ok(None);
    }
    if let Err(e) = apply(js, &actions).await {
        *ensured = false;
        return Err(e);
    }
    Ok(Some((next, view)))
}

/// Ended rollouts `perch status` shows: a rollout to 10,000 devices shows
/// each one's outcome, and the history only grows (`perch deploy list`
/// has it all).
pub const ENDED_SHOWN: usize = 5;

/// The rollouts under way, and the last [`ENDED_SHOWN`] that ended.
fn recent(mut all: Vec<crate::rollout::Rollout>) -> Vec<crate::rollout::Rollout> {
    use crate::rollout::State;
    let ended = all.iter().filter(|r| matches!(r.state, State::Done | State::Aborted)).count();
    let mut skip = ended.saturating_sub(ENDED_SHOWN);
    all.retain(|r| {
        let drop = skip > 0 && matches!(r.state, State::Done | State::Aborted);
        skip -= usize::from(drop);
        !drop
    });
    all
}

/// What `perch status` shows of the rollouts: those under way and the
/// [`ENDED_SHOWN`] that ended last, oldest first.
pub async fn shown(js: &jetstream::Context) -> Result<Vec<crate::rollout::Rollout>, RolloutError> {
    Ok(recent(list(js).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nats_failures_are_ridden_out() {
        assert!(RolloutError::Nats("timed out".into()).is_transient());
        assert!(RolloutError::Status(crate::status::StatusError::Nats("no responders".into())).is_transient());
        assert!(RolloutError::Desired(DesiredError::Nats("timed out".into())).is_transient());
        assert!(!RolloutError::Unknown("app-2-abcdef".into()).is_transient());
        assert!(!RolloutError::Plan("no devices".into()).is_transient());
        assert!(!RolloutError::Desired(DesiredError::NotPublished("x".into())).is_transient());
    }
}
