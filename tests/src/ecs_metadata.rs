//! An ECS task metadata endpoint v4 emulator on a loopback port: the
//! container's metadata at the root of `$ECS_CONTAINER_METADATA_URI_V4`, the
//! task's at `/task`, in the documented shape for a Fargate task.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the task is.
#[derive(Debug, Clone)]
pub struct Task {
    pub cluster: String,
    pub task_arn: String,
    pub az: String,
    /// vCPUs.
    pub cpu: f64,
    pub memory_mib: u64,
}

impl Default for Task {
    fn default() -> Self {
        Task {
            cluster: "arn:aws:ecs:us-east-1:123456789012:cluster/drover".into(),
            task_arn:
                "arn:aws:ecs:us-east-1:123456789012:task/drover/0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c"
                    .into(),
            az: "us-east-1b".into(),
            cpu: 1.0,
            memory_mib: 2048,
        }
    }
}

pub struct EcsMetadata {
    /// The value of `ECS_CONTAINER_METADATA_URI_V4`.
    pub uri: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EcsMetadata {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const CONTAINER_ID: &str = "cd189a933e5849daa93386466019ab50-2495160603";

fn container(task: &Task) -> Value {
    json!({
        "DockerId": CONTAINER_ID,
        "Name": "drover-agent",
        "DockerName": "drover-agent",
        "Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/drover-agent:latest",
        "ImageID": "sha256:6a3b1d0f1f2cb3e2ee7ebc1b8a0d5f2a8c9b1e2d3f4a5b6c7d8e9f0a1b2c3d4e",
        "Labels": {
            "com.amazonaws.ecs.cluster": task.cluster,
            "com.amazonaws.ecs.container-name": "drover-agent",
            "com.amazonaws.ecs.task-arn": task.task_arn,
            "com.amazonaws.ecs.task-definition-family": "drover-worker",
            "com.amazonaws.ecs.task-definition-version": "3"
        },
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Limits": { "CPU": 2 },
        "CreatedAt": "2026-11-23T10:00:00.000Z",
        "StartedAt": "2026-11-23T10:00:01.000Z",
        "Type": "NORMAL",
        "LogDriver": "awslogs",
        "ContainerARN": format!("{}/container/1", task.task_arn),
        "Networks": [{
            "NetworkMode": "awsvpc",
            "IPv4Addresses": ["10.0.2.106"],
            "AttachmentIndex": 0,
            "MACAddress": "0e:9e:32:c7:48:85",
            "IPv4SubnetCIDRBlock": "10.0.2.0/24",
            "PrivateDNSName": "ip-10-0-2-106.us-east-1.compute.internal",
            "SubnetGatewayIpv4Address": "10.0.2.1/24"
        }]
    })
}

fn task_json(task: &Task) -> Value {
    json!({
        "Cluster": task.cluster,
        "TaskARN": task.task_arn,
        "Family": "drover-worker",
        "Revision": "3",
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Limits": { "CPU": task.cpu, "Memory": task.memory_mib },
        "PullStartedAt": "2026-11-23T09:59:50.000Z",
        "PullStoppedAt": "2026-11-23T10:00:00.000Z",
        "AvailabilityZone": task.az,
        "LaunchType": "FARGATE",
        "Containers": [container(task)],
        "ClockDrift": {
            "ClockErrorBound": 0.446931,
            "ReferenceTimestamp": "2026-11-23T10:00:00Z",
            "ClockSynchronizationStatus": "SYNCHRONIZED"
        },
        "EphemeralStorageMetrics": { "Utilized": 261, "Reserved": 20496 }
    })
}

impl EcsMetadata {
    pub async fn start(task: Task) -> EcsMetadata {
        let prefix = format!("/v4/{CONTAINER_ID}");
        let app = Router::new()
            .route(
                &prefix,
                get(|State(t): State<Task>| async move { Json(container(&t)) }),
            )
            .route(
                &format!("{prefix}/task"),
                get(|State(t): State<Task>| async move { Json(task_json(&t)) }),
            )
            .with_state(task);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ECS metadata emulator");
        let uri = format!("http://{}{prefix}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        EcsMetadata { uri, task }
    }
}
