//! `AzureIoTHub.ConnectionString`.

use std::collections::BTreeMap;

/// A parsed connection string: `HostName=...;DeviceId=...;SharedAccessKey=...` or
/// `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`.
///
/// Each `;`-separated pair is split at its first `=`, so base64 keys keep their padding.
/// (The 5.1.0 library split at every `=` and re-appended one, which broke keys ending in
/// `==`; this follows the documented meaning instead.)
///
/// ```
/// use tether_guest::azure_iot_hub::ConnectionString;
/// let cs = ConnectionString::parse("HostName=h.azure-devices.net;DeviceId=d1;SharedAccessKey=a2V5==");
/// assert_eq!(cs.host_name.as_deref(), Some("h.azure-devices.net"));
/// assert_eq!(cs.shared_access_key.as_deref(), Some("a2V5=="));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionString {
    /// `HostName`.
    pub host_name: Option<String>,
    /// `DeviceId`.
    pub device_id: Option<String>,
    /// `SharedAccessKeyName` (policies).
    pub shared_access_key_name: Option<String>,
    /// `SharedAccessKey`, base64.
    pub shared_access_key: Option<String>,
    /// Every pair, including the ones above.
    pub all: BTreeMap<String, String>,
}

impl ConnectionString {
    /// Parses a connection string (imp: `ConnectionString.Parse`). Never fails: missing
    /// parts are `None`, and pairs without `=` are ignored.
    pub fn parse(s: &str) -> ConnectionString {
        let mut all = BTreeMap::new();
        for pair in s.trim().split(';') {
            if let Some((k, v)) = pair.split_once('=') {
                let k = k.trim();
                if !k.is_empty() {
                    all.insert(k.to_owned(), v.trim().to_owned());
                }
            }
        }
        let get = |k: &str| all.get(k).filter(|v| !v.is_empty()).cloned();
        ConnectionString {
            host_name: get("HostName"),
            device_id: get("DeviceId"),
            shared_access_key_name: get("SharedAccessKeyName"),
            shared_access_key: get("SharedAccessKey"),
            all,
        }
    }
}
