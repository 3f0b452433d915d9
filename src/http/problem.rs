//! Errors as `application/problem+json` (RFC 9457), and the mapping from every internal error
//! an HTTP request can meet to a status and a clear message.

use crate::auth::AuthError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use mediamesh_actors::RoomError;
use mediamesh_actors::media::engine::MediaError;
use serde::Serialize;

/// An error (RFC 9457 problem details).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The status's reason phrase.
    #[schema(value_type = String)]
    pub title: &'static str,
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Room(#[from] RoomError),
    #[error("store: {0}")]
    Store(#[from] mediamesh_cluster::StoreError),
    #[error("unsupported content type: expected {expected}")]
    UnsupportedMediaType { expected: &'static str },
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
}

impl ApiError {
    fn title(&self) -> &'static str {
        match self.status_code() {
            StatusCode::BAD_REQUEST => "Bad Request",
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::NOT_FOUND => "Not Found",
            StatusCode::PRECONDITION_FAILED => "Precondition Failed",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "Payload Too Large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "Unsupported Media Type",
            StatusCode::TOO_MANY_REQUESTS => "Too Many Requests",
            StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable",
            _ => "Internal Server Error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Auth(e) if e.is_forbidden() => StatusCode::FORBIDDEN,
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Room(e) => match e {
                RoomError::NodeFull(..) | RoomError::Closing | RoomError::Directory(_) | RoomError::Elsewhere(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                RoomError::RoomFull(..) => StatusCode::TOO_MANY_REQUESTS,
                RoomError::BadOffer(_) | RoomError::BadFragment(_) => StatusCode::BAD_REQUEST,
                RoomError::UnknownSession => StatusCode::NOT_FOUND,
                RoomError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
                RoomError::Media(MediaError::PortsExhausted(..)) => StatusCode::SERVICE_UNAVAILABLE,
                RoomError::Media(MediaError::Negotiation(_)) => StatusCode::BAD_REQUEST,
                RoomError::Media(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Store(e) => {
                use mediamesh_cluster::StoreError;
                match e {
                    StoreError::InvalidInput(_) => StatusCode::BAD_REQUEST,
                    StoreError::EpochConflict { .. } | StoreError::Rejected(_) => StatusCode::CONFLICT,
                    StoreError::NoLeader
                    | StoreError::Timeout(_)
                    | StoreError::Overloaded(_)
                    | StoreError::Transport(_) => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                }
            }
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let problem = Problem {
            kind: "about:blank",
            title: self.title(),
            status: status.as_u16(),
            detail: self.to_string(),
        };
        let mut response = HttpResponse::build(status);
        response.content_type("application/problem+json");
        if status == StatusCode::UNAUTHORIZED {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response.insert_header(("Retry-After", "5"));
        }
        response.json(problem)
    }
}
