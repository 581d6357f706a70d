//! Pools bound to a Fargate task definition: launch agent tasks for the
//! missing workers, counting those already pending or running (ListTasks by
//! `startedBy`, tasks launched moments ago that ECS may not list yet, and
//! registered agents) so repeated ticks and bursts never over-launch.

use std::collections::BTreeSet;

use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, DesiredStatus, LaunchType, NetworkConfiguration,
};
use sha2::{Digest, Sha256};

use super::{aws_error, worker_labels, Demand, LaunchIntent, PoolRecord, PoolTick, Stop};
use crate::config::{FargateScaling, ScalingConfig};

/// A launched task counts as a worker this long even while ECS does not
/// list it (eventual consistency); a launch intent is retried this long.
const LAUNCH_GRACE_MS: i64 = 5 * 60_000;
/// RunTask starts at most this many tasks per call.
const MAX_PER_CALL: u64 = 10;

/// `startedBy` of the pool's tasks: at most 36 letters, digits, `-`, `_`.
pub(super) fn started_by(pool: &str) -> String {
    let plain = format!("drover-{pool}");
    if plain.len() <= 36 && !pool.contains('.') {
        return plain;
    }
    let hash = hex::encode(Sha256::digest(pool.as_bytes()));
    let prefix: String = pool
        .chars()
        .take(16)
        .map(|c| if c == '.' { '_' } else { c })
        .collect();
    format!("drover-{prefix}-{}", &hash[..12])
}

/// The idempotency token of one RunTask call of a launch intent: the same
/// intent run again (a new leader after a crash) launches nothing twice.
fn client_token(pool: &str, intent: &LaunchIntent, call: u64) -> String {
    let hash = hex::encode(Sha256::digest(
        format!("{pool}/{}/{}/{call}", intent.seq, intent.at_ms).as_bytes(),
    ));
    format!("drover-{}", &hash[..40])
}

/// Capacity failures (`RESOURCE:*`, ENI limits, "Capacity is unavailable")
/// as opposed to configuration errors; both back off.
fn is_capacity_failure(reason: &str) -> bool {
    reason.starts_with("RESOURCE:")
        || reason.contains("ENI")
        || reason.to_ascii_lowercase().contains("capacity")
}

async fn list_tasks(tick: &PoolTick<'_>, cfg: &FargateScaling) -> Result<BTreeSet<String>, String> {
    let mut arns = BTreeSet::new();
    let mut next = None;
    loop {
        let out = tick
            .scaler
            .cloud
            .ecs
            .list_tasks()
            .cluster(&cfg.cluster)
            .started_by(started_by(tick.name))
            .desired_status(DesiredStatus::Running)
            .set_next_token(next)
            .send()
            .await
            .map_err(|e| aws_error("ListTasks", &e))?;
        arns.extend(out.task_arns().iter().cloned());
        match out.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_string()),
            _ => return Ok(arns),
        }
    }
}

pub(super) async fn evaluate(
    tick: &mut PoolTick<'_>,
    cfg: &FargateScaling,
    scaling: &ScalingConfig,
    record: &mut PoolRecord,
) -> Result<(), Stop> {
    let now = tick.now_ms;
    let listed = match list_tasks(tick, cfg).await {
        Ok(arns) => arns,
        Err(error) => {
            tracing::warn!(pool = tick.name, %error, "scaler cannot list its Fargate tasks");
            tick.metrics().scaler_errors.inc(tick.name, "list_tasks");
            record.decide("error", error.clone(), now);
            record.last_error = Some(error);
            return Ok(());
        }
    };
    record
        .recent_launches
        .retain(|arn, at| now - *at < LAUNCH_GRACE_MS && !listed.contains(arn));
    // A launch written down by a leader that stopped before recording its
    // outcome: run it again under the same client tokens (idempotent).
    if let Some(intent) = record.pending_launch.clone() {
        if now - intent.at_ms < LAUNCH_GRACE_MS {
            launch(tick, cfg, record, intent, "resuming an unfinished launch").await?;
        } else {
            record.pending_launch = None;
        }
    }
    let tasks = listed.len() as u64 + record.recent_launches.len() as u64;
    let workers = tasks.max(tick.pool.agents);
    let slots = cfg.slots_per_task;
    let scan = (cfg.max_tasks as usize)
        .saturating_mul(slots as usize)
        .saturating_mul(4);
    let needs = tick.queued_needs(scan.max(1000)).await?;
    let demand = Demand::of(
        &needs,
        tick.pool.running,
        cfg.capacity.as_ref(),
        &worker_labels(scaling),
    );
    let wanted = demand.workers(slots, cfg.min_tasks, cfg.max_tasks);
    record.demand_slots = Some(demand.slots());
    record.wanted = Some(wanted);
    record.desired = Some(tasks);
    record.actual = Some(listed.len() as u64);
    record.min = Some(cfg.min_tasks);
    record.max = Some(cfg.max_tasks);
    let why = format!(
        "{} wants {wanted} tasks ({slots} slots each, min {}, max {}); {tasks} pending or running, {} agents registered",
        demand.describe(),
        cfg.min_tasks,
        cfg.max_tasks,
        tick.pool.agents
    );
    if record.held_back(tick.pool.paused, wanted, workers, &why, now) {
        return Ok(());
    }
    let intent = LaunchIntent {
        seq: record.launch_seq + 1,
        count: wanted - workers,
        at_ms: now,
    };
    record.launch_seq = intent.seq;
    launch(tick, cfg, record, intent, &why).await
}

/// Writes the intent (fenced), runs it in calls of at most ten tasks, and
/// records what started and what failed.
async fn launch(
    tick: &mut PoolTick<'_>,
    cfg: &FargateScaling,
    record: &mut PoolRecord,
    intent: LaunchIntent,
    why: &str,
) -> Result<(), Stop> {
    let now = tick.now_ms;
    record.pending_launch = Some(intent.clone());
    record.decide(
        "launch",
        format!("launching {} tasks: {why}", intent.count),
        now,
    );
    tick.save_fenced(record).await?;
    let network = NetworkConfiguration::builder()
        .awsvpc_configuration(
            AwsVpcConfiguration::builder()
                .set_subnets(Some(cfg.subnets.clone()))
                .set_security_groups(Some(cfg.security_groups.clone()))
                .assign_public_ip(if cfg.assign_public_ip {
                    AssignPublicIp::Enabled
                } else {
                    AssignPublicIp::Disabled
                })
                .build()
                .map_err(|e| Stop::Store(crate::store::StoreError::Backend(e.to_string())))?,
        )
        .build();
    let mut started = 0u64;
    let mut failures: Vec<String> = Vec::new();
    let mut error = None;
    let calls = intent.count.div_ceil(MAX_PER_CALL);
    for call in 0..calls {
        let count = (intent.count - call * MAX_PER_CALL).min(MAX_PER_CALL);
        let out = tick
            .scaler
            .cloud
            .ecs
            .run_task()
            .cluster(&cfg.cluster)
            .task_definition(&cfg.task_definition)
            .launch_type(LaunchType::Fargate)
            .count(count as i32)
            .started_by(started_by(tick.name))
            .client_token(client_token(tick.name, &intent, call))
            .network_configuration(network.clone())
            .send()
            .await;
        match out {
            Ok(out) => {
                for task in out.tasks() {
                    if let Some(arn) = task.task_arn() {
                        record.recent_launches.insert(arn.to_string(), now);
                        started += 1;
                    }
                }
                failures.extend(out.failures().iter().map(|f| {
                    format!(
                        "{}{}",
                        f.reason().unwrap_or("unknown failure"),
                        f.detail().map(|d| format!(" ({d})")).unwrap_or_default()
                    )
                }));
            }
            Err(e) => {
                error = Some(aws_error("RunTask", &e));
                break;
            }
        }
    }
    record.pending_launch = None;
    record.desired = Some(record.desired.unwrap_or(0) + started);
    if started > 0 {
        tracing::info!(
            pool = tick.name,
            started,
            wanted = intent.count,
            "launched Fargate tasks"
        );
        record.acted(
            "launch",
            format!("launched {started} of {} tasks: {why}", intent.count),
            now,
        );
    }
    let capacity = failures.iter().any(|f| is_capacity_failure(f));
    match (error, failures.is_empty()) {
        (None, true) => record.succeeded(),
        (error, _) => {
            let mut text = Vec::new();
            if !failures.is_empty() {
                text.push(format!(
                    "RunTask could not start {} tasks: {}",
                    failures.len(),
                    failures.join("; ")
                ));
            }
            text.extend(error);
            let text = text.join("; ");
            tracing::warn!(pool = tick.name, error = %text, "Fargate launch failed; backing off");
            tick.metrics().scaler_errors.inc(
                tick.name,
                if capacity {
                    "run_task_capacity"
                } else {
                    "run_task"
                },
            );
            record.failed(text, now);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_by_fits_ecs_limits_and_stays_distinct() {
        assert_eq!(started_by("cpu"), "drover-cpu");
        for pool in [
            "a.b",
            "a_b",
            &"x".repeat(64),
            &format!("{}y", "x".repeat(63)),
        ] {
            let tag = started_by(pool);
            assert!(tag.len() <= 36, "{tag}");
            assert!(tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        }
        assert_ne!(started_by("a.b"), started_by("a_b"));
        assert_ne!(
            started_by(&"x".repeat(64)),
            started_by(&format!("{}y", "x".repeat(63)))
        );
    }

    #[test]
    fn client_tokens_are_stable_per_intent_and_call() {
        let intent = LaunchIntent {
            seq: 3,
            count: 12,
            at_ms: 1000,
        };
        let token = client_token("cpu", &intent, 0);
        assert!(token.len() <= 64);
        assert_eq!(token, client_token("cpu", &intent.clone(), 0));
        assert_ne!(token, client_token("cpu", &intent, 1));
        assert_ne!(
            token,
            client_token("cpu", &LaunchIntent { seq: 4, ..intent }, 0)
        );
    }

    #[test]
    fn capacity_failures_are_told_apart() {
        assert!(is_capacity_failure("RESOURCE:ENI"));
        assert!(is_capacity_failure("RESOURCE:FARGATE"));
        assert!(is_capacity_failure(
            "Capacity is unavailable at this time. Please try again later."
        ));
        assert!(!is_capacity_failure("MISSING"));
    }
}
