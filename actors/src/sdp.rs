//! The little SDP reading the actors need beyond what the WebRTC stack does: simulcast rids of
//! an offer, the offered codecs, and trickle-ICE fragments (RFC 8840) for WHIP/WHEP PATCH.

use crate::media::codec::Codec;

/// Upper bound on lines read from one SDP or fragment; bodies are size-limited at the edge too.
const SDP_LINES_MAX: usize = 4_096;

/// Rids the offer sends for its first video section (`a=rid:<id> send`), in offer order.
pub fn video_send_rids(offer: &str) -> Vec<String> {
    let mut in_video = false;
    let mut rids = Vec::new();
    for line in offer.lines().take(SDP_LINES_MAX) {
        let line = line.trim();
        if line.starts_with("m=") {
            if in_video && !rids.is_empty() {
                break;
            }
            in_video = line.starts_with("m=video");
        } else if in_video && let Some(rest) = line.strip_prefix("a=rid:") {
            let mut parts = rest.split_whitespace();
            if let (Some(id), Some("send")) = (parts.next(), parts.next()) {
                rids.push(id.to_string());
            }
        }
    }
    rids
}

/// Codecs an offer lists (`a=rtpmap`), in preference order, deduplicated.
pub fn offered_codecs(offer: &str) -> Vec<Codec> {
    let mut codecs = Vec::new();
    for line in offer.lines().take(SDP_LINES_MAX) {
        if let Some(rest) = line.trim().strip_prefix("a=rtpmap:")
            && let Some(name) = rest.split_whitespace().nth(1).and_then(|e| e.split('/').next())
            && let Some(codec) = Codec::from_mime(name)
            && !codecs.contains(&codec)
        {
            codecs.push(codec);
        }
    }
    codecs
}

/// The codec and fmtp an answer chose for its first video section: the first payload type of the
/// `m=video` line. The room knows a publisher's video codec from this as soon as it answers,
/// before the first packet arrives, so a viewer who joins in between gets the same codec.
pub fn answered_video_codec(answer: &str) -> Option<(Codec, String)> {
    let mut payload_type: Option<String> = None;
    let mut codec = None;
    let mut fmtp = String::new();
    for line in answer.lines().take(SDP_LINES_MAX).map(str::trim) {
        if line.starts_with("m=") {
            if payload_type.is_some() {
                break;
            }
            if line.starts_with("m=video") {
                payload_type = line.split_whitespace().nth(3).map(str::to_string);
            }
            continue;
        }
        let Some(pt) = payload_type.as_deref() else { continue };
        if let Some(rest) = line.strip_prefix("a=rtpmap:")
            && let Some((id, encoding)) = rest.split_once(' ')
            && id == pt
        {
            codec = encoding.split('/').next().and_then(Codec::from_mime);
        } else if let Some(rest) = line.strip_prefix("a=fmtp:")
            && let Some((id, parameters)) = rest.split_once(' ')
            && id == pt
        {
            fmtp = parameters.to_string();
        }
    }
    codec.map(|codec| (codec, fmtp))
}

/// Basic shape check before the offer reaches the WebRTC stack, so malformed input gets a
/// precise message.
pub fn validate_offer(offer: &str) -> Result<(), String> {
    let first = offer.lines().next().unwrap_or("").trim();
    if first != "v=0" {
        return Err("an SDP offer starts with \"v=0\"".into());
    }
    if !offer.lines().any(|l| l.starts_with("m=")) {
        return Err("the offer has no media section (m=)".into());
    }
    if offer.lines().count() > SDP_LINES_MAX {
        return Err(format!("the offer has more than {SDP_LINES_MAX} lines"));
    }
    if !offer.lines().any(|l| l.starts_with("a=ice-ufrag:")) {
        return Err("the offer has no ICE credentials (a=ice-ufrag)".into());
    }
    if !offer.lines().any(|l| l.starts_with("a=fingerprint:")) {
        return Err("the offer has no DTLS fingerprint (a=fingerprint)".into());
    }
    Ok(())
}

/// A trickle-ICE SDP fragment (RFC 8840), as sent in a WHIP/WHEP PATCH.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SdpFragment {
    pub ice_ufrag: Option<String>,
    pub ice_pwd: Option<String>,
    /// (mid, candidate attribute value without the `a=` prefix).
    pub candidates: Vec<(Option<String>, String)>,
    pub end_of_candidates: bool,
}

pub fn parse_fragment(body: &str) -> Result<SdpFragment, String> {
    let mut fragment = SdpFragment::default();
    let mut mid: Option<String> = None;
    let mut lines = 0;
    for raw in body.lines() {
        lines += 1;
        if lines > SDP_LINES_MAX {
            return Err(format!("more than {SDP_LINES_MAX} lines"));
        }
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(value) = line.strip_prefix("a=ice-ufrag:") {
            fragment.ice_ufrag = Some(value.to_string());
        } else if let Some(value) = line.strip_prefix("a=ice-pwd:") {
            fragment.ice_pwd = Some(value.to_string());
        } else if let Some(value) = line.strip_prefix("a=mid:") {
            mid = Some(value.to_string());
        } else if let Some(value) = line.strip_prefix("a=candidate:") {
            if value.split_whitespace().count() < 8 {
                return Err(format!("malformed candidate line: {line:.80}"));
            }
            fragment.candidates.push((mid.clone(), format!("candidate:{value}")));
        } else if line == "a=end-of-candidates" {
            fragment.end_of_candidates = true;
        } else if line.starts_with("m=") || line.starts_with("a=") {
            // Other attributes (a=group, m= lines) carry nothing we act on.
        } else {
            return Err(format!("not an SDP fragment line: {line:.80}"));
        }
    }
    if fragment.ice_ufrag.is_some() != fragment.ice_pwd.is_some() {
        return Err("a=ice-ufrag and a=ice-pwd come together".into());
    }
    Ok(fragment)
}

/// Replaces the ICE credentials in an offer, to apply an ICE restart a PATCH asked for.
pub fn replace_ice_credentials(offer: &str, ufrag: &str, pwd: &str) -> String {
    offer
        .lines()
        .map(|line| {
            if line.starts_with("a=ice-ufrag:") {
                format!("a=ice-ufrag:{ufrag}")
            } else if line.starts_with("a=ice-pwd:") {
                format!("a=ice-pwd:{pwd}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
        + "\r\n"
}

/// The first ICE username fragment in an SDP.
pub fn ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
}

/// A fragment answering an ICE restart: our new credentials and candidates.
pub fn restart_fragment(answer: &str) -> String {
    let mut out = String::new();
    for line in answer.lines() {
        let line = line.trim();
        if line.starts_with("a=ice-ufrag:")
            || line.starts_with("a=ice-pwd:")
            || line.starts_with("a=candidate:")
            || line.starts_with("a=end-of-candidates")
        {
            out.push_str(line);
            out.push_str("\r\n");
        }
        if line.starts_with("m=") && !out.is_empty() {
            break; // credentials and candidates of the bundle's first section are enough
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=ice-ufrag:abcd\r\na=ice-pwd:secret\r\n\
        a=fingerprint:sha-256 00\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96 102\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\n\
        a=rid:q send\r\na=rid:h send\r\na=rid:f send\r\na=simulcast:send q;h;f\r\n";

    #[test]
    fn reads_the_answered_video_codec() {
        let answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 98 96\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:98 VP9/90000\r\n\
            a=fmtp:98 profile-id=2\r\na=fmtp:96 x=1\r\n";
        assert_eq!(answered_video_codec(answer), Some((Codec::Vp9, "profile-id=2".into())));
        assert_eq!(answered_video_codec(OFFER), Some((Codec::Vp8, String::new())));
        assert_eq!(
            answered_video_codec("v=0\r\nm=audio 9 RTP 111\r\na=rtpmap:111 opus/48000/2\r\n"),
            None
        );
    }

    #[test]
    fn reads_offer() {
        assert_eq!(video_send_rids(OFFER), ["q", "h", "f"]);
        assert_eq!(offered_codecs(OFFER), [Codec::Opus, Codec::Vp8, Codec::H264]);
        assert!(validate_offer(OFFER).is_ok());
        assert!(validate_offer("hello").is_err());
        assert!(validate_offer("v=0\r\ns=-\r\n").is_err());
        assert_eq!(ice_ufrag(OFFER), Some("abcd"));
        let restarted = replace_ice_credentials(OFFER, "new", "pw");
        assert_eq!(ice_ufrag(&restarted), Some("new"));
    }

    #[test]
    fn fragments() {
        let frag = parse_fragment(
            "a=ice-ufrag:u\r\na=ice-pwd:p\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n\
             a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\n",
        )
        .expect("valid fragment");
        assert_eq!(frag.ice_ufrag.as_deref(), Some("u"));
        assert_eq!(frag.candidates.len(), 1);
        assert_eq!(frag.candidates[0].0.as_deref(), Some("0"));
        assert!(frag.end_of_candidates);
        assert!(parse_fragment("garbage").is_err());
        assert!(parse_fragment("a=candidate:1 2\r\n").is_err());
        assert!(parse_fragment("a=ice-ufrag:u\r\n").is_err());
    }
}
