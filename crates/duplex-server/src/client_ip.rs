//! Who the client is, by address: the TCP peer, or, when the peer is a trusted reverse proxy
//! (`TRUSTED_PROXIES`), the address that proxy names in `X-Forwarded-For` or `Forwarded`
//! (`CLIENT_IP_HEADER`). Everything the server keys or logs per client uses this address:
//! the per-IP session cap, the connect rate limiter, anonymous users and the session logs.
//!
//! A header is believed only from a trusted peer, so a client that connects directly cannot
//! pick its address. Behind proxies the header is a list that each hop appends to; entries
//! left of the first hop the server trusts were written by the client and may be anything,
//! so the client is the right-most entry that is not itself a trusted proxy. An entry that is
//! not an address (`unknown`, an obfuscated `_name`) stops the walk: the client is then the
//! nearest trusted hop, which lumps such clients together rather than letting one choose.
//!
//! [`ClientKey`] is the unit of per-client limits: an IPv4 address, or an IPv6 /64, because
//! one user (one home, one phone) is normally given a whole /64 and can use any address in it.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use axum::http::HeaderMap;

use crate::config::{Cidr, ClientIpHeader};

/// Where the client address comes from (the `TRUSTED_PROXIES` and `CLIENT_IP_HEADER`
/// settings).
#[derive(Debug, Clone, Default)]
pub struct ClientIpSource {
    pub trusted: Vec<Cidr>,
    pub header: ClientIpHeader,
}

impl ClientIpSource {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client's address for a request from TCP peer `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let hops = match self.header {
            ClientIpHeader::XForwardedFor => forwarded_for(headers, "x-forwarded-for", |e| e),
            ClientIpHeader::Forwarded => forwarded_for(headers, "forwarded", for_param),
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.trusts(*ip) => client = *ip,
                Some(ip) => return *ip,
                None => return client,
            }
        }
        client
    }
}

/// The entries of every `name` header, in order (several header lines are one list), each
/// parsed as an address (`None` when it is not one).
fn forwarded_for(headers: &HeaderMap, name: &str, entry: fn(&str) -> &str) -> Vec<Option<IpAddr>> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(v) => v.split(',').map(|e| parse_node(entry(e))).collect(),
            // A header that is not ASCII is one bad entry.
            Err(_) => vec![None],
        })
        .collect()
}

/// The `for=` value of one RFC 7239 element (`for=192.0.2.60;proto=http;by=203.0.113.43`).
fn for_param(element: &str) -> &str {
    element
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
        .map_or("", |(_, v)| v)
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`, optionally in double quotes (RFC 7239 quotes IPv6 and ports).
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    // IPv4 with a port.
    let (ip, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The unit of per-client limits: an IPv4 address, or an IPv6 address's /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !(u128::MAX >> 64);
                ClientKey(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => ClientKey(v4),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}"),
            IpAddr::V6(ip) => write!(f, "{ip}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(trusted: &str, header: ClientIpHeader) -> ClientIpSource {
        ClientIpSource {
            trusted: trusted
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect(),
            header,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let xff = headers(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")]);
        for s in [
            source("", ClientIpHeader::XForwardedFor),
            source("10.0.0.0/8", ClientIpHeader::XForwardedFor),
            source("10.0.0.0/8", ClientIpHeader::Forwarded),
        ] {
            assert_eq!(s.client_ip(ip("203.0.113.7"), &xff), ip("203.0.113.7"));
        }
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let s = source("10.0.0.0/8", ClientIpHeader::XForwardedFor);
        let peer = ip("10.1.2.3");
        // The client's own entry (left) is ignored: the proxy appended the real peer.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.9")]);
        assert_eq!(s.client_ip(peer, &h), ip("198.51.100.9"));
        // Several proxies: trusted hops are skipped from the right.
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-for", "10.9.9.9"),
        ]);
        assert_eq!(s.client_ip(peer, &h), ip("198.51.100.9"));
        // No header: the proxy itself.
        assert_eq!(s.client_ip(peer, &HeaderMap::new()), peer);
        // Garbage where the client should be: the nearest trusted hop, not a guess.
        let h = headers(&[("x-forwarded-for", "198.51.100.9, unknown, 10.9.9.9")]);
        assert_eq!(s.client_ip(peer, &h), ip("10.9.9.9"));
        // Ports and IPv4-mapped addresses.
        let h = headers(&[("x-forwarded-for", "198.51.100.9:4711")]);
        assert_eq!(s.client_ip(peer, &h), ip("198.51.100.9"));
        assert_eq!(
            s.client_ip(
                ip("::ffff:10.1.2.3"),
                &headers(&[("x-forwarded-for", "::ffff:198.51.100.9")])
            ),
            ip("198.51.100.9")
        );
        // Only the configured header is read.
        let h = headers(&[("forwarded", "for=198.51.100.9")]);
        assert_eq!(s.client_ip(peer, &h), peer);
    }

    #[test]
    fn rfc7239_forwarded() {
        let s = source("10.0.0.0/8,fd00::/8", ClientIpHeader::Forwarded);
        let peer = ip("fd00::1");
        let h = headers(&[(
            "forwarded",
            r#"for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https;by=10.0.0.1, For=10.2.2.2"#,
        )]);
        assert_eq!(s.client_ip(peer, &h), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", "for=_hidden, for=10.2.2.2")]);
        assert_eq!(s.client_ip(peer, &h), ip("10.2.2.2"));
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        assert_eq!(s.client_ip(peer, &h), peer, "X-Forwarded-For is not read");
    }

    #[test]
    fn ipv6_clients_are_keyed_per_64() {
        let a = ClientKey::of(ip("2001:db8:1:2:aaaa::1"));
        let b = ClientKey::of(ip("2001:db8:1:2:ffff:1:2:3"));
        let c = ClientKey::of(ip("2001:db8:1:3::1"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let v4 = ClientKey::of(ip("::ffff:192.0.2.1"));
        assert_eq!(v4, ClientKey::of(ip("192.0.2.1")));
        assert_eq!(v4.to_string(), "192.0.2.1");
    }

    #[test]
    fn cidr_blocks() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.0.1")));
        assert!(c.contains(ip("::ffff:10.0.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let one: Cidr = "192.0.2.1".parse().unwrap();
        assert!(one.contains(ip("192.0.2.1")) && !one.contains(ip("192.0.2.2")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("1.2.3.4")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        for bad in ["10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
