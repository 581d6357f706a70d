//! The one table: keys, indexes, on-demand billing and TTL. `infra/` must
//! declare exactly this (see the module docs of `store::dynamodb`).

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use aws_sdk_dynamodb::Client;

use super::aws_err;
use crate::store::{StoreError, StoreResult};

/// The queue index: sparse, only QUEUED jobs (ready or delayed).
pub const QUEUE_INDEX: &str = "gsi1";
/// The owner index: leased jobs by session, live sessions, pools. Keys only.
pub const OWNER_INDEX: &str = "gsi2";
/// The listing index: every job by submit day, newest first. Keys only.
pub const LIST_INDEX: &str = "gsi3";
/// Attributes the claim path reads straight from the queue index.
pub const QUEUE_PROJECTION: &[&str] = &[
    "attempt", "prio", "enq", "nb", "created", "cpu", "mem", "gpus", "disk", "gmodel", "cons",
];
pub const TTL_ATTRIBUTE: &str = "ttl";

fn build<T, E: std::fmt::Display>(r: Result<T, E>) -> StoreResult<T> {
    r.map_err(|e| StoreError::Backend(format!("building a CreateTable request: {e}")))
}

fn schema(hash: &str, range: &str) -> StoreResult<Vec<KeySchemaElement>> {
    Ok(vec![
        build(
            KeySchemaElement::builder()
                .attribute_name(hash)
                .key_type(KeyType::Hash)
                .build(),
        )?,
        build(
            KeySchemaElement::builder()
                .attribute_name(range)
                .key_type(KeyType::Range)
                .build(),
        )?,
    ])
}

fn index(
    name: &str,
    hash: &str,
    range: &str,
    include: &[&str],
) -> StoreResult<GlobalSecondaryIndex> {
    let projection = if include.is_empty() {
        Projection::builder()
            .projection_type(ProjectionType::KeysOnly)
            .build()
    } else {
        Projection::builder()
            .projection_type(ProjectionType::Include)
            .set_non_key_attributes(Some(include.iter().map(|a| a.to_string()).collect()))
            .build()
    };
    build(
        GlobalSecondaryIndex::builder()
            .index_name(name)
            .set_key_schema(Some(schema(hash, range)?))
            .projection(projection)
            .build(),
    )
}

/// Creates the table (on-demand), its three indexes and TTL on `ttl`, and
/// waits until it is active. An existing table is left as it is (TTL is
/// still switched on).
pub async fn create_table(client: &Client, table: &str) -> StoreResult<()> {
    let mut definitions = Vec::new();
    for attr in [
        "pk", "sk", "gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk", "gsi3pk", "gsi3sk",
    ] {
        definitions.push(build(
            AttributeDefinition::builder()
                .attribute_name(attr)
                .attribute_type(ScalarAttributeType::S)
                .build(),
        )?);
    }
    let created = client
        .create_table()
        .table_name(table)
        .set_attribute_definitions(Some(definitions))
        .set_key_schema(Some(schema("pk", "sk")?))
        .global_secondary_indexes(index(QUEUE_INDEX, "gsi1pk", "gsi1sk", QUEUE_PROJECTION)?)
        .global_secondary_indexes(index(OWNER_INDEX, "gsi2pk", "gsi2sk", &[])?)
        .global_secondary_indexes(index(LIST_INDEX, "gsi3pk", "gsi3sk", &[])?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await;
    match created {
        Ok(_) => tracing::info!(table, "created the DynamoDB table"),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            tracing::info!(table, "the DynamoDB table exists already");
        }
        Err(e) => return Err(aws_err("CreateTable", e)),
    }
    wait_active(client, table).await?;
    let ttl = build(
        TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL_ATTRIBUTE)
            .build(),
    )?;
    let described = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| aws_err("DescribeTimeToLive", e))?;
    let enabled = described
        .time_to_live_description()
        .and_then(|d| d.attribute_name())
        == Some(TTL_ATTRIBUTE);
    if !enabled {
        client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(ttl)
            .send()
            .await
            .map_err(|e| aws_err("UpdateTimeToLive", e))?;
    }
    Ok(())
}

async fn wait_active(client: &Client, table: &str) -> StoreResult<()> {
    for _ in 0..300 {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| aws_err("DescribeTable", e))?;
        let active = described.table().is_some_and(|t| {
            t.table_status() == Some(&TableStatus::Active)
                && t.global_secondary_indexes().iter().all(|i| {
                    i.index_status()
                        .is_none_or(|s| *s == aws_sdk_dynamodb::types::IndexStatus::Active)
                })
        });
        if active {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(StoreError::Backend(format!(
        "DynamoDB table {table} did not become active within 5 minutes"
    )))
}
