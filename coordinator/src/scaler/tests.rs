//! The scaler against moto's server (Auto Scaling, EC2, ECS), with a
//! `ManualClock`: cooldowns, backoffs, session expiry and grace periods move
//! only when a test moves them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_autoscaling::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_autoscaling::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_autoscaling::error::BoxError;
use aws_sdk_ecs::types::{Compatibility, ContainerDefinition, NetworkMode};
use drover_proto::model::{JobSpec, Pool, PoolList};
use drover_proto::v1;

use super::*;
use crate::blob::LocalBlobStore;
use crate::clock::ManualClock;
use crate::config::{AsgScaling, FargateScaling, PoolConfig};
use crate::moto;
use crate::store::SqliteStore;

const T0: i64 = 1_700_000_000_000;

/// Counts AWS calls by operation (`SetDesiredCapacity`, `RunTask`, …).
#[derive(Debug, Clone, Default)]
struct Calls(Arc<Mutex<BTreeMap<String, u64>>>);

impl Calls {
    fn count(&self, operation: &str) -> u64 {
        self.0.lock().unwrap().get(operation).copied().unwrap_or(0)
    }
}

impl Intercept for Calls {
    fn name(&self) -> &'static str {
        "Calls"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        // ECS speaks JSON (the operation in a header), Auto Scaling the
        // Query protocol (`Action=` in the form body).
        let operation = match request.headers().get("x-amz-target") {
            Some(target) => target.rsplit('.').next().unwrap_or_default().to_string(),
            None => request
                .body()
                .bytes()
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|body| {
                    body.split('&')
                        .find_map(|kv| kv.strip_prefix("Action="))
                        .map(str::to_string)
                })
                .unwrap_or_default(),
        };
        *self.0.lock().unwrap().entry(operation).or_default() += 1;
        Ok(())
    }
}

/// Clients pointed at moto that count their calls.
async fn counted_cloud() -> (Cloud, Calls) {
    let shared = moto::sdk_config().await;
    let calls = Calls::default();
    let cloud = Cloud {
        autoscaling: aws_sdk_autoscaling::Client::from_conf(
            aws_sdk_autoscaling::config::Builder::from(&shared)
                .interceptor(calls.clone())
                .build(),
        ),
        ecs: aws_sdk_ecs::Client::from_conf(
            aws_sdk_ecs::config::Builder::from(&shared)
                .interceptor(calls.clone())
                .build(),
        ),
    };
    (cloud, calls)
}

/// A fresh name for moto resources (one server serves many tests).
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// An Auto Scaling group from a launch configuration; returns its name.
async fn create_group(cloud: &Cloud, min: i32, max: i32, desired: i32) -> String {
    let name = unique("asg");
    cloud
        .autoscaling
        .create_launch_configuration()
        .launch_configuration_name(&name)
        .image_id("ami-12345678")
        .instance_type("t3.micro")
        .send()
        .await
        .unwrap();
    cloud
        .autoscaling
        .create_auto_scaling_group()
        .auto_scaling_group_name(&name)
        .launch_configuration_name(&name)
        .min_size(min)
        .max_size(max)
        .desired_capacity(desired)
        .availability_zones("us-east-1a")
        .send()
        .await
        .unwrap();
    name
}

/// The group's desired capacity and its instances' ids.
async fn group(cloud: &Cloud, name: &str) -> (u64, Vec<String>) {
    let out = cloud
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .unwrap();
    let g = &out.auto_scaling_groups()[0];
    (
        g.desired_capacity().unwrap() as u64,
        g.instances()
            .iter()
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect(),
    )
}

fn asg(name: &str, slots: u32) -> AsgScaling {
    AsgScaling {
        asg_name: name.to_string(),
        slots_per_instance: slots,
        min: None,
        max: None,
        cooldown_ms: 60_000,
        capacity: None,
        labels: BTreeMap::new(),
        zombie_grace_ms: None,
    }
}

struct Env {
    service: Arc<Service>,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new(pools: Vec<(&str, ScalingConfig)>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::dev(dir.path());
        config.pools = pools
            .into_iter()
            .map(|(name, scaling)| PoolConfig {
                name: name.to_string(),
                session_ttl_ms: None,
                scaling: Some(scaling),
            })
            .chain([PoolConfig {
                name: "default".into(),
                session_ttl_ms: None,
                scaling: None,
            }])
            .collect();
        config.validate().unwrap();
        let clock = ManualClock::new(T0);
        let service = Service::new(
            Arc::new(SqliteStore::in_memory().unwrap()),
            Arc::new(LocalBlobStore::new(dir.path().join("blobs"))),
            Arc::new(clock.clone()),
            config,
        );
        Env {
            service,
            clock,
            _dir: dir,
        }
    }

    async fn submit(&self, pool: &str, n: usize) -> Vec<String> {
        self.submit_specs((0..n).map(|_| job(pool)).collect()).await
    }

    async fn submit_specs(&self, specs: Vec<JobSpec>) -> Vec<String> {
        self.service
            .submit(specs)
            .await
            .unwrap()
            .jobs
            .into_iter()
            .map(|j| j.id)
            .collect()
    }

    async fn pool(&self, name: &str) -> Pool {
        self.service
            .pools()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.pool == name)
            .unwrap()
    }

    async fn scaling(&self, name: &str) -> PoolScaling {
        self.pool(name).await.scaling.expect("a scaling pool")
    }
}

fn job(pool: &str) -> JobSpec {
    let mut spec = JobSpec::command(["true"]);
    spec.pool = pool.to_string();
    spec
}

#[tokio::test]
async fn asg_desired_capacity_follows_demand_once_with_a_cooldown() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 20, 0).await;
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(asg(&name, 2)))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    env.submit("cpu", 20).await;

    let report = scaler.tick().await.unwrap();
    assert!(report.leader);
    assert_eq!(report.decisions["cpu"].action, "scale_out");
    assert_eq!(group(&cloud, &name).await.0, 10, "20 jobs / 2 slots");
    assert_eq!(calls.count("SetDesiredCapacity"), 1);

    // Nothing changed: no call, however many ticks.
    for _ in 0..3 {
        let report = scaler.tick().await.unwrap();
        assert_eq!(report.decisions["cpu"].action, "none");
    }
    assert_eq!(calls.count("SetDesiredCapacity"), 1);

    // More demand within the cooldown: held back.
    env.submit("cpu", 4).await;
    env.clock.advance_ms(59_000);
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["cpu"].action, "cooldown");
    assert_eq!(group(&cloud, &name).await.0, 10);
    assert_eq!(calls.count("SetDesiredCapacity"), 1);

    env.clock.advance_ms(1_000);
    scaler.tick().await.unwrap();
    assert_eq!(group(&cloud, &name).await.0, 12, "24 jobs / 2 slots");
    assert_eq!(calls.count("SetDesiredCapacity"), 2);

    // Less demand never scales in: that is the agents' idle exit.
    let queued = env
        .service
        .list_jobs(&Default::default(), None, Some(1000))
        .await
        .unwrap();
    for job in queued.items.iter().take(20) {
        env.service.cancel(&job.id).await.unwrap();
    }
    env.clock.advance_ms(120_000);
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["cpu"].action, "none");
    assert_eq!(group(&cloud, &name).await.0, 12);
    assert_eq!(calls.count("SetDesiredCapacity"), 2);

    let scaling = env.scaling("cpu").await;
    assert_eq!(
        (scaling.demand_slots, scaling.wanted, scaling.desired),
        (Some(4), Some(2), Some(12))
    );
    let action = scaling.last_action.unwrap();
    assert_eq!(action.action, "scale_out");
    assert_eq!(action.at_ms, T0 + 60_000);
    assert!(action.reason.contains("10 → 12"), "{}", action.reason);
    assert_eq!(
        env.service.metrics.scaler_decisions.get("cpu", "scale_out"),
        2
    );
}

#[tokio::test]
async fn asg_desired_capacity_is_capped_by_max() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 1, 20, 1).await;
    let mut cfg = asg(&name, 2);
    cfg.max = Some(6);
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(cfg))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    env.submit("cpu", 20).await;
    scaler.tick().await.unwrap();
    scaler.tick().await.unwrap();
    assert_eq!(group(&cloud, &name).await.0, 6);
    assert_eq!(calls.count("SetDesiredCapacity"), 1);
    let scaling = env.scaling("cpu").await;
    assert_eq!(
        (
            scaling.min,
            scaling.max,
            scaling.demand_slots,
            scaling.wanted
        ),
        (Some(1), Some(6), Some(20), Some(6)),
        "min is the group's own; max is configured"
    );
}

#[tokio::test]
async fn paused_pool_does_not_scale_out() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 20, 0).await;
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(asg(&name, 1)))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    env.submit("cpu", 3).await;
    env.service.set_pool_paused("cpu", true).await.unwrap();
    for _ in 0..2 {
        let report = scaler.tick().await.unwrap();
        assert_eq!(report.decisions["cpu"].action, "paused");
        env.clock.advance_ms(600_000);
    }
    assert_eq!(group(&cloud, &name).await.0, 0);
    assert_eq!(calls.count("SetDesiredCapacity"), 0);

    env.service.set_pool_paused("cpu", false).await.unwrap();
    scaler.tick().await.unwrap();
    assert_eq!(group(&cloud, &name).await.0, 3);
}

#[tokio::test]
async fn jobs_the_group_cannot_run_are_not_demand() {
    let (cloud, _calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 20, 0).await;
    let mut cfg = asg(&name, 2);
    cfg.capacity = Some(WorkerCapacity {
        cpu_millis: Some(4000),
        memory_mib: Some(16_384),
        disk_gib: None,
        gpus: 1,
        gpu_model: Some("t4".into()),
    });
    cfg.labels = BTreeMap::from([("arch".to_string(), "x86_64".to_string())]);
    let env = Env::new(vec![("gpu", ScalingConfig::Asg(cfg))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    let with = |f: &dyn Fn(&mut JobSpec)| {
        let mut spec = job("gpu");
        f(&mut spec);
        spec
    };
    let mut specs = Vec::new();
    for _ in 0..3 {
        specs.push(with(&|s| {
            s.resources.gpus = 1;
            s.resources.gpu_model = Some("a100".into());
        }));
        specs.push(with(&|s| {
            s.constraints = BTreeMap::from([("arch".to_string(), "arm64".to_string())]);
        }));
        specs.push(with(&|s| s.resources.memory_mib = 65_536));
    }
    for _ in 0..2 {
        specs.push(with(&|s| {
            s.resources.gpus = 1;
            s.resources.gpu_model = Some("t4".into());
        }));
        specs.push(with(&|s| {
            s.constraints = BTreeMap::from([
                ("arch".to_string(), "x86_64".to_string()),
                ("platform".to_string(), "ec2".to_string()),
            ]);
        }));
    }
    env.submit_specs(specs).await;
    scaler.tick().await.unwrap();
    assert_eq!(group(&cloud, &name).await.0, 2, "4 fitting jobs / 2 slots");
    let scaling = env.scaling("gpu").await;
    assert_eq!(scaling.demand_slots, Some(4));
    let reason = scaling.last_action.unwrap().reason;
    assert!(reason.contains("9 queued jobs need more"), "{reason}");
}

/// A VPC, a subnet, a security group, a cluster and a Fargate task
/// definition in moto.
async fn fargate_setup(cloud: &Cloud) -> FargateScaling {
    let vpc = moto::xml_value(
        &moto::ec2("CreateVpc", &[("CidrBlock", "10.0.0.0/16")]).await,
        "vpcId",
    );
    // moto 5.2.5's RunTask fails (HTTP 500) in a VPC without DNS host names.
    moto::ec2(
        "ModifyVpcAttribute",
        &[("VpcId", &vpc), ("EnableDnsHostnames.Value", "true")],
    )
    .await;
    let subnet = moto::xml_value(
        &moto::ec2(
            "CreateSubnet",
            &[
                ("VpcId", &vpc),
                ("CidrBlock", "10.0.1.0/24"),
                ("AvailabilityZone", "us-east-1a"),
            ],
        )
        .await,
        "subnetId",
    );
    let group_name = unique("agents");
    let security_group = moto::xml_value(
        &moto::ec2(
            "CreateSecurityGroup",
            &[
                ("GroupName", &group_name),
                ("GroupDescription", "drover agents"),
                ("VpcId", &vpc),
            ],
        )
        .await,
        "groupId",
    );
    let cluster = unique("cluster");
    cloud
        .ecs
        .create_cluster()
        .cluster_name(&cluster)
        .send()
        .await
        .unwrap();
    let family = unique("agent");
    cloud
        .ecs
        .register_task_definition()
        .family(&family)
        .requires_compatibilities(Compatibility::Fargate)
        .network_mode(NetworkMode::Awsvpc)
        .cpu("1024")
        .memory("2048")
        .container_definitions(
            ContainerDefinition::builder()
                .name("agent")
                .image("drover-agent")
                .cpu(1024)
                .memory(2048)
                .build(),
        )
        .send()
        .await
        .unwrap();
    FargateScaling {
        cluster,
        task_definition: family,
        subnets: vec![subnet],
        security_groups: vec![security_group],
        assign_public_ip: false,
        slots_per_task: 2,
        min_tasks: 0,
        max_tasks: 10,
        capacity: None,
        labels: BTreeMap::new(),
    }
}

async fn pool_tasks(cloud: &Cloud, cfg: &FargateScaling, pool: &str) -> Vec<String> {
    cloud
        .ecs
        .list_tasks()
        .cluster(&cfg.cluster)
        .started_by(fargate::started_by(pool))
        .desired_status(aws_sdk_ecs::types::DesiredStatus::Running)
        .send()
        .await
        .unwrap()
        .task_arns()
        .to_vec()
}

#[tokio::test]
async fn fargate_launches_the_missing_workers_and_never_over_launches() {
    let (cloud, calls) = counted_cloud().await;
    let cfg = fargate_setup(&cloud).await;
    let env = Env::new(vec![("batch", ScalingConfig::Fargate(cfg.clone()))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());

    env.submit("batch", 7).await;
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "launch", "{report:?}");
    assert_eq!(
        pool_tasks(&cloud, &cfg, "batch").await.len(),
        4,
        "7 jobs / 2 slots"
    );
    for _ in 0..3 {
        let report = scaler.tick().await.unwrap();
        assert_eq!(report.decisions["batch"].action, "none");
    }
    assert_eq!(
        calls.count("RunTask"),
        1,
        "repeated ticks launch nothing more"
    );
    assert_eq!(pool_tasks(&cloud, &cfg, "batch").await.len(), 4);

    // A burst: only the difference is launched.
    env.submit("batch", 6).await;
    scaler.tick().await.unwrap();
    scaler.tick().await.unwrap();
    let tasks = pool_tasks(&cloud, &cfg, "batch").await;
    assert_eq!(tasks.len(), 7, "13 jobs / 2 slots");
    assert_eq!(calls.count("RunTask"), 2);

    // A task that stopped is replaced.
    cloud
        .ecs
        .stop_task()
        .cluster(&cfg.cluster)
        .task(&tasks[0])
        .send()
        .await
        .unwrap();
    scaler.tick().await.unwrap();
    assert_eq!(pool_tasks(&cloud, &cfg, "batch").await.len(), 7);
    assert_eq!(calls.count("RunTask"), 3);

    // The cap holds however large the burst.
    env.submit("batch", 100).await;
    scaler.tick().await.unwrap();
    scaler.tick().await.unwrap();
    assert_eq!(pool_tasks(&cloud, &cfg, "batch").await.len(), 10);
    let scaling = env.scaling("batch").await;
    assert_eq!(
        (
            scaling.kind.as_str(),
            scaling.wanted,
            scaling.desired,
            scaling.actual
        ),
        ("fargate", Some(10), Some(10), Some(10))
    );
    assert_eq!(scaling.last_action.unwrap().action, "launch");
}

#[tokio::test]
async fn fargate_counts_registered_agents_as_workers() {
    let (cloud, calls) = counted_cloud().await;
    let cfg = fargate_setup(&cloud).await;
    let env = Env::new(vec![("batch", ScalingConfig::Fargate(cfg.clone()))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    // Two agents already serve the pool (started some other way).
    for i in 0..2 {
        register(&env, "batch", &format!("agent-{i}"), BTreeMap::new()).await;
    }
    env.submit("batch", 4).await;
    scaler.tick().await.unwrap();
    assert_eq!(
        calls.count("RunTask"),
        0,
        "4 jobs / 2 slots = 2 workers, and 2 are there"
    );
    env.submit("batch", 2).await;
    scaler.tick().await.unwrap();
    assert_eq!(pool_tasks(&cloud, &cfg, "batch").await.len(), 1);
}

#[tokio::test]
async fn fargate_launch_errors_back_off_and_are_reported() {
    let (cloud, calls) = counted_cloud().await;
    let mut cfg = fargate_setup(&cloud).await;
    cfg.task_definition = unique("no-such-family");
    let env = Env::new(vec![("batch", ScalingConfig::Fargate(cfg.clone()))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    env.submit("batch", 2).await;

    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "error");
    assert_eq!(calls.count("RunTask"), 1);
    let scaling = env.scaling("batch").await;
    assert!(
        scaling
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("RunTask"),
        "{scaling:?}"
    );
    assert_eq!(scaling.backoff_until_ms, Some(T0 + 30_000));

    env.clock.advance_ms(29_000);
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "backoff");
    assert_eq!(calls.count("RunTask"), 1, "no call while backing off");

    env.clock.advance_ms(1_000);
    scaler.tick().await.unwrap();
    assert_eq!(calls.count("RunTask"), 2, "tried again after the backoff");
    assert_eq!(
        env.scaling("batch").await.backoff_until_ms,
        Some(T0 + 30_000 + 60_000),
        "the backoff doubles"
    );
    assert_eq!(
        env.service.metrics.scaler_errors.get("batch", "run_task"),
        2
    );
}

#[tokio::test]
async fn fargate_tasks_ecs_could_not_place_back_off_and_are_launched_later() {
    let (cloud, calls) = counted_cloud().await;
    let cfg = fargate_setup(&cloud).await;
    let env = Env::new(vec![("batch", ScalingConfig::Fargate(cfg.clone()))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    moto::run_task_failures(
        &cfg.cluster,
        "RESOURCE:FARGATE",
        "no Fargate capacity in us-east-1a",
        3,
    )
    .await;
    env.submit("batch", 8).await;

    // 8 jobs / 2 slots = 4 tasks asked for; ECS starts 1 and fails 3.
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "error", "{report:?}");
    assert_eq!(calls.count("RunTask"), 1);
    assert_eq!(pool_tasks(&cloud, &cfg, "batch").await.len(), 1);
    let scaling = env.scaling("batch").await;
    let error = scaling.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("could not start 3 tasks")
            && error.contains("RESOURCE:FARGATE (no Fargate capacity in us-east-1a)"),
        "{scaling:?}"
    );
    assert_eq!(scaling.desired, Some(1), "the started task is counted");
    assert_eq!(scaling.backoff_until_ms, Some(T0 + 30_000));
    let action = scaling.last_action.unwrap();
    assert!(
        action.reason.contains("launched 1 of 4 tasks"),
        "{}",
        action.reason
    );
    assert_eq!(
        env.service
            .metrics
            .scaler_errors
            .get("batch", "run_task_capacity"),
        1
    );
    assert_eq!(
        env.service.metrics.scaler_errors.get("batch", "run_task"),
        0
    );

    env.clock.advance_ms(29_000);
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "backoff");
    assert_eq!(calls.count("RunTask"), 1, "no call while backing off");

    // After the backoff only the 3 missing tasks are launched.
    env.clock.advance_ms(1_000);
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "launch", "{report:?}");
    assert_eq!(calls.count("RunTask"), 2);
    assert_eq!(pool_tasks(&cloud, &cfg, "batch").await.len(), 4);
    let scaling = env.scaling("batch").await;
    assert_eq!(
        (
            scaling.last_error,
            scaling.backoff_until_ms,
            scaling.desired
        ),
        (None, None, Some(4))
    );
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["batch"].action, "none");
    assert_eq!(calls.count("RunTask"), 2);
}

#[tokio::test]
async fn two_scalers_on_one_store_act_once() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 20, 0).await;
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(asg(&name, 2)))]);
    let a = Scaler::new(env.service.clone(), cloud.clone());
    let b = Scaler::new(env.service.clone(), cloud.clone());
    env.submit("cpu", 20).await;

    let (ra, rb) = tokio::join!(a.tick(), b.tick());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.leader ^ rb.leader, "exactly one leader: {ra:?} {rb:?}");
    let (leader, follower) = if ra.leader { (&a, &b) } else { (&b, &a) };
    for _ in 0..3 {
        assert!(!follower.tick().await.unwrap().leader);
        assert!(leader.tick().await.unwrap().leader);
    }
    assert_eq!(calls.count("SetDesiredCapacity"), 1);
    assert_eq!(group(&cloud, &name).await.0, 10);

    // The leader goes quiet: after its lease expires the other takes over.
    env.clock
        .advance_ms(env.service.config().scaler_leader_ttl_ms as i64 + 1);
    env.submit("cpu", 10).await;
    env.clock.advance_ms(60_000);
    assert!(follower.tick().await.unwrap().leader);
    assert_eq!(group(&cloud, &name).await.0, 15);
    assert!(
        !leader.tick().await.unwrap().leader,
        "the old leader is out for good"
    );
    assert_eq!(calls.count("SetDesiredCapacity"), 2);
}

/// Registers an agent through the gRPC API (served on loopback).
async fn register(
    env: &Env,
    pool: &str,
    agent_id: &str,
    labels: BTreeMap<String, String>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let grpc = crate::grpc::AgentGrpc::new(env.service.clone()).into_server();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client =
        v1::agent_service_client::AgentServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
    let session = client
        .register(v1::RegisterRequest {
            join_token: env.service.config().join_tokens[0].token.clone(),
            agent: Some(v1::AgentInfo {
                agent_id: agent_id.to_string(),
                pool: pool.to_string(),
                hostname: agent_id.to_string(),
                labels: labels.into_iter().collect(),
                capacity: Some(v1::Resources {
                    cpu_millis: 2000,
                    memory_mib: 4096,
                    ..Default::default()
                }),
                runtime: "process".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    server.abort();
    session
}

fn ec2_labels(instance: &str, asg: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("platform".to_string(), "ec2".to_string()),
        ("instance_id".to_string(), instance.to_string()),
        ("asg".to_string(), asg.to_string()),
        ("instance_type".to_string(), "t3.micro".to_string()),
        ("az".to_string(), "us-east-1a".to_string()),
        ("region".to_string(), moto::REGION.to_string()),
        ("spot".to_string(), "false".to_string()),
        ("arch".to_string(), "x86_64".to_string()),
    ])
}

/// Lets every session of `env` expire and the reaper end them (past its
/// circuit breaker, which holds off for a TTL when many expire at once).
async fn expire_sessions(env: &Env) {
    let config = env.service.config();
    env.clock
        .advance_ms((config.session_ttl_ms + config.clock_skew_ms) as i64 + 1);
    let mut report = env.service.reap().await.unwrap();
    if report.breaker_tripped {
        env.clock.advance_ms(config.session_ttl_ms as i64);
        report = env.service.reap().await.unwrap();
    }
    assert!(report.sessions_expired > 0, "{report:?}");
}

async fn instance_state(cloud: &Cloud, instance: &str) -> Option<String> {
    cloud
        .autoscaling
        .describe_auto_scaling_instances()
        .instance_ids(instance)
        .send()
        .await
        .unwrap()
        .auto_scaling_instances()
        .first()
        .and_then(|i| i.lifecycle_state().map(str::to_string))
}

#[tokio::test]
async fn zombie_instance_is_terminated_after_the_grace_period() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 5, 2).await;
    let (_, instances) = group(&cloud, &name).await;
    let (zombie, restarted) = (&instances[0], &instances[1]);
    let other = create_group(&cloud, 0, 5, 1).await;
    let foreign = &group(&cloud, &other).await.1[0];
    let mut cfg = asg(&name, 1);
    cfg.zombie_grace_ms = Some(300_000);
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(cfg))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());

    let zombie_session = register(&env, "cpu", "a-zombie", ec2_labels(zombie, &name)).await;
    register(&env, "cpu", "a-restarted", ec2_labels(restarted, &name)).await;
    // Its labels say this pool's group, but the instance is in another one:
    // the labels are never trusted, the Auto Scaling API is.
    register(&env, "cpu", "a-liar", ec2_labels(foreign, &name)).await;
    // One whose instance is in no group at all.
    register(
        &env,
        "cpu",
        "a-stray",
        ec2_labels("i-0123456789abcdef0", &name),
    )
    .await;
    expire_sessions(&env).await;
    env.clock.advance_ms(299_000);
    // This agent's process came back (systemd) with a new, live session.
    register(&env, "cpu", "a-restarted", ec2_labels(restarted, &name)).await;
    scaler.tick().await.unwrap();
    assert_eq!(
        calls.count("TerminateInstanceInAutoScalingGroup"),
        0,
        "within the grace"
    );
    assert_eq!(
        instance_state(&cloud, zombie).await.as_deref(),
        Some("InService")
    );
    let agents = env.service.agents().await.unwrap();
    assert!(agents.iter().all(|a| a.note.is_none()), "{agents:?}");

    env.clock.advance_ms(1_000);
    let report = scaler.tick().await.unwrap();
    assert_eq!(report.decisions["cpu"].action, "terminate_zombie");
    assert_eq!(calls.count("TerminateInstanceInAutoScalingGroup"), 1);
    let (desired, left) = group(&cloud, &name).await;
    assert_eq!(desired, 1, "terminated with decrement");
    assert_eq!(left, vec![restarted.clone()]);
    assert_eq!(
        instance_state(&cloud, foreign).await.as_deref(),
        Some("InService")
    );
    assert_eq!(group(&cloud, &other).await.0, 1);
    // `GET /v1/agents` / `drover agents` say why the agent is gone.
    let agents = env.service.agents().await.unwrap();
    let (noted, others): (Vec<_>, Vec<_>) = agents.iter().partition(|a| a.note.is_some());
    assert_eq!(noted.len(), 1, "{agents:?}");
    assert_eq!(
        (noted[0].agent_id.as_str(), &noted[0].session_id),
        ("a-zombie", &zombie_session)
    );
    assert_eq!(noted[0].state, drover_proto::model::AgentState::Gone);
    let note = noted[0].note.as_deref().unwrap();
    for part in [
        format!("instance {zombie} terminated by the coordinator"),
        "still InService 5m".to_string(),
        format!("after session {zombie_session} expired"),
        "desired capacity decremented".to_string(),
    ] {
        assert!(note.contains(&part), "{part:?} not in {note:?}");
    }
    assert_eq!(
        others.len(),
        4,
        "a-restarted twice, a-liar, a-stray: {others:?}"
    );

    for _ in 0..2 {
        env.clock.advance_ms(60_000);
        scaler.tick().await.unwrap();
    }
    assert_eq!(
        calls.count("TerminateInstanceInAutoScalingGroup"),
        1,
        "once"
    );
    let scaling = env.scaling("cpu").await;
    let action = scaling.last_action.unwrap();
    assert_eq!(action.action, "terminate_zombie");
    assert!(action.reason.contains(zombie.as_str()), "{}", action.reason);
    assert!(action.reason.contains("a-zombie"), "{}", action.reason);
    assert_eq!(env.service.metrics.zombies_terminated.get("cpu", &name), 1);
    let metrics = env.service.metrics_text().await.unwrap();
    assert!(
        metrics.contains(&format!(
            "drover_zombies_terminated_total{{pool=\"cpu\",asg=\"{name}\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn zombie_at_the_minimum_size_is_replaced() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 1, 5, 1).await;
    let (_, instances) = group(&cloud, &name).await;
    let mut cfg = asg(&name, 1);
    cfg.zombie_grace_ms = Some(60_000);
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(cfg))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    register(&env, "cpu", "a1", ec2_labels(&instances[0], &name)).await;
    expire_sessions(&env).await;
    env.clock.advance_ms(60_000);
    scaler.tick().await.unwrap();
    assert_eq!(
        calls.count("TerminateInstanceInAutoScalingGroup"),
        2,
        "refused with decrement at min size, then without"
    );
    let (desired, left) = group(&cloud, &name).await;
    assert_eq!(desired, 1);
    assert!(!left.contains(&instances[0]), "replaced: {left:?}");
    let reason = env.scaling("cpu").await.last_action.unwrap().reason;
    assert!(reason.contains("without decrement"), "{reason}");
}

#[tokio::test]
async fn zombies_are_left_alone_when_the_pool_has_not_opted_in() {
    let (cloud, calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 5, 1).await;
    let (_, instances) = group(&cloud, &name).await;
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(asg(&name, 1)))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    register(&env, "cpu", "a1", ec2_labels(&instances[0], &name)).await;
    expire_sessions(&env).await;
    for _ in 0..3 {
        env.clock.advance_ms(3_600_000);
        scaler.tick().await.unwrap();
    }
    assert_eq!(calls.count("TerminateInstanceInAutoScalingGroup"), 0);
    assert_eq!(calls.count("DescribeAutoScalingInstances"), 0);
    assert_eq!(
        instance_state(&cloud, &instances[0]).await.as_deref(),
        Some("InService")
    );
}

#[tokio::test]
async fn pools_api_shows_desired_actual_and_the_last_decision() {
    let (cloud, _calls) = counted_cloud().await;
    let name = create_group(&cloud, 0, 20, 0).await;
    let mut cfg = asg(&name, 2);
    cfg.max = Some(6);
    let env = Env::new(vec![("cpu", ScalingConfig::Asg(cfg))]);
    let scaler = Scaler::new(env.service.clone(), cloud.clone());
    env.submit("cpu", 20).await;
    scaler.tick().await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = crate::http::router(env.service.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let admin = env.service.config().api_tokens[0].token.clone();
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/v1/pools"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = resp.json().await.unwrap();
    let list: PoolList = serde_json::from_value(body.clone()).unwrap();
    let cpu = list.pools.iter().find(|p| p.pool == "cpu").unwrap();
    assert_eq!(cpu.queued, 20);
    let scaling = cpu.scaling.as_ref().unwrap();
    assert_eq!(scaling.kind, "asg");
    assert_eq!(scaling.target, name);
    assert_eq!(
        (scaling.wanted, scaling.desired, scaling.actual, scaling.max),
        (Some(6), Some(6), Some(0), Some(6))
    );
    let decision = scaling.last_decision.as_ref().unwrap();
    assert_eq!(
        (decision.action.as_str(), decision.at_ms),
        ("scale_out", T0)
    );
    assert!(decision.reason.contains("0 → 6"), "{}", decision.reason);
    // Pools without scaling carry no scaling object at all.
    let default = body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool"] == "default")
        .unwrap();
    assert!(default.get("scaling").is_none(), "{default}");

    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "drover_pool_desired_workers{pool=\"cpu\"} 6",
        "drover_pool_wanted_workers{pool=\"cpu\"} 6",
        "drover_scaler_decisions_total{pool=\"cpu\",action=\"scale_out\"} 1",
        "drover_scaler_leader 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    server.abort();
}

#[test]
fn openapi_describes_every_pool_and_scaling_field() {
    let decision = ScalingDecision {
        at_ms: 1,
        action: "none".into(),
        reason: "r".into(),
    };
    let pool = Pool {
        pool: "p".into(),
        oldest_queued_age_ms: Some(1),
        scaling: Some(PoolScaling {
            kind: "asg".into(),
            target: "g".into(),
            slots_per_worker: 1,
            min: Some(0),
            max: Some(1),
            demand_slots: Some(1),
            wanted: Some(1),
            desired: Some(1),
            actual: Some(1),
            last_decision: Some(decision.clone()),
            last_action: Some(decision.clone()),
            last_error: Some("e".into()),
            backoff_until_ms: Some(1),
            evaluated_at_ms: Some(1),
        }),
        ..Pool::default()
    };
    let doc = crate::http::openapi_document();
    let schemas = &doc["components"]["schemas"];
    let json = serde_json::to_value(&pool).unwrap();
    for (schema, value) in [
        ("Pool", &json),
        ("PoolScaling", &json["scaling"]),
        ("ScalingDecision", &json["scaling"]["last_decision"]),
    ] {
        let mut documented: Vec<&String> = schemas[schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{schema} is not described"))
            .keys()
            .collect();
        let mut fields: Vec<&String> = value.as_object().unwrap().keys().collect();
        documented.sort();
        fields.sort();
        assert_eq!(documented, fields, "{schema}");
    }
}
