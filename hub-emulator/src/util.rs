//! Small helpers shared by every part of the emulator: time stamps, random keys and ids,
//! percent-encoding as IoT Hub uses it, poison-tolerant locking.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Characters left as-is when IoT Hub (and Python's `urllib.parse.quote(safe='')`)
/// percent-encode a property-bag key or value.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(crate) fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Percent-decodes one property-bag component. `None` when the result is not UTF-8.
pub(crate) fn decode_component(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Splits `a=1&b&c=` into decoded pairs; a key without `=` has value `None`
/// (IoT Hub's encoding of a null property).
pub(crate) fn parse_query(q: &str) -> Option<Vec<(String, Option<String>)>> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Some((decode_component(k)?, Some(decode_component(v)?))),
            None => Some((decode_component(p)?, None)),
        })
        .collect()
}

/// Seconds since the Unix epoch of a wall-clock time (0 before 1970).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// ISO 8601 UTC with 7 fractional digits, the way IoT Hub prints .NET `DateTime`s
/// (`2021-05-12T08:48:08.7205939Z`).
pub(crate) fn iso8601(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:07}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_nanos() / 100
    )
}

/// The .NET "null" date IoT Hub prints for times that never happened.
pub(crate) const NULL_DATE: &str = "0001-01-01T00:00:00Z";

/// Howard Hinnant's days-to-civil conversion (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Cryptographically random bytes from the TLS provider (no extra RNG dependency).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // aws-lc-rs's RNG only fails if the OS RNG is broken; fall back to time-derived
    // bytes rather than panicking, ids stay unique enough for an emulator.
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut buf)
        .is_err()
    {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    buf
}

/// A new symmetric key as IoT Hub generates them: 32 random bytes, base64 (44 chars).
pub(crate) fn new_key() -> String {
    B64.encode(random_bytes::<32>())
}

/// A random RFC 4122 version-4 UUID string.
pub(crate) fn new_uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

pub(crate) fn b64(data: &[u8]) -> String {
    B64.encode(data)
}

pub(crate) fn b64_decode(s: &str) -> Option<Vec<u8>> {
    B64.decode(s).ok()
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the state is
/// always left consistent between statements, and one bad task must not stop the hub.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Deterministic pseudo-random inputs for the garbage-input tests of the parsers.
#[cfg(test)]
pub(crate) fn garbage(
    seed: u64,
    count: usize,
    max_len: usize,
    alphabet: &[u8],
) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut x = seed.max(1);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count).map(move |_| {
        let len = (next() as usize) % (max_len + 1);
        (0..len)
            .map(|_| alphabet[(next() as usize) % alphabet.len()])
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_formats_like_dotnet() {
        let t = UNIX_EPOCH + Duration::new(1_620_809_288, 720_593_900);
        assert_eq!(iso8601(t), "2021-05-12T08:48:08.7205939Z");
    }

    #[test]
    fn query_parsing_keeps_null_and_empty() {
        let q = parse_query("prop1&prop2=&prop3=a%20string").unwrap();
        assert_eq!(q[0], ("prop1".into(), None));
        assert_eq!(q[1], ("prop2".into(), Some(String::new())));
        assert_eq!(q[2], ("prop3".into(), Some("a string".into())));
        assert!(parse_query("bad=%ff").is_none());
    }

    #[test]
    fn uuid_shape() {
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
