//! `drover pools`, `drover pools pause|resume POOL`.

use drover_proto::model::Pool;

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
            print!("{}", pools_table(&list.pools));
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

pub fn pools_table(pools: &[Pool]) -> Table {
    let mut table = Table::new(["POOL", "QUEUED", "RUNNING", "AGENTS", "PAUSED", "OLDEST"]);
    for pool in pools {
        table.row([
            pool.pool.clone(),
            pool.queued.to_string(),
            pool.running.to_string(),
            pool.agents.to_string(),
            if pool.paused { "yes" } else { "no" }.to_string(),
            pool.oldest_queued_age_ms
                .map(human::duration_ms)
                .unwrap_or_else(|| "-".to_string()),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
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
            },
            Pool {
                pool: "gpu".into(),
                queued: 0,
                running: 0,
                agents: 0,
                paused: true,
                oldest_queued_age_ms: None,
            },
        ];
        assert_eq!(
            pools_table(&pools).render(),
            "POOL     QUEUED  RUNNING  AGENTS  PAUSED  OLDEST\n\
             default  12      3        2       no      2m10s\n\
             gpu      0       0        0       yes     -\n"
        );
    }
}
