//! How errors reach the user: one `error: ...` line, and an exit code
//! (2 for usage and validation errors, 1 for everything else).

use std::fmt;

use drover_proto::model::FieldError;

use crate::client::ApiFailure;

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// The user asked for something malformed; exits with 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(message: impl Into<String>) -> UsageError {
        UsageError(message.into())
    }
}

impl From<FieldError> for UsageError {
    /// Rendered like the coordinator's validation errors: `message (field: f)`.
    fn from(err: FieldError) -> UsageError {
        UsageError(format!("{} (field: {})", err.message, err.field))
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The process exit code for an error.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    let usage = err.chain().any(|cause| {
        cause.is::<UsageError>()
            || cause.is::<FieldError>()
            || cause
                .downcast_ref::<ApiFailure>()
                .is_some_and(ApiFailure::is_validation)
    });
    if usage {
        EXIT_USAGE
    } else {
        EXIT_ERROR
    }
}

/// The line printed for an error: `error: <message> (field: <field>)`, with
/// any context first and causes after, separated by `: `.
pub fn render(err: &anyhow::Error) -> String {
    format!("error: {err:#}")
}

#[cfg(test)]
mod tests {
    use drover_proto::model::ApiError;
    use drover_proto::ErrorCode;

    use super::*;

    fn api(code: ErrorCode, field: Option<&str>) -> anyhow::Error {
        ApiFailure {
            status: code.http_status(),
            error: ApiError {
                code,
                message: "pool \"gpu\" has no agent with 8 GPUs (largest: 4)".into(),
                field: field.map(str::to_string),
            },
        }
        .into()
    }

    #[test]
    fn api_errors_render_message_and_field() {
        let err = api(ErrorCode::InvalidArgument, Some("resources.gpus"));
        assert_eq!(
            render(&err),
            "error: pool \"gpu\" has no agent with 8 GPUs (largest: 4) (field: resources.gpus)"
        );
        assert_eq!(exit_code(&err), EXIT_USAGE);
    }

    #[test]
    fn server_side_failures_exit_1() {
        assert_eq!(exit_code(&api(ErrorCode::NotFound, None)), EXIT_ERROR);
        assert_eq!(exit_code(&api(ErrorCode::Unavailable, None)), EXIT_ERROR);
        assert_eq!(
            exit_code(&anyhow::anyhow!("connection refused")),
            EXIT_ERROR
        );
    }

    #[test]
    fn local_validation_errors_exit_2_even_with_context() {
        let err = anyhow::Error::new(UsageError::from(FieldError::new(
            "command",
            "must not be empty",
        )))
        .context("spec.yaml");
        assert_eq!(exit_code(&err), EXIT_USAGE);
        assert_eq!(
            render(&err),
            "error: spec.yaml: must not be empty (field: command)"
        );
    }
}
