//! Property test of the signal decoders the node runs on every frame: 120,000 generated frames
//! (valid messages, mutated ones, random bytes, random JSON-ish text) through the protobuf and
//! JSON decoders. Nothing may panic; every valid message must come back equal from both forms.

use mediamesh_proto::signal::v1::{self as pb, client_message::Body as In, json};
use prost::Message;

/// xorshift64*: deterministic, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn text(&mut self) -> String {
        const PIECES: [&str; 12] = [
            "a",
            "demo",
            "김민수",
            "\"",
            "\\",
            "{",
            "}",
            "\n",
            "v=0",
            "😀",
            "",
            "subscriber",
        ];
        (0..self.below(6))
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }

    fn message(&mut self) -> pb::ClientMessage {
        let body = match self.below(11) {
            0 => In::Join(pb::Join {
                room: self.text(),
                role: self.text(),
                region: self.text(),
                display_name: self.text(),
                resume_token: self.text(),
                token: self.text(),
            }),
            1 => In::Offer(pb::SessionDescription {
                target: self.text(),
                sdp: self.text(),
            }),
            2 => In::Answer(pb::SessionDescription {
                target: self.text(),
                sdp: self.text(),
            }),
            3 => In::Trickle(pb::Trickle {
                target: self.text(),
                fragment: self.text(),
            }),
            4 => In::Subscribe(pb::Subscribe {
                track_ids: (0..self.below(4)).map(|_| self.text()).collect(),
            }),
            5 => In::Unsubscribe(pb::Unsubscribe {
                track_ids: (0..self.below(4)).map(|_| self.text()).collect(),
            }),
            6 => In::SetLayer(pb::SetLayer { layer: self.text() }),
            7 => In::Mute(pb::Mute {
                kind: self.text(),
                muted: self.below(2) == 1,
            }),
            8 => In::Position(pb::PositionReport {
                position_ms: self.next(),
            }),
            9 => In::Leave(pb::Leave {}),
            _ => In::Ping(pb::Ping {
                timestamp_ms: self.next(),
            }),
        };
        pb::ClientMessage {
            id: self.next() >> self.below(64),
            body: Some(body),
        }
    }
}

const JSON_TOKENS: [&str; 24] = [
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"id\"",
    "\"join\"",
    "\"offer\"",
    "\"ping\"",
    "\"room\"",
    "\"sdp\"",
    "1",
    "-1",
    "1e400",
    "null",
    "true",
    "\"x\"",
    "{}",
    "\"\\u0000\"",
    "18446744073709551616",
    " ",
    "\"set_layer\"",
    "\"leave\"",
];

#[test]
fn generated_frames_never_panic_and_valid_ones_round_trip() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut decoded = 0u32;
    const FRAMES: u32 = 120_000;
    for case in 0..FRAMES {
        match case % 4 {
            // A valid message: both forms give it back.
            0 => {
                let message = rng.message();
                let bytes = message.encode_to_vec();
                assert_eq!(
                    pb::ClientMessage::decode(bytes.as_slice()).as_ref(),
                    Ok(&message),
                    "case {case}"
                );
                let text = json::encode_client(&message);
                assert_eq!(json::decode_client(&text), Ok(message), "case {case}: {text}");
                decoded += 1;
            }
            // A valid message with bytes flipped, cut or appended.
            1 => {
                let mut bytes = rng.message().encode_to_vec();
                for _ in 0..=rng.below(3) {
                    match rng.below(3) {
                        0 if !bytes.is_empty() => {
                            let at = rng.below(bytes.len() as u64) as usize;
                            bytes[at] ^= rng.next() as u8 | 1;
                        }
                        1 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
                        _ => bytes.push(rng.next() as u8),
                    }
                }
                if pb::ClientMessage::decode(bytes.as_slice()).is_ok() {
                    decoded += 1;
                }
                let text = String::from_utf8_lossy(&bytes);
                let _ = json::decode_client(&text);
            }
            // Random bytes.
            2 => {
                let bytes: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                let _ = pb::ClientMessage::decode(bytes.as_slice());
                let _ = json::decode_client(&String::from_utf8_lossy(&bytes));
            }
            // Random JSON-ish token soup.
            _ => {
                let text: String = (0..rng.below(16))
                    .map(|_| JSON_TOKENS[rng.below(JSON_TOKENS.len() as u64) as usize])
                    .collect();
                if json::decode_client(&text).is_ok() {
                    decoded += 1;
                }
                let _ = json::peek_id(&text);
            }
        }
    }
    // At least the valid quarter decoded.
    assert!(decoded >= FRAMES / 4, "{decoded}");
}
