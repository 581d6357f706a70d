//! Checks on `infra/` and `ami/` that run with the test suite: cfn-lint on
//! every template, shellcheck on every shell script, the DynamoDB table as
//! `init-table` creates it on moto's server, and the IAM roles against the AWS calls the code
//! makes. The tools come from `scripts/test.sh`; a missing tool fails with
//! the command that installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Pinned in `scripts/test.sh`.
const CFN_LINT_INSTALL: &str = ".venv/bin/pip install cfn-lint==1.58.0 (or run scripts/test.sh)";
const SHELLCHECK_INSTALL: &str = "sudo apt-get install -y shellcheck (or run scripts/test.sh)";

/// The AWS SDK operations the code may call, by their fluent method, and the
/// IAM action each needs. `None`: authorised per item (transactions), see
/// `TRANSACTION_ITEMS`. A call missing here fails the agreement test.
const SDK_OPERATIONS: &[(&str, Option<&str>)] = &[
    ("get_item", Some("dynamodb:GetItem")),
    ("put_item", Some("dynamodb:PutItem")),
    ("update_item", Some("dynamodb:UpdateItem")),
    ("delete_item", Some("dynamodb:DeleteItem")),
    ("query", Some("dynamodb:Query")),
    ("scan", Some("dynamodb:Scan")),
    ("batch_get_item", Some("dynamodb:BatchGetItem")),
    ("batch_write_item", Some("dynamodb:BatchWriteItem")),
    ("transact_write_items", None),
    ("create_table", Some("dynamodb:CreateTable")),
    ("describe_table", Some("dynamodb:DescribeTable")),
    ("describe_time_to_live", Some("dynamodb:DescribeTimeToLive")),
    ("update_time_to_live", Some("dynamodb:UpdateTimeToLive")),
    (
        "describe_auto_scaling_groups",
        Some("autoscaling:DescribeAutoScalingGroups"),
    ),
    (
        "describe_auto_scaling_instances",
        Some("autoscaling:DescribeAutoScalingInstances"),
    ),
    (
        "set_desired_capacity",
        Some("autoscaling:SetDesiredCapacity"),
    ),
    (
        "terminate_instance_in_auto_scaling_group",
        Some("autoscaling:TerminateInstanceInAutoScalingGroup"),
    ),
    (
        "set_instance_protection",
        Some("autoscaling:SetInstanceProtection"),
    ),
    ("set_instance_health", Some("autoscaling:SetInstanceHealth")),
    (
        "record_lifecycle_action_heartbeat",
        Some("autoscaling:RecordLifecycleActionHeartbeat"),
    ),
    (
        "complete_lifecycle_action",
        Some("autoscaling:CompleteLifecycleAction"),
    ),
    ("run_task", Some("ecs:RunTask")),
    ("list_tasks", Some("ecs:ListTasks")),
    ("describe_tasks", Some("ecs:DescribeTasks")),
    ("stop_task", Some("ecs:StopTask")),
    ("get_authorization_token", Some("ecr:GetAuthorizationToken")),
    ("get_object", Some("s3:GetObject")),
    ("put_object", Some("s3:PutObject")),
    ("delete_object", Some("s3:DeleteObject")),
    ("list_objects_v2", Some("s3:ListBucket")),
    ("get_parameter", Some("ssm:GetParameter")),
    ("get_secret_value", Some("secretsmanager:GetSecretValue")),
    ("describe_tags", Some("ec2:DescribeTags")),
    ("describe_instances", Some("ec2:DescribeInstances")),
];

/// `TransactWriteItems` is authorised by the action of each item it holds.
const TRANSACTION_ITEMS: &[(&str, &str)] = &[
    ("Put::builder()", "dynamodb:PutItem"),
    ("Update::builder()", "dynamodb:UpdateItem"),
    ("Delete::builder()", "dynamodb:DeleteItem"),
    ("ConditionCheck::builder()", "dynamodb:ConditionCheckItem"),
];

/// First methods of `.send()` chains that are plain HTTP (reqwest), not AWS.
const HTTP_METHODS: &[&str] = &["get", "post", "put", "patch", "delete", "head", "request"];

/// Called by the code but deliberately not granted: `init-table` only; the
/// stack creates the table (`create_table = false`).
const COORDINATOR_NOT_GRANTED: &[&str] = &[
    "dynamodb:CreateTable",
    "dynamodb:DescribeTable",
    "dynamodb:DescribeTimeToLive",
    "dynamodb:UpdateTimeToLive",
];
/// Granted without a call in `coordinator/src`: RunTask hands the worker's
/// execution role to ECS.
const COORDINATOR_EXTRAS: &[&str] = &["iam:PassRole"];
/// Granted without a call in `agent/src`: Docker pulls ECR layers with the
/// token the agent fetches. (`secretsmanager:GetSecretValue` is called by
/// `bootstrap` for a secret tag, and needed by SSM's Secrets Manager
/// reference, the fleet's join-token parameter.)
const AGENT_EXTRAS: &[&str] = &["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"];
/// ECS execution roles: image pulls, logs, secrets into the containers.
const EXECUTION_ROLE_ALLOWED: &[&str] = &[
    "ecr:GetAuthorizationToken",
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "logs:CreateLogStream",
    "logs:PutLogEvents",
    "secretsmanager:GetSecretValue",
];

/// Which code each role serves.
enum RoleKind {
    Coordinator,
    Agent,
    Execution,
}

const ROLES: &[(&str, RoleKind)] = &[
    ("CoordinatorTaskRole", RoleKind::Coordinator),
    ("CpuAgentRole", RoleKind::Agent),
    ("GpuAgentRole", RoleKind::Agent),
    ("CoordinatorExecutionRole", RoleKind::Execution),
    ("WorkerExecutionRole", RoleKind::Execution),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn cfn_lint() -> PathBuf {
    let path = std::env::var_os("DROVER_CFN_LINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/cfn-lint"));
    assert!(
        path.is_file(),
        "cfn-lint not found at {}: install it with {CFN_LINT_INSTALL}",
        path.display()
    );
    path
}

fn templates() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root().join("infra"))
        .expect("infra/ exists")
        .map(|e| e.expect("readable infra/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no templates in infra/");
    found
}

/// A template as JSON, decoded by cfn-lint's own parser (it knows `!Ref`...).
fn decode(template: &Path) -> Value {
    let python = cfn_lint().with_file_name("python");
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sys\n\
             from cfnlint.decode import decode\n\
             t, errors = decode(sys.argv[1])\n\
             assert not errors, errors\n\
             print(json.dumps(t))",
        ])
        .arg(template)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}; {CFN_LINT_INSTALL}", python.display()));
    assert!(
        out.status.success(),
        "decoding {}: {}",
        template.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("decoded template is JSON")
}

fn resources<'a>(template: &'a Value, kind: &str) -> Vec<(&'a str, &'a Value)> {
    template["Resources"]
        .as_object()
        .expect("Resources")
        .iter()
        .filter(|(_, r)| r["Type"] == kind)
        .map(|(name, r)| (name.as_str(), &r["Properties"]))
        .collect()
}

#[test]
fn templates_pass_cfn_lint() {
    let lint = cfn_lint();
    for template in templates() {
        let out = Command::new(&lint)
            .arg(&template)
            .output()
            .unwrap_or_else(|e| panic!("running cfn-lint: {e}; {CFN_LINT_INSTALL}"));
        // Exit status bits: 1 usage/crash, 2 errors, 4 warnings, 8 informational.
        let code = out.status.code().expect("cfn-lint exited");
        assert!(
            code & 3 == 0,
            "cfn-lint found errors in {} (exit {code}):\n{}{}",
            template.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn shell_scripts(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("readable entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(
                name,
                ".git" | ".venv" | "target" | "node_modules" | ".drover"
            ) {
                shell_scripts(&path, found);
            }
        } else if name.ends_with(".sh") {
            found.push(path);
        }
    }
}

#[test]
fn shell_scripts_pass_shellcheck() {
    let root = root();
    let mut scripts = Vec::new();
    shell_scripts(&root, &mut scripts);
    let ci = root.join(".ci/run");
    if ci.is_file() {
        scripts.push(ci);
    }
    scripts.sort();
    for expected in ["scripts/test.sh", "ami/user-data.sh", "ami/setup.sh"] {
        assert!(
            scripts.contains(&root.join(expected)),
            "{expected} not found among {scripts:?}"
        );
    }
    let out = Command::new("shellcheck")
        .args(&scripts)
        .output()
        .unwrap_or_else(|e| panic!("shellcheck not runnable ({e}): {SHELLCHECK_INSTALL}"));
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What must agree between the table `infra/data.yaml` declares and the one
/// the store creates, in the template's JSON shape: keys, attribute types,
/// billing, the indexes with their projections, the TTL attribute (order
/// of attributes and indexes aside).
fn table_shape(t: &Value) -> Value {
    let sorted = |v: &Value, key: &str| {
        let mut items = v.as_array().cloned().unwrap_or_default();
        items.sort_by_key(|i| i[key].to_string());
        Value::Array(items)
    };
    let indexes: Vec<Value> = sorted(&t["GlobalSecondaryIndexes"], "IndexName")
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let mut projection =
                serde_json::json!({"ProjectionType": i["Projection"]["ProjectionType"]});
            if let Some(attrs) = i["Projection"]["NonKeyAttributes"].as_array() {
                let mut attrs = attrs.clone();
                attrs.sort_by_key(|a| a.to_string());
                projection["NonKeyAttributes"] = Value::Array(attrs);
            }
            serde_json::json!({
                "IndexName": i["IndexName"],
                "KeySchema": i["KeySchema"],
                "Projection": projection,
            })
        })
        .collect();
    serde_json::json!({
        "KeySchema": t["KeySchema"],
        "AttributeDefinitions": sorted(&t["AttributeDefinitions"], "AttributeName"),
        "BillingMode": t["BillingMode"],
        "GlobalSecondaryIndexes": indexes,
        "TimeToLiveSpecification": t["TimeToLiveSpecification"],
    })
}

/// `drover-coordinator init-table` on moto's server, read back with
/// `DescribeTable` and `DescribeTimeToLive`, makes exactly the table the
/// stack declares (the stack adds point-in-time recovery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_init_table_creates_is_the_one_infra_declares() {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};

    let template = decode(&root().join("infra/data.yaml"));
    let tables = resources(&template, "AWS::DynamoDB::Table");
    assert_eq!(tables.len(), 1, "one table");
    let declared = tables[0].1;
    assert_eq!(
        declared["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );

    let moto = drover_tests::aws::Moto::start().await.expect("moto");
    let table = "drover-layout";
    drover_tests::aws::init_table(&moto.coordinator_env(table, table)).await;
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(drover_tests::aws::REGION))
            .credentials_provider(Credentials::new("test", "test", None, None, "static"))
            .endpoint_url(&moto.endpoint)
            .http_client(drover_coordinator::store::dynamodb::https_client())
            .build(),
    );
    let described = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .expect("DescribeTable")
        .table
        .expect("the table");
    let ttl = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .expect("DescribeTimeToLive")
        .time_to_live_description
        .expect("a TTL description");
    let key_schema = |keys: &[aws_sdk_dynamodb::types::KeySchemaElement]| -> Value {
        keys.iter()
            .map(|k| {
                serde_json::json!({
                    "AttributeName": k.attribute_name(),
                    "KeyType": k.key_type().as_str(),
                })
            })
            .collect()
    };
    let live = serde_json::json!({
        "KeySchema": key_schema(described.key_schema()),
        "AttributeDefinitions": described
            .attribute_definitions()
            .iter()
            .map(|a| serde_json::json!({
                "AttributeName": a.attribute_name(),
                "AttributeType": a.attribute_type().as_str(),
            }))
            .collect::<Value>(),
        "BillingMode": described
            .billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|b| b.as_str()),
        "GlobalSecondaryIndexes": described
            .global_secondary_indexes()
            .iter()
            .map(|i| {
                let projection = i.projection().expect("a projection");
                let mut p = serde_json::json!({
                    "ProjectionType": projection.projection_type().map(|t| t.as_str()),
                });
                if !projection.non_key_attributes().is_empty() {
                    p["NonKeyAttributes"] = serde_json::json!(projection.non_key_attributes());
                }
                serde_json::json!({
                    "IndexName": i.index_name(),
                    "KeySchema": key_schema(i.key_schema()),
                    "Projection": p,
                })
            })
            .collect::<Value>(),
        "TimeToLiveSpecification": {
            "AttributeName": ttl.attribute_name(),
            "Enabled": ttl.time_to_live_status().map(|s| s.as_str()) == Some("ENABLED"),
        },
    });
    assert_eq!(table_shape(&live), table_shape(declared));
}

/// The host-side fence: a oneshot unit that runs `drover-agent fence-check`
/// with the agent unit's own command line (so its config, data dir and agent
/// id), a timer that runs it every few seconds, both baked into the image and
/// the timer enabled.
#[test]
fn the_fence_watchdog_runs_fence_check_with_the_agents_config_on_a_timer() {
    let read = |name: &str| {
        std::fs::read_to_string(root().join("ami").join(name))
            .unwrap_or_else(|e| panic!("ami/{name}: {e}"))
    };
    let lines =
        |text: &str| -> Vec<String> { text.lines().map(|l| l.trim().to_string()).collect() };
    let value = |unit: &str, key: &str| {
        lines(unit)
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {key}= in\n{unit}"))
    };
    let agent = read("drover-agent.service");
    let service = read("drover-fence.service");
    let timer = read("drover-fence.timer");

    let agent_exec = value(&agent, "ExecStart");
    let fence_exec = value(&service, "ExecStart");
    assert!(
        fence_exec.starts_with(&format!("{agent_exec} "))
            && fence_exec.split_whitespace().last() == Some("fence-check"),
        "drover-fence.service runs `{agent_exec} ... fence-check` (the agent's config), not {fence_exec:?}"
    );
    assert_eq!(value(&service, "Type"), "oneshot");
    assert_eq!(
        value(&service, "ConditionPathExists"),
        value(&agent, "ConditionPathExists"),
        "the watchdog waits for the config the agent waits for"
    );
    assert_eq!(value(&timer, "Unit"), "drover-fence.service");
    for key in ["OnBootSec", "OnUnitActiveSec", "AccuracySec"] {
        let seconds: u64 = value(&timer, key)
            .trim_end_matches('s')
            .parse()
            .unwrap_or_else(|e| panic!("drover-fence.timer {key}: {e}"));
        assert!(
            seconds <= 60,
            "{key}={seconds}s: the watchdog must act within seconds of the deadline"
        );
    }
    assert_eq!(value(&timer, "WantedBy"), "timers.target");

    let setup = lines(&read("setup.sh"));
    for unit in ["drover-fence.service", "drover-fence.timer"] {
        assert!(
            setup.iter().any(|l| l.starts_with("install ")
                && l.ends_with(&format!("\"${{SRC}}/{unit}\" /etc/systemd/system/{unit}"))),
            "ami/setup.sh installs {unit}"
        );
    }
    assert!(
        setup.iter().any(|l| l.starts_with("systemctl enable ")
            && l.split_whitespace().any(|w| w == "drover-fence.timer")),
        "ami/setup.sh enables drover-fence.timer"
    );
    let packer = read("drover-agent.pkr.hcl");
    for unit in [
        "drover-agent.service",
        "drover-fence.service",
        "drover-fence.timer",
    ] {
        assert!(
            packer.contains(&format!("\"${{path.root}}/{unit}\",")),
            "ami/drover-agent.pkr.hcl uploads {unit}"
        );
    }
}

#[test]
fn launch_templates_carry_user_data_and_imdsv2() {
    let script = std::fs::read_to_string(root().join("ami/user-data.sh")).expect("user-data.sh");
    assert!(
        script
            .lines()
            .any(|l| l.trim() == "/usr/local/bin/drover-agent bootstrap"),
        "ami/user-data.sh runs drover-agent bootstrap (the path ami/setup.sh installs)"
    );
    let template = decode(&root().join("infra/fleet.yaml"));
    let launch_templates = resources(&template, "AWS::EC2::LaunchTemplate");
    assert_eq!(launch_templates.len(), 2, "a CPU and a GPU launch template");
    for (name, lt) in launch_templates {
        let data = &lt["LaunchTemplateData"];
        let user_data = data["UserData"]["Fn::Base64"]
            .as_str()
            .expect("literal user-data");
        if user_data != script {
            let line = user_data
                .lines()
                .zip(script.lines())
                .position(|(a, b)| a != b);
            panic!(
                "{name}: the user-data must be ami/user-data.sh verbatim; first difference at line {}",
                line.map_or(user_data.lines().count().min(script.lines().count()), |l| l) + 1
            );
        }
        let metadata = &data["MetadataOptions"];
        assert_eq!(metadata["HttpTokens"], "required", "{name}: IMDSv2 only");
        assert_eq!(
            metadata["HttpPutResponseHopLimit"], 1,
            "{name}: containers cannot reach IMDS"
        );
        assert_eq!(
            metadata["InstanceMetadataTags"], "enabled",
            "{name}: drover-agent bootstrap reads tags"
        );
    }
    for (name, group) in resources(&template, "AWS::AutoScaling::AutoScalingGroup") {
        let hooks = group["LifecycleHookSpecificationList"]
            .as_array()
            .expect("hooks");
        assert!(
            hooks
                .iter()
                .any(|h| h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"),
            "{name}: a terminating lifecycle hook"
        );
        let tags: BTreeSet<&str> = group["Tags"]
            .as_array()
            .expect("tags")
            .iter()
            .inspect(|t| assert_eq!(t["PropagateAtLaunch"], true, "{name}: {t}"))
            .filter_map(|t| t["Key"].as_str())
            .collect();
        for tag in drover_agent::bootstrap::tags::REQUIRED {
            assert!(
                tags.contains(tag),
                "{name}: drover-agent bootstrap reads tag {tag}, the group lacks it"
            );
        }
    }
}

/// What an intrinsic function evaluates to with `params`, for the functions
/// the instance type overrides and the TLS switch use (`Ref`, `Fn::Join`,
/// `Fn::Split`, `Fn::Select`, `Fn::Equals`, `Fn::Not`, `Fn::If`, and
/// `Fn::Sub` of a string). `None`: `AWS::NoValue`. Anything else (other
/// parameters, resources, attributes) stays as written.
fn evaluate(value: &Value, params: &BTreeMap<&str, Value>, conditions: &Value) -> Option<Value> {
    let eval = |v: &Value| evaluate(v, params, conditions);
    let strings = |v: Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect()
    };
    let function = value
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.iter().next())
        .filter(|(name, _)| *name == "Ref" || name.starts_with("Fn::"));
    let Some((function, args)) = function else {
        return Some(match value {
            Value::Object(o) => Value::Object(
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), eval(v)?)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().filter_map(eval).collect()),
            other => other.clone(),
        });
    };
    let arg = |i: usize| eval(&args[i]).expect("an argument with a value");
    Some(match function.as_str() {
        "Ref" if args == "AWS::NoValue" => return None,
        // Other parameters, resources and attributes stay as written.
        "Ref" => params
            .get(args.as_str().expect("Ref name"))
            .cloned()
            .unwrap_or_else(|| value.clone()),
        "Fn::Join"
            if !arg(1)
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_string)) =>
        {
            value.clone()
        }
        "Fn::Join" => Value::from(strings(arg(1)).join(args[0].as_str().expect("delimiter"))),
        "Fn::Sub" if !args.is_string() => value.clone(),
        "Fn::Split" => Value::from(
            arg(1)
                .as_str()
                .expect("a string")
                .split(args[0].as_str().expect("delimiter"))
                .collect::<Vec<_>>(),
        ),
        "Fn::Select" => {
            let index = args[0].as_u64().expect("index") as usize;
            let list = arg(1);
            let items = list.as_array().expect("a list");
            assert!(
                index < items.len(),
                "Fn::Select {index} of {list}: out of range"
            );
            items[index].clone()
        }
        "Fn::Equals" => Value::from(arg(0) == arg(1)),
        // The string form; names that are not parameters stay as written.
        "Fn::Sub" => {
            let mut text = args.as_str().expect("Fn::Sub of a string").to_string();
            for (name, value) in params {
                if let Some(value) = value.as_str() {
                    text = text.replace(&format!("${{{name}}}"), value);
                }
            }
            Value::from(text)
        }
        "Fn::Not" => Value::from(!arg(0).as_bool().expect("a condition")),
        "Fn::If" => {
            let name = args[0].as_str().expect("condition name");
            let holds = eval(&conditions[name]).and_then(|v| v.as_bool());
            let holds = holds.unwrap_or_else(|| panic!("condition {name}"));
            return eval(&args[if holds { 1 } else { 2 }]);
        }
        _ => value.clone(),
    })
}

#[test]
fn instance_type_lists_of_one_to_six_types_become_the_groups_overrides() {
    let template = decode(&root().join("infra/fleet.yaml"));
    let groups = [
        ("CpuGroup", "CpuInstanceTypes"),
        ("GpuGroup", "GpuInstanceTypes"),
    ];
    let lists: [&[&str]; 4] = [
        &["m7i.xlarge"],
        &["g5.xlarge", "g6.xlarge"],
        &["m6i.xlarge", "m6a.xlarge", "m5.xlarge"],
        &[
            "c7i.2xlarge",
            "c6i.2xlarge",
            "c6a.2xlarge",
            "c5.2xlarge",
            "m7i.2xlarge",
            "m6i.2xlarge",
        ],
    ];
    for (group, param) in groups {
        let overrides = &template["Resources"][group]["Properties"]["MixedInstancesPolicy"]
            ["LaunchTemplate"]["Overrides"];
        for list in lists {
            let params = BTreeMap::from([(param, serde_json::json!(list))]);
            let evaluated =
                evaluate(overrides, &params, &template["Conditions"]).expect("overrides");
            let types: Vec<&str> = evaluated
                .as_array()
                .expect("a list of overrides")
                .iter()
                .map(|o| o["InstanceType"].as_str().expect("InstanceType"))
                .collect();
            assert_eq!(types, list, "{group} with {param} = {list:?}");
        }
    }
}

#[test]
fn a_certificate_makes_the_nlb_terminate_tls_and_every_coordinator_url_https() {
    let template = decode(&root().join("infra/fleet.yaml"));
    let conditions = &template["Conditions"];
    let arn = "arn:aws:acm:eu-west-1:123456789012:certificate/abc";
    for tls in [true, false] {
        let params = BTreeMap::from([
            ("CertificateArn", Value::from(if tls { arn } else { "" })),
            (
                "CoordinatorDomainName",
                Value::from(if tls { "drover.example.com" } else { "" }),
            ),
        ]);
        let eval = |v: &Value| evaluate(v, &params, conditions);
        for (listener, alpn) in [("GrpcListener", true), ("HttpListener", false)] {
            let props = eval(&template["Resources"][listener]["Properties"]).expect("listener");
            assert_eq!(
                props["Protocol"],
                if tls { "TLS" } else { "TCP" },
                "{listener}"
            );
            if tls {
                assert_eq!(
                    props["Certificates"][0]["CertificateArn"], arn,
                    "{listener}"
                );
                assert_eq!(
                    props["AlpnPolicy"] == serde_json::json!(["HTTP2Preferred"]),
                    alpn,
                    "{listener}"
                );
            } else {
                assert!(
                    props.get("Certificates").is_none() && props.get("AlpnPolicy").is_none(),
                    "{listener}"
                );
            }
        }
        // Every URL agents, the coordinator and people are given.
        let mut urls = Vec::new();
        for (name, group) in resources(&template, "AWS::AutoScaling::AutoScalingGroup") {
            let tags = eval(&group["Tags"]).expect("tags");
            for tag in tags
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["Key"] == "drover:coordinator")
            {
                urls.push((name.to_string(), tag["Value"].clone()));
            }
        }
        for (name, task) in resources(&template, "AWS::ECS::TaskDefinition") {
            let containers = eval(&task["ContainerDefinitions"]).expect("containers");
            for c in containers.as_array().unwrap() {
                for e in c["Environment"].as_array().into_iter().flatten() {
                    if e["Name"] == "DROVER_COORDINATOR" {
                        urls.push((name.to_string(), e["Value"].clone()));
                    }
                    if let Some(sub) = e["Value"]["Fn::Sub"].as_array() {
                        if sub[0].as_str().is_some_and(|t| t.contains("public_url")) {
                            let vars = eval(&sub[1]).expect("Fn::Sub variables");
                            urls.push((format!("{name} public_url"), vars["PublicUrl"].clone()));
                        }
                    }
                }
            }
        }
        for output in ["CoordinatorGrpcUrl", "CoordinatorHttpUrl"] {
            urls.push((
                output.to_string(),
                eval(&template["Outputs"][output]["Value"]).expect("output"),
            ));
        }
        assert!(urls.len() >= 6, "URLs found: {urls:?}");
        for (name, url) in &urls {
            let url = url.as_str().unwrap_or_else(|| panic!("{name}: {url}"));
            let want = if tls {
                "https://drover.example.com:"
            } else {
                "http://${LoadBalancer.DNSName}:"
            };
            assert!(url.starts_with(want), "{name} (tls {tls}): {url}");
        }
    }
}

/// Rust source with comments, string and char literals blanked (newlines kept).
fn strip_literals(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, s: &[u8]| {
        out.extend(s.iter().map(|&c| if c == b'\n' { '\n' } else { ' ' }));
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            i + rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            i + 2 + src[i + 2..].find("*/").map_or(rest.len() - 2, |p| p + 2)
        } else if rest[0] == b'r'
            && (rest.get(1) == Some(&b'"') || rest.get(1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let body = i + 2 + hashes;
            body + src[body..].find(&close).expect("closed raw string") + close.len()
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            j + 1
        } else if rest[0] == b'\'' && rest.get(1) == Some(&b'\\') {
            i + 2 + src[i + 2..].find('\'').expect("closed char") + 1
        } else if rest[0] == b'\'' && rest.get(2) == Some(&b'\'') {
            i + 3
        } else {
            let c = src[i..].chars().next().expect("a char");
            out.push(c);
            i += c.len_utf8();
            continue;
        };
        blank(&mut out, &b[i..end]);
        i = end;
    }
    out
}

/// `src` without its `#[cfg(test)] mod x { ... }` blocks, and the names of
/// the test-only modules it declares in other files (`#[cfg(test)] mod x;`).
fn without_test_modules(src: &str) -> (String, Vec<String>) {
    let mut kept = src.to_string();
    let mut test_files = Vec::new();
    while let Some(at) = kept.find("#[cfg(test)]") {
        let after = at + "#[cfg(test)]".len();
        let item = kept[after..].trim_start();
        let item = item.strip_prefix("pub(crate) ").unwrap_or(item);
        let Some(decl) = item.strip_prefix("mod ") else {
            kept.replace_range(at..after, "");
            continue;
        };
        let name: String = decl
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let rest = decl[name.len()..].trim_start();
        let start = kept.len() - rest.len();
        if rest.starts_with(';') {
            test_files.push(name);
            kept.replace_range(at..start + 1, "");
        } else {
            let mut depth = 0;
            let mut end = start;
            for (k, c) in kept[start..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = start + k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            kept.replace_range(at..end, "");
        }
    }
    (kept, test_files)
}

/// The first method of every `.send()` chain: `client.get_item().key(..).send()`
/// gives `get_item`. Presigned requests (`.presigned(..)`, S3) count too: the
/// URL's holder acts with the signer's permissions.
fn send_chains(src: &str) -> Vec<String> {
    let b = src.as_bytes();
    let mut found = Vec::new();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let ends = src
        .match_indices(".send()")
        .chain(src.match_indices(".presigned("));
    for (at, _) in ends {
        let mut i = at; // just before the '.' of the current segment
        let mut first = None;
        loop {
            while i > 0 && (b[i - 1].is_ascii_whitespace() || b[i - 1] == b'?') {
                i -= 1;
            }
            let called = i > 0 && b[i - 1] == b')';
            if called {
                let mut depth = 0;
                while i > 0 {
                    i -= 1;
                    match b[i] {
                        b')' => depth += 1,
                        b'(' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            let name_end = i;
            while i > 0 && ident(b[i - 1]) {
                i -= 1;
            }
            if i == name_end {
                break;
            }
            let name = &src[i..name_end];
            let mut j = i;
            while j > 0 && b[j - 1].is_ascii_whitespace() {
                j -= 1;
            }
            if j > 0 && b[j - 1] == b'.' {
                if called {
                    first = Some(name.to_string());
                }
                i = j - 1;
            } else {
                break;
            }
        }
        if let Some(method) = first {
            found.push(method);
        }
    }
    found
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("readable entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// IAM actions the non-test code under `src` calls.
fn actions_called(src: &Path) -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut test_only = BTreeSet::new();
    let mut texts = BTreeMap::new();
    for file in &files {
        let text = strip_literals(&std::fs::read_to_string(file).expect("source"));
        let (kept, test_mods) = without_test_modules(&text);
        let stem = file.file_stem().and_then(|s| s.to_str()).expect("stem");
        let dir = if matches!(stem, "lib" | "main" | "mod") {
            file.parent().expect("dir").to_path_buf()
        } else {
            file.with_extension("")
        };
        for name in test_mods {
            test_only.insert(dir.join(format!("{name}.rs")));
            test_only.insert(dir.join(&name).join("mod.rs"));
        }
        texts.insert(file.clone(), kept);
    }
    let operations: BTreeMap<&str, Option<&str>> = SDK_OPERATIONS.iter().copied().collect();
    let mut actions = BTreeSet::new();
    let (mut transactions, mut transaction_items) = (false, BTreeSet::new());
    for (file, text) in texts.iter().filter(|(f, _)| !test_only.contains(*f)) {
        for method in send_chains(text) {
            match operations.get(method.as_str()) {
                Some(Some(action)) => {
                    actions.insert(action.to_string());
                }
                Some(None) => {}
                None => assert!(
                    HTTP_METHODS.contains(&method.as_str()),
                    "{}: `.{method}()…send()` is an AWS call missing from SDK_OPERATIONS in tests/tests/infra.rs: add it with its IAM action",
                    file.display()
                ),
            }
        }
        if text.contains("aws_sdk_dynamodb") {
            for (builder, action) in TRANSACTION_ITEMS {
                if text.contains(builder) {
                    transaction_items.insert(action.to_string());
                }
            }
        }
        transactions |= text.contains(".transact_write_items()");
    }
    if transactions {
        actions.extend(transaction_items);
    }
    actions
}

/// `aws <service> <operation>` in a shell script, as IAM actions.
fn cli_actions(script: &str) -> BTreeSet<String> {
    let mut actions = BTreeSet::new();
    for line in script.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let words: Vec<&str> = line.split_whitespace().collect();
        for w in words
            .windows(3)
            .filter(|w| w[0] == "aws" || w[0].ends_with("$(aws"))
        {
            let operation: String = w[2]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            let pascal: String = operation
                .split('-')
                .map(|part| {
                    let mut c = part.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect();
            actions.insert(format!("{}:{pascal}", w[1]));
        }
    }
    actions
}

/// Allowed actions of every role in the templates, by resource name.
fn role_actions() -> BTreeMap<String, BTreeSet<String>> {
    let mut roles = BTreeMap::new();
    for template in templates() {
        let t = decode(&template);
        for (name, role) in resources(&t, "AWS::IAM::Role") {
            let mut actions = BTreeSet::new();
            for policy in role["Policies"].as_array().into_iter().flatten() {
                for statement in policy["PolicyDocument"]["Statement"]
                    .as_array()
                    .expect("Statement")
                {
                    assert_eq!(statement["Effect"], "Allow", "{name}: {statement}");
                    match &statement["Action"] {
                        Value::String(a) => {
                            actions.insert(a.clone());
                        }
                        Value::Array(list) => actions
                            .extend(list.iter().map(|a| a.as_str().expect("action").to_string())),
                        other => panic!("{name}: Action {other}"),
                    }
                }
            }
            assert!(
                role["ManagedPolicyArns"].is_null(),
                "{name}: managed policies cannot be checked against the code"
            );
            roles.insert(name.to_string(), actions);
        }
        assert!(
            resources(&t, "AWS::IAM::Policy").is_empty()
                && resources(&t, "AWS::IAM::ManagedPolicy").is_empty(),
            "{}: keep policies inline in their role so the test sees them",
            template.display()
        );
    }
    roles
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn iam_roles_grant_exactly_what_the_code_calls() {
    let root = root();
    let coordinator_calls = actions_called(&root.join("coordinator/src"));
    let mut agent_calls = actions_called(&root.join("agent/src"));
    agent_calls.extend(cli_actions(
        &std::fs::read_to_string(root.join("ami/user-data.sh")).expect("user-data.sh"),
    ));
    // The scan must see the calls we know about, or it is not scanning.
    for known in [
        "dynamodb:Query",
        "dynamodb:ConditionCheckItem",
        "autoscaling:SetDesiredCapacity",
        "ecs:RunTask",
    ] {
        assert!(
            coordinator_calls.contains(known),
            "coordinator scan missed {known}: {coordinator_calls:?}"
        );
    }
    for known in [
        "autoscaling:CompleteLifecycleAction",
        "ecr:GetAuthorizationToken",
        "ssm:GetParameter",
        "autoscaling:SetInstanceHealth",
    ] {
        assert!(
            agent_calls.contains(known),
            "agent scan missed {known}: {agent_calls:?}"
        );
    }

    let coordinator_role: BTreeSet<String> = coordinator_calls
        .difference(&set(COORDINATOR_NOT_GRANTED))
        .cloned()
        .chain(set(COORDINATOR_EXTRAS))
        .collect();
    let agent_role: BTreeSet<String> = agent_calls
        .iter()
        .cloned()
        .chain(set(AGENT_EXTRAS))
        .collect();

    let roles = role_actions();
    let mut problems = Vec::new();
    for (name, actions) in &roles {
        let Some((_, kind)) = ROLES.iter().find(|(n, _)| n == name) else {
            problems.push(format!(
                "{name}: a role this test does not know; add it to ROLES"
            ));
            continue;
        };
        let expected = match kind {
            RoleKind::Coordinator => coordinator_role.clone(),
            RoleKind::Agent => agent_role.clone(),
            RoleKind::Execution => {
                for extra in actions.difference(&set(EXECUTION_ROLE_ALLOWED)) {
                    problems.push(format!(
                        "{name}: {extra} is not an execution role's business"
                    ));
                }
                continue;
            }
        };
        for missing in expected.difference(actions) {
            problems.push(format!(
                "{name}: the code calls {missing}, the role does not allow it"
            ));
        }
        for unused in actions.difference(&expected) {
            problems.push(format!(
                "{name}: allows {unused}, which the code never calls"
            ));
        }
        if matches!(kind, RoleKind::Agent) {
            for a in actions
                .iter()
                .filter(|a| a.starts_with("dynamodb:") || a.starts_with("s3:"))
            {
                problems.push(format!("{name}: agents get no DynamoDB or S3 access ({a})"));
            }
        }
    }
    for (name, _) in ROLES {
        if !roles.contains_key(*name) {
            problems.push(format!("{name}: no such role in infra/"));
        }
    }
    assert!(
        problems.is_empty(),
        "IAM and code disagree:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn scanner_finds_fluent_sdk_calls_outside_tests() {
    let src = r##"
        async fn f(c: &Client) {
            // c.not_a_call().send()
            let s = "c.in_a_string().send()";
            let r = r#"c.in_raw().send()"#;
            let out = self
                .client
                .update_item()
                .key("pk", v(&format!("J#{}", id)))
                .send()
                .await?;
            call(calls, OP, || async { client.complete_lifecycle_action().hook(h).send().await });
            let body = http().get(url).send().await;
            let url = c.put_object().bucket(b).presigned(config).await?;
            let ch = 'x';
        }
        #[cfg(test)]
        mod tests {
            fn t() { client.delete_table().send(); }
        }
        #[cfg(test)]
        mod moto;
    "##;
    let (kept, test_files) = without_test_modules(&strip_literals(src));
    assert_eq!(
        send_chains(&kept),
        [
            "update_item",
            "complete_lifecycle_action",
            "get",
            "put_object"
        ]
    );
    assert_eq!(test_files, ["moto"]);
    assert_eq!(
        cli_actions("# aws ec2 run-instances\naws autoscaling set-instance-health --x\nT=$(aws ssm get-parameter)\n"),
        set(&["autoscaling:SetInstanceHealth", "ssm:GetParameter"])
    );
}
