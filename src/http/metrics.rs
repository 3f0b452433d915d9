//! `GET /metrics`: Prometheus text exposition.

use super::AppState;
use actix_web::{HttpResponse, web};

pub async fn scrape(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
