//! The HTTP edge (actix-web): WHIP, WHEP, admin API, metrics and health. Handlers check
//! authorization and input, then talk to actors through their addresses.

pub mod admin;
pub mod metrics;
pub mod observe;
pub mod openapi;
pub mod problem;
pub mod sessions;

use crate::auth::TokenKeys;
use crate::metrics::Metrics;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use mediamesh_actors::{RoomRegistry, SessionKind};
use problem::ApiError;
use std::sync::Arc;

/// Shared by every HTTP worker.
pub struct AppState {
    pub node_id: String,
    pub region: String,
    pub keys: TokenKeys,
    pub rooms: Arc<RoomRegistry>,
    pub metrics: Arc<Metrics>,
    pub body_bytes_max: usize,
    pub store: mediamesh_cluster::Store,
    /// The mesh between nodes (migration, drain, relay stats).
    pub mesh: Arc<crate::mesh::Mesh>,
    /// Starts a drain of this node (false: one is running already).
    pub start_drain: crate::mesh::service::DrainStarter,
    /// `--mask-names`: names with Hangul are shown masked.
    pub mask_names: bool,
    /// `--test-faults`: the partition endpoint answers (else 404).
    pub test_faults: bool,
    /// The TURN relay (None: `--turn off`).
    pub turn: Option<(
        actix::Addr<mediamesh_actors::turn::TurnRelay>,
        mediamesh_actors::turn::TurnHandle,
    )>,
}

/// Every route of the node.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics::scrape))
        .route("/signal", web::get().to(crate::signal::ws::connect))
        .route("/sdk/mediamesh.js", web::get().to(browser_sdk))
        .route("/demo", web::get().to(demo_page))
        .route("/", web::get().to(dashboard_page))
        .service(
            web::resource("/whip/{room}")
                .route(web::post().to(|s, r, p, q, b| sessions::create(s, r, p, q, b, SessionKind::Publisher)))
                .route(web::method(actix_web::http::Method::OPTIONS).to(preflight)),
        )
        .service(
            web::resource("/whip/{room}/{session}")
                .route(web::patch().to(|s, r, p, b| sessions::patch(s, r, p, b, SessionKind::Publisher)))
                .route(web::delete().to(|s, r, p| sessions::delete(s, r, p, SessionKind::Publisher)))
                .route(web::method(actix_web::http::Method::OPTIONS).to(preflight)),
        )
        .service(
            web::resource("/whep/{room}")
                .route(web::post().to(|s, r, p, q, b| sessions::create(s, r, p, q, b, SessionKind::Subscriber)))
                .route(web::method(actix_web::http::Method::OPTIONS).to(preflight)),
        )
        .service(
            web::resource("/whep/{room}/{session}")
                .route(web::patch().to(|s, r, p, b| sessions::patch(s, r, p, b, SessionKind::Subscriber)))
                .route(web::delete().to(|s, r, p| sessions::delete(s, r, p, SessionKind::Subscriber)))
                .route(web::method(actix_web::http::Method::OPTIONS).to(preflight)),
        )
        .route("/admin/v1/cluster", web::get().to(admin::cluster))
        .route("/admin/v1/turn/rotate", web::post().to(admin::turn_rotate))
        .route("/admin/v1/rooms", web::get().to(admin::rooms))
        .route("/admin/v1/rooms/{room}", web::get().to(admin::room))
        .route("/admin/v1/rooms/{room}/migrate", web::post().to(admin::migrate))
        .route("/admin/v1/migrations", web::get().to(admin::migrations))
        .route("/admin/v1/usage", web::get().to(admin::usage))
        .route("/admin/v1/openapi.json", web::get().to(openapi::openapi_json))
        .route("/admin/v1/nodes/{id}/drain", web::post().to(admin::drain))
        .service(
            web::resource("/admin/v1/test/partition")
                .route(web::post().to(admin::partition))
                .route(web::delete().to(admin::heal)),
        )
        .service(
            web::resource("/admin/v1/viewers/{viewer}")
                .route(web::get().to(admin::viewer_get))
                .route(web::put().to(admin::viewer_put))
                .route(web::delete().to(admin::viewer_delete)),
        );
}

/// What extractors refuse (a query or path that does not parse) and routes that do not exist
/// answer as problems too, like every other error.
pub fn extractor_errors(config: &mut web::ServiceConfig) {
    config
        .app_data(
            web::QueryConfig::default()
                .error_handler(|e, _| ApiError::BadRequest(format!("invalid query: {e}")).into()),
        )
        .app_data(
            web::PathConfig::default().error_handler(|e, _| ApiError::BadRequest(format!("invalid path: {e}")).into()),
        )
        .default_service(web::to(|request: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError::NotFound(format!(
                "no route {} {:.200}",
                request.method(),
                request.path()
            )))
        }));
}

/// Headers every response carries, so pages on other origins can use the API.
pub fn cors_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add(("Access-Control-Allow-Origin", "*"))
        .add((
            "Access-Control-Expose-Headers",
            "Location, ETag, Link, Accept-Patch, Retry-After",
        ))
}

async fn preflight() -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header(("Access-Control-Allow-Methods", "POST, PATCH, DELETE, OPTIONS"))
        .insert_header(("Access-Control-Allow-Headers", "Authorization, Content-Type, If-Match"))
        .insert_header(("Access-Control-Max-Age", "86400"))
        .insert_header(("Accept-Post", "application/sdp"))
        .finish()
}

/// The browser SDK (`sdk/js/mediamesh.js`), built into the binary.
async fn browser_sdk() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(include_str!("../../sdk/js/mediamesh.js"))
}

/// A page that publishes a camera and watches a room with the browser SDK.
async fn demo_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .body(include_str!("../../sdk/js/demo.html"))
}

/// The operators' dashboard (`src/http/dashboard.html`, plain JS polling the admin API). The
/// page is public; every admin call it makes carries the token the operator gives it.
async fn dashboard_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; frame-ancestors 'none'"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(include_str!("dashboard.html"))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// Ready when the store has a leader and this node is registered.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let turn_ready = state.turn.as_ref().is_none_or(|(_, handle)| handle.is_ready());
    if state.store.is_ready() && turn_ready {
        HttpResponse::Ok().content_type("text/plain").body("ready\n")
    } else {
        HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body("not ready\n")
    }
}

/// Refuses a request whose `Content-Type` is not `expected` (parameters allowed).
pub fn require_content_type(request: &HttpRequest, expected: &'static str) -> Result<(), ApiError> {
    let actual = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if actual.as_deref() == Some(expected) {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType { expected })
    }
}

/// Reads a request body of at most `bytes_max` bytes, refusing larger ones before reading
/// them when the length is declared.
pub async fn read_body(request: &HttpRequest, mut payload: web::Payload, bytes_max: usize) -> Result<Bytes, ApiError> {
    if let Some(length) = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && length > bytes_max
    {
        return Err(ApiError::PayloadTooLarge(bytes_max));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body failed: {e}")))?;
        if body.len() + chunk.len() > bytes_max {
            return Err(ApiError::PayloadTooLarge(bytes_max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
