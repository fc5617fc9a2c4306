//! Owned payload values: the imp data model, carried as CBOR.

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use crate::cbor::{CborError, Reader, Sink, Token, Writer};

/// Deepest array/map nesting [`Value::decode`] accepts: hostile input cannot exhaust the stack.
pub const MAX_DEPTH: usize = 32;

/// A payload value: what an imp agent and device can exchange.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    /// null (also what an empty payload means).
    #[default]
    Null,
    /// Boolean.
    Bool(bool),
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// UTF-8 string.
    String(String),
    /// Binary blob.
    Bytes(Vec<u8>),
    /// Array of values.
    Array(Vec<Value>),
    /// Table with string keys (kept sorted, so encoding is deterministic).
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// Encodes as CBOR.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the CBOR encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        let _ = self.write(&mut Writer::new(out));
    }

    /// Writes the CBOR encoding through any writer (e.g. into a fixed slice).
    pub fn write<S: Sink>(&self, w: &mut Writer<S>) -> Result<(), CborError> {
        match self {
            Value::Null => w.null().map(drop),
            Value::Bool(b) => w.bool(*b).map(drop),
            Value::Int(i) => w.int(*i).map(drop),
            Value::Float(f) => w.float(*f).map(drop),
            Value::String(s) => w.str(s).map(drop),
            Value::Bytes(b) => w.bytes(b).map(drop),
            Value::Array(items) => {
                w.array(items.len())?;
                items.iter().try_for_each(|v| v.write(w))
            }
            Value::Map(map) => {
                w.map(map.len())?;
                map.iter().try_for_each(|(k, v)| {
                    w.str(k)?;
                    v.write(w)
                })
            }
        }
    }

    /// Decodes one CBOR item; an empty input is `Null` (a payload-less message).
    pub fn decode(bytes: &[u8]) -> Result<Value, CborError> {
        Self::decode_with_depth(bytes, MAX_DEPTH)
    }

    /// Decodes with a custom nesting limit.
    pub fn decode_with_depth(bytes: &[u8], max_depth: usize) -> Result<Value, CborError> {
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        let mut r = Reader::new(bytes);
        let token = r.token()?;
        let v = read_value(&mut r, token, max_depth)?;
        if r.remaining() != 0 {
            return Err(CborError::TrailingBytes);
        }
        Ok(v)
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number as a float, if this is an integer or a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value at `key`, if this is a map holding it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(m) => m.get(key),
            _ => None,
        }
    }
}

fn read_value(r: &mut Reader<'_>, token: Token<'_>, depth: usize) -> Result<Value, CborError> {
    Ok(match token {
        Token::Null => Value::Null,
        Token::Bool(b) => Value::Bool(b),
        Token::Int(i) => Value::Int(i),
        Token::Float(f) => Value::Float(f),
        Token::Str(s) => Value::String(s.to_owned()),
        Token::Bytes(b) => Value::Bytes(b.to_vec()),
        Token::Break => return Err(CborError::UnexpectedBreak),
        Token::Array(len) => {
            let depth = depth.checked_sub(1).ok_or(CborError::TooDeep)?;
            // Every item takes at least one byte: a declared length beyond the input is a lie.
            let cap = bounded_len(r, len, 1)?;
            let mut items = Vec::with_capacity(cap);
            while let Some(token) = next_item(r, len, items.len())? {
                items.push(read_value(r, token, depth)?);
            }
            Value::Array(items)
        }
        Token::Map(len) => {
            let depth = depth.checked_sub(1).ok_or(CborError::TooDeep)?;
            bounded_len(r, len, 2)?;
            let mut map = BTreeMap::new();
            let mut count = 0;
            while let Some(token) = next_item(r, len, count)? {
                let Token::Str(key) = token else {
                    return Err(CborError::NonStringKey);
                };
                let key = key.to_owned();
                let token = r.token()?;
                if token == Token::Break {
                    return Err(CborError::UnexpectedBreak);
                }
                let value = read_value(r, token, depth)?;
                if map.insert(key, value).is_some() {
                    return Err(CborError::DuplicateKey);
                }
                count += 1;
            }
            Value::Map(map)
        }
    })
}

fn bounded_len(r: &Reader<'_>, len: Option<u64>, min_item: u64) -> Result<usize, CborError> {
    match len {
        None => Ok(0),
        Some(n) if n.saturating_mul(min_item) <= r.remaining() as u64 => Ok(n as usize),
        Some(_) => Err(CborError::LengthTooLarge),
    }
}

/// Next item of a container, or `None` at its end (count reached, or break if indefinite).
fn next_item<'a>(
    r: &mut Reader<'a>,
    len: Option<u64>,
    done: usize,
) -> Result<Option<Token<'a>>, CborError> {
    match len {
        Some(n) if done as u64 >= n => Ok(None),
        Some(_) => match r.token()? {
            Token::Break => Err(CborError::UnexpectedBreak),
            t => Ok(Some(t)),
        },
        None => match r.token()? {
            Token::Break => Ok(None),
            t => Ok(Some(t)),
        },
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<i32> for Value {
    fn from(i: i32) -> Self {
        Value::Int(i.into())
    }
}
impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::Int(i.into())
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b)
    }
}
impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Self {
        Value::Array(items)
    }
}
impl From<BTreeMap<String, Value>> for Value {
    fn from(m: BTreeMap<String, Value>) -> Self {
        Value::Map(m)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sample() -> Value {
        let mut m = BTreeMap::new();
        m.insert("temp".into(), Value::Float(21.5));
        m.insert("n".into(), Value::Int(-70000));
        m.insert("blob".into(), Value::Bytes(vec![0, 1, 255]));
        m.insert(
            "nested".into(),
            Value::Array(vec![
                Value::Null,
                Value::Bool(true),
                Value::String("\u{e9}t\u{e9}".into()),
            ]),
        );
        Value::Map(m)
    }

    #[test]
    fn every_kind_round_trips() {
        let values = [
            Value::Null,
            Value::Bool(false),
            Value::Bool(true),
            Value::Int(0),
            Value::Int(23),
            Value::Int(24),
            Value::Int(-24),
            Value::Int(-25),
            Value::Int(i64::MAX),
            Value::Int(i64::MIN),
            Value::Float(0.1),
            Value::Float(-1.5),
            Value::Float(f64::INFINITY),
            Value::Float(1e300),
            Value::String(String::new()),
            Value::String("x".repeat(300)),
            Value::Bytes(vec![0; 70000]),
            Value::Array(vec![]),
            Value::Map(BTreeMap::new()),
            sample(),
        ];
        for v in values {
            assert_eq!(Value::decode(&v.encode()), Ok(v));
        }
        let nan = Value::decode(&Value::Float(f64::NAN).encode()).unwrap();
        assert!(matches!(nan, Value::Float(f) if f.is_nan()));
    }

    #[test]
    fn known_encoding() {
        let mut m = BTreeMap::new();
        m.insert("a".into(), Value::Int(1));
        m.insert("b".into(), Value::Array(vec![Value::Int(2), Value::Int(3)]));
        assert_eq!(
            Value::Map(m).encode(),
            [0xA2, 0x61, b'a', 0x01, 0x61, b'b', 0x82, 0x02, 0x03]
        );
    }

    #[test]
    fn empty_payload_is_null() {
        assert_eq!(Value::decode(&[]), Ok(Value::Null));
    }

    #[test]
    fn decodes_indefinite_containers_and_half_floats() {
        let bytes = [0x9F, 0x01, 0xBF, 0x61, b'k', 0xF9, 0x3C, 0x00, 0xFF, 0xFF];
        let mut m = BTreeMap::new();
        m.insert("k".into(), Value::Float(1.0));
        assert_eq!(
            Value::decode(&bytes),
            Ok(Value::Array(vec![Value::Int(1), Value::Map(m)]))
        );
    }

    #[test]
    fn rejects_hostile_and_invalid_input() {
        let deep = [0x81u8; 100_000];
        assert_eq!(Value::decode(&deep), Err(CborError::TooDeep));
        let deep_indef = [0x9Fu8; 1000];
        assert_eq!(Value::decode(&deep_indef), Err(CborError::TooDeep));
        let mut ok_depth = vec![0x81u8; MAX_DEPTH];
        ok_depth.push(0xF6);
        assert!(Value::decode(&ok_depth).is_ok());
        ok_depth.insert(0, 0x81);
        assert_eq!(Value::decode(&ok_depth), Err(CborError::TooDeep));
        // Declared lengths far beyond the input must not allocate.
        assert_eq!(
            Value::decode(&[0x9B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(CborError::LengthTooLarge)
        );
        assert_eq!(
            Value::decode(&[0xBB, 0x0F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(CborError::LengthTooLarge)
        );
        assert_eq!(
            Value::decode(&[0xA1, 0x01, 0x02]),
            Err(CborError::NonStringKey)
        );
        assert_eq!(
            Value::decode(&[0xA2, 0x61, b'a', 1, 0x61, b'a', 2]),
            Err(CborError::DuplicateKey)
        );
        assert_eq!(Value::decode(&[0x01, 0x02]), Err(CborError::TrailingBytes));
        assert_eq!(Value::decode(&[0xFF]), Err(CborError::UnexpectedBreak));
        assert_eq!(
            Value::decode(&[0x82, 0x01, 0xFF]),
            Err(CborError::UnexpectedBreak)
        );
        assert_eq!(
            Value::decode(&[0xBF, 0x61, b'a', 0xFF]),
            Err(CborError::UnexpectedBreak)
        );
        assert_eq!(Value::decode(&[0x82, 0x01, 0x19]), Err(CborError::Eof));
    }

    #[test]
    fn encodes_into_a_fixed_slice() {
        let mut buf = [0u8; 64];
        let mut w = Writer::new(crate::cbor::SliceSink::new(&mut buf));
        sample().write(&mut w).unwrap();
        assert_eq!(w.into_inner().written(), &sample().encode()[..]);
        let mut small = [0u8; 4];
        let mut w = Writer::new(crate::cbor::SliceSink::new(&mut small));
        assert_eq!(sample().write(&mut w), Err(CborError::BufferFull));
    }
}
