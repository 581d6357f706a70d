//! The benchmark harness in its short mode, so it does not rot. No
//! assertion on speed: only that every scenario runs and reports.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_in_smoke_mode() {
    let out = tempfile::tempdir().unwrap();
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover-bench"))
        .args(["--smoke", "--out"])
        .arg(out.path())
        .arg("all")
        .status()
        .await
        .unwrap();
    assert!(status.success());
    for (name, _) in drover_tests::bench::SCENARIOS {
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.path().join(format!("{name}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(json["scenario"], *name);
        assert!(
            json["figures"].as_object().is_some_and(|f| !f.is_empty()),
            "{name} reported figures"
        );
    }
}
