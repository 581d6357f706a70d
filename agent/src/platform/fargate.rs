//! ECS Fargate: identity from the task metadata endpoint v4
//! (`$ECS_CONTAINER_METADATA_URI_V4/task`). An idle agent exits 0, which
//! stops its standalone task; SIGTERM from ECS drains within the task's stop
//! timeout (the agent loop handles both).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{base_labels, IdleExit, Platform, PlatformError, PlatformKind};

/// The fields of `GET /task` the agent uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TaskMetadata {
    #[serde(rename = "TaskARN")]
    task_arn: String,
    cluster: String,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    limits: Option<Limits>,
}

#[derive(Debug, Deserialize)]
struct Limits {
    /// vCPUs (0.25, 1, 4…).
    #[serde(rename = "CPU", default)]
    cpu: Option<f64>,
    /// MiB.
    #[serde(rename = "Memory", default)]
    memory: Option<u64>,
}

pub struct FargatePlatform {
    labels: BTreeMap<String, String>,
    limits: Option<(u32, u64)>,
}

impl FargatePlatform {
    /// Reads the task metadata; `base` is `$ECS_CONTAINER_METADATA_URI_V4`.
    pub async fn detect(base: &str) -> Result<FargatePlatform, PlatformError> {
        let url = format!("{}/task", base.trim_end_matches('/'));
        let err = |message: String| PlatformError::TaskMetadata {
            url: url.clone(),
            message,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| err(e.to_string()))?;
        let resp = http
            .get(&url)
            .send()
            .await
            .map_err(|e| err(format!("no answer: {e}")))?;
        if !resp.status().is_success() {
            return Err(err(format!("HTTP {}", resp.status())));
        }
        let task: TaskMetadata = resp
            .json()
            .await
            .map_err(|e| err(format!("unexpected task metadata: {e}")))?;
        Ok(FargatePlatform::from_metadata(task))
    }

    fn from_metadata(task: TaskMetadata) -> FargatePlatform {
        let mut labels = base_labels(PlatformKind::Fargate);
        // arn:aws:ecs:<region>:<account>:task/<cluster>/<id>
        if let Some(region) = task.task_arn.split(':').nth(3).filter(|r| !r.is_empty()) {
            labels.insert("region".into(), region.to_string());
        }
        labels.insert("task_arn".into(), task.task_arn);
        labels.insert("cluster".into(), task.cluster);
        if let Some(az) = task.availability_zone.filter(|az| !az.is_empty()) {
            labels.insert("az".into(), az);
        }
        let limits = task.limits.and_then(|l| match (l.cpu, l.memory) {
            (Some(cpu), Some(memory)) if cpu > 0.0 && memory > 0 => {
                Some(((cpu * 1000.0).round() as u32, memory))
            }
            _ => None,
        });
        FargatePlatform { labels, limits }
    }
}

#[async_trait]
impl Platform for FargatePlatform {
    fn kind(&self) -> PlatformKind {
        PlatformKind::Fargate
    }

    fn labels(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }

    fn capacity_limits(&self) -> Option<(u32, u64)> {
        self.limits
    }

    fn can_terminate_self(&self) -> bool {
        true
    }

    async fn terminate_idle(&self) -> IdleExit {
        tracing::info!("idle on fargate: exiting, which stops this task");
        IdleExit::Exit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_metadata_becomes_labels_and_limits() {
        let task: TaskMetadata = serde_json::from_str(
            r#"{"Cluster":"arn:aws:ecs:eu-west-1:111122223333:cluster/workers",
                "TaskARN":"arn:aws:ecs:eu-west-1:111122223333:task/workers/abc",
                "Family":"drover","Revision":"3","AvailabilityZone":"eu-west-1b",
                "LaunchType":"FARGATE","Limits":{"CPU":0.25,"Memory":512},"Containers":[]}"#,
        )
        .unwrap();
        let p = FargatePlatform::from_metadata(task);
        assert_eq!(p.labels["platform"], "fargate");
        assert_eq!(
            p.labels["task_arn"],
            "arn:aws:ecs:eu-west-1:111122223333:task/workers/abc"
        );
        assert_eq!(
            p.labels["cluster"],
            "arn:aws:ecs:eu-west-1:111122223333:cluster/workers"
        );
        assert_eq!(p.labels["az"], "eu-west-1b");
        assert_eq!(p.labels["region"], "eu-west-1");
        assert_eq!(p.limits, Some((250, 512)));
    }
}
