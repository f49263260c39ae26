//! Who sent a request: the client's address and the scheme it used. They are the connection's
//! own, unless the connection comes from a trusted proxy (`trusted_proxies`): then the client
//! is the rightmost address of `Forwarded` or `X-Forwarded-For` that is not a trusted proxy,
//! and the scheme is `X-Forwarded-Proto`'s. From anyone else those headers are ignored. Decides
//! nothing itself: the rate limits, the operator's pages and the logs use what it finds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, App};
use crate::config::TrustedProxies;

/// The headers by which a proxy tells whom it forwards. A request carrying any of them came
/// through a proxy, whoever connected: it is never local.
const FORWARDING: [&str; 3] = ["forwarded", "x-forwarded-for", "x-real-ip"];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client of one request, found once by [`identify`] and taken by handlers as an extractor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr {
    ip: IpAddr,
    https: bool,
    forwarded: bool,
}

impl ClientAddr {
    /// The client of a request that arrived from `peer` over a connection that is HTTPS or
    /// not, with `headers`.
    pub fn of(peer: IpAddr, https: bool, headers: &HeaderMap, trusted: &TrustedProxies) -> ClientAddr {
        let peer = peer.to_canonical();
        let forwarded = FORWARDING.iter().any(|name| headers.contains_key(*name));
        if !trusted.contains(peer) {
            return ClientAddr { ip: peer, https, forwarded };
        }
        let by_xff = headers
            .contains_key(X_FORWARDED_FOR)
            .then(|| rightmost_untrusted(peer, x_forwarded_for(headers), trusted));
        let by_forwarded = headers
            .contains_key(axum::http::header::FORWARDED)
            .then(|| rightmost_untrusted(peer, forwarded_for(headers), trusted));
        let ip = match (by_xff, by_forwarded) {
            (Some(a), Some(b)) if a != b => {
                // One of the two came from the client, through the proxy; which cannot be told.
                tracing::debug!(%peer, x_forwarded_for = %a, forwarded = %b, "forwarding headers disagree");
                peer
            }
            (Some(ip), _) | (None, Some(ip)) => ip,
            (None, None) => peer,
        };
        ClientAddr { ip, https: forwarded_https(headers).unwrap_or(https), forwarded }
    }

    /// The address the rate limits charge and the logs name.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// `https` or `http`: what the client used to reach the hub or its proxy.
    pub fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// Whether the request names a client forwarded by a proxy (`Forwarded`,
    /// `X-Forwarded-For`, `X-Real-IP`), trusted or not.
    pub fn forwarded(&self) -> bool {
        self.forwarded
    }

    /// A caller on the hub's own machine: from loopback, and through no proxy.
    pub fn is_local(&self) -> bool {
        !self.forwarded && self.ip.is_loopback()
    }
}

/// One hop of a forwarding header, as its proxy wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Addr(IpAddr),
    /// `unknown`, an obfuscated name (`_hidden`), or an element without `for`: the proxy that
    /// wrote it did not say.
    Hidden,
    /// Not an address, nor anything else the header allows.
    Malformed,
}

/// Walks the hops from the right, starting at `peer`: each hop was written by the proxy at the
/// address found so far, so it is believed only while that address is a trusted proxy. The
/// first address that is not one is the client. A hop that names no address stops the walk at
/// the last trusted proxy, which then stands for the client.
fn rightmost_untrusted(peer: IpAddr, hops: Vec<Hop>, trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        if !trusted.contains(client) {
            break;
        }
        match hop {
            Hop::Addr(ip) => client = ip.to_canonical(),
            Hop::Hidden | Hop::Malformed => {
                tracing::debug!(%peer, %client, ?hop, "the forwarded chain names no address here");
                break;
            }
        }
    }
    client
}

/// Every `X-Forwarded-For` header's addresses, in order: `203.0.113.7, 10.0.0.2`. Split on
/// the raw bytes, so that what a client wrote on the left, however malformed, spoils only its
/// own elements and not the addresses its proxies appended on the right.
fn x_forwarded_for(headers: &HeaderMap) -> Vec<Hop> {
    headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(|element| std::str::from_utf8(element).map_or(Hop::Malformed, address))
        .collect()
}

/// An address as proxies write it in `X-Forwarded-For`, with or without a port.
fn address(text: &str) -> Hop {
    let text = text.trim();
    text.parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .map_or(Hop::Malformed, Hop::Addr)
}

/// The `for=` of every element of every `Forwarded` header (RFC 7239), in order:
/// `for=192.0.2.43, for="[2001:db8::1]:4711";proto=https, for=unknown`.
fn forwarded_for(headers: &HeaderMap) -> Vec<Hop> {
    let mut hops = Vec::new();
    for value in headers.get_all(axum::http::header::FORWARDED) {
        let Ok(text) = value.to_str() else {
            hops.push(Hop::Malformed);
            continue;
        };
        for element in split_unquoted(text, ',') {
            let mut hop = Hop::Hidden;
            for pair in split_unquoted(element, ';') {
                let Some((name, value)) = pair.split_once('=') else {
                    hop = Hop::Malformed;
                    break;
                };
                if name.trim().eq_ignore_ascii_case("for") {
                    hop = node(value.trim());
                }
            }
            hops.push(hop);
        }
    }
    hops
}

/// `text` split at every `separator` outside a quoted string. An unclosed quote runs to the
/// end, where it makes the element malformed.
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A `for=` node: an IPv4 address, a quoted `"[IPv6]"`, either with a port, `unknown` or an
/// obfuscated `_name`.
fn node(value: &str) -> Hop {
    let node = match value.strip_prefix('"') {
        Some(rest) => match rest.strip_suffix('"') {
            Some(inner) if !inner.contains(['"', '\\']) => inner,
            _ => return Hop::Malformed,
        },
        None => value,
    };
    if node.eq_ignore_ascii_case("unknown") || node.starts_with('_') {
        return Hop::Hidden;
    }
    let (host, port) = match node.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<Ipv6Addr>().map(IpAddr::V6), port),
            None => return Hop::Malformed,
        },
        None => {
            let (v4, port) = node.split_at(node.find(':').unwrap_or(node.len()));
            (v4.parse::<Ipv4Addr>().map(IpAddr::V4), port)
        }
    };
    match host {
        Ok(ip) if port.is_empty() || port.strip_prefix(':').is_some_and(is_node_port) => Hop::Addr(ip),
        _ => Hop::Malformed,
    }
}

/// A port as RFC 7239 writes it: a number, or an obfuscated `_name`.
fn is_node_port(port: &str) -> bool {
    let digits = (1..=5).contains(&port.len()) && port.bytes().all(|b| b.is_ascii_digit());
    let obfuscated = port.len() > 1
        && port.starts_with('_')
        && port.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    digits || obfuscated
}

/// The scheme `X-Forwarded-Proto` names (its rightmost value), if it names one.
fn forwarded_https(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get_all(X_FORWARDED_PROTO).iter().next_back()?;
    let scheme = value.to_str().ok()?.rsplit(',').next()?.trim();
    if scheme.eq_ignore_ascii_case("https") {
        Some(true)
    } else if scheme.eq_ignore_ascii_case("http") {
        Some(false)
    } else {
        tracing::debug!(?value, "X-Forwarded-Proto names no scheme");
        None
    }
}

/// Finds every request's client (before it is logged), and refuses a forwarded request when
/// auth is off: a development hub is for its own machine, never exposed through a proxy.
pub(super) async fn identify(State(app): State<App>, mut request: Request<Body>, next: Next) -> Response {
    let Some(&ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() else {
        tracing::error!("a request arrived without its connection's address");
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the hub failed; nothing was changed",
        )
        .into_response();
    };
    let config = app.config();
    let client = ClientAddr::of(peer.ip(), app.tls().is_some(), request.headers(), &config.trusted_proxies);
    let mut response = if client.forwarded() && !config.auth {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "proxy_not_allowed",
            "this hub runs with auth = false, for development on its own machine: it refuses requests \
             forwarded by a proxy (Forwarded, X-Forwarded-For, X-Real-IP)",
        )
        .into_response()
    } else {
        request.extensions_mut().insert(client);
        next.run(request).await
    };
    // For the logs, which see the answer after this layer.
    response.extensions_mut().insert(client);
    response
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<ClientAddr, ApiError> {
        parts.extensions.get::<ClientAddr>().copied().ok_or_else(|| {
            tracing::error!("a request reached its handler without its client");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the hub failed; nothing was changed",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const PEER: &str = "127.0.0.1";

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::try_from(entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    /// The client of a request from `peer` with `pairs`, behind the proxies `proxies`.
    fn client_of(peer: &str, proxies: &[&str], pairs: &[(&str, &str)]) -> ClientAddr {
        ClientAddr::of(peer.parse().unwrap(), false, &headers(pairs), &trusted(proxies))
    }

    /// The address the hub takes for a request from the trusted proxy `PEER` with `pairs`.
    fn through_proxy(pairs: &[(&str, &str)]) -> String {
        client_of(PEER, &[PEER, "10.0.0.0/8"], pairs).ip().to_string()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let pairs = [
            ("x-forwarded-for", "198.51.100.7"),
            ("forwarded", "for=198.51.100.7"),
            ("x-forwarded-proto", "https"),
        ];
        let client = client_of("203.0.113.9", &[PEER], &pairs);
        assert_eq!(client.ip().to_string(), "203.0.113.9");
        assert_eq!(client.scheme(), "http");
        // No proxy is trusted by default, not even loopback.
        let client = client_of(PEER, &[], &pairs);
        assert_eq!(client.ip().to_string(), PEER);
        assert!(client.forwarded() && !client.is_local());
    }

    #[test]
    fn a_request_with_any_forwarding_header_is_never_local() {
        assert!(client_of(PEER, &[], &[]).is_local());
        assert!(client_of("::1", &[], &[]).is_local());
        assert!(client_of("::ffff:127.0.0.1", &[], &[]).is_local());
        assert!(!client_of("192.0.2.1", &[], &[]).is_local());
        for name in ["forwarded", "x-forwarded-for", "x-real-ip", "X-Real-IP"] {
            for proxies in [&[][..], &[PEER][..]] {
                let client = client_of(PEER, proxies, &[(name, "127.0.0.1")]);
                assert!(client.forwarded() && !client.is_local(), "{name} from {proxies:?}");
            }
        }
        // X-Real-IP tells that a proxy forwarded the request; the address comes from the others.
        assert_eq!(through_proxy(&[("x-real-ip", "198.51.100.7")]), PEER);
    }

    #[test]
    fn the_client_is_the_rightmost_address_that_is_not_a_trusted_proxy() {
        assert_eq!(through_proxy(&[("x-forwarded-for", "198.51.100.7")]), "198.51.100.7");
        // What the client wrote itself is left of what its proxies appended.
        assert_eq!(through_proxy(&[("x-forwarded-for", "192.0.2.1, 198.51.100.7")]), "198.51.100.7");
        assert_eq!(
            through_proxy(&[("x-forwarded-for", "192.0.2.1,198.51.100.7, 10.0.0.2,10.1.1.1")]),
            "198.51.100.7"
        );
        // A chain of trusted proxies only: the farthest stands for the client.
        assert_eq!(through_proxy(&[("x-forwarded-for", "10.0.0.3, 10.0.0.2")]), "10.0.0.3");
        // Several header lines are one list, in order.
        let lines = [("x-forwarded-for", "192.0.2.1"), ("x-forwarded-for", "198.51.100.7, 10.0.0.2")];
        assert_eq!(through_proxy(&lines), "198.51.100.7");
    }

    #[test]
    fn ipv6_clients_and_ipv4_peers_written_as_ipv6() {
        assert_eq!(through_proxy(&[("x-forwarded-for", "2001:db8::1")]), "2001:db8::1");
        assert_eq!(through_proxy(&[("x-forwarded-for", "[2001:db8::1]:4711")]), "2001:db8::1");
        assert_eq!(through_proxy(&[("x-forwarded-for", "198.51.100.7:50312")]), "198.51.100.7");
        assert_eq!(through_proxy(&[("x-forwarded-for", "2001:db8::1, ::ffff:10.0.0.2")]), "2001:db8::1");
        let client = client_of("::ffff:127.0.0.1", &[PEER], &[("x-forwarded-for", "::ffff:198.51.100.7")]);
        assert_eq!(client.ip().to_string(), "198.51.100.7");
        let client = client_of("::1", &["::1"], &[("x-forwarded-for", "2001:db8::2")]);
        assert_eq!(client.ip().to_string(), "2001:db8::2");
    }

    #[test]
    fn forwarded_names_the_client_by_for() {
        let by_forwarded = |value: &str| through_proxy(&[("forwarded", value)]);
        assert_eq!(by_forwarded("for=198.51.100.7"), "198.51.100.7");
        assert_eq!(by_forwarded("for=\"[2001:db8::1]:4711\""), "2001:db8::1");
        assert_eq!(by_forwarded("For=\"[2001:db8::1]\";proto=https"), "2001:db8::1");
        assert_eq!(by_forwarded("for=\"198.51.100.7:4711\""), "198.51.100.7");
        assert_eq!(by_forwarded("for=192.0.2.60;proto=http;by=203.0.113.43"), "192.0.2.60");
        assert_eq!(by_forwarded("for=192.0.2.43, for=198.51.100.17"), "198.51.100.17");
        assert_eq!(
            by_forwarded("for=192.0.2.43, for=198.51.100.17;by=\"[::1]:80,x\", for=10.0.0.2"),
            "198.51.100.17"
        );
        assert_eq!(by_forwarded("for=\"198.51.100.7:_p0rt\""), "198.51.100.7");
        // A proxy that did not say whom it forwarded stands for the client itself.
        assert_eq!(by_forwarded("for=unknown"), PEER);
        assert_eq!(by_forwarded("for=198.51.100.7, for=unknown"), PEER);
        assert_eq!(by_forwarded("for=\"_gazonk\""), PEER);
        assert_eq!(by_forwarded("for=_hidden, for=10.0.0.2"), "10.0.0.2");
        assert_eq!(by_forwarded("proto=https;by=10.0.0.9"), PEER);
        // Beyond the first untrusted address nothing is read.
        assert_eq!(by_forwarded("for=unknown, for=198.51.100.7"), "198.51.100.7");
        assert_eq!(by_forwarded("for=\"[oops, for=198.51.100.7"), PEER);
    }

    #[test]
    fn malformed_forwarding_headers_leave_the_peer_as_the_client() {
        for xff in [
            "",
            ",",
            "not-an-address",
            "198.51.100.7, garbage",
            "198.51.100.7,",
            "1.2.3",
            "[::1",
            "198.51.100.7:99999",
        ] {
            assert_eq!(through_proxy(&[("x-forwarded-for", xff)]), PEER, "X-Forwarded-For: {xff}");
        }
        for forwarded in [
            "",
            "for",
            "for=",
            "for=\"\"",
            "for=\"[2001:db8::1\"",
            "for=2001:db8::1",
            "for=\"[zz::1]\"",
            "for=198.51.100.7:",
            "for=198.51.100.7:123456",
            "for=\"198.51.100.7",
            "for=\"1\\\"2\"",
            "for=198.51.100.7;;",
            "=",
            ";",
            "\"",
            "\\",
            "for=\"[::1]x\"",
        ] {
            assert_eq!(through_proxy(&[("forwarded", forwarded)]), PEER, "Forwarded: {forwarded}");
        }
        let mut binary = HeaderMap::new();
        binary.insert("x-forwarded-for", HeaderValue::from_bytes(b"198.51.100.\xff").unwrap());
        binary.insert("forwarded", HeaderValue::from_bytes(b"for=\xff").unwrap());
        let client = ClientAddr::of(PEER.parse().unwrap(), false, &binary, &trusted(&[PEER]));
        assert_eq!(client.ip().to_string(), PEER);
        // What the client wrote left of the address its proxy appended is never read, even
        // bytes that are not text.
        assert_eq!(through_proxy(&[("x-forwarded-for", "garbage, 198.51.100.7")]), "198.51.100.7");
        let mut appended = HeaderMap::new();
        appended.insert("x-forwarded-for", HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.7").unwrap());
        let client = ClientAddr::of(PEER.parse().unwrap(), false, &appended, &trusted(&[PEER]));
        assert_eq!(client.ip().to_string(), "198.51.100.7");
    }

    #[test]
    fn forwarded_and_x_forwarded_for_count_only_when_they_agree() {
        let both =
            |xff: &str, forwarded: &str| through_proxy(&[("x-forwarded-for", xff), ("forwarded", forwarded)]);
        assert_eq!(both("198.51.100.7", "for=198.51.100.7"), "198.51.100.7");
        assert_eq!(both("192.0.2.1, 198.51.100.7", "for=198.51.100.7"), "198.51.100.7");
        // One of them came from the client through the proxy, and it cannot be told which.
        assert_eq!(both("198.51.100.7", "for=192.0.2.1"), PEER);
    }

    #[test]
    fn the_scheme_comes_from_a_trusted_proxy_only() {
        let scheme = |peer: &str, https: bool, proto: &str| {
            ClientAddr::of(
                peer.parse().unwrap(),
                https,
                &headers(&[("x-forwarded-proto", proto)]),
                &trusted(&[PEER]),
            )
            .scheme()
        };
        assert_eq!(scheme(PEER, false, "https"), "https");
        assert_eq!(scheme(PEER, false, "HTTPS"), "https");
        assert_eq!(scheme(PEER, true, "http"), "http");
        assert_eq!(scheme(PEER, false, "http, https"), "https");
        assert_eq!(scheme(PEER, false, "gopher"), "http");
        assert_eq!(scheme(PEER, true, ""), "https");
        assert_eq!(scheme("192.0.2.1", false, "https"), "http");
    }
}
