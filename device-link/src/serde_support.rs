//! Conversions between payloads and serde types.
//!
//! Serde data goes through `minicbor-serde`, and every result is passed through
//! [`Value::decode`], so what reaches the wire (or a deserializer) is always the checked,
//! depth-limited subset. Serde's data model maps as: structs and maps → CBOR maps (keys must
//! be strings), sequences/tuples → arrays, `Option::None` → null, unit `()` → empty array,
//! unit enum variants → their name, other variants → a one-entry map `{variant: content}`.
//! Integers must fit i64; an `f32` field must be fed a value exactly representable as f32.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use ::serde::de::{
    self, Deserialize, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor,
};
use ::serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::cbor::CborError;
use crate::value::Value;

/// Why a serde conversion failed.
#[derive(Clone, Debug, PartialEq)]
pub enum SerdeError {
    /// The serde type could not be written as CBOR.
    Encode(String),
    /// The CBOR did not match the serde type.
    Decode(String),
    /// The CBOR is outside the payload subset (e.g. a u64 above i64::MAX, a non-string key).
    Cbor(CborError),
}

impl fmt::Display for SerdeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerdeError::Encode(m) => write!(f, "serde encode: {m}"),
            SerdeError::Decode(m) => write!(f, "serde decode: {m}"),
            SerdeError::Cbor(e) => write!(f, "payload: {e}"),
        }
    }
}

impl core::error::Error for SerdeError {}

impl From<CborError> for SerdeError {
    fn from(e: CborError) -> Self {
        SerdeError::Cbor(e)
    }
}

/// Converts any serde type to a [`Value`].
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, SerdeError> {
    let bytes = minicbor_serde::to_vec(value).map_err(|e| SerdeError::Encode(e.to_string()))?;
    Ok(Value::decode(&bytes)?)
}

/// Converts a [`Value`] to any serde type.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, SerdeError> {
    minicbor_serde::from_slice(&value.encode()).map_err(|e| SerdeError::Decode(e.to_string()))
}

/// Encodes any serde type as a payload (the canonical subset encoding).
pub fn to_cbor<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, SerdeError> {
    Ok(to_value(value)?.encode())
}

/// Decodes a payload into any serde type, checking the subset and nesting depth first.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SerdeError> {
    from_value(&Value::decode(bytes)?)
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_none(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(f) => s.serialize_f64(*f),
            Value::String(v) => s.serialize_str(v),
            Value::Bytes(b) => s.serialize_bytes(b),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a payload value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer above i64::MAX"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            m.insert(k, v);
        }
        Ok(Value::Map(m))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::serde::{Deserialize, Serialize};
    use alloc::vec;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Mode {
        Idle,
        Run(u32),
        Blink { on_ms: u16, off_ms: u16 },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Reading {
        temp: f64,
        humidity: f32,
        count: u64,
        delta: i32,
        label: String,
        tags: Vec<String>,
        note: Option<String>,
        mode: Mode,
        modes: Vec<Mode>,
        #[serde(with = "bytes_field")]
        raw: Vec<u8>,
    }

    mod bytes_field {
        use alloc::vec::Vec;
        pub fn serialize<S: ::serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
        pub fn deserialize<'de, D: ::serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            struct V;
            impl<'de> ::serde::de::Visitor<'de> for V {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                    Ok(v.to_vec())
                }
            }
            d.deserialize_bytes(V)
        }
    }

    fn reading() -> Reading {
        Reading {
            temp: 21.3,
            humidity: 0.5,
            count: 42,
            delta: -3,
            label: "kitchen".into(),
            tags: vec!["a".into(), "b".into()],
            note: None,
            mode: Mode::Blink {
                on_ms: 100,
                off_ms: 900,
            },
            modes: vec![Mode::Idle, Mode::Run(7)],
            raw: vec![0, 1, 2],
        }
    }

    #[test]
    fn struct_round_trips_through_value_and_cbor() {
        let r = reading();
        let v = to_value(&r).unwrap();
        assert_eq!(v.get("label"), Some(&Value::String("kitchen".into())));
        assert_eq!(v.get("note"), Some(&Value::Null));
        assert_eq!(v.get("raw"), Some(&Value::Bytes(vec![0, 1, 2])));
        assert_eq!(v.get("count"), Some(&Value::Int(42)));
        assert_eq!(from_value::<Reading>(&v).unwrap(), r);
        assert_eq!(from_cbor::<Reading>(&to_cbor(&r).unwrap()).unwrap(), r);
    }

    #[test]
    fn value_is_itself_serde() {
        let v = to_value(&reading()).unwrap();
        assert_eq!(from_value::<Value>(&v).unwrap(), v);
        assert_eq!(to_value(&v).unwrap(), v);
    }

    #[test]
    fn out_of_subset_values_are_errors() {
        assert!(matches!(
            to_value(&u64::MAX),
            Err(SerdeError::Cbor(CborError::IntegerRange))
        ));
        let mut m = BTreeMap::new();
        m.insert(1u32, "x");
        assert!(matches!(
            to_value(&m),
            Err(SerdeError::Cbor(CborError::NonStringKey))
        ));
        assert!(matches!(
            from_value::<u8>(&Value::String("x".into())),
            Err(SerdeError::Decode(_))
        ));
        assert!(matches!(
            from_cbor::<Value>(&[0x81; 64]),
            Err(SerdeError::Cbor(CborError::TooDeep))
        ));
    }
}
