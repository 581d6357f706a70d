//! `drover-agent bootstrap`, the real binary, as user-data runs it: instance
//! identity and tags from the IMDSv2 emulator, the join token from moto's SSM
//! Parameter Store or Secrets Manager, the instance in a moto Auto Scaling
//! group that a failed boot marks Unhealthy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use aws_sdk_autoscaling::config::{BehaviorVersion, Credentials, Region};
use drover_agent::AgentConfig;
use drover_tests::aws::{Group, Moto, REGION};
use drover_tests::imds::{Identity, Imds};

const TOKEN: &str = "bootstrap-join-token-7f3a9c1e5b";
const COORDINATOR: &str = "http://drover-nlb.internal:7070";

async fn start_moto() -> Moto {
    Moto::start()
        .await
        .expect("moto (run scripts/test.sh once to install it)")
}

/// An SDK client of `$sdk` on moto (static test credentials).
macro_rules! client {
    ($sdk:ident, $moto:expr) => {
        $sdk::Client::from_conf(
            $sdk::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .credentials_provider(Credentials::new("test", "test", None, None, "static"))
                .endpoint_url(&$moto.endpoint)
                .http_client(drover_agent::platform::http_client())
                .build(),
        )
    };
}

async fn put_secure_string(moto: &Moto, name: &str, value: &str) {
    client!(aws_sdk_ssm, moto)
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .expect("PutParameter");
}

async fn create_secret(moto: &Moto, name: &str, value: &str) {
    client!(aws_sdk_secretsmanager, moto)
        .create_secret()
        .name(name)
        .secret_string(value)
        .send()
        .await
        .expect("CreateSecret");
}

/// One instance in group `name`, and an IMDS that serves it with `tags`
/// (`None`: instance metadata tags off).
async fn instance(moto: &Moto, name: &str, tags: Option<&[(&str, &str)]>) -> (String, Imds) {
    let id = moto
        .create_group(&Group::new(name, 0, 2, 1))
        .await
        .expect("group")[0]
        .clone();
    let mut identity = Identity::new(&id);
    if let Some(tags) = tags {
        identity.asg_tag = Some(name.to_string());
        identity.tags = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    (id, Imds::start(identity).await)
}

fn fleet_tags(parameter: &str) -> Vec<(&str, &str)> {
    vec![
        ("drover:coordinator", COORDINATOR),
        ("drover:pool", "cpu"),
        ("drover:join-token-parameter", parameter),
        ("drover:lifecycle-hook", "drover-drain"),
        ("Name", "drover-cpu"),
    ]
}

/// Runs `drover-agent bootstrap` against `imds` and `moto`, writing under
/// `root`.
async fn bootstrap(moto: &Moto, imds: &Imds, root: &Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(drover_tests::binary("drover-agent"));
    command
        .arg("bootstrap")
        .arg("--output")
        .arg(config_path(root))
        .arg("--data-dir")
        .arg(root.join("var/lib/drover"))
        .args(args)
        .env("DROVER_IMDS_ENDPOINT", &imds.endpoint)
        .env("RUST_LOG", "debug")
        .env_remove("DROVER_COORDINATOR")
        .env_remove("DROVER_POOL")
        .env_remove("DROVER_DATA_DIR")
        .kill_on_drop(true);
    for (k, v) in moto.agent_env() {
        command.env(k, v);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("bootstrap finished within 60 s")
        .expect("drover-agent runs");
    let text = printed(&output);
    assert!(
        !text.contains(TOKEN),
        "the join token was printed or logged:\n{text}"
    );
    output
}

fn config_path(root: &Path) -> PathBuf {
    root.join("etc/drover/agent.toml")
}

fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The instance's health as its group reports it.
async fn health(moto: &Moto, instance_id: &str) -> String {
    let out = moto
        .autoscaling()
        .describe_auto_scaling_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .expect("DescribeAutoScalingInstances");
    out.auto_scaling_instances()
        .first()
        .and_then(|i| i.health_status())
        .expect("the instance is in its group")
        .to_ascii_uppercase()
}

fn assert_written(root: &Path, instance_id: &str, pool: &str, hook: Option<&str>) -> AgentConfig {
    use std::os::unix::fs::PermissionsExt as _;
    let path = config_path(root);
    let mode = std::fs::metadata(&path)
        .expect("agent.toml written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "agent.toml is private");
    let config = AgentConfig::from_toml_file(&path).expect("agent.toml parses");
    config.validate().expect("agent.toml is valid");
    assert_eq!(config.coordinator, COORDINATOR);
    assert_eq!(config.join_token, TOKEN);
    assert_eq!(config.pool, pool);
    assert_eq!(config.agent_id, instance_id);
    assert_eq!(config.lifecycle_hook.as_deref(), hook);
    assert_eq!(config.data_dir, root.join("var/lib/drover"));
    assert_eq!(config.platform, drover_agent::config::PlatformChoice::Ec2);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_boot_writes_the_agent_config_from_tags_and_a_secure_string() {
    let moto = start_moto().await;
    put_secure_string(&moto, "/drover/join-token/cpu", TOKEN).await;
    let tags = fleet_tags("/drover/join-token/cpu");
    let (id, imds) = instance(&moto, "drover-cpu", Some(&tags)).await;
    let root = tempfile::tempdir().unwrap();

    let out = bootstrap(&moto, &imds, root.path(), &[]).await;
    assert!(out.status.success(), "{}", printed(&out));
    let config = assert_written(root.path(), &id, "cpu", Some("drover-drain"));
    // The agent started from this file talks to the same IMDS and AWS.
    assert_eq!(config.imds_endpoint, imds.endpoint);
    assert_eq!(config.aws_endpoint.as_deref(), Some(moto.endpoint.as_str()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&id) && stdout.contains("pool cpu"),
        "{stdout}"
    );

    assert_eq!(health(&moto, &id).await, "HEALTHY");
    assert!(moto.calls_of("SetInstanceHealth").await.unwrap().is_empty());
    assert_eq!(imds.unauthorized(), 0, "every IMDS read carried a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_secrets_manager_by_reference_or_by_tag() {
    let moto = start_moto().await;
    create_secret(&moto, "drover/join-token/gpu", TOKEN).await;

    // infra/fleet.yaml's way: SSM's reference to the secret.
    let tags = fleet_tags("/aws/reference/secretsmanager/drover/join-token/gpu");
    let (id, imds) = instance(&moto, "drover-gpu", Some(&tags)).await;
    let root = tempfile::tempdir().unwrap();
    let out = bootstrap(&moto, &imds, root.path(), &["--pool", "gpu"]).await;
    assert!(out.status.success(), "{}", printed(&out));
    assert_written(root.path(), &id, "gpu", Some("drover-drain"));

    // A secret tag instead of the parameter; no lifecycle hook.
    let tags = [
        ("drover:coordinator", COORDINATOR),
        ("drover:pool", "gpu"),
        ("drover:join-token-secret", "drover/join-token/gpu"),
    ];
    let (id, imds) = instance(&moto, "drover-gpu-2", Some(&tags)).await;
    let root = tempfile::tempdir().unwrap();
    let out = bootstrap(&moto, &imds, root.path(), &[]).await;
    assert!(out.status.success(), "{}", printed(&out));
    assert_written(root.path(), &id, "gpu", None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_fails_naming_the_parameter_and_marks_the_instance_unhealthy() {
    let moto = start_moto().await;
    // A token exists, but not where the tag points.
    put_secure_string(&moto, "/drover/join-token/cpu", TOKEN).await;
    let tags = fleet_tags("/drover/join-token/typo");
    let (id, imds) = instance(&moto, "drover-cpu", Some(&tags)).await;
    let root = tempfile::tempdir().unwrap();

    let out = bootstrap(&moto, &imds, root.path(), &[]).await;
    assert!(!out.status.success(), "{}", printed(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "SSM parameter /drover/join-token/typo does not exist",
        "drover:join-token-parameter",
        &format!("instance {id} is marked Unhealthy"),
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    assert!(!config_path(root.path()).exists(), "nothing written");

    assert_eq!(health(&moto, &id).await, "UNHEALTHY");
    let marks = moto.calls_of("SetInstanceHealth").await.unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].params["InstanceId"], id);
    assert_eq!(marks[0].params["HealthStatus"], "Unhealthy");
    assert_eq!(marks[0].params["ShouldRespectGracePeriod"], "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_off_or_a_later_user_data_failure_mark_the_instance_unhealthy() {
    let moto = start_moto().await;
    let (id, imds) = instance(&moto, "untagged", None).await;
    let root = tempfile::tempdir().unwrap();
    let out = bootstrap(&moto, &imds, root.path(), &[]).await;
    assert!(!out.status.success(), "{}", printed(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InstanceMetadataTags: enabled") && stderr.contains("drover:coordinator"),
        "{stderr}"
    );
    assert_eq!(health(&moto, &id).await, "UNHEALTHY");

    // user-data's `|| drover-agent bootstrap --fail ...` after the service
    // did not start.
    let tags = BTreeMap::from([("drover:pool", "cpu")]);
    let tags: Vec<(&str, &str)> = tags.into_iter().collect();
    let (id, imds) = instance(&moto, "tagged", Some(&tags)).await;
    let out = bootstrap(
        &moto,
        &imds,
        root.path(),
        &["--fail", "drover-agent.service did not start"],
    )
    .await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("drover-agent.service did not start"),
        "{stderr}"
    );
    assert_eq!(health(&moto, &id).await, "UNHEALTHY");
}
