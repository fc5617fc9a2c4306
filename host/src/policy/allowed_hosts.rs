//! Where an agent may connect: scheme-qualified host patterns (as Spin's
//! `allowed_outbound_hosts`), checked on the URL, and on the resolved addresses so that a
//! public name cannot lead into the host's own network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An agent's outbound destinations.
#[derive(Debug, Clone, Default)]
pub enum AllowedHosts {
    /// Anything, at any address: `tether run` and hosts without a manifest.
    #[default]
    All,
    /// Only these patterns; the empty list denies everything.
    Only(Vec<HostPattern>),
}

/// One allowed destination: `scheme://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// `http`, `https`, `mqtt`, `mqtts` or `*`.
    scheme: String,
    host: HostMatch,
    /// `None` means any port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    /// `*.example.com`: the stored suffix is `.example.com`.
    Suffix(String),
    Name(String),
    Ip(IpAddr),
}

/// An allowed-hosts entry that cannot be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid allowed host {pattern:?}: {reason}")]
pub struct PatternError {
    pattern: String,
    reason: &'static str,
}

/// What a permitted connection may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Any address: the destination was named explicitly (an IP literal or `localhost`),
    /// or the agent is unrestricted.
    Any,
    /// Only public addresses once the name is resolved.
    PublicOnly,
}

const SCHEMES: [&str; 5] = ["http", "https", "mqtt", "mqtts", "*"];

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        "mqtt" => Some(1883),
        "mqtts" => Some(8883),
        _ => None,
    }
}

impl HostPattern {
    /// Parses `scheme://host[:port]`: host `*`, `*.suffix`, a name, an IPv4 address or
    /// `[IPv6]`; port a number or `*`, the scheme's default when left out.
    pub fn parse(pattern: &str) -> Result<HostPattern, PatternError> {
        let err = |reason| PatternError { pattern: pattern.to_owned(), reason };
        let (scheme, rest) = pattern.split_once("://").ok_or_else(|| err("expected scheme://host[:port]"))?;
        let scheme = scheme.to_ascii_lowercase();
        if !SCHEMES.contains(&scheme.as_str()) {
            return Err(err("the scheme must be http, https, mqtt, mqtts or *"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(err("a path is not allowed"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !rest.starts_with('[') || h.ends_with(']') => (h, Some(p)),
            _ => (rest, None),
        };
        let port = match port {
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| err("the port must be a number or *"))?),
            None if scheme == "*" => None,
            None => default_port(&scheme),
        };
        let host = host.to_ascii_lowercase();
        let host = if host == "*" {
            HostMatch::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') {
                return Err(err("a wildcard covers whole labels only, as in *.example.com"));
            }
            HostMatch::Suffix(format!(".{suffix}"))
        } else if let Some(ip) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            HostMatch::Ip(ip.parse().map_err(|_| err("not an IPv6 address"))?)
        } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
            HostMatch::Ip(ip.into())
        } else if host.is_empty() || host.contains(['*', '[', ']', '@']) {
            return Err(err("not a host name"));
        } else {
            HostMatch::Name(host)
        };
        Ok(HostPattern { scheme, host, port })
    }

    fn matches(&self, scheme: &str, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Suffix(suffix) => host.ends_with(suffix.as_str()),
            HostMatch::Name(name) => host == name,
            HostMatch::Ip(allowed) => ip == Some(*allowed),
        };
        (self.scheme == "*" || self.scheme == scheme) && host_ok && self.port.is_none_or(|p| p == port)
    }

    /// Names a destination exactly, so its non-public addresses are meant.
    fn explicit(&self) -> bool {
        match &self.host {
            HostMatch::Ip(_) => true,
            HostMatch::Name(name) => name == "localhost",
            _ => false,
        }
    }
}

impl AllowedHosts {
    /// Parses a list of patterns (see [`HostPattern::parse`]).
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<AllowedHosts, PatternError> {
        patterns.iter().map(|p| HostPattern::parse(p.as_ref())).collect::<Result<_, _>>().map(AllowedHosts::Only)
    }

    /// Whether `scheme://host:port` may be reached (scheme as in the patterns: `http`,
    /// `https`, `mqtt`, `mqtts`), and at which addresses. `None`: not allowed.
    pub fn check(&self, scheme: &str, host: &str, port: u16) -> Option<Reach> {
        let patterns = match self {
            AllowedHosts::All => return Some(Reach::Any),
            AllowedHosts::Only(patterns) => patterns,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        let mut reach = None;
        for pattern in patterns.iter().filter(|p| p.matches(scheme, &host, ip, port)) {
            if pattern.explicit() {
                return Some(Reach::Any);
            }
            reach = Some(Reach::PublicOnly);
        }
        // An IP literal needs no resolving: check it here.
        match (reach, ip) {
            (Some(Reach::PublicOnly), Some(ip)) if !is_public(ip) => None,
            _ => reach,
        }
    }
}

/// Whether an address is on the public internet. Refused: the ranges of IANA's
/// special-purpose registries that are not globally reachable (loopback, private,
/// link-local with the cloud metadata service 169.254.169.254, shared, benchmarking,
/// reserved, documentation, IETF assignments, multicast, unspecified), all of IPv6 outside
/// global unicast 2000::/3, and Teredo. An IPv6 address that carries an IPv4 one (mapped,
/// compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) is judged by that IPv4 address.
///
/// Written here rather than taken from a crate: std's `is_global` is unstable, and the
/// crates that copy it are unmaintained and do not unwrap NAT64 or 6to4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b); // 100.64.0.0/10, carrier-grade NAT
    let ietf = a == 192 && b == 0 && c == 0; // 192.0.0.0/24
    let benchmarking = a == 198 && (b & 0xfe) == 18; // 198.18.0.0/15
    let relay = a == 192 && b == 88 && c == 99; // 192.88.99.0/24, the retired 6to4 relays
    let reserved = a >= 240; // 240.0.0.0/4 and the broadcast address
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_documentation()
        || shared
        || ietf
        || benchmarking
        || relay
        || reserved
        || a == 0)
}

/// The IPv4 address that `ip` stands for, if it is one of the forms that carry one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    match s {
        // ::ffff:a.b.c.d
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => v4(hi, lo),
        // ::a.b.c.d (deprecated "compatible"); :: and ::1 are IPv6's own.
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => v4(hi, lo),
        // 64:ff9b::a.b.c.d, the well-known NAT64 prefix
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        // 2002:aabb:ccdd::/48, 6to4
        [0x2002, hi, lo, ..] => v4(hi, lo),
        _ => None,
    }
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let global_unicast = s[0] & 0xe000 == 0x2000; // 2000::/3
    // 2001::/23: IETF protocol assignments, Teredo (2001::/32) among them; the few that
    // are globally reachable are not what an agent calls.
    let ietf = s[0] == 0x2001 && s[1] < 0x200;
    let documentation = (s[0] == 0x2001 && s[1] == 0xdb8) || (s[0] == 0x3fff && s[1] < 0x1000); // 2001:db8::/32, 3fff::/20
    let nat64_local = s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1; // 64:ff9b:1::/48
    global_unicast && !ietf && !documentation && !nat64_local
}

/// Marks the resolver's refusal, so that the HTTP backend reports `not-allowed` rather
/// than an unresolved host.
pub(crate) const DENIED_ADDRESS: &str = "resolves only to non-public addresses";

/// reqwest's resolver for agents limited to public addresses: drops every other address,
/// and fails when none is left.
pub(crate) struct PublicResolver;

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve_public(&name, 0).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Resolves `host` and keeps the public addresses; an error when there are none.
pub(crate) async fn resolve_public(host: &str, port: u16) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.filter(|a| is_public(a.ip())).collect();
    if addrs.is_empty() {
        return Err(format!("{host} {DENIED_ADDRESS}").into());
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_scheme_host_and_port() {
        let allowed = AllowedHosts::parse(&["https://*.azure-devices.net", "mqtts://localhost:8883", "http://127.0.0.1:*"]).unwrap();
        assert_eq!(allowed.check("https", "hub.azure-devices.net", 443), Some(Reach::PublicOnly));
        assert_eq!(allowed.check("https", "azure-devices.net", 443), None);
        assert_eq!(allowed.check("http", "hub.azure-devices.net", 443), None);
        assert_eq!(allowed.check("https", "hub.azure-devices.net", 8443), None);
        assert_eq!(allowed.check("mqtts", "localhost", 8883), Some(Reach::Any));
        assert_eq!(allowed.check("mqtt", "localhost", 8883), None);
        assert_eq!(allowed.check("http", "127.0.0.1", 1234), Some(Reach::Any));
        assert_eq!(AllowedHosts::parse::<&str>(&[]).unwrap().check("http", "example.com", 80), None);
    }

    #[test]
    fn wildcards_do_not_reach_private_ip_literals() {
        let allowed = AllowedHosts::parse(&["http://*:*"]).unwrap();
        assert_eq!(allowed.check("http", "169.254.169.254", 80), None);
        assert_eq!(allowed.check("http", "10.1.2.3", 80), None);
        assert_eq!(allowed.check("http", "[::1]", 80), None);
        assert_eq!(allowed.check("http", "93.184.216.34", 80), Some(Reach::PublicOnly));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["example.com", "ftp://x", "http://x/path", "http://x:port", "http://a*.b", "http://[::1"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_public_addresses() {
        let refused = [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "198.19.255.254",
            "192.88.99.1",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "100::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::169.254.169.254",
            "64:ff9b::7f00:1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2001::1",
            "2001:db8::1",
            "3fff::1",
        ];
        for ip in refused {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
