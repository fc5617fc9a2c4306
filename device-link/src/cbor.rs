//! The CBOR subset used for payloads, without allocation: a writer over a byte slice and
//! a pull reader of tokens. Firmware without a heap builds and reads payloads with these;
//! `Value` is built on them.

use core::fmt;

/// Why a payload could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CborError {
    /// The input ended inside an item.
    Eof,
    /// Bytes follow the single top-level item.
    TrailingBytes,
    /// An item outside the subset (tag, undefined, simple value, reserved encoding),
    /// identified by its initial byte.
    Unsupported(u8),
    /// An integer outside the i64 range.
    IntegerRange,
    /// A text string that is not UTF-8.
    InvalidUtf8,
    /// Arrays/maps nested deeper than the decoder's limit.
    TooDeep,
    /// A map key that is not a text string.
    NonStringKey,
    /// The same key twice in one map.
    DuplicateKey,
    /// A declared length larger than the remaining input could hold.
    LengthTooLarge,
    /// A break byte where no indefinite-length item was open.
    UnexpectedBreak,
    /// The output slice is full.
    BufferFull,
}

impl fmt::Display for CborError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CborError::Eof => f.write_str("CBOR input ends inside an item"),
            CborError::TrailingBytes => f.write_str("bytes after the CBOR item"),
            CborError::Unsupported(b) => {
                write!(f, "unsupported CBOR item (initial byte 0x{b:02x})")
            }
            CborError::IntegerRange => f.write_str("integer outside the i64 range"),
            CborError::InvalidUtf8 => f.write_str("text string is not UTF-8"),
            CborError::TooDeep => f.write_str("CBOR nesting too deep"),
            CborError::NonStringKey => f.write_str("map key is not a text string"),
            CborError::DuplicateKey => f.write_str("duplicate map key"),
            CborError::LengthTooLarge => f.write_str("CBOR length exceeds the input"),
            CborError::UnexpectedBreak => f.write_str("unexpected CBOR break"),
            CborError::BufferFull => f.write_str("CBOR output buffer full"),
        }
    }
}

impl core::error::Error for CborError {}

/// Where a [`Writer`] puts bytes.
pub trait Sink {
    /// Appends bytes, or fails with [`CborError::BufferFull`].
    fn put(&mut self, bytes: &[u8]) -> Result<(), CborError>;
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn put(&mut self, bytes: &[u8]) -> Result<(), CborError> {
        (**self).put(bytes)
    }
}

/// A [`Sink`] over a fixed slice.
#[derive(Debug)]
pub struct SliceSink<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> SliceSink<'a> {
    /// A sink writing from the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceSink { buf, len: 0 }
    }

    /// The bytes written so far.
    pub fn written(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Sink for SliceSink<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), CborError> {
        let end = self
            .len
            .checked_add(bytes.len())
            .ok_or(CborError::BufferFull)?;
        let dst = self
            .buf
            .get_mut(self.len..end)
            .ok_or(CborError::BufferFull)?;
        dst.copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }
}

#[cfg(feature = "alloc")]
impl Sink for alloc::vec::Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), CborError> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// Encoder of the subset: definite lengths, shortest argument encodings, floats as f32
/// when exact and f64 otherwise. The caller writes `n` items after `array(n)` and `n`
/// key/value pairs after `map(n)`.
#[derive(Debug)]
pub struct Writer<S> {
    sink: S,
}

impl<S: Sink> Writer<S> {
    /// A writer into `sink`.
    pub fn new(sink: S) -> Self {
        Writer { sink }
    }

    /// The sink, with everything written.
    pub fn into_inner(self) -> S {
        self.sink
    }

    fn head(&mut self, major: u8, arg: u64) -> Result<&mut Self, CborError> {
        let m = major << 5;
        if arg < 24 {
            self.sink.put(&[m | arg as u8])?;
        } else if let Ok(a) = u8::try_from(arg) {
            self.sink.put(&[m | 24, a])?;
        } else if let Ok(a) = u16::try_from(arg) {
            self.sink.put(&[m | 25])?;
            self.sink.put(&a.to_be_bytes())?;
        } else if let Ok(a) = u32::try_from(arg) {
            self.sink.put(&[m | 26])?;
            self.sink.put(&a.to_be_bytes())?;
        } else {
            self.sink.put(&[m | 27])?;
            self.sink.put(&arg.to_be_bytes())?;
        }
        Ok(self)
    }

    /// Writes null.
    pub fn null(&mut self) -> Result<&mut Self, CborError> {
        self.sink.put(&[0xF6])?;
        Ok(self)
    }

    /// Writes a boolean.
    pub fn bool(&mut self, b: bool) -> Result<&mut Self, CborError> {
        self.sink.put(&[if b { 0xF5 } else { 0xF4 }])?;
        Ok(self)
    }

    /// Writes an integer.
    pub fn int(&mut self, i: i64) -> Result<&mut Self, CborError> {
        if i >= 0 {
            self.head(0, i as u64)
        } else {
            self.head(1, !(i as u64))
        }
    }

    /// Writes a float: as f32 when that is exact (NaN included), else as f64.
    pub fn float(&mut self, f: f64) -> Result<&mut Self, CborError> {
        let narrow = f as f32;
        if f64::from(narrow) == f || f.is_nan() {
            self.sink.put(&[0xFA])?;
            self.sink.put(&narrow.to_be_bytes())?;
        } else {
            self.sink.put(&[0xFB])?;
            self.sink.put(&f.to_be_bytes())?;
        }
        Ok(self)
    }

    /// Writes a text string.
    pub fn str(&mut self, s: &str) -> Result<&mut Self, CborError> {
        self.head(3, s.len() as u64)?;
        self.sink.put(s.as_bytes())?;
        Ok(self)
    }

    /// Writes a byte string.
    pub fn bytes(&mut self, b: &[u8]) -> Result<&mut Self, CborError> {
        self.head(2, b.len() as u64)?;
        self.sink.put(b)?;
        Ok(self)
    }

    /// Starts an array of `len` items.
    pub fn array(&mut self, len: usize) -> Result<&mut Self, CborError> {
        self.head(4, len as u64)
    }

    /// Starts a map of `len` pairs (keys must be text strings).
    pub fn map(&mut self, len: usize) -> Result<&mut Self, CborError> {
        self.head(5, len as u64)
    }
}

/// One item header or scalar read by a [`Reader`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Token<'a> {
    /// null.
    Null,
    /// true or false.
    Bool(bool),
    /// An integer in the i64 range.
    Int(i64),
    /// A half, single or double float, widened.
    Float(f64),
    /// A definite-length text string.
    Str(&'a str),
    /// A definite-length byte string.
    Bytes(&'a [u8]),
    /// Start of an array: `Some(n)` items, or `None` for indefinite length (ended by `Break`).
    Array(Option<u64>),
    /// Start of a map: `Some(n)` pairs, or `None` for indefinite length (ended by `Break`).
    Map(Option<u64>),
    /// End of an indefinite-length array or map.
    Break,
}

/// Pull reader of the subset. Indefinite-length arrays and maps are accepted (some serde
/// encoders emit them); indefinite strings, tags and other simple values are not.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Reader { input, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.input.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CborError> {
        let end = self.pos.checked_add(n).ok_or(CborError::Eof)?;
        let out = self.input.get(self.pos..end).ok_or(CborError::Eof)?;
        self.pos = end;
        Ok(out)
    }

    fn arg(&mut self, initial: u8) -> Result<u64, CborError> {
        let info = initial & 0x1F;
        Ok(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)?[0]),
            25 => {
                let b = self.take(2)?;
                u64::from(u16::from_be_bytes([b[0], b[1]]))
            }
            26 => {
                let b = self.take(4)?;
                u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            27 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(self.take(8)?);
                u64::from_be_bytes(a)
            }
            _ => return Err(CborError::Unsupported(initial)),
        })
    }

    fn len(&mut self, initial: u8) -> Result<usize, CborError> {
        let n = self.arg(initial)?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(CborError::LengthTooLarge),
        }
    }

    /// Reads the next token.
    pub fn token(&mut self) -> Result<Token<'a>, CborError> {
        let initial = self.take(1)?[0];
        let major = initial >> 5;
        let indefinite = initial & 0x1F == 31;
        Ok(match major {
            0 => {
                Token::Int(i64::try_from(self.arg(initial)?).map_err(|_| CborError::IntegerRange)?)
            }
            1 => {
                let n = i64::try_from(self.arg(initial)?).map_err(|_| CborError::IntegerRange)?;
                Token::Int(-1 - n)
            }
            2 if !indefinite => {
                let n = self.len(initial)?;
                Token::Bytes(self.take(n)?)
            }
            3 if !indefinite => {
                let n = self.len(initial)?;
                let s = core::str::from_utf8(self.take(n)?).map_err(|_| CborError::InvalidUtf8)?;
                Token::Str(s)
            }
            4 if indefinite => Token::Array(None),
            4 => Token::Array(Some(self.arg(initial)?)),
            5 if indefinite => Token::Map(None),
            5 => Token::Map(Some(self.arg(initial)?)),
            7 => match initial {
                0xF4 => Token::Bool(false),
                0xF5 => Token::Bool(true),
                0xF6 => Token::Null,
                0xF9 => {
                    let b = self.take(2)?;
                    Token::Float(f16_to_f64(u16::from_be_bytes([b[0], b[1]])))
                }
                0xFA => {
                    let b = self.take(4)?;
                    Token::Float(f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]])))
                }
                0xFB => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(self.take(8)?);
                    Token::Float(f64::from_be_bytes(a))
                }
                0xFF => Token::Break,
                _ => return Err(CborError::Unsupported(initial)),
            },
            _ => return Err(CborError::Unsupported(initial)),
        })
    }
}

/// Widens an IEEE 754 half float by bit manipulation (no float math in core).
fn f16_to_f64(h: u16) -> f64 {
    let sign = u64::from(h & 0x8000) << 48;
    let exp = u64::from((h >> 10) & 0x1F);
    let mant = u64::from(h & 0x3FF);
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // Subnormal: value = mant * 2^-24; normalise so the top set bit becomes implicit.
            let top = 63 - u64::from(mant.leading_zeros());
            let frac = (mant << (52 - top)) & ((1 << 52) - 1);
            sign | ((1023 + top - 24) << 52) | frac
        }
        0x1F => sign | (0x7FF << 52) | (mant << 42),
        e => sign | ((e + 1023 - 15) << 52) | (mant << 42),
    };
    f64::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_widen_exactly() {
        assert_eq!(f16_to_f64(0x3C00), 1.0);
        assert_eq!(f16_to_f64(0xC000), -2.0);
        assert_eq!(f16_to_f64(0x7BFF), 65504.0);
        assert_eq!(f16_to_f64(0x0001), 1.0 / 16_777_216.0);
        assert_eq!(f16_to_f64(0x03FF), 1023.0 / 16_777_216.0);
        assert_eq!(f16_to_f64(0x0400), 1.0 / 16384.0);
        assert_eq!(f16_to_f64(0x7C00), f64::INFINITY);
        assert_eq!(f16_to_f64(0xFC00), f64::NEG_INFINITY);
        assert!(f16_to_f64(0x7E00).is_nan());
        assert_eq!(f16_to_f64(0x8000).to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn writer_uses_shortest_forms() {
        let mut buf = [0u8; 64];
        let mut w = Writer::new(SliceSink::new(&mut buf));
        w.int(0)
            .unwrap()
            .int(23)
            .unwrap()
            .int(24)
            .unwrap()
            .int(-1)
            .unwrap()
            .int(-25)
            .unwrap();
        w.int(i64::MIN)
            .unwrap()
            .float(1.5)
            .unwrap()
            .float(0.1)
            .unwrap();
        let out = w.into_inner();
        assert_eq!(
            out.written(),
            &[
                0x00, 0x17, 0x18, 24, 0x20, 0x38, 24, 0x3B, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                0xFF, 0xFF, 0xFA, 0x3F, 0xC0, 0, 0, 0xFB, 0x3F, 0xB9, 0x99, 0x99, 0x99, 0x99, 0x99,
                0x9A
            ]
        );
    }

    #[test]
    fn slice_sink_reports_full() {
        let mut buf = [0u8; 2];
        let mut w = Writer::new(SliceSink::new(&mut buf));
        assert_eq!(w.str("abc").err(), Some(CborError::BufferFull));
    }

    #[test]
    fn reader_rejects_what_is_outside_the_subset() {
        let cases: [(&[u8], CborError); 8] = [
            (&[0xC0, 0x00], CborError::Unsupported(0xC0)),
            (&[0xF7], CborError::Unsupported(0xF7)),
            (&[0x5F, 0xFF], CborError::Unsupported(0x5F)),
            (&[0x1C], CborError::Unsupported(0x1C)),
            (&[0x1B, 0x80, 0, 0, 0, 0, 0, 0, 0], CborError::IntegerRange),
            (&[0x62, 0xFF, 0xFE], CborError::InvalidUtf8),
            (&[0x45, 1, 2], CborError::LengthTooLarge),
            (&[0x19, 1], CborError::Eof),
        ];
        for (input, err) in cases {
            assert_eq!(Reader::new(input).token(), Err(err), "{input:02x?}");
        }
        assert_eq!(
            Reader::new(&[0x3B, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).token(),
            Ok(Token::Int(i64::MIN))
        );
    }
}
