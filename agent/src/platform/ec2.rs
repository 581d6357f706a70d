//! EC2: identity from IMDSv2; spot notices, rebalance recommendations and the
//! ASG target lifecycle state polled from IMDS; scale-in protection,
//! self-termination and lifecycle actions on the instance's own ASG.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::time::Instant;

use super::asg::{self, Asg, AwsErrorKind};
use super::imds::Imds;
use super::{base_labels, IdleExit, Notice, Platform, PlatformError, PlatformKind};
use crate::config::AgentConfig;
use crate::metrics::AwsCalls;

/// The ASG tag that instance metadata tags expose.
const ASG_TAG: &str = "tags/instance/aws:autoscaling:groupName";
/// How long an agent that terminated itself waits to see its instance in
/// `Terminating:Wait` before it leaves the hook to its default result.
const LIFECYCLE_WAIT: Duration = Duration::from_secs(120);

pub struct Ec2Platform {
    imds: Imds,
    labels: BTreeMap<String, String>,
    spot: bool,
    asg: Option<Asg>,
    hook: Option<String>,
    poll: Duration,
}

/// `spot/instance-action`.
#[derive(Debug, Deserialize)]
struct InstanceAction {
    action: String,
    time: String,
}

/// Parses a spot `instance-action` document into its deadline.
pub(crate) fn spot_deadline(json: &str) -> Result<(String, SystemTime), String> {
    let action: InstanceAction = serde_json::from_str(json)
        .map_err(|e| format!("unexpected instance-action {json:?}: {e}"))?;
    let time = humantime::parse_rfc3339_weak(&action.time)
        .map_err(|e| format!("unexpected instance-action time {:?}: {e}", action.time))?;
    Ok((action.action, time))
}

impl Ec2Platform {
    /// Reads the identity from IMDS and finds the instance's ASG (instance
    /// metadata tags, else `DescribeAutoScalingInstances`).
    pub async fn detect(
        config: &AgentConfig,
        calls: Arc<AwsCalls>,
    ) -> Result<Ec2Platform, PlatformError> {
        let imds = Imds::new(&config.imds_endpoint)?;
        let instance_id = imds.required("instance-id").await?;
        let instance_type = imds.required("instance-type").await?;
        let az = imds.required("placement/availability-zone").await?;
        let region = match imds.meta("placement/region").await? {
            Some(region) => region,
            // us-east-1a → us-east-1
            None => az
                .trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .to_string(),
        };
        let spot = imds.meta("instance-life-cycle").await?.as_deref() == Some("spot");
        let client = asg::client(&region, config.aws_endpoint.as_deref()).await;
        let group = match imds.meta(ASG_TAG).await? {
            Some(group) => Some(group),
            None => match asg::find_group(&client, &calls, &instance_id).await {
                Ok(group) => group,
                Err(e) => {
                    tracing::warn!(
                        "cannot tell whether instance {instance_id} is in an Auto Scaling group: {e} — \
                         enable instance metadata tags or allow autoscaling:DescribeAutoScalingInstances; \
                         idle termination and scale-in protection are off"
                    );
                    None
                }
            },
        };
        let mut labels = base_labels(PlatformKind::Ec2);
        labels.insert("instance_id".into(), instance_id.clone());
        labels.insert("instance_type".into(), instance_type);
        labels.insert("az".into(), az);
        labels.insert("region".into(), region);
        labels.insert("spot".into(), spot.to_string());
        if let Some(group) = &group {
            labels.insert("asg".into(), group.clone());
        }
        tracing::info!(
            instance = %instance_id,
            asg = group.as_deref().unwrap_or("(none)"),
            spot,
            "running on ec2"
        );
        Ok(Ec2Platform {
            imds,
            labels,
            spot,
            asg: group.map(|group| Asg {
                client,
                group,
                instance_id,
                calls,
            }),
            hook: config.lifecycle_hook.clone(),
            poll: Duration::from_millis(config.platform_poll_ms),
        })
    }

    async fn target_lifecycle_state(&self) -> Result<Option<String>, PlatformError> {
        if self.asg.is_none() {
            return Ok(None);
        }
        self.imds.meta("autoscaling/target-lifecycle-state").await
    }

    /// After a successful self-termination with a terminating hook: waits
    /// until IMDS shows the instance in `Terminating:Wait`, then completes
    /// the action at once so that no idle instance is held for the hook's
    /// timeout.
    async fn complete_own_termination(&self) {
        let Some(hook) = &self.hook else {
            return;
        };
        let deadline = Instant::now() + LIFECYCLE_WAIT;
        let period = self.poll.min(Duration::from_millis(500));
        loop {
            match self.target_lifecycle_state().await {
                Ok(Some(state)) if state == "Terminated" => break,
                Ok(_) => {}
                Err(e) => tracing::debug!("{e}"),
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    hook,
                    "the instance did not reach Terminating:Wait within {LIFECYCLE_WAIT:?}; \
                     leaving the lifecycle action to the hook's timeout (is lifecycle_hook right?)"
                );
                return;
            }
            tokio::time::sleep(period).await;
        }
        if let Err(e) = self.complete_lifecycle().await {
            tracing::warn!("{e}; the hook's timeout ends the wait instead");
        }
    }
}

#[async_trait]
impl Platform for Ec2Platform {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Ec2
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }

    fn can_terminate_self(&self) -> bool {
        self.asg.is_some()
    }

    fn has_scale_in_protection(&self) -> bool {
        self.asg.is_some()
    }

    async fn poll(&self) -> Result<Vec<Notice>, PlatformError> {
        let mut notices = Vec::new();
        if self.spot {
            if let Some(json) = self.imds.meta("spot/instance-action").await? {
                match spot_deadline(&json) {
                    Ok((_, deadline)) => notices.push(Notice::SpotInterruption { deadline }),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            if self
                .imds
                .meta("events/recommendations/rebalance")
                .await?
                .is_some()
            {
                notices.push(Notice::Rebalance);
            }
        }
        if self.target_lifecycle_state().await?.as_deref() == Some("Terminated") {
            notices.push(Notice::LifecycleTerminating);
        }
        Ok(notices)
    }

    async fn set_scale_in_protection(&self, protected: bool) -> Result<(), PlatformError> {
        match &self.asg {
            Some(asg) => asg.set_protection(protected).await,
            None => Ok(()),
        }
    }

    async fn terminate_idle(&self) -> IdleExit {
        let Some(asg) = &self.asg else {
            return IdleExit::Exit;
        };
        match asg.terminate(true).await {
            Ok(()) => {
                tracing::info!(
                    instance = %asg.instance_id,
                    asg = %asg.group,
                    "idle: terminating this instance; the group's desired capacity drops by one"
                );
                self.complete_own_termination().await;
                IdleExit::Exit
            }
            Err(e) if e.aws_kind() == Some(AwsErrorKind::AtMinSize) => IdleExit::KeepServing(format!(
                "the Auto Scaling group {} is at its min size ({e}); serving again, trying again after another idle period",
                asg.group
            )),
            Err(e) => IdleExit::KeepServing(format!(
                "cannot terminate this instance ({e}); serving again, trying again after another idle period"
            )),
        }
    }

    async fn lifecycle_heartbeat(&self) -> Result<(), PlatformError> {
        match (&self.asg, &self.hook) {
            (Some(asg), Some(hook)) => asg.lifecycle_heartbeat(hook).await,
            _ => Ok(()),
        }
    }

    async fn complete_lifecycle(&self) -> Result<(), PlatformError> {
        match (&self.asg, &self.hook) {
            (Some(asg), Some(hook)) => {
                asg.complete_lifecycle(hook, "CONTINUE").await?;
                tracing::info!(
                    hook,
                    "completed the terminating lifecycle action (CONTINUE)"
                );
                Ok(())
            }
            (Some(_), None) => {
                tracing::warn!(
                    "the ASG is terminating this instance but lifecycle_hook is not set \
                     (DROVER_LIFECYCLE_HOOK): the hook's timeout ends the wait"
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spot_notice_time_is_the_deadline() {
        let (action, deadline) =
            spot_deadline(r#"{"action": "terminate", "time": "2026-11-23T10:00:00Z"}"#).unwrap();
        assert_eq!(action, "terminate");
        assert_eq!(
            deadline,
            humantime::parse_rfc3339("2026-11-23T10:00:00Z").unwrap()
        );
        assert!(spot_deadline("{}").is_err());
        assert!(spot_deadline(r#"{"action":"stop","time":"soon"}"#).is_err());
    }
}
