//! Device twin documents: patch/replace semantics, `$version`s, `$metadata` and the
//! limits IoT Hub enforces (protocol notes §1.8, §1.9).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

const MAX_SECTION_BYTES: usize = 32 * 1024;
const MAX_TAGS_BYTES: usize = 8 * 1024;
/// "All JSON objects in tags, desired, and reported properties can have a maximum depth of
/// 10": Azure's own valid example nests ten objects under `tags`, so the section root is
/// depth 0 and the tenth nested object (with leaves in it) is depth 10.
const MAX_DEPTH: usize = 10;
const MAX_KEY_BYTES: usize = 1024;
const MAX_STRING_BYTES: usize = 4 * 1024;
const MAX_SAFE_INT: i64 = 4_503_599_627_370_495;
const MIN_SAFE_INT: i64 = -4_503_599_627_370_496;

/// Why a twin update was refused (400 on the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("twin patch must be a JSON object")]
    NotAnObject,
    #[error("invalid property name '{0}'")]
    InvalidKey(String),
    #[error("twin nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("string value longer than {MAX_STRING_BYTES} bytes")]
    StringTooLong,
    #[error("integer value out of range")]
    IntegerOutOfRange,
    #[error("{0} would exceed its size limit")]
    TooLarge(&'static str),
}

/// One section (`desired` or `reported`) with its version and metadata tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Section {
    pub values: Map<String, Value>,
    pub metadata: Map<String, Value>,
    pub version: u64,
}

impl Section {
    fn new(now: &str) -> Self {
        let mut metadata = Map::new();
        metadata.insert("$lastUpdated".into(), now.into());
        Section {
            values: Map::new(),
            metadata,
            version: 1,
        }
    }

    /// `{..values, "$version": v}`: what a device sees (no `$metadata` over MQTT).
    pub fn device_view(&self) -> Value {
        let mut v = self.values.clone();
        v.insert("$version".into(), self.version.into());
        Value::Object(v)
    }

    /// `{..values, "$metadata": .., "$version": v}`: what the service REST API returns.
    fn service_view(&self) -> Value {
        let mut v = self.values.clone();
        v.insert("$metadata".into(), Value::Object(self.metadata.clone()));
        v.insert("$version".into(), self.version.into());
        Value::Object(v)
    }

    /// Validates and merges `patch`; returns the new version. With `replace`, the section
    /// is rebuilt from `patch` alone (twin PUT).
    fn apply(
        &mut self,
        patch: &Map<String, Value>,
        replace: bool,
        now: &str,
        name: &'static str,
        desired: bool,
    ) -> Result<u64, TwinError> {
        validate_map(patch, 0)?;
        let mut values = if replace {
            Map::new()
        } else {
            self.values.clone()
        };
        let mut metadata = if replace {
            Map::new()
        } else {
            self.metadata.clone()
        };
        let version = self.version + 1;
        merge(
            &mut values,
            &mut metadata,
            patch,
            now,
            desired.then_some(version),
        );
        metadata.insert("$lastUpdated".into(), now.into());
        if desired {
            metadata.insert("$lastUpdatedVersion".into(), version.into());
        }
        if Value::Object(values.clone()).to_string().len() > MAX_SECTION_BYTES {
            return Err(TwinError::TooLarge(name));
        }
        self.values = values;
        self.metadata = metadata;
        self.version = version;
        Ok(version)
    }
}

/// A device's twin: tags plus desired and reported properties.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Twin {
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
    /// Top-level `version`: bumped by every change.
    pub version: u64,
    /// Whole-twin etag counter (the etag is its 8-byte big-endian base64).
    pub etag: u64,
}

impl Twin {
    pub fn new(now: &str) -> Self {
        Twin {
            tags: Map::new(),
            desired: Section::new(now),
            reported: Section::new(now),
            version: 1,
            etag: 1,
        }
    }

    pub fn etag(&self) -> String {
        crate::util::b64(&self.etag.to_be_bytes())
    }

    fn touch(&mut self) {
        self.version += 1;
        self.etag += 1;
    }

    /// Device-side GET body (`$iothub/twin/res/200`).
    pub fn device_view(&self) -> Value {
        json!({ "desired": self.desired.device_view(), "reported": self.reported.device_view() })
    }

    /// The `properties` member of the service-side twin JSON, plus tags when present.
    pub fn service_members(&self) -> Map<String, Value> {
        let mut m = Map::new();
        if !self.tags.is_empty() {
            m.insert("tags".into(), Value::Object(self.tags.clone()));
        }
        m.insert("version".into(), self.version.into());
        m.insert(
            "properties".into(),
            json!({ "desired": self.desired.service_view(), "reported": self.reported.service_view() }),
        );
        m
    }

    /// A reported-properties patch from the device; returns the new reported `$version`.
    pub fn patch_reported(&mut self, patch: &Value, now: &str) -> Result<u64, TwinError> {
        let patch = patch.as_object().ok_or(TwinError::NotAnObject)?;
        let v = self
            .reported
            .apply(patch, false, now, "reported properties", false)?;
        self.touch();
        Ok(v)
    }

    /// Service-side update (PATCH merges, PUT replaces) of tags and desired properties.
    /// Returns the desired notification to send the device, if desired changed.
    pub fn service_update(
        &mut self,
        body: &Value,
        replace: bool,
        now: &str,
    ) -> Result<Option<Value>, ServiceTwinError> {
        let body = body
            .as_object()
            .ok_or(ServiceTwinError::Twin(TwinError::NotAnObject))?;
        let tags = match body.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Object(t)) => Some(t),
            Some(_) => return Err(ServiceTwinError::Twin(TwinError::NotAnObject)),
        };
        let props = match body.get("properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return Err(ServiceTwinError::Twin(TwinError::NotAnObject)),
        };
        if props.is_some_and(|p| p.get("reported").is_some_and(|r| !r.is_null())) {
            return Err(ServiceTwinError::ReportedIsReadOnly);
        }
        let desired = match props.and_then(|p| p.get("desired")) {
            None => None,
            // `{"properties":{"desired":null}}` clears all desired properties.
            Some(Value::Null) => Some(Map::new()),
            Some(Value::Object(d)) => Some(without_dollar_members(d)),
            Some(_) => return Err(ServiceTwinError::Twin(TwinError::NotAnObject)),
        };
        let clear_desired = matches!(props.and_then(|p| p.get("desired")), Some(Value::Null));

        let mut next = self.clone();
        if let Some(tags) = tags.map(without_dollar_members) {
            validate_map(&tags, 0)?;
            let mut meta = Map::new();
            let base = if replace {
                Map::new()
            } else {
                next.tags.clone()
            };
            let mut merged = base;
            merge(&mut merged, &mut meta, &tags, now, None);
            if Value::Object(merged.clone()).to_string().len() > MAX_TAGS_BYTES {
                return Err(TwinError::TooLarge("tags").into());
            }
            next.tags = merged;
        } else if replace {
            next.tags = Map::new();
        }
        let notification = match desired {
            Some(d) => {
                let v = next.desired.apply(
                    &d,
                    replace || clear_desired,
                    now,
                    "desired properties",
                    true,
                )?;
                let mut n = if replace || clear_desired {
                    next.desired.values.clone()
                } else {
                    d
                };
                n.insert("$version".into(), v.into());
                Some(Value::Object(n))
            }
            None if replace => {
                let v = next
                    .desired
                    .apply(&Map::new(), true, now, "desired properties", true)?;
                Some(json!({ "$version": v }))
            }
            None => None,
        };
        next.touch();
        *self = next;
        Ok(notification)
    }
}

/// Errors of service-side twin updates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceTwinError {
    #[error(transparent)]
    Twin(#[from] TwinError),
    #[error("reported properties are read-only for the service")]
    ReportedIsReadOnly,
}

/// Drops `$metadata`/`$version` a client may echo back from a GET before a PUT.
fn without_dollar_members(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn validate_map(m: &Map<String, Value>, depth: usize) -> Result<(), TwinError> {
    if depth > MAX_DEPTH {
        return Err(TwinError::TooDeep);
    }
    for (k, v) in m {
        let bad = k.is_empty()
            || k.len() > MAX_KEY_BYTES
            || k.starts_with('$')
            || k.chars().any(|c| c == '.' || c == ' ' || c.is_control());
        if bad {
            return Err(TwinError::InvalidKey(k.clone()));
        }
        validate_value(v, depth)?;
    }
    Ok(())
}

fn validate_value(v: &Value, depth: usize) -> Result<(), TwinError> {
    match v {
        Value::Object(m) => validate_map(m, depth + 1),
        Value::Array(a) => {
            if depth + 1 > MAX_DEPTH {
                return Err(TwinError::TooDeep);
            }
            a.iter().try_for_each(|x| validate_value(x, depth + 1))
        }
        Value::String(s) if s.len() > MAX_STRING_BYTES => Err(TwinError::StringTooLong),
        Value::Number(n)
            if n.as_i64()
                .is_some_and(|i| !(MIN_SAFE_INT..=MAX_SAFE_INT).contains(&i))
                || n.as_u64().is_some_and(|u| u > MAX_SAFE_INT as u64) =>
        {
            Err(TwinError::IntegerOutOfRange)
        }
        _ => Ok(()),
    }
}

/// JSON merge patch with IoT Hub's metadata: `null` deletes, objects merge recursively
/// (a missing parent becomes `{}`), everything else replaces.
fn merge(
    target: &mut Map<String, Value>,
    meta: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    now: &str,
    version: Option<u64>,
) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
                meta.remove(k);
            }
            Value::Object(child) => {
                if !target.get(k).is_some_and(Value::is_object) {
                    target.insert(k.clone(), Value::Object(Map::new()));
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                if !meta.get(k).is_some_and(Value::is_object) {
                    meta.insert(k.clone(), Value::Object(Map::new()));
                }
                if let (Some(Value::Object(t)), Some(Value::Object(m))) =
                    (target.get_mut(k), meta.get_mut(k))
                {
                    merge(t, m, child, now, version);
                    stamp(m, now, version);
                }
            }
            leaf => {
                target.insert(k.clone(), leaf.clone());
                let mut m = Map::new();
                stamp(&mut m, now, version);
                meta.insert(k.clone(), Value::Object(m));
            }
        }
    }
}

fn stamp(m: &mut Map<String, Value>, now: &str, version: Option<u64>) {
    m.insert("$lastUpdated".into(), now.into());
    if let Some(v) = version {
        m.insert("$lastUpdatedVersion".into(), v.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_patch_merges_and_deletes() {
        let mut t = Twin::new("t0");
        assert_eq!(
            t.patch_reported(&json!({"a": 1, "b": {"c": 2}}), "t1")
                .unwrap(),
            2
        );
        assert_eq!(
            t.patch_reported(&json!({"a": null, "b": {"d": 3}}), "t2")
                .unwrap(),
            3
        );
        assert_eq!(
            t.device_view()["reported"],
            json!({"b": {"c": 2, "d": 3}, "$version": 3})
        );
        // A null under a missing parent leaves the parent as {} (C# e2e behaviour).
        t.patch_reported(&json!({"p1": {"p2": null}}), "t3")
            .unwrap();
        assert_eq!(t.reported.values["p1"], json!({}));
    }

    #[test]
    fn invalid_keys_are_rejected_and_nothing_stored() {
        let mut t = Twin::new("t0");
        for bad in [
            json!({"$x": 1}),
            json!({"a.b": 1}),
            json!({"a b": 1}),
            json!([1]),
            json!({"a": "x".repeat(5000)}),
        ] {
            assert!(t.patch_reported(&bad, "t1").is_err(), "{bad}");
        }
        assert_eq!(t.reported.version, 1);
    }

    /// `levels` objects nested under the section root, with a leaf in the innermost.
    fn nested(levels: usize) -> Value {
        let mut v = json!({ "property": "value" });
        for i in (1..levels).rev() {
            v = json!({ format!("l{i}"): v });
        }
        json!({ "l0": v })
    }

    #[test]
    fn depth_ten_is_accepted_and_eleven_refused() {
        // Azure's documented valid example: ten nested objects, a leaf in the tenth.
        let mut t = Twin::new("t0");
        assert_eq!(t.patch_reported(&nested(10), "t1"), Ok(2));
        assert_eq!(t.patch_reported(&nested(11), "t2"), Err(TwinError::TooDeep));
        let tags = |n| json!({ "tags": nested(n) });
        assert!(t.service_update(&tags(10), false, "t3").is_ok());
        assert_eq!(
            t.service_update(&tags(11), false, "t4"),
            Err(ServiceTwinError::Twin(TwinError::TooDeep))
        );
        let desired = |n| json!({ "properties": { "desired": nested(n) } });
        assert!(t.service_update(&desired(10), false, "t5").is_ok());
        assert_eq!(
            t.service_update(&desired(11), false, "t6"),
            Err(ServiceTwinError::Twin(TwinError::TooDeep))
        );
        // An array is a level too: ten objects plus an array around the leaf is eleven.
        let mut arr = nested(10);
        let mut inner = &mut arr;
        for i in 0..10 {
            inner = &mut inner[format!("l{i}")];
        }
        inner["property"] = json!(["value"]);
        assert_eq!(t.patch_reported(&arr, "t7"), Err(TwinError::TooDeep));
    }

    #[test]
    fn desired_patch_and_replace_notifications() {
        let mut t = Twin::new("t0");
        let n = t
            .service_update(&json!({"properties": {"desired": {"x": 1}}}), false, "t1")
            .unwrap();
        assert_eq!(n, Some(json!({"x": 1, "$version": 2})));
        let n = t
            .service_update(
                &json!({"tags": {"site": "a"}, "properties": {"desired": {"y": 2}}}),
                true,
                "t2",
            )
            .unwrap();
        assert_eq!(n, Some(json!({"y": 2, "$version": 3})));
        assert_eq!(t.tags["site"], "a");
        assert!(
            t.service_update(&json!({"properties": {"reported": {"z": 1}}}), false, "t3")
                .is_err()
        );
        let n = t
            .service_update(&json!({"properties": {"desired": null}}), false, "t4")
            .unwrap();
        assert_eq!(n, Some(json!({"$version": 4})));
        assert_eq!(t.etag(), crate::util::b64(&4u64.to_be_bytes()));
    }
}
