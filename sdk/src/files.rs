//! Media files to publish instead of synthetic frames: VP8 in IVF, Opus in Ogg (RFC 7845).
//! Sans-IO readers over bytes; [`load_ivf`] and [`load_ogg_opus`] read a whole file (bounded).

use bytes::Bytes;
use std::path::Path;

/// Files larger than this are refused: they are read into memory and looped.
pub const MEDIA_FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// A VP8 stream from an IVF file.
#[derive(Debug, Clone)]
pub struct IvfVideo {
    pub width: u16,
    pub height: u16,
    /// Frames per second from the header's time base (at least 1).
    pub frame_rate: u32,
    /// Frame data, each with whether it is a keyframe.
    pub frames: Vec<(bool, Bytes)>,
}

/// Opus packets from an Ogg file, in order, without the two header packets.
#[derive(Debug, Clone)]
pub struct OggOpus {
    pub packets: Vec<Bytes>,
}

fn read_limited(path: &Path) -> Result<Vec<u8>, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size > MEDIA_FILE_BYTES_MAX {
        return Err(format!(
            "{}: {size} bytes, more than the {MEDIA_FILE_BYTES_MAX} a media file may have",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn load_ivf(path: &Path) -> Result<IvfVideo, String> {
    parse_ivf(&read_limited(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn load_ogg_opus(path: &Path) -> Result<OggOpus, String> {
    parse_ogg_opus(&read_limited(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// IVF: a 32-byte header (`DKIF`, version, header size, fourcc, width, height, time base), then
/// frames of a 12-byte header (size, timestamp) and the data.
pub fn parse_ivf(data: &[u8]) -> Result<IvfVideo, String> {
    if data.len() < 32 || &data[0..4] != b"DKIF" {
        return Err("not an IVF file (no DKIF signature)".into());
    }
    if &data[8..12] != b"VP80" {
        return Err(format!(
            "IVF codec {:?} is not VP8 (VP80)",
            String::from_utf8_lossy(&data[8..12])
        ));
    }
    let u16_at = |at: usize| u16::from_le_bytes([data[at], data[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let header_bytes = usize::from(u16_at(6)).max(32);
    let (rate, scale) = (u32_at(16), u32_at(20));
    let frame_rate = rate.checked_div(scale).map_or(30, |fps| fps.clamp(1, 240));
    let mut frames = Vec::new();
    let mut at = header_bytes;
    while at + 12 <= data.len() {
        let size = u32_at(at) as usize;
        let start = at + 12;
        let end = start
            .checked_add(size)
            .filter(|end| *end <= data.len())
            .ok_or_else(|| format!("frame {} runs past the end of the file", frames.len()))?;
        let frame = Bytes::copy_from_slice(&data[start..end]);
        // VP8 frame tag: bit 0 clear on a keyframe (RFC 6386 §9.1).
        let keyframe = frame.first().is_some_and(|tag| tag & 0x01 == 0);
        if !frame.is_empty() {
            frames.push((keyframe, frame));
        }
        at = end;
    }
    if !frames.iter().any(|(keyframe, _)| *keyframe) {
        return Err("the file has no keyframe".into());
    }
    Ok(IvfVideo {
        width: u16_at(12),
        height: u16_at(14),
        frame_rate,
        frames,
    })
}

/// Ogg pages (`OggS`, 27-byte header, lacing table) carry packets split into 255-byte segments;
/// the first two packets of an Opus stream are `OpusHead` and `OpusTags`.
pub fn parse_ogg_opus(data: &[u8]) -> Result<OggOpus, String> {
    let mut packets = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut at = 0;
    while at < data.len() {
        if data.len() < at + 27 || &data[at..at + 4] != b"OggS" {
            return Err(format!("no Ogg page at byte {at}"));
        }
        let segments = usize::from(data[at + 26]);
        let table_end = at + 27 + segments;
        if data.len() < table_end {
            return Err(format!("the page at byte {at} is cut short"));
        }
        let mut body = table_end;
        for &lace in &data[at + 27..table_end] {
            let end = body + usize::from(lace);
            if end > data.len() {
                return Err(format!("the page at byte {at} is cut short"));
            }
            partial.extend_from_slice(&data[body..end]);
            body = end;
            if lace < 255 {
                packets.push(Bytes::from(std::mem::take(&mut partial)));
            }
        }
        at = body;
    }
    if packets.first().is_none_or(|p| !p.starts_with(b"OpusHead")) {
        return Err("not an Ogg Opus file (no OpusHead)".into());
    }
    let packets: Vec<Bytes> = packets.into_iter().skip(2).filter(|p| !p.is_empty()).collect();
    if packets.is_empty() {
        return Err("the file has no audio packets".into());
    }
    Ok(OggOpus { packets })
}

/// Writes frames as an IVF file (VP8), for tests and tools that need one.
pub fn write_ivf(width: u16, height: u16, frame_rate: u32, frames: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + frames.iter().map(|f| f.len() + 12).sum::<usize>());
    out.extend_from_slice(b"DKIF");
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&32u16.to_le_bytes());
    out.extend_from_slice(b"VP80");
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&height.to_le_bytes());
    out.extend_from_slice(&frame_rate.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for (index, frame) in frames.iter().enumerate() {
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(&(index as u64).to_le_bytes());
        out.extend_from_slice(frame);
    }
    out
}

/// Writes packets as an Ogg Opus file (one packet per page, CRC left zero: readers here do not
/// check it), for tests and tools that need one.
pub fn write_ogg_opus(packets: &[Bytes]) -> Vec<u8> {
    let mut head = b"OpusHead".to_vec();
    head.extend_from_slice(&[1, 2, 0x38, 0x01, 0x80, 0xBB, 0, 0, 0, 0, 0]);
    let tags = b"OpusTags\x08\x00\x00\x00mediamesh\x00\x00\x00\x00".to_vec();
    let mut out = Vec::new();
    let all: Vec<Vec<u8>> = [head, tags]
        .into_iter()
        .chain(packets.iter().map(|p| p.to_vec()))
        .collect();
    for (sequence, packet) in all.iter().enumerate() {
        let mut lacing = vec![255u8; packet.len() / 255];
        lacing.push((packet.len() % 255) as u8);
        out.extend_from_slice(b"OggS");
        out.push(0);
        out.push(if sequence == 0 { 2 } else { 0 });
        out.extend_from_slice(&(sequence as u64 * 960).to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(sequence as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.push(lacing.len() as u8);
        out.extend_from_slice(&lacing);
        out.extend_from_slice(packet);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Vp8Packetizer;

    #[test]
    fn ivf_round_trip_and_refusals() {
        let packetizer = Vp8Packetizer::new(320, 240, 1_200);
        let frames = vec![
            packetizer.frame_data(true, 3_000),
            packetizer.frame_data(false, 700),
            packetizer.frame_data(false, 650),
        ];
        let file = write_ivf(320, 240, 25, &frames);
        let video = parse_ivf(&file).expect("parses");
        assert_eq!((video.width, video.height, video.frame_rate), (320, 240, 25));
        assert_eq!(
            video.frames.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [true, false, false]
        );
        assert_eq!(video.frames[1].1, frames[1]);
        assert!(parse_ivf(&file[..file.len() - 10]).is_err(), "truncated");
        assert!(parse_ivf(b"RIFF").is_err());
        let mut vp9 = file.clone();
        vp9[8..12].copy_from_slice(b"VP90");
        assert!(parse_ivf(&vp9).unwrap_err().contains("not VP8"));
    }

    #[test]
    fn ogg_round_trip_with_long_packets_and_refusals() {
        let packets = vec![
            Bytes::from_static(&[0xF8, 0xFF, 0xFE]),
            Bytes::from(vec![0xF8; 600]), // spans three segments
            Bytes::from(vec![0xF8; 255]), // ends on a full segment: a 0 lace follows
        ];
        let file = write_ogg_opus(&packets);
        assert_eq!(parse_ogg_opus(&file).expect("parses").packets, packets);
        assert!(parse_ogg_opus(&file[..file.len() - 5]).is_err(), "truncated");
        assert!(parse_ogg_opus(b"OggS").is_err());
        assert!(parse_ogg_opus(&write_ogg_opus(&[])).is_err(), "no audio");
    }
}
