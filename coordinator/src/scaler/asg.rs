//! Pools bound to an Auto Scaling group: raise its desired capacity, and
//! (opt-in) terminate instances whose agent is gone while they run on.

use aws_sdk_autoscaling::error::ProvideErrorMetadata;
use aws_sdk_autoscaling::types::LifecycleState;

use super::{aws_error, human_ms, worker_labels, Demand, PoolRecord, PoolTick, Stop, ZombieNote};
use crate::config::{AsgScaling, ScalingConfig};

/// Lost sessions older than the grace period plus this are not looked at.
const ZOMBIE_HORIZON_MS: i64 = 60 * 60_000;

/// What the scaler needs of the group.
struct Group {
    desired: u64,
    min: u64,
    max: u64,
    in_service: u64,
}

async fn describe_group(tick: &PoolTick<'_>, name: &str) -> Result<Option<Group>, String> {
    let out = tick
        .scaler
        .cloud
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .map_err(|e| aws_error("DescribeAutoScalingGroups", &e))?;
    Ok(out.auto_scaling_groups().first().map(|g| Group {
        desired: g.desired_capacity().unwrap_or(0).max(0) as u64,
        min: g.min_size().unwrap_or(0).max(0) as u64,
        max: g.max_size().unwrap_or(0).max(0) as u64,
        in_service: g
            .instances()
            .iter()
            .filter(|i| i.lifecycle_state() == Some(&LifecycleState::InService))
            .count() as u64,
    }))
}

pub(super) async fn evaluate(
    tick: &mut PoolTick<'_>,
    cfg: &AsgScaling,
    scaling: &ScalingConfig,
    record: &mut PoolRecord,
) -> Result<(), Stop> {
    let now = tick.now_ms;
    let group = match describe_group(tick, &cfg.asg_name).await {
        Ok(Some(group)) => group,
        Ok(None) => {
            let error = format!(
                "Auto Scaling group {:?} not found (pools.scaling.asg_name, region and credentials)",
                cfg.asg_name
            );
            tick.metrics().scaler_errors.inc(tick.name, "describe");
            record.decide("error", error.clone(), now);
            record.last_error = Some(error);
            return Ok(());
        }
        Err(error) => {
            tracing::warn!(pool = tick.name, %error, "scaler cannot see its Auto Scaling group");
            tick.metrics().scaler_errors.inc(tick.name, "describe");
            record.decide("error", error.clone(), now);
            record.last_error = Some(error);
            return Ok(());
        }
    };
    let min = cfg.min.unwrap_or(group.min);
    let max = cfg.max.unwrap_or(group.max).min(group.max);
    let slots = cfg.slots_per_instance;
    let scan = (max as usize)
        .saturating_mul(slots as usize)
        .saturating_mul(4);
    let needs = tick.queued_needs(scan.max(1000)).await?;
    let demand = Demand::of(
        &needs,
        tick.pool.running,
        cfg.capacity.as_ref(),
        &worker_labels(scaling),
    );
    let wanted = demand.workers(slots, min, max);
    record.demand_slots = Some(demand.slots());
    record.wanted = Some(wanted);
    record.desired = Some(group.desired);
    record.actual = Some(group.in_service);
    record.min = Some(min);
    record.max = Some(max);
    let why = format!(
        "{} wants {wanted} instances ({slots} slots each, min {min}, max {max}); desired capacity is {}",
        demand.describe(),
        group.desired
    );
    if record.held_back(tick.pool.paused, wanted, group.desired, &why, now) {
        return Ok(());
    }
    if let Some(last) = record.last_scale_out_ms {
        let ready_at = last + cfg.cooldown_ms as i64;
        if now < ready_at {
            record.decide(
                "cooldown",
                format!("{why}; cooldown for {} more", human_ms(ready_at - now)),
                now,
            );
            return Ok(());
        }
    }
    // Fenced first: a coordinator that lost the lease never gets here.
    record.last_scale_out_ms = Some(now);
    record.decide(
        "scale_out",
        format!(
            "setting desired capacity {} → {wanted}: {why}",
            group.desired
        ),
        now,
    );
    tick.save_fenced(record).await?;
    let set = tick
        .scaler
        .cloud
        .autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name(&cfg.asg_name)
        .desired_capacity(wanted.min(i32::MAX as u64) as i32)
        .honor_cooldown(false)
        .send()
        .await;
    match set {
        Ok(_) => {
            record.succeeded();
            record.desired = Some(wanted);
            let reason = format!(
                "desired capacity {} → {wanted}: {}",
                group.desired,
                demand.describe()
            );
            tracing::info!(pool = tick.name, asg = %cfg.asg_name, from = group.desired, to = wanted, "scaled out");
            record.acted("scale_out", reason, now);
        }
        Err(e) => {
            let error = aws_error("SetDesiredCapacity", &e);
            tracing::warn!(pool = tick.name, %error, "scale-out failed; backing off");
            tick.metrics()
                .scaler_errors
                .inc(tick.name, "set_desired_capacity");
            record.failed(error, now);
        }
    }
    Ok(())
}

/// Zombie reaping: a session that expired (its jobs are requeued already)
/// while its instance is still in service in this pool's group is, after
/// `zombie_grace_ms` and unless a new session came from the instance,
/// terminated. The instance id comes from the agent's labels but is only
/// acted on when the Auto Scaling API itself says the instance is in this
/// group.
pub(super) async fn reap_zombies(
    tick: &mut PoolTick<'_>,
    cfg: &AsgScaling,
    record: &mut PoolRecord,
) -> Result<(), Stop> {
    let Some(grace) = cfg.zombie_grace_ms.map(|g| g as i64) else {
        return Ok(());
    };
    let now = tick.now_ms;
    record
        .zombies
        .retain(|_, note| now - note.at_ms < grace + 2 * ZOMBIE_HORIZON_MS);
    let lost = tick
        .store()
        .lost_sessions(now - grace - ZOMBIE_HORIZON_MS, now)
        .await?;
    let candidates: Vec<_> = lost
        .into_iter()
        .filter(|s| s.pool == tick.name && !record.zombies.contains_key(&s.session_id))
        .filter(|s| s.ended_at_ms + grace <= now)
        .filter(|s| s.labels.get("platform").is_none_or(|p| p == "ec2"))
        .filter_map(|s| {
            let instance = s.labels.get("instance_id")?.clone();
            Some((s, instance))
        })
        .collect();
    if candidates.is_empty() {
        return Ok(());
    }
    let live = tick
        .store()
        .list_agents(now, 0)
        .await?
        .into_iter()
        .filter(|a| a.state != drover_proto::model::AgentState::Gone)
        .collect::<Vec<_>>();
    for (session, instance) in candidates {
        let note = |outcome: String| ZombieNote {
            instance_id: instance.clone(),
            at_ms: now,
            outcome,
        };
        if let Some(label) = session.labels.get("asg").filter(|a| **a != cfg.asg_name) {
            record.zombies.insert(
                session.session_id.clone(),
                note(format!("left alone: its agent names the group {label:?}")),
            );
            continue;
        }
        if let Some(agent) = live
            .iter()
            .find(|a| a.labels.get("instance_id") == Some(&instance))
        {
            record.zombies.insert(
                session.session_id.clone(),
                note(format!(
                    "left alone: session {} serves from the instance again",
                    agent.session_id
                )),
            );
            continue;
        }
        let described = tick
            .scaler
            .cloud
            .autoscaling
            .describe_auto_scaling_instances()
            .instance_ids(&instance)
            .send()
            .await;
        let details = match described {
            Ok(out) => out.auto_scaling_instances().first().cloned(),
            Err(e) => {
                let error = aws_error("DescribeAutoScalingInstances", &e);
                tracing::warn!(pool = tick.name, %instance, %error, "cannot check a zombie candidate; retrying next tick");
                tick.metrics()
                    .scaler_errors
                    .inc(tick.name, "describe_instances");
                continue;
            }
        };
        let in_group = details
            .as_ref()
            .is_some_and(|d| d.auto_scaling_group_name() == Some(cfg.asg_name.as_str()));
        let state = details
            .as_ref()
            .and_then(|d| d.lifecycle_state())
            .unwrap_or("")
            .to_string();
        if !in_group {
            let seen = details
                .as_ref()
                .and_then(|d| d.auto_scaling_group_name())
                .map(|g| format!("in the group {g:?}"))
                .unwrap_or_else(|| "in no Auto Scaling group".into());
            tracing::warn!(pool = tick.name, %instance, agent = %session.agent_id, "zombie candidate is {seen}, not in {:?}: left alone", cfg.asg_name);
            record.zombies.insert(
                session.session_id.clone(),
                note(format!("left alone: AWS says it is {seen}")),
            );
            continue;
        }
        if state != "InService" {
            record.zombies.insert(
                session.session_id.clone(),
                note(format!("left alone: lifecycle state {state}")),
            );
            continue;
        }
        let reason = format!(
            "instance {instance} still InService {} after session {} of agent {} expired (zombie_grace_ms {})",
            human_ms(now - session.ended_at_ms),
            session.session_id,
            session.agent_id,
            grace
        );
        // Fenced first: noted as handled before AWS is asked.
        record.zombies.insert(
            session.session_id.clone(),
            note(format!("terminating: {reason}")),
        );
        record.decide("terminate_zombie", reason.clone(), now);
        tick.save_fenced(record).await?;
        let outcome = terminate(tick, &instance).await;
        let outcome_text = match &outcome {
            Ok(true) => "terminated, desired capacity decremented".to_string(),
            Ok(false) => "terminated without decrement (the group is at its minimum size): it will be replaced".to_string(),
            Err(e) => format!("termination failed: {e}"),
        };
        record
            .zombies
            .insert(session.session_id.clone(), note(outcome_text.clone()));
        match outcome {
            Ok(_) => {
                tracing::warn!(pool = tick.name, %instance, agent = %session.agent_id, session = %session.session_id, "zombie instance {outcome_text}");
                tick.metrics()
                    .zombies_terminated
                    .inc(tick.name, &cfg.asg_name);
                record.acted("terminate_zombie", format!("{reason}: {outcome_text}"), now);
                // On the agent's record too, so `drover agents` says more
                // than `gone`.
                let agent_note = format!(
                    "instance {instance} terminated by the coordinator: still InService {} after session {} expired (zombie_grace_ms {grace}); {outcome_text}",
                    human_ms(now - session.ended_at_ms),
                    session.session_id,
                );
                if let Err(error) = tick
                    .store()
                    .note_agent(&session.session_id, &agent_note)
                    .await
                {
                    tracing::warn!(pool = tick.name, session = %session.session_id, %error, "cannot record the zombie termination on the agent");
                }
            }
            Err(error) => {
                tracing::warn!(pool = tick.name, %instance, %error, "zombie instance could not be terminated");
                tick.metrics()
                    .scaler_errors
                    .inc(tick.name, "terminate_instance");
                record.decide("error", format!("{reason}: {outcome_text}"), now);
            }
        }
    }
    Ok(())
}

/// Terminates with decrement; when AWS refuses because the group is at its
/// minimum size, without (the group then replaces the instance). Returns
/// whether the desired capacity was decremented.
async fn terminate(tick: &PoolTick<'_>, instance: &str) -> Result<bool, String> {
    let call = |decrement: bool| {
        tick.scaler
            .cloud
            .autoscaling
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance)
            .should_decrement_desired_capacity(decrement)
            .send()
    };
    match call(true).await {
        Ok(_) => Ok(true),
        Err(e) if at_min_size(e.code(), e.message()) => match call(false).await {
            Ok(_) => Ok(false),
            Err(e) => Err(aws_error("TerminateInstanceInAutoScalingGroup", &e)),
        },
        Err(e) => Err(aws_error("TerminateInstanceInAutoScalingGroup", &e)),
    }
}

/// AWS's refusal to terminate with decrement at the group's minimum size.
fn at_min_size(code: Option<&str>, message: Option<&str>) -> bool {
    code == Some("ValidationError")
        && message.is_some_and(|m| m.contains("min size") || m.contains("minSize"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_min_size_refusal_falls_back_to_terminating_without_decrement() {
        assert!(super::at_min_size(
            Some("ValidationError"),
            Some("Currently, desiredSize equals minSize (1). Terminating instance without replacement will violate group's min size constraint.")
        ));
        assert!(!super::at_min_size(
            Some("ValidationError"),
            Some("Instance Id not found")
        ));
        assert!(!super::at_min_size(Some("Throttling"), Some("min size")));
    }
}
