//! `drover-coordinator init-table` on moto's server: it creates the table,
//! and refuses a name the coordinator would refuse, before any AWS call.

use drover_tests::aws::Moto;

async fn init_table(env: &[(String, String)]) -> std::process::Output {
    tokio::process::Command::new(drover_tests::binary("drover-coordinator"))
        .arg("init-table")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("running drover-coordinator init-table")
}

async fn dynamodb_actions(moto: &Moto) -> Vec<String> {
    moto.calls()
        .await
        .expect("moto calls")
        .into_iter()
        .filter(|c| c.service == "dynamodb")
        .map(|c| c.action)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_table_refuses_a_bad_table_name_before_calling_aws() {
    let moto = Moto::start().await.expect("moto");
    let out = init_table(&moto.coordinator_env("t1", "drover-init")).await;
    assert!(!out.status.success(), "init-table accepted table name t1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("dynamodb.table") && stderr.contains("\"t1\""),
        "the error names the setting and the value: {stderr}"
    );
    assert_eq!(dynamodb_actions(&moto).await, Vec::<String>::new());

    let out = init_table(&moto.coordinator_env("drover-init", "drover-init")).await;
    assert!(
        out.status.success(),
        "init-table: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let actions = dynamodb_actions(&moto).await;
    assert!(
        actions.iter().any(|a| a == "CreateTable"),
        "a good name creates the table: {actions:?}"
    );
}
