//! moto's server with Drover's additions (`tests/moto/server.py`): one
//! process per [`Moto`], on a free loopback port, killed when dropped (and
//! exiting by itself when the test process dies: its stdin closes).
//!
//! The launcher fills moto's Auto Scaling gaps (min-size refusal,
//! `Terminating:Wait`, lifecycle heartbeats and completion) and records every
//! AWS request it receives, for assertions.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_autoscaling::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_autoscaling::types::LaunchTemplateSpecification;
use serde::Deserialize;

pub const REGION: &str = "us-east-1";

/// The venv's python, next to `$DROVER_MOTO_SERVER` (scripts/test.sh sets
/// it to `.venv/bin/moto_server`).
pub fn moto_python() -> PathBuf {
    let server = std::env::var("DROVER_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server")
        });
    server.with_file_name("python")
}

/// One AWS request moto received.
#[derive(Debug, Clone, Deserialize)]
pub struct Call {
    pub service: String,
    pub action: String,
    pub params: std::collections::BTreeMap<String, String>,
    pub status: u16,
    pub time_ms: i64,
    /// DynamoDB: the table and index (Query, Scan) named.
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub index: Option<String>,
    /// DynamoDB: milliseconds moto spent serving it.
    #[serde(default)]
    pub ms: Option<f64>,
}

/// An instance as its Auto Scaling group sees it.
#[derive(Debug, Clone, Deserialize)]
pub struct InstanceInfo {
    pub group: String,
    pub lifecycle_state: String,
    pub protected: bool,
}

pub struct Moto {
    child: Child,
    _stdin: ChildStdin,
    pub endpoint: String,
    http: reqwest::Client,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub async fn start() -> anyhow::Result<Moto> {
        let python = moto_python();
        if !python.exists() {
            bail!(
                "{} not found: run scripts/test.sh (it installs moto[server] into .venv) \
                 or point DROVER_MOTO_SERVER at a venv's moto_server",
                python.display()
            );
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("moto/server.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let line = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                BufReader::new(stdout).read_line(&mut line).map(|_| line)
            }),
        )
        .await
        .context("moto did not announce its port within 60 s")???;
        let port: u16 = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected first line from the moto launcher: {line:?}"))?;
        Ok(Moto {
            child,
            _stdin: stdin,
            endpoint: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        })
    }

    /// An Auto Scaling client on this server (static test credentials).
    pub fn autoscaling(&self) -> aws_sdk_autoscaling::Client {
        let config = aws_sdk_autoscaling::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("test", "test", None, None, "static"))
            .endpoint_url(&self.endpoint)
            .http_client(drover_agent::platform::http_client())
            .build();
        aws_sdk_autoscaling::Client::from_conf(config)
    }

    /// Environment for an agent process that talks to this server.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DROVER_AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", REGION.into()),
            // The credential chain never looks for a real IMDS.
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// An EC2 Query-protocol call (the tests do not link aws-sdk-ec2); the
    /// response body as text.
    pub async fn ec2(&self, action: &str, params: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut form = vec![("Action", action), ("Version", "2016-11-15")];
        form.extend_from_slice(params);
        let resp = self
            .http
            .post(&self.endpoint)
            .header(
                "Authorization",
                format!("AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/ec2/aws4_request, SignedHeaders=host, Signature=0"),
            )
            .form(&form)
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("EC2 {action}: HTTP {status}: {text}");
        }
        Ok(text)
    }

    /// Environment of a coordinator process on this server's DynamoDB
    /// `table` and S3 `bucket`.
    pub fn coordinator_env(&self, table: &str, bucket: &str) -> Vec<(String, String)> {
        [
            ("DROVER_STORE", "dynamodb".to_string()),
            ("DROVER_DYNAMODB_TABLE", table.to_string()),
            ("DROVER_DYNAMODB_ENDPOINT", self.endpoint.clone()),
            ("DROVER_BLOBS", "s3".to_string()),
            ("DROVER_S3_BUCKET", bucket.to_string()),
            ("DROVER_S3_ENDPOINT", self.endpoint.clone()),
            ("DROVER_S3_FORCE_PATH_STYLE", "true".to_string()),
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// An S3 REST call (the tests link no S3 SDK; moto checks no signature).
    async fn s3(&self, method: reqwest::Method, path: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .request(method.clone(), format!("{}/{path}", self.endpoint))
            .header(
                "Authorization",
                format!("AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/s3/aws4_request, SignedHeaders=host, Signature=0"),
            )
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("S3 {method} /{path}: HTTP {status}: {text}");
        }
        Ok(text)
    }

    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.s3(reqwest::Method::PUT, bucket).await.map(|_| ())
    }

    /// Keys of the objects in `bucket` under `prefix` (up to 1,000).
    pub async fn s3_keys(&self, bucket: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
        let xml = self
            .s3(
                reqwest::Method::GET,
                &format!("{bucket}?list-type=2&prefix={prefix}"),
            )
            .await?;
        Ok(xml
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect())
    }

    /// The EC2 state name of an instance (`running`, `terminated`…).
    pub async fn ec2_state(&self, instance_id: &str) -> anyhow::Result<String> {
        let xml = self
            .ec2("DescribeInstances", &[("InstanceId.1", instance_id)])
            .await?;
        let state = xml
            .split("<instanceState>")
            .nth(1)
            .and_then(|s| s.split("<name>").nth(1))
            .and_then(|s| s.split("</name>").next())
            .with_context(|| format!("no instance state in {xml}"))?;
        Ok(state.to_string())
    }

    /// Creates a launch template and a group of `desired` instances in
    /// `us-east-1a`, with a terminating lifecycle hook when asked; returns
    /// the group's instance ids.
    pub async fn create_group(&self, group: &Group) -> anyhow::Result<Vec<String>> {
        let template = format!("{}-template", group.name);
        self.ec2(
            "CreateLaunchTemplate",
            &[
                ("LaunchTemplateName", &template),
                ("LaunchTemplateData.ImageId", "ami-12c6146b"),
                ("LaunchTemplateData.InstanceType", "m5.large"),
            ],
        )
        .await?;
        let asg = self.autoscaling();
        asg.create_auto_scaling_group()
            .auto_scaling_group_name(&group.name)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_name(&template)
                    .build(),
            )
            .min_size(group.min)
            .max_size(group.max)
            .desired_capacity(group.desired)
            .availability_zones("us-east-1a")
            .send()
            .await?;
        if let Some(hook) = &group.terminating_hook {
            asg.put_lifecycle_hook()
                .auto_scaling_group_name(&group.name)
                .lifecycle_hook_name(hook)
                .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
                .heartbeat_timeout(group.hook_timeout_secs)
                .default_result("CONTINUE")
                .send()
                .await?;
        }
        self.group_instances(&group.name).await
    }

    /// Instance ids of the group, and its desired capacity.
    pub async fn group_state(&self, name: &str) -> anyhow::Result<(Vec<String>, i32)> {
        let out = self
            .autoscaling()
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await?;
        let group = out
            .auto_scaling_groups()
            .first()
            .with_context(|| format!("no group {name}"))?;
        let ids = group
            .instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        Ok((ids, group.desired_capacity().unwrap_or_default()))
    }

    pub async fn group_instances(&self, name: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.group_state(name).await?.0)
    }

    /// Every AWS request received so far.
    pub async fn calls(&self) -> anyhow::Result<Vec<Call>> {
        Ok(self
            .http
            .get(format!("{}/_drover/calls", self.endpoint))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The Auto Scaling requests of one action.
    pub async fn calls_of(&self, action: &str) -> anyhow::Result<Vec<Call>> {
        Ok(self
            .calls()
            .await?
            .into_iter()
            .filter(|c| c.service == "autoscaling" && c.action == action)
            .collect())
    }

    /// The next `count` requests of `action` fail with `code`/`message`
    /// (HTTP `status`).
    pub async fn fault(
        &self,
        action: &str,
        status: u16,
        code: &str,
        message: &str,
        count: u32,
    ) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_drover/faults", self.endpoint))
            .json(&serde_json::json!({
                "action": action, "status": status, "code": code, "message": message, "count": count,
            }))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// How the instance's group sees it; `None` once it left the group.
    pub async fn instance(&self, instance_id: &str) -> anyhow::Result<Option<InstanceInfo>> {
        instance_info(&self.http, &self.endpoint, instance_id).await
    }
}

/// `drover-coordinator init-table`, as an operator runs it.
pub async fn init_table(env: &[(String, String)]) {
    let status = tokio::process::Command::new(crate::binary("drover-coordinator"))
        .arg("init-table")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .status()
        .await
        .expect("running drover-coordinator init-table");
    assert!(status.success(), "init-table: {status}");
}

/// `GET /_drover/instance/<id>` (also used by the IMDS emulator).
pub async fn instance_info(
    http: &reqwest::Client,
    endpoint: &str,
    instance_id: &str,
) -> anyhow::Result<Option<InstanceInfo>> {
    let resp = http
        .get(format!("{endpoint}/_drover/instance/{instance_id}"))
        .send()
        .await?;
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    Ok(Some(resp.error_for_status()?.json().await?))
}

/// A group for [`Moto::create_group`].
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    pub terminating_hook: Option<String>,
    pub hook_timeout_secs: i32,
}

impl Group {
    pub fn new(name: &str, min: i32, max: i32, desired: i32) -> Group {
        Group {
            name: name.to_string(),
            min,
            max,
            desired,
            terminating_hook: None,
            hook_timeout_secs: 300,
        }
    }

    pub fn with_terminating_hook(mut self, hook: &str) -> Group {
        self.terminating_hook = Some(hook.to_string());
        self
    }
}
