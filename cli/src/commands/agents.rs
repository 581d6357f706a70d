//! `drover agents`, `drover drain`.

use drover_proto::model::{Agent, Resources};

use crate::client::Client;
use crate::commands::print_json;
use crate::human;
use crate::table::Table;

pub async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let list = client.list_agents().await?;
    if json {
        return print_json(&list);
    }
    print!("{}", agents_text(&list.agents, human::now_ms()));
    Ok(())
}

/// The table, then what the coordinator did about agents that have a note
/// (e.g. a zombie instance it terminated), one line each: notes are too long
/// for a column.
pub fn agents_text(agents: &[Agent], now_ms: i64) -> String {
    let mut out = agents_table(agents, now_ms).render();
    let notes: Vec<String> = agents
        .iter()
        .filter_map(|a| {
            a.note
                .as_ref()
                .map(|note| format!("{} (session {}): {note}\n", a.agent_id, a.session_id))
        })
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        out.extend(notes);
    }
    out
}

pub fn agents_table(agents: &[Agent], now_ms: i64) -> Table {
    let mut table = Table::new([
        "AGENT",
        "POOL",
        "STATE",
        "RUNNING",
        "CAPACITY",
        "PLATFORM",
        "AZ",
        "RUNTIME",
        "LAST HEARTBEAT",
        "LABELS",
    ]);
    for agent in agents {
        table.row([
            agent.agent_id.clone(),
            agent.pool.clone(),
            agent.state.as_str().to_string(),
            agent.running.to_string(),
            capacity(&agent.capacity),
            platform(agent),
            agent
                .labels
                .get("az")
                .cloned()
                .unwrap_or_else(|| "-".into()),
            agent.runtime.clone(),
            format!("{} ago", human::age(now_ms, agent.last_heartbeat_ms)),
            agent
                .labels
                .iter()
                .filter(|(k, _)| !SHOWN_LABELS.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    table
}

/// Labels with a column of their own.
const SHOWN_LABELS: [&str; 4] = ["platform", "instance_type", "spot", "az"];

/// Where the agent runs, from its labels: `ec2/m5.large/spot`,
/// `ec2/c6i.xlarge/on-demand`, `fargate`, `local`.
pub fn platform(agent: &Agent) -> String {
    let label = |k: &str| agent.labels.get(k).map(String::as_str);
    let mut out = label("platform").unwrap_or("-").to_string();
    if let Some(instance_type) = label("instance_type") {
        out.push('/');
        out.push_str(instance_type);
    }
    match label("spot") {
        Some("true") => out.push_str("/spot"),
        Some("false") => out.push_str("/on-demand"),
        _ => {}
    }
    out
}

/// Compact capacity for a table cell: `4000m/8192Mi/1gpu`.
pub fn capacity(resources: &Resources) -> String {
    let mut out = format!("{}m/{}Mi", resources.cpu_millis, resources.memory_mib);
    if resources.gpus > 0 {
        out.push_str(&format!("/{}gpu", resources.gpus));
        if let Some(model) = &resources.gpu_model {
            out.push_str(&format!("({model})"));
        }
    }
    out
}

pub async fn drain(client: &Client, agent_id: &str, json: bool) -> anyhow::Result<()> {
    let agent = client.drain_agent(agent_id).await?;
    if json {
        return print_json(&agent);
    }
    println!(
        "agent {}: {} ({} running job(s) will finish, then it leaves)",
        agent.agent_id,
        agent.state.as_str(),
        agent.running
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use drover_proto::model::AgentState;

    use super::*;

    #[test]
    fn agents_table_shows_capacity_heartbeat_and_labels() {
        let agent = Agent {
            agent_id: "dev-1".into(),
            session_id: "s".into(),
            pool: "default".into(),
            hostname: "h".into(),
            labels: BTreeMap::from([
                ("arch".into(), "x86_64".into()),
                ("spot".into(), "false".into()),
                ("platform".into(), "ec2".into()),
                ("instance_type".into(), "g4dn.xlarge".into()),
                ("az".into(), "eu-west-1a".into()),
                ("instance_id".into(), "i-0abc".into()),
            ]),
            capacity: Resources {
                cpu_millis: 4000,
                memory_mib: 8192,
                gpus: 1,
                disk_gib: 0,
                gpu_model: Some("T4".into()),
            },
            runtime: "process".into(),
            version: "0.1.0".into(),
            state: AgentState::Active,
            registered_at_ms: 0,
            last_heartbeat_ms: 97_000,
            running: 2,
            health_addr: String::new(),
            note: None,
        };
        let mut local = agent.clone();
        local.agent_id = "laptop".into();
        local.labels = BTreeMap::from([("platform".into(), "local".into())]);
        let out = agents_table(&[agent, local], 100_000).render();
        let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "dev-1",
                "default",
                "active",
                "2",
                "4000m/8192Mi/1gpu(T4)",
                "ec2/g4dn.xlarge/on-demand",
                "eu-west-1a",
                "process",
                "3s",
                "ago",
                "arch=x86_64,instance_id=i-0abc"
            ]
        );
        let row: Vec<&str> = out.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(row[5..7], ["local", "-"]);
    }

    #[test]
    fn agents_with_a_note_get_a_line_under_the_table() {
        let agent = |id: &str, note: Option<&str>| Agent {
            agent_id: id.into(),
            session_id: format!("s-{id}"),
            pool: "cpu".into(),
            hostname: "h".into(),
            labels: BTreeMap::new(),
            capacity: Resources::default(),
            runtime: "docker".into(),
            version: "0.1.0".into(),
            state: AgentState::Gone,
            registered_at_ms: 0,
            last_heartbeat_ms: 0,
            running: 0,
            health_addr: String::new(),
            note: note.map(str::to_string),
        };
        let out = agents_text(
            &[
                agent("a1", None),
                agent(
                    "a2",
                    Some("instance i-0abc terminated by the coordinator: still InService"),
                ),
            ],
            1_000,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(lines[3], "");
        assert_eq!(
            lines[4],
            "a2 (session s-a2): instance i-0abc terminated by the coordinator: still InService"
        );
        let plain = agents_text(&[agent("a1", None)], 1_000);
        assert_eq!(plain, agents_table(&[agent("a1", None)], 1_000).render());
    }
}
