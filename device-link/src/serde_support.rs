//! Conversions between payloads and serde types.
//!
//! Serde data goes through `minicbor-serde`, and every result is passed through
//! [`Value::decode`], so what reaches the wire (or a deserializer) is always the checked,
//! depth-limited subset. Serde's data model maps as: structs and maps → CBOR maps (keys must
//! be strings), sequences/tuples → arrays, `Option::None` → null, unit `()` → empty array,
//! unit enum variants → their name, other variants → a one-entry map `{variant: content}`.
//! Integers must fit i64; an `f32` field must be fed a value exactly representable as f32.
//! A float field also takes an integer (a board that sends `21` for 21.0 °C), as JSON and
//! imp do; the integer must be exactly representable in the float type.
//!
//! Decoding walks the checked [`Value`] with a deserializer of its own, rather than
//! minicbor-serde's, because minicbor-serde refuses an integer for a float field.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use ::serde::de::value::{MapDeserializer, SeqDeserializer};
use ::serde::de::{
    self, Deserialize, DeserializeOwned, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
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
    T::deserialize(ValueDe(value)).map_err(|e| SerdeError::Decode(e.to_string()))
}

type DeError = de::value::Error;

/// A deserializer over a borrowed [`Value`] (what `(&value).into_deserializer()` gives).
pub struct ValueDe<'a>(&'a Value);

impl<'de> IntoDeserializer<'de, DeError> for &'de Value {
    type Deserializer = ValueDe<'de>;
    fn into_deserializer(self) -> ValueDe<'de> {
        ValueDe(self)
    }
}

impl ValueDe<'_> {
    fn unexpected(&self) -> de::Unexpected<'_> {
        match self.0 {
            Value::Null => de::Unexpected::Unit,
            Value::Bool(b) => de::Unexpected::Bool(*b),
            Value::Int(i) => de::Unexpected::Signed(*i),
            Value::Float(f) => de::Unexpected::Float(*f),
            Value::String(s) => de::Unexpected::Str(s),
            Value::Bytes(b) => de::Unexpected::Bytes(b),
            Value::Array(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
        }
    }
}

impl<'de> Deserializer<'de> for ValueDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Bytes(b) => visitor.visit_borrowed_bytes(b),
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.iter());
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Map(map) => {
                let mut map = MapDeserializer::new(map.iter().map(|(k, v)| (k.as_str(), v)));
                let value = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(value)
            }
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Int(i) if (*i as f64) as i64 == *i => visitor.visit_f64(*i as f64),
            Value::Int(_) => Err(de::Error::invalid_value(self.unexpected(), &"an integer exactly representable as f64")),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Int(i) if (*i as f32) as i64 == *i => visitor.visit_f32(*i as f32),
            Value::Float(f) if f.is_nan() || (*f as f32) as f64 == *f => visitor.visit_f32(*f as f32),
            Value::Int(_) | Value::Float(_) => Err(de::Error::invalid_value(self.unexpected(), &"a number exactly representable as f32")),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    /// `()` is written as an empty array; null is taken too.
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Array(items) if items.is_empty() => visitor.visit_unit(),
            _ => Err(de::Error::invalid_type(self.unexpected(), &"unit (an empty array or null)")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    /// Unit variants are their name; others a one-entry map `{variant: content}`.
    fn deserialize_enum<V: Visitor<'de>>(self, _name: &'static str, _variants: &'static [&'static str], visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Map(map) if map.len() == 1 => match map.iter().next() {
                Some((variant, value)) => visitor.visit_enum(EnumDe { variant, value }),
                None => Err(de::Error::invalid_length(0, &"one variant")),
            },
            _ => Err(de::Error::invalid_type(self.unexpected(), &"a variant name or a one-entry map")),
        }
    }

    ::serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 char str string bytes byte_buf seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

/// A variant with content: `{variant: value}`.
struct EnumDe<'a> {
    variant: &'a str,
    value: &'a Value,
}

impl<'de> de::EnumAccess<'de> for EnumDe<'de> {
    type Error = DeError;
    type Variant = ValueDe<'de>;

    fn variant_seed<S: de::DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, ValueDe<'de>), DeError> {
        let variant = seed.deserialize(self.variant.into_deserializer())?;
        Ok((variant, ValueDe(self.value)))
    }
}

impl<'de> de::VariantAccess<'de> for ValueDe<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<S: de::DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, DeError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_any(visitor)
    }
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

    #[test]
    fn float_fields_take_integers_that_fit() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct T {
            celsius: f64,
            humidity: f32,
            count: u8,
        }
        let mut m = BTreeMap::new();
        for (k, x) in [("celsius", 21), ("humidity", 40), ("count", 3)] {
            m.insert(String::from(k), Value::Int(x));
        }
        let t: T = from_value(&Value::Map(m.clone())).unwrap();
        assert_eq!(t, T { celsius: 21.0, humidity: 40.0, count: 3 });
        assert_eq!(from_value::<f64>(&Value::Int(-7)).unwrap(), -7.0);
        // Not exactly representable: refused rather than rounded.
        assert!(from_value::<f64>(&Value::Int(i64::MAX - 1)).is_err());
        assert!(from_value::<f32>(&Value::Int(16_777_217)).is_err());
        assert!(from_value::<f32>(&Value::Float(0.1)).is_err());
        assert_eq!(from_value::<f32>(&Value::Float(0.5)).unwrap(), 0.5);
        // Integer fields still refuse floats.
        m.insert(String::from("count"), Value::Float(3.5));
        assert!(from_value::<T>(&Value::Map(m)).is_err());
        assert_eq!(from_value::<()>(&Value::Array(Vec::new())).unwrap(), ());
        assert_eq!(from_value::<Option<u8>>(&Value::Null).unwrap(), None);
    }
}
