//! The scaler's items: its leader lease (`LEADER#<name>` / `LEADER`), one
//! record per pool (`SCALER` / `<pool>`, one partition so a single query
//! reads them all), and a marker per lost session (`LOST#<day>` /
//! `<ended ms>#<session>`, written when a session is ended after its expiry)
//! so finding zombies never scans the sessions that left normally.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::{ConditionCheck, Put, ReturnValue, TransactWriteItem};
use drover_proto::model::Resources;

use super::item::{get_n, get_s, key, n, req_n, req_s, s, Expr, Item};
use super::table::QUEUE_INDEX;
use super::{aws_err, built, constraints_of, json_err, ttl_secs, DynamoStore, TxError, DAY_MS};
use crate::store::{JobNeeds, LeaderLease, LostSession, StoreError, StoreResult};

fn leader_pk(name: &str) -> String {
    format!("LEADER#{name}")
}

const SCALER_PK: &str = "SCALER";

fn lost_pk(day: i64) -> String {
    format!("LOST#{day:06}")
}

impl DynamoStore {
    /// Query pages of `pk` on `index` (or the table) until `limit` items.
    async fn query_limited(
        &self,
        index: Option<&str>,
        pk_attr: &str,
        pk: String,
        sk_from: Option<String>,
        limit: usize,
    ) -> StoreResult<Vec<Item>> {
        let mut expr = Expr::new();
        let mut cond = format!("{} = {}", expr.name(pk_attr), expr.value(s(pk)));
        if let Some(from) = sk_from {
            cond.push_str(&format!(
                " AND {} >= {}",
                expr.name("sk"),
                expr.value(s(from))
            ));
        }
        let mut out = Vec::new();
        let mut start = None;
        while out.len() < limit {
            let resp = self
                .client
                .query()
                .table_name(&*self.table)
                .set_index_name(index.map(str::to_string))
                .key_condition_expression(&cond)
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values())
                .limit((limit - out.len()).clamp(1, 1000) as i32)
                .consistent_read(index.is_none())
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| aws_err("Query", e))?;
            out.extend(resp.items.unwrap_or_default());
            match resp.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    pub(super) async fn queued_needs_impl(
        &self,
        pool: &str,
        limit: usize,
    ) -> StoreResult<Vec<JobNeeds>> {
        let mut out = Vec::new();
        for shard in 0..self.shards {
            for partition in [format!("Q#{pool}#{shard}"), format!("D#{pool}#{shard}")] {
                if out.len() >= limit {
                    return Ok(out);
                }
                let items = self
                    .query_limited(
                        Some(QUEUE_INDEX),
                        "gsi1pk",
                        partition,
                        None,
                        limit - out.len(),
                    )
                    .await?;
                out.extend(items.iter().map(|item| JobNeeds {
                    resources: Resources {
                        cpu_millis: get_n(item, "cpu").unwrap_or(0),
                        memory_mib: get_n(item, "mem").unwrap_or(0),
                        gpus: get_n(item, "gpus").unwrap_or(0),
                        disk_gib: get_n(item, "disk").unwrap_or(0),
                        gpu_model: get_s(item, "gmodel").map(str::to_string),
                    },
                    constraints: constraints_of(item),
                }));
            }
        }
        Ok(out)
    }

    /// Called by `end_session` when it ended a session after its expiry.
    pub(super) async fn mark_lost(&self, session: &Item, now_ms: i64) -> StoreResult<()> {
        let session_id = req_s(session, "session_id")?;
        let mut item = key(
            lost_pk(now_ms.div_euclid(DAY_MS)),
            format!("{now_ms:013}#{session_id}"),
        );
        for (k, v) in [
            ("session_id", s(&session_id)),
            ("agent_id", s(req_s(session, "agent_id")?)),
            ("pool", s(req_s(session, "pool")?)),
            ("labels", s(get_s(session, "labels").unwrap_or("{}"))),
            ("ended", n(now_ms)),
            (super::TTL_ATTRIBUTE, ttl_secs(now_ms + self.retention_ms)),
        ] {
            item.insert(k.to_string(), v);
        }
        self.client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| aws_err("PutItem", e))?;
        Ok(())
    }

    pub(super) async fn lost_sessions_impl(
        &self,
        since_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Vec<LostSession>> {
        let mut out = Vec::new();
        let mut day = since_ms.div_euclid(DAY_MS);
        while day <= now_ms.div_euclid(DAY_MS) {
            for item in self
                .query_limited(
                    None,
                    "pk",
                    lost_pk(day),
                    Some(format!("{since_ms:013}")),
                    usize::MAX,
                )
                .await?
            {
                out.push(LostSession {
                    session_id: req_s(&item, "session_id")?,
                    agent_id: req_s(&item, "agent_id")?,
                    pool: req_s(&item, "pool")?,
                    labels: serde_json::from_str(get_s(&item, "labels").unwrap_or("{}"))
                        .map_err(json_err)?,
                    ended_at_ms: req_n(&item, "ended")?,
                });
            }
            day += 1;
        }
        Ok(out)
    }

    pub(super) async fn try_acquire_leader_impl(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now_ms: i64,
    ) -> StoreResult<Option<LeaderLease>> {
        let current = self.get(leader_pk(name), "LEADER").await?;
        let expires_at_ms = now_ms + ttl_ms as i64;
        let mut expr = Expr::new();
        expr.set("holder", s(holder))
            .set("expires", n(expires_at_ms));
        let epoch = match &current {
            None => {
                expr.when_absent("pk");
                1
            }
            Some(item) => {
                let epoch: u64 = req_n(item, "epoch")?;
                let expires: i64 = req_n(item, "expires")?;
                let same = get_s(item, "holder") == Some(holder);
                if !same && expires >= now_ms {
                    return Ok(None);
                }
                // Whatever was read must still be there: a concurrent taker
                // changes the epoch or the expiry and this write fails.
                expr.when_eq("epoch", n(epoch))
                    .when_eq("expires", n(expires));
                if same {
                    epoch
                } else {
                    epoch + 1
                }
            }
        };
        expr.set("epoch", n(epoch));
        let won = self
            .update_item(key(leader_pk(name), "LEADER"), &expr, ReturnValue::None)
            .await?
            .is_some();
        Ok(won.then(|| LeaderLease {
            name: name.to_string(),
            holder: holder.to_string(),
            epoch,
            expires_at_ms,
        }))
    }

    pub(super) async fn release_leader_impl(&self, lease: &LeaderLease) -> StoreResult<()> {
        let mut expr = Expr::new();
        expr.set("expires", n(i64::MIN))
            .when_eq("holder", s(&lease.holder))
            .when_eq("epoch", n(lease.epoch));
        self.update_item(
            key(leader_pk(&lease.name), "LEADER"),
            &expr,
            ReturnValue::None,
        )
        .await?;
        Ok(())
    }

    pub(super) async fn scaler_states_impl(&self) -> StoreResult<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for item in self
            .query_limited(None, "pk", SCALER_PK.into(), None, usize::MAX)
            .await?
        {
            out.insert(req_s(&item, "sk")?, req_s(&item, "state")?);
        }
        Ok(out)
    }

    pub(super) async fn put_scaler_state_impl(
        &self,
        pool: &str,
        state: &str,
        lease: &LeaderLease,
    ) -> StoreResult<()> {
        let mut cond = Expr::new();
        cond.when_eq("holder", s(&lease.holder))
            .when_eq("epoch", n(lease.epoch));
        let check = built(
            ConditionCheck::builder()
                .table_name(&*self.table)
                .set_key(Some(key(leader_pk(&lease.name), "LEADER")))
                .set_condition_expression(cond.condition())
                .set_expression_attribute_names(cond.names())
                .set_expression_attribute_values(cond.values())
                .build(),
        )?;
        let mut item = key(SCALER_PK, pool);
        item.insert("state".into(), s(state));
        let put = built(
            Put::builder()
                .table_name(&*self.table)
                .set_item(Some(item))
                .build(),
        )?;
        match self
            .transact(vec![
                TransactWriteItem::builder().condition_check(check).build(),
                TransactWriteItem::builder().put(put).build(),
            ])
            .await
        {
            Ok(()) => Ok(()),
            Err(TxError::Cancelled(reasons))
                if reasons.first().and_then(|r| r.as_deref()) == Some("ConditionalCheckFailed") =>
            {
                Err(StoreError::Conflict(format!(
                    "the {} lease (epoch {}) is no longer held by {}",
                    lease.name, lease.epoch, lease.holder
                )))
            }
            Err(TxError::Cancelled(reasons)) => Err(StoreError::Backend(format!(
                "writing the scaler record of pool {pool} was cancelled: {reasons:?}"
            ))),
            Err(TxError::Other(e)) => Err(e),
        }
    }
}
