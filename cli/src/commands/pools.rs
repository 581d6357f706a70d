//! `drover pools`, `drover pools pause|resume POOL`.

use drover_proto::model::{Pool, PoolScaling};

use crate::args::PoolsAction;
use crate::client::Client;
use crate::commands::print_json;
use crate::human;
use crate::table::Table;

pub async fn run(client: &Client, action: Option<&PoolsAction>, json: bool) -> anyhow::Result<()> {
    let pool = match action {
        None => {
            let list = client.list_pools().await?;
            if json {
                return print_json(&list);
            }
            print!("{}", pools_table(&list.pools, human::now_ms()));
            return Ok(());
        }
        Some(PoolsAction::Pause { pool }) => client.pause_pool(pool).await?,
        Some(PoolsAction::Resume { pool }) => client.resume_pool(pool).await?,
    };
    if json {
        return print_json(&pool);
    }
    println!(
        "pool {}: {} ({} queued, {} running)",
        pool.pool,
        if pool.paused { "paused" } else { "active" },
        pool.queued,
        pool.running
    );
    Ok(())
}

/// One row per pool; pools bound to an ASG or Fargate add the scaler's
/// view: kind and bounds, desired vs actual workers, the last decision.
pub fn pools_table(pools: &[Pool], now_ms: i64) -> Table {
    let scaling = pools.iter().any(|p| p.scaling.is_some());
    let mut headers = vec!["POOL", "QUEUED", "RUNNING", "AGENTS", "PAUSED", "OLDEST"];
    if scaling {
        headers.extend(["SCALING", "DESIRED", "ACTUAL", "LAST DECISION"]);
    }
    let mut table = Table::new(headers);
    for pool in pools {
        let mut row = vec![
            pool.pool.clone(),
            pool.queued.to_string(),
            pool.running.to_string(),
            pool.agents.to_string(),
            if pool.paused { "yes" } else { "no" }.to_string(),
            pool.oldest_queued_age_ms
                .map(human::duration_ms)
                .unwrap_or_else(|| "-".to_string()),
        ];
        if let Some(s) = &pool.scaling {
            row.extend(scaling_cells(s, now_ms));
        } else if scaling {
            row.extend(["-", "-", "-", "-"].map(String::from));
        }
        table.row(row);
    }
    table
}

fn scaling_cells(s: &PoolScaling, now_ms: i64) -> [String; 4] {
    let number = |n: Option<u64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    let bounds = match (s.min, s.max) {
        (Some(min), Some(max)) => format!(" {min}-{max}"),
        (None, Some(max)) => format!(" ≤{max}"),
        _ => String::new(),
    };
    let mut desired = number(s.desired);
    if let Some(wanted) = s.wanted.filter(|w| Some(*w) != s.desired) {
        desired.push_str(&format!(" (wants {wanted})"));
    }
    let decision = match &s.last_decision {
        Some(d) => format!(
            "{} {} ago: {}",
            d.action,
            human::duration_ms(now_ms - d.at_ms),
            d.reason
        ),
        None => "-".to_string(),
    };
    [
        format!("{}{bounds}", s.kind),
        desired,
        number(s.actual),
        decision,
    ]
}

#[cfg(test)]
mod tests {
    use drover_proto::model::{PoolList, ScalingDecision};

    use super::*;

    #[test]
    fn pools_table_shows_depth_and_oldest_age() {
        let pools = [
            Pool {
                pool: "default".into(),
                queued: 12,
                running: 3,
                agents: 2,
                paused: false,
                oldest_queued_age_ms: Some(130_000),
                scaling: None,
            },
            Pool {
                pool: "gpu".into(),
                queued: 0,
                running: 0,
                agents: 0,
                paused: true,
                oldest_queued_age_ms: None,
                scaling: None,
            },
        ];
        assert_eq!(
            pools_table(&pools, 0).render(),
            "POOL     QUEUED  RUNNING  AGENTS  PAUSED  OLDEST\n\
             default  12      3        2       no      2m10s\n\
             gpu      0       0        0       yes     -\n"
        );
    }

    fn scaling_pools() -> Vec<Pool> {
        vec![
            Pool {
                pool: "cpu".into(),
                queued: 20,
                running: 0,
                agents: 0,
                paused: false,
                oldest_queued_age_ms: Some(5_000),
                scaling: Some(PoolScaling {
                    kind: "asg".into(),
                    target: "drover-cpu".into(),
                    slots_per_worker: 2,
                    min: Some(0),
                    max: Some(6),
                    demand_slots: Some(20),
                    wanted: Some(6),
                    desired: Some(4),
                    actual: Some(3),
                    last_decision: Some(ScalingDecision {
                        at_ms: 1_000,
                        action: "cooldown".into(),
                        reason: "wants 6; cooldown for 30s more".into(),
                    }),
                    ..PoolScaling::default()
                }),
            },
            Pool {
                pool: "default".into(),
                ..Pool::default()
            },
        ]
    }

    #[test]
    fn pools_table_shows_desired_actual_and_the_last_decision_of_scaling_pools() {
        assert_eq!(
            pools_table(&scaling_pools(), 91_000).render(),
            "POOL     QUEUED  RUNNING  AGENTS  PAUSED  OLDEST  SCALING  DESIRED      ACTUAL  LAST DECISION\n\
             cpu      20      0        0       no      5s      asg 0-6  4 (wants 6)  3       cooldown 1m30s ago: wants 6; cooldown for 30s more\n\
             default  0       0        0       no      -       -        -            -       -\n"
        );
    }

    #[test]
    fn pools_json_carries_the_scaler_view_and_omits_it_elsewhere() {
        let list = PoolList {
            pools: scaling_pools(),
        };
        let json: serde_json::Value = serde_json::to_value(&list).unwrap();
        let cpu = &json["pools"][0]["scaling"];
        assert_eq!(
            (
                &cpu["kind"],
                &cpu["desired"],
                &cpu["actual"],
                &cpu["wanted"]
            ),
            (
                &serde_json::json!("asg"),
                &serde_json::json!(4),
                &serde_json::json!(3),
                &serde_json::json!(6)
            )
        );
        assert_eq!(cpu["last_decision"]["action"], "cooldown");
        assert!(json["pools"][1].get("scaling").is_none());
        let back: PoolList = serde_json::from_value(json).unwrap();
        assert_eq!(back, list, "`--json` round-trips");
    }
}
