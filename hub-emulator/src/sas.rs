//! Shared access signatures as IoT Hub and DPS check them (protocol notes §1.3, §3.2).
//!
//! The HMAC is computed over `sr` exactly as received: SDKs disagree on percent-encoding
//! case (`%2f` vs `%2F`), so re-encoding would reject valid tokens.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::util::{b64, b64_decode, encode_component};

type HmacSha256 = Hmac<Sha256>;

/// A parsed `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`.
#[derive(Debug, Clone)]
pub struct SasToken {
    sr_raw: String,
    se_raw: String,
    sig: Vec<u8>,
    /// `sr` percent-decoded and lower-cased, for the resource comparison.
    pub resource: String,
    pub expiry: u64,
    pub key_name: Option<String>,
}

/// Why a token was refused. Every variant maps to CONNACK 5 / HTTP 401 on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("not a SharedAccessSignature")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("signature mismatch")]
    BadSignature,
    #[error("token is not valid for this resource")]
    WrongResource,
    #[error("unknown key name")]
    UnknownKeyName,
    #[error("key lacks the required permission")]
    Forbidden,
    #[error("device unknown or disabled")]
    UnknownDevice,
}

impl SasToken {
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let body = token
            .trim()
            .strip_prefix("SharedAccessSignature ")
            .ok_or(SasError::Malformed)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in body.split('&') {
            let (k, v) = pair.split_once('=').ok_or(SasError::Malformed)?;
            let slot = match k {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => return Err(SasError::Malformed),
            };
            if slot.replace(v.to_string()).is_some() {
                return Err(SasError::Malformed);
            }
        }
        let (sr_raw, sig, se_raw) = (
            sr.ok_or(SasError::Malformed)?,
            sig.ok_or(SasError::Malformed)?,
            se.ok_or(SasError::Malformed)?,
        );
        let sig = crate::util::decode_component(&sig)
            .and_then(|s| b64_decode(&s))
            .ok_or(SasError::Malformed)?;
        let resource = crate::util::decode_component(&sr_raw)
            .ok_or(SasError::Malformed)?
            .to_lowercase();
        let expiry = se_raw.parse().map_err(|_| SasError::Malformed)?;
        let key_name = skn
            .map(|s| crate::util::decode_component(&s).ok_or(SasError::Malformed))
            .transpose()?;
        Ok(SasToken {
            sr_raw,
            se_raw,
            sig,
            resource,
            expiry,
            key_name,
        })
    }

    /// True when `key_b64` produced this signature.
    pub fn signed_with(&self, key_b64: &str) -> bool {
        let Some(key) = b64_decode(key_b64) else {
            return false;
        };
        let Ok(mut mac) = HmacSha256::new_from_slice(&key) else {
            return false;
        };
        mac.update(self.sr_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.se_raw.as_bytes());
        mac.verify_slice(&self.sig).is_ok()
    }

    /// Checks signature against any of `keys` (primary, secondary) and expiry against `now`.
    pub fn verify(&self, keys: &[&str], now: u64) -> Result<(), SasError> {
        if !keys.iter().any(|k| self.signed_with(k)) {
            return Err(SasError::BadSignature);
        }
        if self.expiry <= now {
            return Err(SasError::Expired);
        }
        Ok(())
    }

    /// Whether the token's resource is a segment-wise, case-insensitive prefix of
    /// `host_aliases[any]/target_path`. The host may carry a `:port`.
    pub fn covers(&self, host_aliases: &[String], target_path: &[&str]) -> bool {
        let mut segs = self.resource.trim_end_matches('/').split('/');
        let Some(host) = segs.next() else {
            return false;
        };
        let host = host.split_once(':').map_or(host, |(h, _)| h);
        if !host_aliases.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return false;
        }
        self.covers_path(segs, target_path)
    }

    /// Whether the token's resource is a segment-wise prefix of `target_path`, with no
    /// host part (DPS: `{scope}/registrations/{id}`).
    pub fn covers_hostless(&self, target_path: &[&str]) -> bool {
        self.covers_path(self.resource.trim_end_matches('/').split('/'), target_path)
    }

    fn covers_path<'a>(&self, segs: impl Iterator<Item = &'a str>, target: &[&str]) -> bool {
        let mut n = 0;
        for seg in segs {
            match target.get(n) {
                Some(t) if t.eq_ignore_ascii_case(seg) => n += 1,
                _ => return false,
            }
        }
        true
    }
}

/// Builds a SAS token the way the Python device SDK does (`sr` percent-encoded with
/// upper-case hex, `skn` appended when a policy name is given).
pub fn generate_sas_token(
    resource: &str,
    key_b64: &str,
    key_name: Option<&str>,
    expiry: u64,
) -> Option<String> {
    let sr = encode_component(resource);
    let mut mac = HmacSha256::new_from_slice(&b64_decode(key_b64)?).ok()?;
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = encode_component(&b64(&mac.finalize().into_bytes()));
    let mut token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encode_component(name));
    }
    Some(token)
}

/// The per-device key of a DPS group enrollment: base64(HMAC-SHA256(groupKey, regId)).
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Option<String> {
    let mut mac = HmacSha256::new_from_slice(&b64_decode(group_key_b64)?).ok()?;
    mac.update(registration_id.as_bytes());
    Some(b64(&mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";

    #[test]
    fn roundtrip_and_prefix_rules() {
        let t = generate_sas_token("Hub.example/devices/Dev1", KEY, None, 2_000_000_000).unwrap();
        let t = SasToken::parse(&t).unwrap();
        assert!(t.verify(&["AAAA", KEY], 1).is_ok());
        assert_eq!(t.verify(&[KEY], 2_000_000_000), Err(SasError::Expired));
        let hosts = vec!["hub.example".to_string()];
        assert!(t.covers(&hosts, &["devices", "dev1"]));
        assert!(t.covers(&hosts, &["devices", "dev1", "messages", "events"]));
        assert!(!t.covers(&hosts, &["devices", "dev10"]));
        assert!(!t.covers(&["other".to_string()], &["devices", "dev1"]));
    }

    #[test]
    fn signature_uses_sr_as_received() {
        // Lower-case escapes as the C SDK sends them: the HMAC covers them verbatim.
        let sr = "hub%2fdevices%2fd";
        let mut mac = HmacSha256::new_from_slice(&b64_decode(KEY).unwrap()).unwrap();
        mac.update(format!("{sr}\n99").as_bytes());
        let sig = encode_component(&b64(&mac.finalize().into_bytes()));
        let t = SasToken::parse(&format!("SharedAccessSignature sig={sig}&se=99&sr={sr}")).unwrap();
        assert!(t.signed_with(KEY));
        assert_eq!(t.resource, "hub/devices/d");
    }

    #[test]
    fn malformed_tokens() {
        for bad in [
            "",
            "SharedAccessSignature ",
            "SharedAccessSignature sr=a&sig=%%&se=1",
            "SharedAccessSignature sr=a&sig=AA==&se=x",
            "Bearer x",
            "SharedAccessSignature sr=a&sr=b&sig=AA==&se=1",
        ] {
            assert!(SasToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_tokens_never_panic() {
        let alphabet = b"SharedAccessSignature sr=sig=se=skn=&%2F%%AQ==19\xff";
        for input in crate::util::garbage(11, 20_000, 80, alphabet) {
            let s = String::from_utf8_lossy(&input);
            if let Ok(t) = SasToken::parse(&format!("SharedAccessSignature {s}")) {
                let _ = t.verify(&[KEY, "%%%"], 0);
                let _ = t.covers(&["h".to_string()], &["devices", "d"]);
            }
        }
    }

    #[test]
    fn group_key_derivation_matches_openssl() {
        // echo -n dev-1 | openssl sha256 -mac HMAC -macopt hexkey:$(echo KEY | base64 -d | xxd -p -c 256) -binary | base64
        assert_eq!(
            derive_device_key(KEY, "dev-1").unwrap(),
            "CGu1Zghk4iprOdpahhLnKZReG2oJA6GBaFojdp/bsIA="
        );
    }
}
