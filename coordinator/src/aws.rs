//! What the SDK clients of the coordinator's state (DynamoDB, S3) share:
//! retries stated explicitly rather than left to SDK defaults, and a count
//! of throttled DynamoDB answers.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::interceptors::FinalizerInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

/// Tries per call, the first included, when neither Drover's setting nor
/// the AWS chain names a number.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// The first retry waits up to this long (full jitter), each next one up
/// to twice as long as the one before…
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// …but never more than this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The retries of a client: the SDK's standard mode (throttling errors such
/// as `ThrottlingException`, `ProvisionedThroughputExceededException` or
/// S3's `SlowDown`, 5xx answers, timeouts and broken connections are
/// retried, with exponential backoff and full jitter, within the SDK's
/// retry quota), with Drover's backoff.
///
/// The number of tries: `max_attempts` (Drover's `dynamodb.max_attempts` /
/// `s3.max_attempts`) when set; else `AWS_MAX_ATTEMPTS` (environment, or a
/// profile's `max_attempts`) as the SDK read it into `chain`; else
/// [`DEFAULT_MAX_ATTEMPTS`]. The mode is the chain's (`AWS_RETRY_MODE`,
/// standard when unset). A profile's `max_attempts = 3`, the SDK's own
/// default, cannot be told from no setting and reads as unset.
pub fn retry_config(chain: Option<&RetryConfig>, max_attempts: Option<u32>) -> RetryConfig {
    let chain = chain.cloned().unwrap_or_else(RetryConfig::standard);
    let chain_attempts = (chain.max_attempts() != RetryConfig::standard().max_attempts()
        || std::env::var_os("AWS_MAX_ATTEMPTS").is_some())
    .then_some(chain.max_attempts());
    chain
        .with_max_attempts(
            max_attempts
                .or(chain_attempts)
                .unwrap_or(DEFAULT_MAX_ATTEMPTS),
        )
        .with_initial_backoff(INITIAL_BACKOFF)
        .with_max_backoff(MAX_BACKOFF)
}

/// Error codes of a throttled DynamoDB request.
const THROTTLED: [&str; 3] = [
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
];

/// Counts every throttled DynamoDB attempt, retried or not, by operation,
/// into [`crate::metrics::DYNAMODB_THROTTLED`]
/// (`drover_dynamodb_throttled_total`).
#[derive(Debug, Default)]
pub struct ThrottleCounter;

impl Intercept for ThrottleCounter {
    fn name(&self) -> &'static str {
        "DroverThrottleCounter"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let throttled = context
            .response()
            .filter(|r| r.status().as_u16() == 400)
            .and_then(error_code)
            .is_some_and(|code| THROTTLED.contains(&code.as_str()));
        if throttled {
            let operation = cfg.load::<Metadata>().map_or("unknown", |m| m.name());
            crate::metrics::DYNAMODB_THROTTLED.inc(operation);
        }
        Ok(())
    }
}

/// The error code of a JSON-protocol error answer (`x-amzn-ErrorType`, else
/// the body's `__type`) without its namespace
/// (`com.amazonaws.dynamodb.v20120810#`). The body was read whole before
/// an attempt ends.
fn error_code(response: &HttpResponse) -> Option<String> {
    let raw = match response.headers().get("x-amzn-errortype") {
        Some(header) => header.to_string(),
        None => {
            let body: serde_json::Value = serde_json::from_slice(response.body().bytes()?).ok()?;
            body.get("__type")?.as_str()?.to_string()
        }
    };
    // The header may carry a `:<url>` suffix.
    let code = raw.split(':').next()?;
    Some(code.rsplit('#').next()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drover_s_max_attempts_wins_then_the_chain_s_then_eight() {
        // (No AWS_MAX_ATTEMPTS in the test environment.)
        let standard = RetryConfig::standard();
        assert_eq!(
            retry_config(None, None).max_attempts(),
            DEFAULT_MAX_ATTEMPTS
        );
        assert_eq!(
            retry_config(Some(&standard), None).max_attempts(),
            DEFAULT_MAX_ATTEMPTS,
            "the SDK's default is no setting"
        );
        let chain = RetryConfig::adaptive().with_max_attempts(5);
        let from_chain = retry_config(Some(&chain), None);
        assert_eq!(from_chain.max_attempts(), 5);
        assert_eq!(from_chain.mode(), chain.mode());
        let drover = retry_config(Some(&chain), Some(2));
        assert_eq!(drover.max_attempts(), 2);
        assert_eq!(drover.initial_backoff(), INITIAL_BACKOFF);
        assert_eq!(drover.max_backoff(), MAX_BACKOFF);
    }
}
