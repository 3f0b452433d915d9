//! Synthetic media: VP8 and Opus RTP payloads that are valid on the wire without an encoder.
//!
//! There is no VP8 encoder in this build, so video frames are made up: a keyframe carries the
//! minimal valid VP8 keyframe header (RFC 6386 §9.1: 3-byte frame tag with the P bit clear, start
//! code `9d 01 2a`, width and height), an interframe only the frame tag with the P bit set, and
//! both are padded with zeros up to the size that gives the requested bitrate. The packetizer
//! follows RFC 7741 §4.2 with the one-byte payload descriptor. Sans-IO: no clock, no sockets.

use bytes::{BufMut, Bytes, BytesMut};

/// RTP clock rate of VP8.
pub const VP8_CLOCK_RATE: u32 = 90_000;
/// RTP clock rate of Opus (always 48 kHz on the wire, RFC 7587).
pub const OPUS_CLOCK_RATE: u32 = 48_000;
/// Length of one synthetic Opus packet.
pub const OPUS_PACKET_DURATION_MS: u32 = 20;
/// Opus TOC byte: configuration 31 (CELT fullband, 20 ms), mono, one frame (RFC 6716 §3.1).
pub const OPUS_TOC_CELT_FB_20MS: u8 = 0xF8;
/// A CELT silence frame as libopus emits it, after the TOC byte.
const OPUS_SILENCE: [u8; 2] = [0xFF, 0xFE];

/// VP8 payload descriptor: S bit, start of a partition.
const VP8_DESCRIPTOR_S: u8 = 0x10;
/// Size of a keyframe header in the frame data: frame tag (3), start code (3), width, height.
const VP8_KEYFRAME_HEADER_BYTES: usize = 10;
/// Size of an interframe header: the frame tag only.
const VP8_INTERFRAME_HEADER_BYTES: usize = 3;
/// The VP8 keyframe start code.
const VP8_START_CODE: [u8; 3] = [0x9D, 0x01, 0x2A];
/// `first_part_size` is a 19-bit field of the frame tag.
const VP8_FIRST_PART_SIZE_MAX: usize = (1 << 19) - 1;

/// Synthetic H.264 for packetization mode 1 (RFC 6184): a keyframe is an SPS, a PPS and an IDR
/// slice, any other frame one non-IDR slice, each slice padded to the size the bitrate asks for.
/// A NAL unit that does not fit one payload goes out in FU-A fragments.
#[derive(Debug, Clone)]
pub struct H264Packetizer {
    /// Largest RTP payload.
    pub payload_bytes_max: usize,
}

/// Constrained Baseline 3.1 (`profile-level-id=42e01f`) parameter sets.
const H264_SPS: [u8; 13] = [
    0x67, 0x42, 0xE0, 0x1F, 0xDA, 0x01, 0x40, 0x16, 0xE8, 0x06, 0xD0, 0xA1, 0x35,
];
const H264_PPS: [u8; 4] = [0x68, 0xCE, 0x06, 0xE2];
/// NAL unit headers: nal_ref_idc 3 with type 5 (IDR slice), nal_ref_idc 2 with type 1.
const H264_IDR_SLICE: u8 = 0x65;
const H264_SLICE: u8 = 0x41;
const H264_FU_A: u8 = 28;
const H264_STAP_A: u8 = 24;

impl H264Packetizer {
    pub fn new(payload_bytes_max: usize) -> Self {
        assert!(
            payload_bytes_max >= 3,
            "an FU-A payload holds two header bytes and data"
        );
        Self { payload_bytes_max }
    }

    /// The NAL units of one synthetic frame of about `frame_bytes` bytes.
    pub fn frame_nals(&self, keyframe: bool, frame_bytes: usize) -> Vec<Bytes> {
        let mut nals = Vec::with_capacity(3);
        if keyframe {
            nals.push(Bytes::from_static(&H264_SPS));
            nals.push(Bytes::from_static(&H264_PPS));
        }
        let mut slice = BytesMut::with_capacity(frame_bytes.max(2));
        slice.put_u8(if keyframe { H264_IDR_SLICE } else { H264_SLICE });
        // first_mb_in_slice = 0 (ue(v) "1"), then filler.
        slice.put_u8(0x88);
        slice.resize(frame_bytes.max(2), 0);
        nals.push(slice.freeze());
        nals
    }

    /// RTP payloads of one frame, in order; the last one is sent with the marker bit.
    pub fn packetize(&self, nals: &[Bytes]) -> Vec<Bytes> {
        let mut payloads = Vec::new();
        for nal in nals {
            if nal.len() <= self.payload_bytes_max {
                payloads.push(nal.clone());
                continue;
            }
            let indicator = (nal[0] & 0xE0) | H264_FU_A;
            let nal_type = nal[0] & 0x1F;
            let chunks: Vec<&[u8]> = nal[1..].chunks(self.payload_bytes_max - 2).collect();
            let last = chunks.len() - 1;
            for (index, chunk) in chunks.into_iter().enumerate() {
                let mut payload = BytesMut::with_capacity(chunk.len() + 2);
                let start = if index == 0 { 0x80 } else { 0 };
                let end = if index == last { 0x40 } else { 0 };
                payload.put_u8(indicator);
                payload.put_u8(start | end | nal_type);
                payload.put_slice(chunk);
                payloads.push(payload.freeze());
            }
        }
        payloads
    }
}

/// Whether an H.264 payload starts a keyframe: an IDR slice or an SPS, alone, in a STAP-A, or as
/// the first FU-A fragment of an IDR slice (RFC 6184).
pub fn h264_keyframe_start(payload: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1F {
        IDR | SPS => true,
        H264_STAP_A => {
            let mut offset = 1;
            while offset + 2 < payload.len() {
                let size = usize::from(u16::from_be_bytes([payload[offset], payload[offset + 1]]));
                if matches!(payload[offset + 2] & 0x1F, IDR | SPS) {
                    return true;
                }
                offset += 2 + size;
            }
            false
        }
        H264_FU_A => payload.get(1).is_some_and(|&fu| fu & 0x80 != 0 && fu & 0x1F == IDR),
        _ => false,
    }
}

/// Splits synthetic VP8 frames into RTP payloads of at most `payload_bytes_max` bytes each.
#[derive(Debug, Clone)]
pub struct Vp8Packetizer {
    pub width: u16,
    pub height: u16,
    /// Largest RTP payload, payload descriptor included.
    pub payload_bytes_max: usize,
}

impl Vp8Packetizer {
    pub fn new(width: u16, height: u16, payload_bytes_max: usize) -> Self {
        assert!(
            payload_bytes_max >= 2,
            "a payload holds the descriptor and at least one byte"
        );
        assert!(width < (1 << 14) && height < (1 << 14), "VP8 dimensions are 14-bit");
        Self {
            width,
            height,
            payload_bytes_max,
        }
    }

    /// The frame data (what a VP8 encoder would output) of one synthetic frame of about
    /// `frame_bytes` bytes; never smaller than its header.
    pub fn frame_data(&self, keyframe: bool, frame_bytes: usize) -> Bytes {
        let header_bytes = if keyframe {
            VP8_KEYFRAME_HEADER_BYTES
        } else {
            VP8_INTERFRAME_HEADER_BYTES
        };
        let total = frame_bytes.max(header_bytes);
        let first_part_size = (total - header_bytes).min(VP8_FIRST_PART_SIZE_MAX) as u32;
        // Frame tag, little-endian: bit 0 P (0 = keyframe), bits 1-3 version, bit 4 show_frame,
        // bits 5-23 first_part_size.
        let tag: u32 = u32::from(!keyframe) | (1 << 4) | (first_part_size << 5);
        let mut data = BytesMut::with_capacity(total);
        data.put_slice(&tag.to_le_bytes()[..3]);
        if keyframe {
            data.put_slice(&VP8_START_CODE);
            // 14-bit dimension, 2-bit scale of zero.
            data.put_u16_le(self.width);
            data.put_u16_le(self.height);
        }
        data.resize(total, 0);
        data.freeze()
    }

    /// RTP payloads of one frame, in order; the last one is sent with the marker bit.
    pub fn packetize(&self, frame: &Bytes) -> Vec<Bytes> {
        let chunk_max = self.payload_bytes_max - 1;
        let mut payloads = Vec::with_capacity(frame.len().div_ceil(chunk_max));
        for (index, chunk) in frame.chunks(chunk_max).enumerate() {
            let mut payload = BytesMut::with_capacity(chunk.len() + 1);
            // X=0, N=0, S only on the first packet, PID=0.
            payload.put_u8(if index == 0 { VP8_DESCRIPTOR_S } else { 0 });
            payload.put_slice(chunk);
            payloads.push(payload.freeze());
        }
        payloads
    }
}

/// Whether an RTP payload starts a VP8 keyframe: the payload descriptor has S set and PID 0
/// (RFC 7741 §4.2), and the VP8 payload header after it has the P bit clear (§4.3).
pub fn vp8_keyframe_start(payload: &[u8]) -> bool {
    vp8_frame_offset(payload).is_some_and(|offset| payload.get(offset).is_some_and(|header| header & 0x01 == 0))
}

/// The picture size a VP8 keyframe's first payload announces (RFC 6386 §9.1): how a receiver
/// that does not decode tells which simulcast layer it gets.
pub fn vp8_keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    let frame = payload.get(vp8_frame_offset(payload)?..)?;
    if frame.len() < VP8_KEYFRAME_HEADER_BYTES || frame[0] & 0x01 != 0 || frame[3..6] != VP8_START_CODE {
        return None;
    }
    let width = u16::from_le_bytes([frame[6], frame[7]]) & 0x3FFF;
    let height = u16::from_le_bytes([frame[8], frame[9]]) & 0x3FFF;
    Some((width, height))
}

/// Where the VP8 frame data starts in a payload that begins a frame (S set, PID 0).
fn vp8_frame_offset(payload: &[u8]) -> Option<usize> {
    let &first = payload.first()?;
    if first & VP8_DESCRIPTOR_S == 0 || first & 0x07 != 0 {
        return None;
    }
    let mut offset = 1;
    if first & 0x80 != 0 {
        let &extension = payload.get(offset)?;
        offset += 1;
        if extension & 0x80 != 0 {
            // PictureID: two bytes when its M bit is set.
            let &picture_id = payload.get(offset)?;
            offset += if picture_id & 0x80 != 0 { 2 } else { 1 };
        }
        if extension & 0x40 != 0 {
            offset += 1; // TL0PICIDX
        }
        if extension & 0x30 != 0 {
            offset += 1; // TID/Y/KEYIDX
        }
    }
    Some(offset)
}

/// One synthetic Opus packet of `payload_bytes` bytes (at least 3): TOC, a silence frame, zeros.
pub fn opus_packet(payload_bytes: usize) -> Bytes {
    let total = payload_bytes.max(1 + OPUS_SILENCE.len());
    let mut payload = BytesMut::with_capacity(total);
    payload.put_u8(OPUS_TOC_CELT_FB_20MS);
    payload.put_slice(&OPUS_SILENCE);
    payload.resize(total, 0);
    payload.freeze()
}

/// Frame sizes for a target bitrate: keyframes are twice the average, interframes a little
/// smaller, so that one keyframe interval averages out to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSizes {
    pub keyframe_bytes: usize,
    pub interframe_bytes: usize,
}

impl FrameSizes {
    pub fn for_bitrate(bitrate_bps: u64, frame_rate: u32, keyframe_interval_frames: u32) -> Self {
        assert!(frame_rate > 0, "frame rate is validated by the caller");
        let average = (bitrate_bps / 8 / u64::from(frame_rate)) as usize;
        let interval = keyframe_interval_frames.max(2) as usize;
        let keyframe_bytes = average * 2;
        // interval * average = keyframe + (interval - 1) * interframe
        let interframe_bytes = (interval * average).saturating_sub(keyframe_bytes) / (interval - 1);
        Self {
            keyframe_bytes,
            interframe_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_frames_fragment_and_keyframes_are_detected() {
        let packetizer = H264Packetizer::new(1_200);
        let keyframe = packetizer.packetize(&packetizer.frame_nals(true, 3_000));
        // SPS and PPS alone, then the IDR slice in three FU-A fragments.
        assert_eq!(keyframe.len(), 2 + 2_999usize.div_ceil(1_198));
        assert!(keyframe.iter().all(|p| p.len() <= 1_200));
        assert!(h264_keyframe_start(&keyframe[0]), "SPS");
        assert!(h264_keyframe_start(&keyframe[2]), "first IDR fragment");
        assert!(!h264_keyframe_start(&keyframe[3]), "later fragment");
        assert_eq!(keyframe[2][1] & 0xC0, 0x80, "S bit");
        assert_eq!(keyframe.last().map(|p| p[1] & 0xC0), Some(0x40), "E bit");
        let fragments: usize = keyframe[2..].iter().map(|p| p.len() - 2).sum();
        assert_eq!(fragments, 2_999);
        let interframe = packetizer.packetize(&packetizer.frame_nals(false, 500));
        assert_eq!(interframe.len(), 1);
        assert!(!h264_keyframe_start(&interframe[0]));
        assert!(
            h264_keyframe_start(&[0x78, 0x00, 0x02, 0x67, 0x42]),
            "STAP-A with an SPS"
        );
    }

    #[test]
    fn keyframe_has_valid_header_and_is_detected() {
        let packetizer = Vp8Packetizer::new(640, 480, 1_200);
        let frame = packetizer.frame_data(true, 5_000);
        assert_eq!(frame.len(), 5_000);
        assert_eq!(frame[0] & 0x01, 0, "P bit clear on a keyframe");
        assert_eq!(frame[0] & 0x10, 0x10, "show_frame");
        assert_eq!(&frame[3..6], &VP8_START_CODE);
        assert_eq!(u16::from_le_bytes([frame[6], frame[7]]), 640);
        assert_eq!(u16::from_le_bytes([frame[8], frame[9]]), 480);
        let tag = u32::from_le_bytes([frame[0], frame[1], frame[2], 0]);
        assert_eq!((tag >> 5) as usize, 5_000 - VP8_KEYFRAME_HEADER_BYTES);

        let payloads = packetizer.packetize(&frame);
        assert_eq!(payloads.len(), 5_000usize.div_ceil(1_199));
        assert!(payloads.iter().all(|p| p.len() <= 1_200));
        assert!(vp8_keyframe_start(&payloads[0]));
        assert_eq!(vp8_keyframe_size(&payloads[0]), Some((640, 480)));
        assert_eq!(vp8_keyframe_size(&payloads[1]), None);
        assert!(
            payloads[1..].iter().all(|p| !vp8_keyframe_start(p)),
            "S bit only on the first"
        );
        assert_eq!(payloads.iter().map(|p| p.len() - 1).sum::<usize>(), 5_000);
    }

    #[test]
    fn interframe_is_not_a_keyframe() {
        let packetizer = Vp8Packetizer::new(640, 480, 1_200);
        let frame = packetizer.frame_data(false, 3_000);
        assert_eq!(frame[0] & 0x01, 1, "P bit set on an interframe");
        let payloads = packetizer.packetize(&frame);
        assert_eq!(payloads[0][0], VP8_DESCRIPTOR_S);
        assert!(payloads.iter().all(|p| !vp8_keyframe_start(p)));
    }

    #[test]
    fn tiny_frames_keep_their_header() {
        let packetizer = Vp8Packetizer::new(16, 16, 2);
        let frame = packetizer.frame_data(true, 0);
        assert_eq!(frame.len(), VP8_KEYFRAME_HEADER_BYTES);
        let payloads = packetizer.packetize(&frame);
        assert_eq!(payloads.len(), VP8_KEYFRAME_HEADER_BYTES);
        assert!(vp8_keyframe_start(&payloads[0]));
    }

    #[test]
    fn keyframe_detection_reads_the_extended_descriptor() {
        // X=1, S=1, PID=0; I=1 with a 15-bit picture id; then a keyframe payload header.
        assert!(vp8_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x00]));
        // The same with the P bit set.
        assert!(!vp8_keyframe_start(&[0x90, 0x80, 0x81, 0x23, 0x01]));
        // X=1 with I, L and T/K present: descriptor of 5 bytes.
        assert!(vp8_keyframe_start(&[0x90, 0xF0, 0x05, 0x01, 0x20, 0x00]));
        // PID 1 is not the start of the frame.
        assert!(!vp8_keyframe_start(&[0x11, 0x00]));
        // S clear.
        assert!(!vp8_keyframe_start(&[0x00, 0x00]));
        // Truncated.
        assert!(!vp8_keyframe_start(&[0x90]));
        assert!(!vp8_keyframe_start(&[0x10]));
        assert!(!vp8_keyframe_start(&[]));
    }

    #[test]
    fn frame_sizes_average_to_the_bitrate() {
        let sizes = FrameSizes::for_bitrate(1_500_000, 30, 60);
        let interval_bytes = sizes.keyframe_bytes + 59 * sizes.interframe_bytes;
        let average_bps = interval_bytes as f64 * 8.0 * 30.0 / 60.0;
        assert!((average_bps - 1_500_000.0).abs() < 1_500_000.0 * 0.01, "{average_bps}");
        assert_eq!(sizes.keyframe_bytes, 12_500);
    }

    #[test]
    fn opus_packet_is_a_silence_frame() {
        let packet = opus_packet(60);
        assert_eq!(packet.len(), 60);
        assert_eq!(packet[0], OPUS_TOC_CELT_FB_20MS);
        assert_eq!(opus_packet(0).len(), 3);
    }
}
