//! The OpenAPI 3.1 document of the admin API, generated from the handlers' `#[utoipa::path]`
//! attributes and the types they answer with, served at `GET /admin/v1/openapi.json`.
//!
//! [`Conventions`] adds what every admin route shares, so no route can forget it: the bearer
//! security scheme, the 401/403/503 responses, and the `application/problem+json` body (RFC 9457)
//! of every error response a handler lists.

use super::AppState;
use super::admin::{self, authorize_admin};
use super::problem::{ApiError, Problem};
use actix_web::{HttpRequest, HttpResponse, web};
use std::sync::OnceLock;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, ObjectBuilder, Ref, RefOr, Response, Type};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mediamesh admin API",
        description = "Operate a mediamesh cluster: nodes, rooms, migrations, drains, viewer state, usage. \
            Every route needs a bearer token with the `admin` grant (`mediamesh token create --admin`). \
            Errors are `application/problem+json` (RFC 9457).",
    ),
    paths(
        admin::cluster,
        admin::rooms,
        admin::room,
        admin::migrate,
        admin::drain,
        admin::migrations,
        admin::viewer_get,
        admin::viewer_put,
        admin::viewer_delete,
        admin::usage,
        admin::turn_rotate,
        openapi_json,
    ),
    components(schemas(Problem)),
    modifiers(&Conventions),
    tags(
        (name = "cluster", description = "Nodes and the replicated store"),
        (name = "rooms", description = "Rooms, their placement and migrations"),
        (name = "viewers", description = "Resumable viewer state"),
        (name = "usage", description = "Viewer-minutes per room per KST day"),
        (name = "turn", description = "The embedded TURN relay"),
        (name = "meta", description = "This document"),
    ),
)]
pub struct AdminApi;

/// What every admin operation shares.
struct Conventions;

const SECURITY: &str = "bearer";

fn problem(description: &str) -> Response {
    let mut response = Response::new(description);
    response.content.insert(
        "application/problem+json".into(),
        Content::new(Some(RefOr::Ref(Ref::from_schema_name("Problem")))),
    );
    response
}

fn string_header(description: &str) -> utoipa::openapi::header::Header {
    HeaderBuilder::new()
        .schema(ObjectBuilder::new().schema_type(Type::String))
        .description(Some(description))
        .build()
}

impl Modify for Conventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        openapi.security = Some(vec![SecurityRequirement::new(SECURITY, Vec::<String>::new())]);
        let mut unauthorized = problem("Missing, malformed, expired or wrongly signed token");
        unauthorized
            .headers
            .insert("WWW-Authenticate".into(), string_header("`Bearer`"));
        let forbidden = problem("The token has no admin grant");
        let mut unavailable = problem("The cluster cannot answer now (no store leader, a node unreachable)");
        unavailable
            .headers
            .insert("Retry-After".into(), string_header("Seconds to wait"));
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                let responses = &mut operation.responses.responses;
                // Error responses listed by the handlers get the problem body.
                for (status, response) in responses.iter_mut() {
                    if let RefOr::T(response) = response
                        && !status.starts_with('2')
                        && response.content.is_empty()
                    {
                        *response = problem(&response.description);
                    }
                }
                responses.insert("401".into(), RefOr::T(unauthorized.clone()));
                responses.insert("403".into(), RefOr::T(forbidden.clone()));
                responses.insert("503".into(), RefOr::T(unavailable.clone()));
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static serde_json::Value {
    static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| serde_json::to_value(AdminApi::openapi()).unwrap_or_default())
}

/// This document: the OpenAPI 3.1 description of the admin API.
#[utoipa::path(get, path = "/admin/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi_json(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    authorize_admin(&state, &request)?;
    Ok(HttpResponse::Ok().json(document()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_and_every_operation_needs_a_token() {
        let doc = document();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        let paths = doc["paths"].as_object().unwrap();
        let mut operations = Vec::new();
        for (path, item) in paths {
            for (method, operation) in item.as_object().unwrap() {
                if !["get", "put", "post", "delete"].contains(&method.as_str()) {
                    continue;
                }
                operations.push(format!("{} {path}", method.to_uppercase()));
                let responses = operation["responses"].as_object().unwrap();
                for status in ["401", "403", "503"] {
                    let content = &responses[status]["content"]["application/problem+json"];
                    assert!(content.is_object(), "{method} {path}: {status}");
                }
                for (status, response) in responses {
                    if !status.starts_with('2') {
                        assert!(
                            response["content"]["application/problem+json"].is_object(),
                            "{method} {path} {status} has no problem body"
                        );
                    }
                }
            }
        }
        operations.sort();
        assert_eq!(
            operations,
            [
                "DELETE /admin/v1/viewers/{viewer}",
                "GET /admin/v1/cluster",
                "GET /admin/v1/migrations",
                "GET /admin/v1/openapi.json",
                "GET /admin/v1/rooms",
                "GET /admin/v1/rooms/{room}",
                "GET /admin/v1/usage",
                "GET /admin/v1/viewers/{viewer}",
                "POST /admin/v1/nodes/{id}/drain",
                "POST /admin/v1/rooms/{room}/migrate",
                "POST /admin/v1/turn/rotate",
                "PUT /admin/v1/viewers/{viewer}",
            ]
        );
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert!(doc["components"]["schemas"]["RoomsView"].is_object());
    }
}
