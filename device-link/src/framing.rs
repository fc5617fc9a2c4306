//! Byte-level framing: CRC-32 over the frame content, COBS encoding, 0x00 delimiter.
//!
//! COBS and CRC-32 are written out here rather than taken from crates: each is a few lines,
//! the streaming decoder needs COBS state that slice-based crates do not expose, and the
//! spec (docs/device-link.md) quotes exactly this code's behaviour.

use core::fmt;

/// Bytes of CRC-32 at the end of every frame's decoded content.
pub const CRC_LEN: usize = 4;

/// CRC-32/ISO-HDLC (the zlib/Ethernet CRC): reflected polynomial 0xEDB88320, init and
/// final XOR 0xFFFFFFFF. Check value of "123456789" is 0xCBF43926.
#[derive(Clone, Copy, Debug)]
pub struct Crc32(u32);

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

impl Crc32 {
    /// A fresh CRC computation.
    pub const fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }

    /// Adds bytes to the computation.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.0;
        for &b in bytes {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    /// The CRC of everything added so far.
    pub const fn finish(self) -> u32 {
        !self.0
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

/// CRC-32 of `bytes` in one call.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.finish()
}

/// Worst-case wire size of a frame whose decoded content (including CRC) is `content_len`
/// bytes: one COBS code byte per started 254-byte block, plus the 0x00 delimiter.
pub const fn max_encoded_len(content_len: usize) -> usize {
    content_len + content_len / 254 + 2
}

/// Streaming COBS encoder writing one frame into a slice, computing the CRC on the way so
/// a frame is built without a second buffer.
pub(crate) struct FrameWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
    code_pos: usize,
    code: u8,
    crc: Crc32,
    overflow: bool,
}

impl<'a> FrameWriter<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        let overflow = out.is_empty();
        FrameWriter {
            out,
            pos: 1,
            code_pos: 0,
            code: 1,
            crc: Crc32::new(),
            overflow,
        }
    }

    fn put(&mut self, index: usize, byte: u8) {
        match self.out.get_mut(index) {
            Some(slot) => *slot = byte,
            None => self.overflow = true,
        }
    }

    fn push_byte(&mut self, b: u8) {
        if b == 0 {
            self.put(self.code_pos, self.code);
            self.code_pos = self.pos;
            self.pos += 1;
            self.code = 1;
        } else {
            self.put(self.pos, b);
            self.pos += 1;
            self.code += 1;
            if self.code == 0xFF {
                self.put(self.code_pos, self.code);
                self.code_pos = self.pos;
                self.pos += 1;
                self.code = 1;
            }
        }
    }

    /// Appends content bytes (covered by the CRC).
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.crc.update(bytes);
        for &b in bytes {
            self.push_byte(b);
        }
    }

    /// Appends the CRC, closes the last COBS block and the frame; `None` if `out` was too small.
    pub(crate) fn finish(mut self) -> Option<usize> {
        let crc = self.crc.finish().to_le_bytes();
        for b in crc {
            self.push_byte(b);
        }
        self.put(self.code_pos, self.code);
        self.put(self.pos, 0);
        if self.overflow {
            None
        } else {
            Some(self.pos + 1)
        }
    }
}

/// Why a received frame was dropped by the [`FrameDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The CRC did not match the content: bytes were corrupted on the line.
    Crc,
    /// A delimiter arrived inside a COBS block: the frame was truncated.
    Cobs,
    /// The frame was longer than the receive buffer; it was skipped up to its delimiter.
    Oversize,
    /// The frame was too short to hold a type byte and a CRC.
    TooShort,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeError::Crc => "frame CRC mismatch",
            DecodeError::Cobs => "truncated COBS frame",
            DecodeError::Oversize => "frame larger than the receive buffer",
            DecodeError::TooShort => "frame too short",
        })
    }
}

impl core::error::Error for DecodeError {}

/// Frames dropped by a [`FrameDecoder`], by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    /// CRC mismatches.
    pub crc: u32,
    /// Truncated COBS frames.
    pub cobs: u32,
    /// Frames longer than the buffer.
    pub oversize: u32,
    /// Frames shorter than type + CRC.
    pub too_short: u32,
    /// Good frames delivered.
    pub frames: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DecState {
    /// Between frames: the next non-zero byte is a COBS code byte.
    Idle,
    InFrame,
    /// Skipping to the next delimiter after an error found mid-frame.
    Discard(DecodeError),
    /// A frame was handed out; its content stays in the buffer until the next `feed`.
    Done,
}

/// Streaming frame decoder: accepts bytes in any chunking, yields CRC-checked frame
/// contents, and resynchronises on the next 0x00 after any error. The buffer's length is
/// the largest frame content (including CRC) accepted.
#[derive(Debug)]
pub struct FrameDecoder<B> {
    buf: B,
    len: usize,
    remaining: u8,
    pending_zero: bool,
    state: DecState,
    counts: DecodeCounts,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameDecoder<B> {
    /// A decoder whose largest accepted frame content is `buf.len()` bytes.
    pub fn new(buf: B) -> Self {
        FrameDecoder {
            buf,
            len: 0,
            remaining: 0,
            pending_zero: false,
            state: DecState::Idle,
            counts: DecodeCounts::default(),
        }
    }

    /// Largest frame content (type, body and CRC) this decoder accepts.
    pub fn capacity(&self) -> usize {
        self.buf.as_ref().len()
    }

    /// Counts of delivered and dropped frames.
    pub fn counts(&self) -> DecodeCounts {
        self.counts
    }

    /// Content (type and body, without CRC) of the frame most recently returned by `feed`.
    pub(crate) fn last_frame(&self) -> Option<&[u8]> {
        if self.state == DecState::Done {
            self.buf.as_ref().get(..self.len.saturating_sub(CRC_LEN))
        } else {
            None
        }
    }

    fn push(&mut self, b: u8) {
        match self.buf.as_mut().get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.state = DecState::Discard(DecodeError::Oversize),
        }
    }

    /// Consumes bytes until one frame ends (good or bad) or `input` runs out. Returns the
    /// bytes consumed and, if a frame ended, its content without CRC or why it was dropped.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Result<&[u8], DecodeError>>) {
        if self.state == DecState::Done {
            self.state = DecState::Idle;
        }
        for (i, &b) in input.iter().enumerate() {
            if b == 0 {
                match self.end_frame() {
                    // Empty frames (runs of 0x00) are padding: keep going.
                    None => continue,
                    Some(Ok(())) => return (i + 1, self.last_frame().map(Ok)),
                    Some(Err(e)) => return (i + 1, Some(Err(e))),
                }
            }
            match self.state {
                DecState::Discard(_) => {}
                DecState::Idle | DecState::Done => {
                    self.state = DecState::InFrame;
                    self.len = 0;
                    self.start_block(b);
                }
                DecState::InFrame => {
                    if self.remaining == 0 {
                        self.start_block(b);
                    } else {
                        self.remaining -= 1;
                        self.push(b);
                    }
                }
            }
        }
        (input.len(), None)
    }

    fn start_block(&mut self, code: u8) {
        if self.pending_zero {
            self.push(0);
        }
        self.remaining = code - 1;
        self.pending_zero = code != 0xFF;
    }

    /// Handles a delimiter: `None` for an empty frame (ignored), else the frame's fate.
    fn end_frame(&mut self) -> Option<Result<(), DecodeError>> {
        let state = self.state;
        let remaining = self.remaining;
        self.state = DecState::Idle;
        self.remaining = 0;
        self.pending_zero = false;
        let result = match state {
            DecState::Idle | DecState::Done => return None,
            DecState::Discard(e) => Err(e),
            DecState::InFrame if remaining != 0 => Err(DecodeError::Cobs),
            DecState::InFrame if self.len < 1 + CRC_LEN => Err(DecodeError::TooShort),
            DecState::InFrame => {
                let buf = self.buf.as_ref();
                let body = self.len - CRC_LEN;
                let mut crc = [0u8; CRC_LEN];
                crc.copy_from_slice(&buf[body..self.len]);
                if crc32(&buf[..body]) == u32::from_le_bytes(crc) {
                    Ok(())
                } else {
                    Err(DecodeError::Crc)
                }
            }
        };
        match result {
            Ok(()) => {
                self.state = DecState::Done;
                self.counts.frames = self.counts.frames.wrapping_add(1);
            }
            Err(e) => {
                let c = match e {
                    DecodeError::Crc => &mut self.counts.crc,
                    DecodeError::Cobs => &mut self.counts.cobs,
                    DecodeError::Oversize => &mut self.counts.oversize,
                    DecodeError::TooShort => &mut self.counts.too_short,
                };
                *c = c.wrapping_add(1);
            }
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(content: &[u8]) -> ([u8; 1200], usize) {
        let mut out = [0u8; 1200];
        let mut w = FrameWriter::new(&mut out);
        w.push(content);
        let n = w.finish().unwrap();
        (out, n)
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_lengths_around_block_boundaries() {
        for len in [
            0usize, 1, 2, 249, 250, 251, 252, 253, 254, 255, 256, 507, 508, 509, 1000,
        ] {
            for fill in [0u8, 1, 0xFF] {
                let content: [u8; 1000] =
                    core::array::from_fn(|i| if fill == 1 { i as u8 } else { fill });
                let content = &content[..len.min(1000)];
                let (wire, n) = encode(content);
                assert!(n <= max_encoded_len(content.len() + CRC_LEN), "len {len}");
                assert_eq!(wire[n - 1], 0);
                assert!(!wire[..n - 1].contains(&0));
                let mut dec = FrameDecoder::new([0u8; 1100]);
                let (used, out) = dec.feed(&wire[..n]);
                assert_eq!(used, n);
                if content.is_empty() {
                    // Only a type byte is a valid minimum; the empty content is too short.
                    assert_eq!(out, Some(Err(DecodeError::TooShort)));
                } else {
                    assert_eq!(out, Some(Ok(content)));
                }
            }
        }
    }

    #[test]
    fn accepts_encoding_without_trailing_empty_block() {
        // 254 non-zero bytes whose CRC also has no zero: encoders may end on a 0xFF block.
        let content: [u8; 250] = [7; 250];
        let mut raw = [0u8; 254];
        raw[..250].copy_from_slice(&content);
        raw[250..].copy_from_slice(&crc32(&content).to_le_bytes());
        assert!(!raw.contains(&0));
        let mut wire = [0u8; 256];
        wire[0] = 0xFF;
        wire[1..255].copy_from_slice(&raw);
        let mut dec = FrameDecoder::new([0u8; 300]);
        let (_, out) = dec.feed(&wire[..256]);
        assert_eq!(out, Some(Ok(&content[..])));
    }

    #[test]
    fn writer_reports_overflow() {
        let mut out = [0u8; 8];
        let mut w = FrameWriter::new(&mut out);
        w.push(&[1, 2, 3, 4, 5]);
        assert_eq!(w.finish(), None);
    }

    #[test]
    fn oversize_is_skipped_and_next_frame_decodes() {
        let (big, bn) = encode(&[9u8; 100]);
        let (small, sn) = encode(&[1, 2, 3]);
        let mut dec = FrameDecoder::new([0u8; 50]);
        let (used, out) = dec.feed(&big[..bn]);
        assert_eq!((used, out), (bn, Some(Err(DecodeError::Oversize))));
        let (_, out) = dec.feed(&small[..sn]);
        assert_eq!(out, Some(Ok(&[1u8, 2, 3][..])));
        assert_eq!(dec.counts().oversize, 1);
    }

    #[test]
    fn truncated_frame_is_a_cobs_error() {
        let (wire, n) = encode(&[5u8; 20]);
        let mut dec = FrameDecoder::new([0u8; 64]);
        let mut cut = [0u8; 64];
        cut[..10].copy_from_slice(&wire[..10]);
        let (_, out) = dec.feed(&cut[..11]);
        assert_eq!(out, Some(Err(DecodeError::Cobs)));
        let (_, out) = dec.feed(&wire[..n]);
        assert_eq!(out, Some(Ok(&[5u8; 20][..])));
    }
}
