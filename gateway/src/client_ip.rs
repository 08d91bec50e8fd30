//! The client's address behind load balancers: `X-Forwarded-For` or `Forwarded` is read
//! only when the TCP peer is a trusted proxy, and then walked from the right, skipping
//! trusted proxies, so that the first untrusted hop (the one a trusted proxy saw) is the
//! client. A header from anyone else is never believed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use http::HeaderMap;
use serde::Deserialize;

/// An IP network, `10.0.0.0/8` or `2001:db8::/32` (a plain address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("not an IP network: {s:?}"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) as IPv4; anything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Which header carries the client chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// Resolves client addresses.
#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    pub trusted: Vec<Cidr>,
    pub header: ForwardedHeader,
}

impl ClientIpResolver {
    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client's address for a request from TCP peer `peer`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return peer;
        }
        let hops: Vec<Option<IpAddr>> = match self.header {
            ForwardedHeader::XForwardedFor => headers
                .get_all("x-forwarded-for")
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("").split(',').map(str::to_string).collect::<Vec<_>>())
                .map(|h| parse_hop(&h))
                .collect(),
            ForwardedHeader::Forwarded => headers
                .get_all("forwarded")
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("").split(',').map(str::to_string).collect::<Vec<_>>())
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                        .and_then(|(_, v)| parse_hop(v))
                })
                .collect(),
        };
        // Walk from the proxy nearest to us outwards.
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) => {
                    client = canonical(*ip);
                    if !self.is_trusted(client) {
                        break;
                    }
                }
                // An unparsable hop: stop at the last address a trusted proxy vouched for.
                None => break,
            }
        }
        client
    }
}

/// One hop of either header: `1.2.3.4`, `1.2.3.4:5678`, `[2001:db8::1]:80`, `2001:db8::1`,
/// `"[2001:db8::1]"` (quoted, as `Forwarded` writes IPv6).
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if s.is_empty() {
        return None;
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        return rest[..end].parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The key a per-address limit counts under: an IPv4 address, or the /64 an IPv6 address
/// is in (one host usually holds a whole /64, so counting single IPv6 addresses would
/// let it sidestep any limit).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.2.3")) && !c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.9.9")));
        let c: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c.contains(ip("2001:db8:1::1")) && !c.contains(ip("2001:db9::1")));
        assert!(!c.contains(ip("10.1.2.3")));
        let c: Cidr = "127.0.0.1".parse().unwrap();
        assert!(c.contains(ip("127.0.0.1")) && !c.contains(ip("127.0.0.2")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0/8", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn header_is_ignored_from_untrusted_peers() {
        let r = ClientIpResolver {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            header: ForwardedHeader::XForwardedFor,
        };
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(r.resolve(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        assert_eq!(ClientIpResolver::default().resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn x_forwarded_for_from_the_right() {
        let r = ClientIpResolver {
            trusted: vec!["10.0.0.0/8".parse().unwrap(), "192.168.0.0/16".parse().unwrap()],
            header: ForwardedHeader::XForwardedFor,
        };
        let peer = ip("10.0.0.1");
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["1.2.3.4"])), ip("1.2.3.4"));
        // The client spoofed a first entry; the trusted proxy appended the real one.
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["6.6.6.6, 1.2.3.4"])), ip("1.2.3.4"));
        // Two trusted proxies.
        assert_eq!(
            r.resolve(peer, &headers("x-forwarded-for", &["6.6.6.6, 1.2.3.4, 192.168.1.1"])),
            ip("1.2.3.4")
        );
        // Split over several header lines.
        assert_eq!(
            r.resolve(peer, &headers("x-forwarded-for", &["6.6.6.6", "1.2.3.4, 192.168.1.1"])),
            ip("1.2.3.4")
        );
        // With ports, IPv6.
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["1.2.3.4:5555"])), ip("1.2.3.4"));
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["[2001:db8::7]:443"])), ip("2001:db8::7"));
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["2001:db8::7"])), ip("2001:db8::7"));
        // Garbage right after the proxy: the proxy is what we know.
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["1.2.3.4, garbage"])), peer);
        // Only trusted hops: the leftmost.
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["10.9.9.9"])), ip("10.9.9.9"));
        // No header: the peer.
        assert_eq!(r.resolve(peer, &HeaderMap::new()), peer);
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &[""])), peer);
        // The other header is not read.
        assert_eq!(r.resolve(peer, &headers("forwarded", &["for=1.2.3.4"])), peer);
    }

    #[test]
    fn forwarded_header() {
        let r = ClientIpResolver {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            header: ForwardedHeader::Forwarded,
        };
        let peer = ip("10.0.0.1");
        assert_eq!(r.resolve(peer, &headers("forwarded", &["for=1.2.3.4;proto=https"])), ip("1.2.3.4"));
        assert_eq!(
            r.resolve(peer, &headers("forwarded", &["for=6.6.6.6, For=\"[2001:db8::1]:80\""])),
            ip("2001:db8::1")
        );
        assert_eq!(r.resolve(peer, &headers("forwarded", &["for=_hidden"])), peer);
        assert_eq!(r.resolve(peer, &headers("x-forwarded-for", &["1.2.3.4"])), peer);
    }

    #[test]
    fn limit_keys() {
        assert_eq!(limit_key(ip("1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(limit_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(limit_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }
}
