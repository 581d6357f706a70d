use super::*;

fn parse(yaml_like_json: &str) -> WorkflowSpec {
    serde_json::from_str(yaml_like_json).expect("workflow parses")
}

fn calc() -> WorkflowSpec {
    parse(
        r#"{
        "name": "calc",
        "steps": [
            {"name": "gen", "command": ["sh", "-c", "echo 6 > $DROVER_OUTPUT_DIR/x"], "outputs": true},
            {"name": "mul", "depends_on": ["gen"], "command": ["true"], "outputs": true},
            {"name": "div", "depends_on": ["gen"], "array": 2, "command": ["true"], "outputs": true},
            {"name": "sum", "depends_on": ["mul", "div"], "command": ["true"]}
        ]}"#,
    )
}

fn err(wf: &WorkflowSpec) -> FieldError {
    wf.validate().expect_err("the workflow must be rejected")
}

#[test]
fn the_calculator_expands_into_linked_jobs_with_inputs_per_task() {
    let wf = calc();
    wf.validate().unwrap();
    let mut n = 0;
    let ex = wf.expand("RUN1", || {
        n += 1;
        format!("J{n:025}")
    });
    assert_eq!(ex.jobs.len(), 5);
    assert_eq!(ex.steps.len(), 4);
    let div = &ex.steps[2];
    assert_eq!((div.array, div.jobs.len()), (Some(2), 2));

    let sum = ex.jobs.iter().find(|j| j.link.step == "sum").unwrap();
    let names: Vec<_> = sum.spec.inputs.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["mul", "div/0", "div/1"]);
    assert_eq!(sum.spec.inputs[1].job, div.jobs[0]);
    assert_eq!(sum.spec.name, "calc/sum");
    sum.spec.validate().unwrap();

    let tasks: Vec<_> = ex.jobs.iter().filter(|j| j.link.step == "div").collect();
    for (i, task) in tasks.iter().enumerate() {
        assert_eq!(task.link.task_index, Some(i as u32));
        assert_eq!(task.spec.env[TASK_INDEX_ENV].value(), i.to_string());
        assert_eq!(task.spec.env[TASK_COUNT_ENV].value(), "2");
        assert_eq!(task.spec.name, format!("calc/div[{i}]"));
        assert_eq!(task.link.run_id, "RUN1");
    }
    let gen = ex.jobs.iter().find(|j| j.link.step == "gen").unwrap();
    assert!(gen.spec.inputs.is_empty() && !gen.spec.env.contains_key(TASK_INDEX_ENV));

    assert_eq!(dependency_count(&ex.steps, "sum"), 3);
    assert_eq!(dependency_count(&ex.steps, "gen"), 0);
    let mut dependents = dependents_of(&ex.steps, "gen");
    dependents.sort();
    assert_eq!(dependents.len(), 3);
    assert!(dependents_of(&ex.steps, "sum").is_empty());
    let order: Vec<_> = dependents_first(&ex.steps)
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(order, ["sum", "mul", "div", "gen"]);
}

#[test]
fn array_accepts_a_count_or_a_count_object() {
    let wf = parse(
        r#"{"name": "a", "steps": [{"name": "s", "array": {"count": 3}, "command": ["true"]}]}"#,
    );
    assert_eq!(wf.steps[0].tasks(), 3);
}

#[test]
fn unknown_fields_in_a_step_are_rejected() {
    let e = serde_json::from_str::<WorkflowSpec>(
        r#"{"name": "a", "steps": [{"name": "s", "command": ["true"], "dependson": ["x"]}]}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dependson"), "{e}");
}

#[test]
fn an_unknown_dependency_is_named_with_the_steps_that_exist() {
    let mut wf = calc();
    wf.steps[3].depends_on.push("mull".into());
    let e = err(&wf);
    assert_eq!(e.field, "steps[3].depends_on[2]");
    assert!(
        e.message.contains("\"mull\"") && e.message.contains("gen, mul, div, sum"),
        "{e}"
    );
}

#[test]
fn a_cycle_is_named_step_by_step() {
    let mut wf = calc();
    wf.steps[0].depends_on.push("sum".into());
    let e = err(&wf);
    assert_eq!(e.field, "steps");
    assert!(e.message.contains("gen -> sum -> mul -> gen"), "{e}");
    let mut wf = calc();
    wf.steps[1].depends_on = vec!["mul".into()];
    assert!(err(&wf).message.contains("itself"));
}

#[test]
fn duplicate_and_unsafe_step_names_are_rejected() {
    let mut wf = calc();
    wf.steps[2].name = "mul".into();
    let e = err(&wf);
    assert_eq!(e.field, "steps[2].name");
    assert!(e.message.contains("unique"), "{e}");
    for bad in ["../etc", "a/b", ".hidden", "", "x y"] {
        let mut wf = calc();
        wf.steps[0].name = bad.into();
        let e = err(&wf);
        assert_eq!(e.field, "steps[0].name", "{bad:?}: {e}");
    }
}

#[test]
fn array_bounds_are_enforced() {
    for bad in [0, MAX_ARRAY + 1] {
        let mut wf = calc();
        wf.steps[2].array = Some(ArrayCount::Count(bad));
        let e = err(&wf);
        assert_eq!(e.field, "steps[2].array", "{e}");
    }
    let mut wf = calc();
    wf.steps[2].array = Some(ArrayCount::Count(MAX_ARRAY));
    wf.steps[3].inputs = Some(vec!["mul".into()]);
    wf.validate().unwrap();
}

#[test]
fn too_many_input_artifacts_ask_for_a_merge_step() {
    let mut wf = calc();
    wf.steps[2].array = Some(ArrayCount::Count(MAX_INPUTS as u32 + 1));
    let e = err(&wf);
    assert_eq!(e.field, "steps[3].inputs");
    assert!(e.message.contains("merges"), "{e}");
}

#[test]
fn inputs_must_be_dependencies_that_declare_outputs() {
    let mut wf = calc();
    wf.steps[1].inputs = Some(vec!["div".into()]);
    let e = err(&wf);
    assert_eq!(e.field, "steps[1].inputs[0]");
    assert!(e.message.contains("depends_on"), "{e}");
    let mut wf = calc();
    wf.steps[1].job.outputs = false;
    wf.steps[3].inputs = Some(vec!["mul".into()]);
    assert!(err(&wf).message.contains("outputs: true"));
    // By default only dependencies with outputs become inputs.
    let mut wf = calc();
    wf.steps[1].job.outputs = false;
    wf.validate().unwrap();
    let ex = wf.expand("R", || "0".repeat(26));
    let sum = ex.jobs.last().unwrap();
    assert_eq!(sum.spec.inputs.len(), 2);
}

#[test]
fn job_spec_errors_name_the_step() {
    let mut wf = calc();
    wf.steps[1].job.command.clear();
    assert_eq!(err(&wf).field, "steps[1].command");
    let mut wf = calc();
    wf.steps[2]
        .job
        .env
        .insert(TASK_INDEX_ENV.into(), EnvValue::Plain("1".into()));
    assert_eq!(err(&wf).field, format!("steps[2].env.{TASK_INDEX_ENV}"));
    let mut wf = calc();
    wf.steps[0].job.idempotency_key = Some("k".into());
    assert_eq!(err(&wf).field, "steps[0].idempotency_key");
    let mut wf = calc();
    wf.name = "no spaces".into();
    assert_eq!(err(&wf).field, "name");
    let mut wf = calc();
    wf.steps.clear();
    assert_eq!(err(&wf).field, "steps");
}

#[test]
fn run_state_follows_its_jobs() {
    use JobState::*;
    assert_eq!(RunState::of([Succeeded, Running], false), RunState::Running);
    assert_eq!(
        RunState::of([Succeeded, Succeeded], false),
        RunState::Succeeded
    );
    assert_eq!(
        RunState::of([Succeeded, Failed, Failed], false),
        RunState::Failed
    );
    assert_eq!(RunState::of([Succeeded, TimedOut], false), RunState::Failed);
    assert_eq!(
        RunState::of([Cancelled, Succeeded], false),
        RunState::Cancelled
    );
    assert_eq!(RunState::of([Failed, Cancelled], true), RunState::Cancelled);
    assert_eq!(RunState::of([Pending], true), RunState::Running);
}

#[test]
fn input_names_allow_a_task_index_and_nothing_else() {
    use crate::model::validate_input_name;
    for ok in ["gen", "div/0", "div/255"] {
        validate_input_name("n", ok).unwrap();
    }
    for bad in ["div/", "div/x", "../0", "a/b/0", "div/0/1", "/0", "div/-1"] {
        assert!(validate_input_name("n", bad).is_err(), "{bad}");
    }
}
