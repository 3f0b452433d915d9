//! Errors of the SDK. A refusal by the server keeps its status and its RFC 9457 problem body.

use serde::Deserialize;
use std::fmt;
use std::time::Duration;

/// An `application/problem+json` body (RFC 9457) as mediamesh sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Problem {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.title.is_empty(), self.detail.is_empty()) {
            (false, false) => write!(f, "{}: {}", self.title, self.detail),
            (false, true) => f.write_str(&self.title),
            _ => f.write_str(&self.detail),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("HTTP request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{method} {url} refused with {status}: {}", describe(.problem, .body))]
    Refused {
        method: &'static str,
        url: String,
        status: u16,
        problem: Option<Box<Problem>>,
        /// The raw body when it was not a problem document (truncated).
        body: String,
    },
    #[error("the server's answer is unusable: {0}")]
    BadAnswer(String),
    #[error("webrtc: {0}")]
    WebRtc(String),
    #[error("{what} did not happen within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the connection failed before media flowed")]
    ConnectionFailed,
    /// The node answered a signal message with an error.
    #[error("signal error {code}: {message}")]
    Signal { code: String, message: String, fatal: bool },
    /// A media file could not be used.
    #[error("media source: {0}")]
    Media(String),
    /// The signal channel could not be opened or broke.
    #[error("signal channel: {0}")]
    Channel(String),
}

fn describe(problem: &Option<Box<Problem>>, body: &str) -> String {
    match problem {
        Some(problem) => problem.to_string(),
        None if body.is_empty() => "(empty body)".to_string(),
        None => body.to_string(),
    }
}

impl From<webrtc::error::Error> for Error {
    fn from(error: webrtc::error::Error) -> Self {
        Error::WebRtc(error.to_string())
    }
}

impl Error {
    /// The HTTP status of a refusal, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The code of a signal error reply (`not_joined`, `forbidden`, …), if this is one.
    pub fn signal_code(&self) -> Option<&str> {
        match self {
            Error::Signal { code, .. } => Some(code),
            _ => None,
        }
    }
}
