/// The kinds of error the services return, and their gRPC and HTTP codes.
/// Every error type in Drover maps onto one of these, in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Bad input; the message names the field and the fix.
    InvalidArgument,
    NotFound,
    /// Missing or wrong token.
    Unauthenticated,
    /// Token is valid but lacks the scope.
    PermissionDenied,
    /// The operation does not apply in the current state (lease lost, job
    /// already finished).
    FailedPrecondition,
    /// Conflicting concurrent change; retrying may succeed.
    Aborted,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::FailedPrecondition | ErrorCode::Aborted => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::Aborted => tonic::Code::Aborted,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }
}
