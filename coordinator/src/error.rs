//! The service's error type and its one mapping to gRPC and HTTP codes.

use drover_proto::model::FieldError;
use drover_proto::ErrorCode;

use crate::blob::BlobError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Includes "lease lost": the caller must stop working on that attempt.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::Invalid(_) => ErrorCode::InvalidArgument,
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            ServiceError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            ServiceError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            ServiceError::Unavailable(_) => ErrorCode::Unavailable,
            ServiceError::Internal(_) => ErrorCode::Internal,
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            ServiceError::Invalid(e) => Some(&e.field),
            _ => None,
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ServiceError::Invalid(FieldError::new(field, message))
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ServiceError::NotFound(format!("{what} not found")),
            e @ StoreError::LeaseLost { .. } => ServiceError::FailedPrecondition(e.to_string()),
            StoreError::Conflict(msg) => ServiceError::FailedPrecondition(msg),
            StoreError::Invalid(e) => ServiceError::Invalid(e),
            StoreError::Backend(msg) => ServiceError::Unavailable(format!("store: {msg}")),
        }
    }
}

impl From<BlobError> for ServiceError {
    fn from(e: BlobError) -> Self {
        match e {
            e @ BlobError::Gap { .. } => ServiceError::FailedPrecondition(e.to_string()),
            e @ BlobError::TooLarge { .. } => ServiceError::invalid("artifact", e.to_string()),
            e @ BlobError::Unsupported => ServiceError::NotFound(e.to_string()),
            BlobError::Io(msg) => ServiceError::Unavailable(format!("blob store: {msg}")),
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        tonic::Status::new(e.code().grpc_code(), e.to_string())
    }
}
