//! IMDSv2 through `aws_config::imds` (a session token from `PUT
//! /latest/api/token`, cached and refreshed, then GETs that carry it), with
//! short timeouts: on a host without IMDS, detection gives up in about a
//! second.

use std::time::Duration;

use aws_config::imds::client::error::ImdsError;
use aws_config::provider_config::ProviderConfig;

use super::PlatformError;

#[derive(Clone)]
pub struct Imds {
    client: aws_config::imds::Client,
    endpoint: String,
}

impl Imds {
    pub fn new(endpoint: &str) -> Result<Imds, PlatformError> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let provider = ProviderConfig::without_region().with_http_client(super::http_client());
        let client = aws_config::imds::Client::builder()
            .configure(&provider)
            .endpoint(&endpoint)
            .map_err(|e| PlatformError::Imds {
                endpoint: endpoint.clone(),
                message: format!("not a valid endpoint: {e}"),
            })?
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(2))
            .max_attempts(2)
            .build();
        Ok(Imds { client, endpoint })
    }

    /// `GET /latest/meta-data/<path>`; `None` when IMDS answers 404 (no spot
    /// notice, no instance tags, not in an ASG).
    pub async fn meta(&self, path: &str) -> Result<Option<String>, PlatformError> {
        let full = format!("/latest/meta-data/{path}");
        match self.client.get(full.clone()).await {
            Ok(value) => Ok(Some(value.as_ref().trim().to_string())),
            Err(ImdsError::ErrorResponse(r)) if r.response().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(PlatformError::Imds {
                endpoint: self.endpoint.clone(),
                message: format!("GET {full}: {}", describe(&e)),
            }),
        }
    }

    /// Like [`meta`](Self::meta) for a value that must exist.
    pub async fn required(&self, path: &str) -> Result<String, PlatformError> {
        self.meta(path).await?.ok_or_else(|| PlatformError::Imds {
            endpoint: self.endpoint.clone(),
            message: format!("/latest/meta-data/{path} is missing (404)"),
        })
    }
}

fn describe(e: &ImdsError) -> String {
    match e {
        ImdsError::ErrorResponse(r) => format!("HTTP {}", r.response().status().as_u16()),
        other => aws_sdk_autoscaling::error::DisplayErrorContext(other).to_string(),
    }
}
