//! The instance's own Auto Scaling group: scale-in protection,
//! self-termination and the terminating lifecycle action. Every call is
//! counted and retried here (the SDK's own retries are off, so the count is
//! the number of requests AWS saw).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_autoscaling::config::http::HttpResponse;
use aws_sdk_autoscaling::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use super::PlatformError;
use crate::client::Backoff;
use crate::metrics::AwsCalls;

/// Requests per operation before giving up (throttling and transient errors).
const ATTEMPTS: u32 = 5;

/// What an AWS error means for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwsErrorKind {
    /// TerminateInstanceInAutoScalingGroup with decrement refused: desired
    /// capacity equals the group's min size. Serve again.
    AtMinSize,
    /// Throttling or request limits: retry with backoff.
    Throttled,
    /// 5xx, timeouts, network, no credentials yet: retry with backoff.
    Transient,
    /// Anything else (access denied, validation): retrying will not help.
    Rejected,
}

impl AwsErrorKind {
    pub fn retryable(self) -> bool {
        matches!(self, AwsErrorKind::Throttled | AwsErrorKind::Transient)
    }
}

/// Classifies an AWS answer by HTTP status (None: no answer at all), error
/// code and message.
pub fn classify(status: Option<u16>, code: Option<&str>, message: Option<&str>) -> AwsErrorKind {
    const THROTTLING: [&str; 7] = [
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "TooManyRequestsException",
        "SlowDown",
    ];
    let code = code.unwrap_or("");
    if THROTTLING.contains(&code) || status == Some(429) {
        return AwsErrorKind::Throttled;
    }
    if code == "ValidationError"
        && message.is_some_and(|m| m.to_ascii_lowercase().contains("min size"))
    {
        return AwsErrorKind::AtMinSize;
    }
    match status {
        None => AwsErrorKind::Transient,
        Some(s) if s >= 500 => AwsErrorKind::Transient,
        _ if matches!(
            code,
            "InternalFailure" | "ServiceUnavailable" | "ResourceContention" | "RequestTimeout"
        ) =>
        {
            AwsErrorKind::Transient
        }
        _ => AwsErrorKind::Rejected,
    }
}

pub(crate) fn from_sdk<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> PlatformError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (status, code, message) = match &err {
        SdkError::ServiceError(ctx) => (
            Some(ctx.raw().status().as_u16()),
            ctx.err().code().map(str::to_string),
            ctx.err().message().map(str::to_string),
        ),
        SdkError::ResponseError(ctx) => (Some(ctx.raw().status().as_u16()), None, None),
        _ => (None, None, None),
    };
    let kind = classify(status, code.as_deref(), message.as_deref());
    let message = match (code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => DisplayErrorContext(&err).to_string(),
    };
    PlatformError::Aws { op, kind, message }
}

/// An Auto Scaling client for `region` from the standard credential chain,
/// pointed at `endpoint` when set (an emulator).
pub async fn client(region: &str, endpoint: Option<&str>) -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::new(&sdk_config(region, endpoint).await)
}

/// What every AWS client of the agent starts from: the standard credential
/// chain, the rustls client, short timeouts, no SDK retries (callers retry),
/// pointed at `endpoint` when set (an emulator).
pub(crate) async fn sdk_config(region: &str, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(super::http_client())
        .region(aws_config::Region::new(region.to_string()))
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        );
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// Runs one AWS operation with bounded retries of throttling and transient
/// errors, counting every request.
pub(crate) async fn call<T, F, Fut>(
    calls: &AwsCalls,
    op: &'static str,
    mut f: F,
) -> Result<T, PlatformError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, PlatformError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = f().await;
        calls.record(op, result.is_ok());
        match result {
            Ok(value) => return Ok(value),
            Err(e) if attempt < ATTEMPTS && e.aws_kind().is_some_and(AwsErrorKind::retryable) => {
                let delay = backoff.next_delay();
                tracing::debug!("{e}; retrying in {delay:?} (attempt {attempt} of {ATTEMPTS})");
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The group name of `instance_id`, from `DescribeAutoScalingInstances`;
/// `None` when the instance is in no group.
pub async fn find_group(
    client: &aws_sdk_autoscaling::Client,
    calls: &AwsCalls,
    instance_id: &str,
) -> Result<Option<String>, PlatformError> {
    const OP: &str = "DescribeAutoScalingInstances";
    let out = call(calls, OP, || async {
        client
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| from_sdk(OP, e))
    })
    .await?;
    Ok(out
        .auto_scaling_instances()
        .iter()
        .find(|i| i.instance_id() == Some(instance_id))
        .and_then(|i| i.auto_scaling_group_name())
        .map(str::to_string))
}

/// This instance in its group.
pub struct Asg {
    pub client: aws_sdk_autoscaling::Client,
    pub group: String,
    pub instance_id: String,
    pub calls: Arc<AwsCalls>,
}

impl Asg {
    /// `TerminateInstanceInAutoScalingGroup`; with `decrement` the group's
    /// desired capacity drops by one (AWS refuses at min size:
    /// [`AwsErrorKind::AtMinSize`]).
    pub async fn terminate(&self, decrement: bool) -> Result<(), PlatformError> {
        const OP: &str = "TerminateInstanceInAutoScalingGroup";
        call(&self.calls, OP, || async {
            self.client
                .terminate_instance_in_auto_scaling_group()
                .instance_id(&self.instance_id)
                .should_decrement_desired_capacity(decrement)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| from_sdk(OP, e))
        })
        .await
    }

    pub async fn set_protection(&self, protected: bool) -> Result<(), PlatformError> {
        const OP: &str = "SetInstanceProtection";
        call(&self.calls, OP, || async {
            self.client
                .set_instance_protection()
                .auto_scaling_group_name(&self.group)
                .instance_ids(&self.instance_id)
                .protected_from_scale_in(protected)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| from_sdk(OP, e))
        })
        .await
    }

    pub async fn lifecycle_heartbeat(&self, hook: &str) -> Result<(), PlatformError> {
        const OP: &str = "RecordLifecycleActionHeartbeat";
        call(&self.calls, OP, || async {
            self.client
                .record_lifecycle_action_heartbeat()
                .auto_scaling_group_name(&self.group)
                .lifecycle_hook_name(hook)
                .instance_id(&self.instance_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| from_sdk(OP, e))
        })
        .await
    }

    pub async fn complete_lifecycle(&self, hook: &str, result: &str) -> Result<(), PlatformError> {
        const OP: &str = "CompleteLifecycleAction";
        call(&self.calls, OP, || async {
            self.client
                .complete_lifecycle_action()
                .auto_scaling_group_name(&self.group)
                .lifecycle_hook_name(hook)
                .instance_id(&self.instance_id)
                .lifecycle_action_result(result)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| from_sdk(OP, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN_SIZE: &str = "Currently, desiredSize equals minSize (1). Terminating instance without replacement will violate group's min size constraint. Either set shouldDecrementDesiredCapacity flag to false or lower group's min size.";

    #[test]
    fn aws_errors_are_classified_by_what_the_agent_does() {
        assert_eq!(
            classify(Some(400), Some("ValidationError"), Some(MIN_SIZE)),
            AwsErrorKind::AtMinSize
        );
        assert_eq!(
            classify(Some(400), Some("Throttling"), Some("Rate exceeded")),
            AwsErrorKind::Throttled
        );
        assert_eq!(
            classify(Some(400), Some("RequestLimitExceeded"), None),
            AwsErrorKind::Throttled
        );
        assert_eq!(
            classify(Some(503), Some("ServiceUnavailable"), None),
            AwsErrorKind::Transient
        );
        assert_eq!(
            classify(Some(500), Some("InternalFailure"), None),
            AwsErrorKind::Transient
        );
        assert_eq!(
            classify(Some(400), Some("ResourceContention"), None),
            AwsErrorKind::Transient
        );
        assert_eq!(classify(None, None, None), AwsErrorKind::Transient);
        assert_eq!(
            classify(
                Some(400),
                Some("ValidationError"),
                Some("No active Lifecycle Action found with instance ID i-1")
            ),
            AwsErrorKind::Rejected
        );
        assert_eq!(
            classify(Some(403), Some("AccessDenied"), Some("not authorized")),
            AwsErrorKind::Rejected
        );
        assert!(AwsErrorKind::Throttled.retryable());
        assert!(AwsErrorKind::Transient.retryable());
        assert!(!AwsErrorKind::AtMinSize.retryable());
        assert!(!AwsErrorKind::Rejected.retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn calls_retry_transient_errors_a_bounded_number_of_times() {
        let calls = AwsCalls::default();
        let mut tries = 0;
        let result: Result<(), _> = call(&calls, "Op", || {
            tries += 1;
            async {
                Err(PlatformError::Aws {
                    op: "Op",
                    kind: AwsErrorKind::Throttled,
                    message: "Throttling".into(),
                })
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(tries, ATTEMPTS);
        assert_eq!(calls.get("Op", false), u64::from(ATTEMPTS));

        let mut tries = 0;
        let result: Result<(), _> = call(&calls, "Op", || {
            tries += 1;
            async {
                Err(PlatformError::Aws {
                    op: "Op",
                    kind: AwsErrorKind::AtMinSize,
                    message: MIN_SIZE.into(),
                })
            }
        })
        .await;
        assert_eq!(
            result.unwrap_err().aws_kind(),
            Some(AwsErrorKind::AtMinSize)
        );
        assert_eq!(tries, 1, "a refusal is not retried");

        let mut tries = 0;
        call(&calls, "Ok", || {
            tries += 1;
            let fail = tries < 3;
            async move {
                if fail {
                    Err(PlatformError::Aws {
                        op: "Ok",
                        kind: AwsErrorKind::Transient,
                        message: "503".into(),
                    })
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((calls.get("Ok", false), calls.get("Ok", true)), (2, 1));
    }
}
