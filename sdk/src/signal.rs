//! WHIP/WHEP HTTP exchanges: POST the offer, read the answer and `Location`, DELETE at the end.

use crate::error::{Error, Problem};
use reqwest::{Client, StatusCode, Url};
use std::sync::OnceLock;
use std::time::Duration;

/// A refusal body kept in an error is cut to this many bytes.
const ERROR_BODY_BYTES_MAX: usize = 512;

/// The client used when the caller gives none: one connection pool per process.
pub fn default_http_client() -> Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    // Redirects are followed by hand (`post_offer`): reqwest would drop the bearer token on a
    // redirect to another node.
    CLIENT
        .get_or_init(|| {
            Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_else(|_| Client::new())
        })
        .clone()
}

pub(crate) fn parse_url(url: &str) -> Result<Url, Error> {
    let parsed = Url::parse(url).map_err(|e| Error::InvalidUrl {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::InvalidUrl {
            url: url.to_string(),
            reason: "the scheme must be http or https".into(),
        });
    }
    Ok(parsed)
}

/// The session a successful POST created.
pub(crate) struct Created {
    /// Absolute URL of the session resource (the `Location` header resolved against the POST URL).
    pub location: Url,
    pub answer_sdp: String,
}

/// Redirects a POST of an offer follows at most.
const REDIRECTS_MAX: usize = 3;

pub(crate) async fn post_offer(
    http: &Client,
    url: &Url,
    token: &str,
    offer_sdp: String,
    timeout: Duration,
) -> Result<Created, Error> {
    let mut url = url.clone();
    let mut redirects = 0;
    let response = loop {
        let response = http
            .post(url.clone())
            .bearer_auth(token)
            .header("content-type", "application/sdp")
            .timeout(timeout)
            .body(offer_sdp.clone())
            .send()
            .await
            .map_err(|source| Error::Http {
                url: url.to_string(),
                source,
            })?;
        let status = response.status();
        // A WHIP endpoint may send the publisher to the node that hosts the room (RFC 9725 §4.5).
        if matches!(status, StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT)
            && redirects < REDIRECTS_MAX
        {
            let next = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| Error::BadAnswer(format!("{status} without a usable Location header")))?;
            redirects += 1;
            url = next;
            continue;
        }
        break response;
    };
    let url = &url;
    let http_error = |source| Error::Http {
        url: url.to_string(),
        source,
    };
    let status = response.status();
    if status != StatusCode::CREATED {
        return Err(refusal("POST", url, response).await);
    }
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Error::BadAnswer("201 Created without a Location header".into()))?
        .to_string();
    let location = url
        .join(&location)
        .map_err(|e| Error::BadAnswer(format!("Location {location:?} is not a URL: {e}")))?;
    let answer_sdp = response.text().await.map_err(http_error)?;
    if !answer_sdp.starts_with("v=0") {
        return Err(Error::BadAnswer("the body of 201 Created is not an SDP answer".into()));
    }
    Ok(Created { location, answer_sdp })
}

/// Ends a session. A session the server no longer knows (404) counts as ended.
pub(crate) async fn delete(http: &Client, location: &Url, token: &str, timeout: Duration) -> Result<(), Error> {
    let response = http
        .delete(location.clone())
        .bearer_auth(token)
        .timeout(timeout)
        .send()
        .await
        .map_err(|source| Error::Http {
            url: location.to_string(),
            source,
        })?;
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_FOUND {
        return Ok(());
    }
    Err(refusal("DELETE", location, response).await)
}

async fn refusal(method: &'static str, url: &Url, response: reqwest::Response) -> Error {
    let status = response.status().as_u16();
    let is_problem = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let body = response.text().await.unwrap_or_default();
    let problem = if is_problem {
        serde_json::from_str::<Problem>(&body).ok().map(Box::new)
    } else {
        None
    };
    let body = if problem.is_some() {
        String::new()
    } else {
        let mut end = body.len().min(ERROR_BODY_BYTES_MAX);
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        body[..end].to_string()
    };
    Error::Refused {
        method,
        url: url.to_string(),
        status,
        problem,
        body,
    }
}
