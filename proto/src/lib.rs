//! Generated protobuf and gRPC types of mediamesh. No logic lives here (DESIGN.md §2): the
//! `.proto` files under `proto/` are the source, `build.rs` compiles them with protox and
//! tonic-prost-build.

/// Client ↔ node session channel (`--grpc` port, and its JSON form on the WebSocket `/signal`).
pub mod signal {
    /// Version 1 of the signal protocol.
    pub mod v1 {
        tonic::include_proto!("mediamesh.signal.v1");

        /// The JSON form of the two top-level messages: `{"id": 1, "join": {...}}`, the oneof
        /// flattened into the message (prost keeps it in a `body` field). Decoding tells a
        /// message type it does not know from a malformed one.
        pub mod json {
            use super::{ClientMessage, ServerMessage, client_message, server_message};
            use serde::de::DeserializeOwned;
            use serde_json::{Map, Value};

            #[derive(Debug, Clone, PartialEq, Eq)]
            pub enum DecodeError {
                /// Not a JSON object, two body keys, a field of the wrong type…
                Malformed(String),
                /// A well-formed message whose type this version does not know (or none at all).
                Unknown(String),
            }

            impl std::fmt::Display for DecodeError {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    match self {
                        DecodeError::Malformed(m) => write!(f, "malformed message: {m}"),
                        DecodeError::Unknown(t) if t.is_empty() => write!(f, "a message needs a type key"),
                        DecodeError::Unknown(t) => write!(f, "unknown message type {t:.40?}"),
                    }
                }
            }

            fn decode<B: DeserializeOwned>(text: &str) -> Result<(u64, B), DecodeError> {
                let value: Value = serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
                let Value::Object(mut object) = value else {
                    return Err(DecodeError::Malformed("a message is a JSON object".into()));
                };
                let id = match object.remove("id") {
                    None | Some(Value::Null) => 0,
                    Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or_default(),
                    Some(_) => return Err(DecodeError::Malformed("\"id\" is an unsigned integer".into())),
                };
                let mut keys = object.keys();
                let (Some(key), None) = (keys.next(), keys.next()) else {
                    return Err(match object.len() {
                        0 => DecodeError::Unknown(String::new()),
                        _ => DecodeError::Malformed("a message has exactly one type key besides \"id\"".into()),
                    });
                };
                let key = key.clone();
                let single = Value::Object(Map::from_iter(object));
                serde_json::from_value::<B>(single).map(|body| (id, body)).map_err(|e| {
                    let text = e.to_string();
                    if text.starts_with("unknown variant") {
                        DecodeError::Unknown(key)
                    } else {
                        DecodeError::Malformed(format!("{key}: {text}"))
                    }
                })
            }

            fn encode<B: serde::Serialize>(id: u64, body: &Option<B>) -> String {
                let mut object = match body.as_ref().map(serde_json::to_value) {
                    Some(Ok(Value::Object(object))) => object,
                    _ => Map::new(),
                };
                if id != 0 {
                    object.insert("id".into(), Value::from(id));
                }
                Value::Object(object).to_string()
            }

            /// The `id` of a message that did not decode, when it has a readable one (so the error
            /// reply can carry it), else 0.
            pub fn peek_id(text: &str) -> u64 {
                serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v.get("id").and_then(Value::as_u64))
                    .unwrap_or(0)
            }

            pub fn decode_client(text: &str) -> Result<ClientMessage, DecodeError> {
                decode::<client_message::Body>(text).map(|(id, body)| ClientMessage { id, body: Some(body) })
            }

            pub fn decode_server(text: &str) -> Result<ServerMessage, DecodeError> {
                decode::<server_message::Body>(text).map(|(id, body)| ServerMessage { id, body: Some(body) })
            }

            pub fn encode_client(message: &ClientMessage) -> String {
                encode(message.id, &message.body)
            }

            pub fn encode_server(message: &ServerMessage) -> String {
                encode(message.id, &message.body)
            }
        }
    }
}

/// Internal node-to-node service (`--cluster` port): raft transport, proposal forwarding, join.
pub mod cluster {
    /// Version 1 of the cluster service.
    pub mod v1 {
        tonic::include_proto!("mediamesh.cluster.v1");
    }
}

/// Node ↔ node media relay and room handoff (`--cluster` port, next to `cluster::v1`).
pub mod mesh {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("mediamesh.mesh.v1");
    }
}

#[cfg(test)]
mod tests {
    use super::signal::v1::json::{self, DecodeError};
    use super::signal::v1::{ClientMessage, Join, client_message::Body};

    #[test]
    fn signal_json_form() {
        let text = r#"{"id":7,"join":{"room":"demo","role":"subscriber"}}"#;
        let message = json::decode_client(text).unwrap();
        let Some(Body::Join(Join { room, role, token, .. })) = &message.body else {
            panic!("not a join: {message:?}");
        };
        assert_eq!(
            (message.id, room.as_str(), role.as_str(), token.as_str()),
            (7, "demo", "subscriber", "")
        );
        let back = json::encode_client(&message);
        assert_eq!(json::decode_client(&back).unwrap(), message);
        assert!(back.contains(r#""join":{"#) && back.contains(r#""id":7"#), "{back}");
        let ping = ClientMessage {
            id: 0,
            body: Some(Body::Ping(Default::default())),
        };
        assert_eq!(json::encode_client(&ping), r#"{"ping":{"timestamp_ms":0}}"#);
    }

    #[test]
    fn signal_json_errors() {
        let unknown = |t: &str| DecodeError::Unknown(t.into());
        assert_eq!(json::decode_client(r#"{"id":1,"dance":{}}"#), Err(unknown("dance")));
        assert_eq!(json::decode_client(r#"{"id":1}"#), Err(unknown("")));
        assert_eq!(json::peek_id(r#"{"id":3,"dance":{}}"#), 3);
        assert_eq!(json::peek_id(r#"{"id":3,"#), 0);
        for bad in [
            r#"{"join":{"room":5}}"#,
            r#"{"join":{},"ping":{}}"#,
            r#"{"id":-1,"ping":{}}"#,
            r#"[1]"#,
            r#"{"ping":"#,
            r#"{"ping":7}"#,
        ] {
            assert!(
                matches!(json::decode_client(bad), Err(DecodeError::Malformed(_))),
                "{bad}"
            );
        }
    }
}
