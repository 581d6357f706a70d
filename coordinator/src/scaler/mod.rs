//! The scaler: grows pools bound to an Auto Scaling group or to Fargate from
//! their demand, and (opt-in) terminates zombie instances.
//!
//! - **Demand** is the pool's queued jobs that one worker could run (its
//!   declared capacity and labels) plus its running jobs, in slots; a pool
//!   wants `clamp(ceil(demand / slots per worker), min, max)` workers.
//! - **Scale-out only.** An ASG's desired capacity is only ever raised, to an
//!   absolute `max(current, wanted)`; Fargate tasks are launched for the
//!   missing workers. Workers leave by themselves when idle, so the scaler
//!   never stops a busy one.
//! - **One scaler at a time.** Each tick first takes or renews the `scaler`
//!   leader lease in the store; every record write and every AWS action is
//!   preceded by a write fenced by that lease, so N coordinators never scale
//!   out N times and a leader that lost its lease stops acting.
//! - What it decided, and why, is kept per pool in the store and shown by
//!   `GET /v1/pools` on every coordinator.

mod asg;
mod fargate;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_proto::model::{Pool, PoolScaling, ScalingDecision};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{AwsConfig, Config, ScalingConfig, WorkerCapacity};
use crate::metrics::Metrics;
use crate::service::Service;
use crate::store::{JobNeeds, LeaderLease, Store, StoreError, StoreResult};

/// The leader lease the scaler runs under.
pub const LEADER_NAME: &str = "scaler";
/// First backoff after an AWS error; doubles per error in a row.
const BACKOFF_BASE_MS: i64 = 30_000;
const BACKOFF_MAX_MS: i64 = 10 * 60_000;
/// Most queued jobs examined per pool and tick.
const MAX_DEMAND_SCAN: usize = 10_000;
/// An unchanged record is still rewritten this often, so `evaluated_at_ms`
/// shows the scaler is alive.
const REFRESH_RECORD_MS: i64 = 60_000;

/// The AWS clients the scaler uses. Never EC2: instance state comes from
/// the Auto Scaling API.
#[derive(Debug, Clone)]
pub struct Cloud {
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub ecs: aws_sdk_ecs::Client,
}

impl Cloud {
    /// Clients from the standard AWS chain (environment, profile, instance
    /// or task role), with `[aws]`'s region and endpoint when set.
    pub async fn connect(aws: &AwsConfig) -> Cloud {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(crate::store::dynamodb::https_client());
        if let Some(region) = &aws.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &aws.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        Cloud::from_sdk_config(&loader.load().await)
    }

    pub fn from_sdk_config(config: &aws_config::SdkConfig) -> Cloud {
        Cloud {
            autoscaling: aws_sdk_autoscaling::Client::new(config),
            ecs: aws_sdk_ecs::Client::new(config),
        }
    }
}

/// What the scaler remembers about a pool between ticks, stored as JSON
/// (`Store::put_scaler_state`) so any coordinator can show it and a new
/// leader carries on where the last one stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct PoolRecord {
    demand_slots: Option<u64>,
    wanted: Option<u64>,
    desired: Option<u64>,
    actual: Option<u64>,
    min: Option<u64>,
    max: Option<u64>,
    last_decision: Option<ScalingDecision>,
    last_action: Option<ScalingDecision>,
    last_error: Option<String>,
    backoff_until_ms: Option<i64>,
    evaluated_at_ms: Option<i64>,
    errors_in_row: u32,
    last_scale_out_ms: Option<i64>,
    /// Fargate: launches so far (numbers launch intents).
    launch_seq: u64,
    /// Fargate: a launch written down but not yet known to have happened;
    /// its client tokens make running it again idempotent.
    pending_launch: Option<LaunchIntent>,
    /// Fargate: tasks launched recently that ECS may not list yet, by ARN.
    recent_launches: BTreeMap<String, i64>,
    /// Lost sessions already dealt with (zombie reaping), by session id.
    zombies: BTreeMap<String, ZombieNote>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LaunchIntent {
    seq: u64,
    count: u64,
    at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ZombieNote {
    instance_id: String,
    at_ms: i64,
    outcome: String,
}

impl PoolRecord {
    fn parse(pool: &str, json: Option<&String>) -> PoolRecord {
        match json.map(|j| serde_json::from_str(j)) {
            None => PoolRecord::default(),
            Some(Ok(record)) => record,
            Some(Err(e)) => {
                tracing::warn!(pool, error = %e, "unreadable scaler record; starting afresh");
                PoolRecord::default()
            }
        }
    }

    /// Records the outcome of this evaluation; its time is kept while the
    /// same decision repeats.
    fn decide(&mut self, action: &str, reason: String, now_ms: i64) {
        let same = self
            .last_decision
            .as_ref()
            .is_some_and(|d| d.action == action && d.reason == reason);
        if !same {
            self.last_decision = Some(ScalingDecision {
                at_ms: now_ms,
                action: action.to_string(),
                reason,
            });
        }
    }

    /// Records a change made to the pool's workers.
    fn acted(&mut self, action: &str, reason: String, now_ms: i64) {
        self.last_action = Some(ScalingDecision {
            at_ms: now_ms,
            action: action.to_string(),
            reason: reason.clone(),
        });
        self.decide(action, reason, now_ms);
    }

    /// An AWS call failed: back off exponentially and say why.
    fn failed(&mut self, error: String, now_ms: i64) {
        self.errors_in_row += 1;
        let backoff = (BACKOFF_BASE_MS << (self.errors_in_row - 1).min(10)).min(BACKOFF_MAX_MS);
        self.backoff_until_ms = Some(now_ms + backoff);
        self.decide(
            "error",
            format!("{error}; no scale-out for {}", human_ms(backoff)),
            now_ms,
        );
        self.last_error = Some(error);
    }

    fn succeeded(&mut self) {
        self.errors_in_row = 0;
        self.last_error = None;
        self.backoff_until_ms = None;
    }

    fn in_backoff(&self, now_ms: i64) -> Option<i64> {
        self.backoff_until_ms.filter(|until| *until > now_ms)
    }

    /// The checks every back-end makes before scaling out: a paused pool,
    /// enough workers already (`have` ≥ `wanted`), a back-off after errors.
    /// Records the decision and answers true when the tick stops here.
    fn held_back(&mut self, paused: bool, wanted: u64, have: u64, why: &str, now_ms: i64) -> bool {
        if paused {
            self.decide(
                "paused",
                format!("pool paused: no scale-out; {why}"),
                now_ms,
            );
        } else if wanted <= have {
            self.decide("none", why.to_string(), now_ms);
        } else if let Some(until) = self.in_backoff(now_ms) {
            let reason = format!(
                "{why}; backing off for {} after: {}",
                human_ms(until - now_ms),
                self.last_error.as_deref().unwrap_or("an error")
            );
            self.decide("backoff", reason, now_ms);
        } else {
            return false;
        }
        true
    }

    fn view(&self, scaling: &ScalingConfig) -> PoolScaling {
        let (target, min, max) = match scaling {
            ScalingConfig::Asg(a) => (a.asg_name.clone(), a.min, a.max),
            ScalingConfig::Fargate(f) => (
                format!("{}/{}", f.cluster, f.task_definition),
                Some(f.min_tasks),
                Some(f.max_tasks),
            ),
        };
        PoolScaling {
            kind: scaling.kind().to_string(),
            target,
            slots_per_worker: scaling.slots_per_worker(),
            min: self.min.or(min),
            max: self.max.or(max),
            demand_slots: self.demand_slots,
            wanted: self.wanted,
            desired: self.desired,
            actual: self.actual,
            last_decision: self.last_decision.clone(),
            last_action: self.last_action.clone(),
            last_error: self.last_error.clone(),
            backoff_until_ms: self.backoff_until_ms,
            evaluated_at_ms: self.evaluated_at_ms,
        }
    }
}

/// Adds each scaling pool's record to `pools` (for `GET /v1/pools`).
pub async fn annotate_pools(
    config: &Config,
    store: &dyn Store,
    pools: &mut Vec<Pool>,
) -> StoreResult<()> {
    if config.scaling_pools().next().is_none() {
        return Ok(());
    }
    let states = store.scaler_states().await?;
    for (name, scaling) in config.scaling_pools() {
        let view = PoolRecord::parse(name, states.get(name)).view(scaling);
        match pools.iter_mut().find(|p| p.pool == name) {
            Some(pool) => pool.scaling = Some(view),
            None => pools.push(Pool {
                pool: name.to_string(),
                scaling: Some(view),
                ..Pool::default()
            }),
        }
    }
    Ok(())
}

/// How many of a pool's queued jobs one worker could run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Demand {
    /// Queued jobs a worker could run.
    fitting: u64,
    /// Queued jobs no worker of the group could run: not demand.
    unfit: u64,
    running: u64,
}

impl Demand {
    fn of(
        needs: &[JobNeeds],
        running: u64,
        capacity: Option<&WorkerCapacity>,
        labels: &BTreeMap<String, String>,
    ) -> Demand {
        let fits = |job: &JobNeeds| {
            capacity.is_none_or(|c| c.fits(&job.resources))
                && job
                    .constraints
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
        };
        let fitting = needs.iter().filter(|j| fits(j)).count() as u64;
        Demand {
            fitting,
            unfit: needs.len() as u64 - fitting,
            running,
        }
    }

    fn slots(&self) -> u64 {
        self.fitting + self.running
    }

    /// Workers wanted: `clamp(ceil(slots / per_worker), min, max)`.
    fn workers(&self, slots_per_worker: u32, min: u64, max: u64) -> u64 {
        self.slots()
            .div_ceil(slots_per_worker.max(1) as u64)
            .max(min)
            .min(max)
    }

    fn describe(&self) -> String {
        let mut out = format!(
            "demand {} slots ({} queued that fit + {} running)",
            self.slots(),
            self.fitting,
            self.running
        );
        if self.unfit > 0 {
            out.push_str(&format!(
                "; {} queued jobs need more than a worker offers or labels it lacks",
                self.unfit
            ));
        }
        out
    }
}

/// The labels a worker of this binding will have, for matching job
/// constraints: the declared ones plus what the binding implies.
fn worker_labels(scaling: &ScalingConfig) -> BTreeMap<String, String> {
    let (mut implied, declared) = match scaling {
        ScalingConfig::Asg(a) => (
            BTreeMap::from([
                ("platform".to_string(), "ec2".to_string()),
                ("asg".to_string(), a.asg_name.clone()),
            ]),
            &a.labels,
        ),
        ScalingConfig::Fargate(f) => (
            BTreeMap::from([("platform".to_string(), "fargate".to_string())]),
            &f.labels,
        ),
    };
    implied.extend(declared.iter().map(|(k, v)| (k.clone(), v.clone())));
    implied
}

/// Why a tick stopped early.
#[derive(Debug)]
enum Stop {
    /// Another coordinator holds the lease now: act no more.
    Fenced,
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(_) => Stop::Fenced,
            e => Stop::Store(e),
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Whether this coordinator held the scaler lease (and so acted).
    pub leader: bool,
    /// Each scaling pool's decision, when leader.
    pub decisions: BTreeMap<String, ScalingDecision>,
}

/// One pool's evaluation within a tick.
struct PoolTick<'a> {
    scaler: &'a Scaler,
    name: &'a str,
    pool: Pool,
    lease: &'a LeaderLease,
    now_ms: i64,
    /// The record as last written, to skip writes that change nothing.
    saved: PoolRecord,
}

impl PoolTick<'_> {
    fn store(&self) -> &dyn Store {
        &**self.scaler.service.store()
    }

    fn metrics(&self) -> &Metrics {
        &self.scaler.service.metrics
    }

    /// Writes the record (fenced by the lease) when it changed or has not
    /// been written for a while.
    async fn save(&mut self, record: &PoolRecord) -> Result<(), Stop> {
        let unchanged = PoolRecord {
            evaluated_at_ms: Some(self.now_ms),
            ..self.saved.clone()
        } == PoolRecord {
            evaluated_at_ms: Some(self.now_ms),
            ..record.clone()
        };
        let fresh = self
            .saved
            .evaluated_at_ms
            .is_some_and(|at| self.now_ms - at < REFRESH_RECORD_MS);
        if unchanged && fresh {
            return Ok(());
        }
        self.save_fenced(record).await
    }

    /// Writes the record, fenced by the lease, always. Every AWS action is
    /// preceded by one of these, so a coordinator that lost the lease acts
    /// no more.
    async fn save_fenced(&mut self, record: &PoolRecord) -> Result<(), Stop> {
        let mut record = record.clone();
        record.evaluated_at_ms = Some(self.now_ms);
        let json = serde_json::to_string(&record)
            .map_err(|e| Stop::Store(StoreError::Backend(e.to_string())))?;
        self.store()
            .put_scaler_state(self.name, &json, self.lease)
            .await?;
        self.saved = record;
        Ok(())
    }

    async fn queued_needs(&self, limit: usize) -> Result<Vec<JobNeeds>, Stop> {
        Ok(self
            .store()
            .queued_needs(self.name, limit.clamp(1, MAX_DEMAND_SCAN))
            .await?)
    }
}

/// Runs scaling ticks under the leader lease.
pub struct Scaler {
    service: Arc<Service>,
    cloud: Cloud,
    /// This coordinator's name on the leader lease.
    holder: String,
    /// Ticks never overlap (the loop and a test, say).
    tick_lock: tokio::sync::Mutex<()>,
    lease: Mutex<Option<LeaderLease>>,
}

impl Scaler {
    pub fn new(service: Arc<Service>, cloud: Cloud) -> Arc<Scaler> {
        let holder = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "coordinator".into()),
            ulid::Ulid::new()
        );
        Arc::new(Scaler {
            service,
            cloud,
            holder,
            tick_lock: tokio::sync::Mutex::new(()),
            lease: Mutex::new(None),
        })
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn config(&self) -> &Config {
        self.service.config()
    }

    /// One pass over every scaling pool, if this coordinator is (or becomes)
    /// the leader.
    pub async fn tick(&self) -> StoreResult<TickReport> {
        let _one_at_a_time = self.tick_lock.lock().await;
        let store = self.service.store().clone();
        let now_ms = self.service.now_ms();
        let lease = store
            .try_acquire_leader(
                LEADER_NAME,
                &self.holder,
                self.config().scaler_leader_ttl_ms,
                now_ms,
            )
            .await?;
        let was_leader = self.set_lease(lease.clone());
        let Some(lease) = lease else {
            if was_leader {
                tracing::warn!(holder = %self.holder, "lost the scaler lease to another coordinator");
            }
            return Ok(TickReport::default());
        };
        if !was_leader {
            tracing::info!(holder = %self.holder, epoch = lease.epoch, "took the scaler lease");
        }
        let mut report = TickReport {
            leader: true,
            ..TickReport::default()
        };
        let pools: BTreeMap<String, Pool> = store
            .pools(now_ms)
            .await?
            .into_iter()
            .map(|p| (p.pool.clone(), p))
            .collect();
        let states = store.scaler_states().await?;
        for (name, scaling) in self.config().scaling_pools() {
            let saved = PoolRecord::parse(name, states.get(name));
            let mut record = saved.clone();
            let mut tick = PoolTick {
                scaler: self,
                name,
                pool: pools.get(name).cloned().unwrap_or_else(|| Pool {
                    pool: name.to_string(),
                    ..Pool::default()
                }),
                lease: &lease,
                now_ms,
                saved,
            };
            let outcome = match scaling {
                ScalingConfig::Asg(cfg) => {
                    asg::evaluate(&mut tick, cfg, scaling, &mut record).await
                }
                ScalingConfig::Fargate(cfg) => {
                    fargate::evaluate(&mut tick, cfg, scaling, &mut record).await
                }
            };
            let outcome = match outcome {
                Ok(()) => match scaling {
                    ScalingConfig::Asg(cfg) if cfg.zombie_grace_ms.is_some() => {
                        asg::reap_zombies(&mut tick, cfg, &mut record).await
                    }
                    _ => Ok(()),
                },
                Err(stop) => Err(stop),
            };
            let outcome = match outcome {
                Ok(()) => tick.save(&record).await,
                Err(stop) => Err(stop),
            };
            match outcome {
                Ok(()) => {}
                Err(Stop::Fenced) => {
                    tracing::warn!(holder = %self.holder, pool = name, "scaler lease lost mid-tick; stopping");
                    self.set_lease(None);
                    report.leader = false;
                    report.decisions.clear();
                    return Ok(report);
                }
                Err(Stop::Store(e)) => return Err(e),
            }
            if let Some(decision) = &record.last_decision {
                self.service
                    .metrics
                    .scaler_decisions
                    .inc(name, &decision.action);
                report.decisions.insert(name.to_string(), decision.clone());
            }
        }
        Ok(report)
    }

    /// Remembers the lease; returns whether this coordinator held it before.
    fn set_lease(&self, lease: Option<LeaderLease>) -> bool {
        self.service
            .metrics
            .scaler_leader
            .store(lease.is_some() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut held = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *held, lease).is_some()
    }

    /// Gives the lease up (shutdown) so another coordinator takes over at once.
    pub async fn release(&self) {
        let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(lease) = lease {
            if let Err(e) = self.service.store().release_leader(&lease).await {
                tracing::warn!(error = %e, "could not release the scaler lease; it expires by itself");
            }
        }
    }
}

/// The scaler loop: one tick per `interval_ms` (the first after one
/// interval), until `shutdown`; then the lease is released.
pub async fn run(scaler: Arc<Scaler>, interval_ms: u64, shutdown: CancellationToken) {
    let period = Duration::from_millis(interval_ms.max(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match scaler.tick().await {
            Ok(report) => tracing::debug!(?report, "scaler tick"),
            Err(e) => tracing::warn!(error = %e, "scaler tick failed; retrying next tick"),
        }
    }
    scaler.release().await;
}

/// `1m30s`-style durations for decision texts.
fn human_ms(ms: i64) -> String {
    humantime::format_duration(Duration::from_millis(ms.max(0) as u64 / 1000 * 1000)).to_string()
}

/// An AWS error with its code and message (and the cause chain). Every SDK
/// crate re-exports the same `SdkError`, so this serves Auto Scaling too.
fn aws_error<E>(operation: &str, e: &aws_sdk_ecs::error::SdkError<E>) -> String
where
    E: std::error::Error + 'static,
{
    format!(
        "{operation}: {}",
        aws_sdk_ecs::error::DisplayErrorContext(e)
    )
}
