//! Codec knowledge the forwarder needs: which codec a track carries and whether an RTP payload
//! starts a keyframe. Pure functions over payload bytes; nothing here allocates.

/// A codec the media plane forwards. Anything else is refused at negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Opus,
    Vp8,
    Vp9,
    H264,
    Av1,
}

impl Codec {
    /// Maps an SDP/RTP mime type (`video/VP8`) to a codec, case-insensitively.
    pub fn from_mime(mime_type: &str) -> Option<Codec> {
        let subtype = mime_type.rsplit('/').next().unwrap_or(mime_type);
        match subtype.to_ascii_lowercase().as_str() {
            "opus" => Some(Codec::Opus),
            "vp8" => Some(Codec::Vp8),
            "vp9" => Some(Codec::Vp9),
            "h264" => Some(Codec::H264),
            "av1" => Some(Codec::Av1),
            _ => None,
        }
    }

    pub fn mime_type(self) -> &'static str {
        match self {
            Codec::Opus => "audio/opus",
            Codec::Vp8 => "video/VP8",
            Codec::Vp9 => "video/VP9",
            Codec::H264 => "video/H264",
            Codec::Av1 => "video/AV1",
        }
    }

    pub fn is_video(self) -> bool {
        !matches!(self, Codec::Opus)
    }

    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            _ => 90_000,
        }
    }

    /// Whether `payload` is the first packet of a keyframe (an independently decodable picture).
    /// Audio has no keyframes: every packet is a valid starting point, so it answers `true`.
    pub fn is_keyframe_start(self, payload: &[u8]) -> bool {
        match self {
            Codec::Opus => true,
            Codec::Vp8 => vp8_keyframe_start(payload),
            Codec::Vp9 => vp9_keyframe_start(payload),
            Codec::H264 => h264_keyframe_start(payload),
            Codec::Av1 => av1_keyframe_start(payload),
        }
    }
}

/// RFC 7741 §4.2: payload descriptor, then the VP8 payload header whose P bit is 0 on keyframes.
fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let extended = first & 0x80 != 0;
    let start_of_partition = first & 0x10 != 0;
    let partition_index = first & 0x07;
    if !start_of_partition || partition_index != 0 {
        return false;
    }
    let mut offset = 1;
    if extended {
        let Some(&ext) = payload.get(offset) else {
            return false;
        };
        offset += 1;
        if ext & 0x80 != 0 {
            // PictureID: one byte, or two when its M bit is set.
            let Some(&picture_id) = payload.get(offset) else {
                return false;
            };
            offset += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            offset += 1; // TL0PICIDX
        }
        if ext & 0x30 != 0 {
            offset += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(offset).is_some_and(|header| header & 0x01 == 0)
}

/// draft-ietf-payload-vp9 §4.2: P (inter-picture predicted) clear and B (beginning of frame) set.
fn vp9_keyframe_start(payload: &[u8]) -> bool {
    payload
        .first()
        .is_some_and(|&first| first & 0x40 == 0 && first & 0x08 != 0)
}

/// RFC 6184: an IDR slice or a sequence parameter set starts a keyframe, whether sent alone,
/// aggregated (STAP-A) or as the first fragment of a fragmented unit (FU-A).
fn h264_keyframe_start(payload: &[u8]) -> bool {
    const NAL_IDR: u8 = 5;
    const NAL_SPS: u8 = 7;
    const NAL_STAP_A: u8 = 24;
    const NAL_FU_A: u8 = 28;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1F {
        NAL_IDR | NAL_SPS => true,
        NAL_STAP_A => {
            let mut offset = 1;
            while offset + 2 < payload.len() {
                let size = u16::from_be_bytes([payload[offset], payload[offset + 1]]) as usize;
                let nal_type = payload[offset + 2] & 0x1F;
                if nal_type == NAL_IDR || nal_type == NAL_SPS {
                    return true;
                }
                offset += 2 + size;
            }
            false
        }
        NAL_FU_A => payload.get(1).is_some_and(|&fu| fu & 0x80 != 0 && fu & 0x1F == NAL_IDR),
        _ => false,
    }
}

/// AV1 RTP payload format §4.4: the N bit of the aggregation header marks the first packet of a
/// coded video sequence, which begins with a keyframe.
fn av1_keyframe_start(payload: &[u8]) -> bool {
    payload.first().is_some_and(|&header| header & 0x08 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_and_delta_frame() {
        // X=1, S=1, PID=0; I=1 with a 15-bit picture id; payload header P=0 (keyframe).
        assert!(Codec::Vp8.is_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x10]));
        // Same with P=1: a delta frame.
        assert!(!Codec::Vp8.is_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x11]));
        // Not the start of the partition.
        assert!(!Codec::Vp8.is_keyframe_start(&[0x80, 0x80, 0x81, 0x23, 0x10]));
        // No extension byte, keyframe.
        assert!(Codec::Vp8.is_keyframe_start(&[0x10, 0x00]));
        // Truncated descriptors never panic.
        for len in 0..5 {
            let _ = Codec::Vp8.is_keyframe_start(&[0x90, 0xF0, 0x81, 0x23, 0x10][..len]);
        }
    }

    #[test]
    fn h264_idr_sps_stap_and_fragments() {
        assert!(Codec::H264.is_keyframe_start(&[0x65, 0x88]));
        assert!(Codec::H264.is_keyframe_start(&[0x67, 0x42]));
        assert!(!Codec::H264.is_keyframe_start(&[0x41, 0x9a]));
        // STAP-A carrying SPS (size 2) then PPS.
        assert!(Codec::H264.is_keyframe_start(&[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x01, 0x68]));
        // FU-A start of an IDR, and a middle fragment.
        assert!(Codec::H264.is_keyframe_start(&[0x7c, 0x85, 0x00]));
        assert!(!Codec::H264.is_keyframe_start(&[0x7c, 0x05, 0x00]));
        // STAP-A with a size that runs past the end does not panic.
        assert!(!Codec::H264.is_keyframe_start(&[0x78, 0xff, 0xff, 0x41]));
    }

    #[test]
    fn vp9_av1_opus() {
        assert!(Codec::Vp9.is_keyframe_start(&[0x08]));
        assert!(!Codec::Vp9.is_keyframe_start(&[0x48]));
        assert!(Codec::Av1.is_keyframe_start(&[0x08]));
        assert!(!Codec::Av1.is_keyframe_start(&[0x10]));
        assert!(Codec::Opus.is_keyframe_start(&[]));
        assert_eq!(Codec::from_mime("video/vp8"), Some(Codec::Vp8));
        assert_eq!(Codec::from_mime("audio/OPUS"), Some(Codec::Opus));
        assert_eq!(Codec::from_mime("video/H265"), None);
    }
}
