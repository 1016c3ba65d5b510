//! The agent's TCP channel to the server: a WebSocket at `/ws`, over TLS
//! (pinned to the server's key, or a front's certificate checked against
//! the system roots or `--server-ca`), directly or through an HTTP proxy
//! (`--proxy`, `HTTPS_PROXY`, `NO_PROXY`).

use crate::AgentError;
use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use punch_protocol::ws::{self, WsAuth, WsFrame};
use punch_protocol::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

/// A byte stream the WebSocket runs over (TCP, TLS, a proxy tunnel).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The WebSocket to the server.
pub(crate) type Ws = WebSocketStream<Box<dyn Io>>;

/// A `ws://` or `wss://` endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsUrl {
    /// TLS (`wss`).
    pub secure: bool,
    /// Host name or IP (without brackets).
    pub host: String,
    /// Port (443 / 80 when the URL names none).
    pub port: u16,
    /// Path and query, `/ws` by default.
    pub path: String,
}

impl WsUrl {
    /// Parses `wss://HOST[:PORT][/PATH]` (or `ws://`, for a trusted network
    /// or a test: without TLS anyone on the path reads the offers).
    pub fn parse(s: &str) -> Result<WsUrl, AgentError> {
        let bad = |why: &str| AgentError::Config(format!("{s:?}: {why}"));
        let (secure, rest) = if let Some(r) = s.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(bad("expected wss://HOST[:PORT]/PATH"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ws::PATH),
        };
        if authority.contains('@') {
            return Err(bad("credentials are not allowed in the server URL"));
        }
        let (host, port) = split_host_port(authority).map_err(|e| bad(&e))?;
        Ok(WsUrl {
            secure,
            host,
            port: port.unwrap_or(if secure { 443 } else { 80 }),
            path: path.to_string(),
        })
    }

    /// `host:port` with brackets around IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for WsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.secure { "wss" } else { "ws" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

/// Splits `host[:port]` / `[v6][:port]`.
fn split_host_port(a: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let end = rest.find(']').ok_or("unclosed [")?;
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("junk after ]".into()),
        };
        (rest[..end].to_string(), port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            Some(_) => return Err("put IPv6 addresses in brackets".into()),
            None => (a.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
        None => None,
    };
    Ok((host, port))
}

/// An HTTP proxy: where it is and the Basic credentials it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `user:password`, percent-decoded, if the URL carries them.
    pub credentials: Option<String>,
}

impl Proxy {
    /// Parses `http://[USER:PASS@]HOST[:PORT]` (a bare `HOST:PORT` too).
    pub fn parse(s: &str) -> Result<Proxy, AgentError> {
        let bad = |why: &str| AgentError::Config(format!("proxy {s:?}: {why}"));
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.starts_with("https://") || s.starts_with("socks") {
            return Err(bad("only http:// proxies (HTTP CONNECT) are supported"));
        } else if s.contains("://") {
            return Err(bad("unknown scheme"));
        } else {
            s
        };
        let rest = rest.trim_end_matches('/');
        let (creds, hostport) = match rest.rsplit_once('@') {
            Some((c, h)) => (Some(percent_decode(c)), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport).map_err(|e| bad(&e))?;
        Ok(Proxy {
            host,
            port: port.unwrap_or(80),
            credentials: creds,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Does a `NO_PROXY` list exempt `host`? Entries are separated by commas:
/// `*` (everything), a domain (`example.com`, `.example.com` or
/// `*.example.com`: the domain and its subdomains), an IP address, or a
/// CIDR block (`10.0.0.0/8`); a `:port` suffix is ignored.
pub fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host
        .trim_matches(|c| c == '[' || c == ']')
        .to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|e| {
            let e = e.to_ascii_lowercase();
            if e == "*" {
                return true;
            }
            if let (Some(ip), Some((net, bits))) = (ip, e.split_once('/')) {
                return cidr_contains(net, bits, ip);
            }
            let e = match split_host_port(&e) {
                Ok((h, _)) => h,
                Err(_) => e.clone(),
            };
            if let (Some(ip), Ok(eip)) = (ip, e.parse::<IpAddr>()) {
                return ip == eip;
            }
            let domain = e.trim_start_matches('*').trim_start_matches('.');
            !domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}")))
        })
}

fn cidr_contains(net: &str, bits: &str, ip: IpAddr) -> bool {
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (net, ip.to_canonical()) {
        (IpAddr::V4(n), IpAddr::V4(i)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// The proxy for a connection to `url`: `--proxy`, else `HTTPS_PROXY`
/// (`HTTP_PROXY` for `ws://`), else `ALL_PROXY` (upper or lower case);
/// none when `NO_PROXY` exempts the host.
pub fn proxy_for(
    flag: Option<&str>,
    url: &WsUrl,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, AgentError> {
    let get = |name: &str| {
        env(name)
            .or_else(|| env(&name.to_ascii_lowercase()))
            .filter(|v| !v.trim().is_empty())
    };
    let chosen = match flag {
        Some(p) => Some(p.to_string()),
        None => {
            let scheme_var = if url.secure {
                "HTTPS_PROXY"
            } else {
                "HTTP_PROXY"
            };
            get(scheme_var).or_else(|| get("ALL_PROXY"))
        }
    };
    let Some(p) = chosen else { return Ok(None) };
    if let Some(list) = get("NO_PROXY") {
        if no_proxy_matches(&list, &url.host) {
            debug!(host = %url.host, "NO_PROXY exempts the server; connecting directly");
            return Ok(None);
        }
    }
    Proxy::parse(&p).map(Some)
}

/// Starts the error of a proxy that refused our credentials (a setting to
/// fix, not a network fault to retry).
pub(crate) const PROXY_AUTH: &str = "proxy authentication failed";

/// Opens a tunnel to `target` (`host:port`) through an HTTP proxy with
/// CONNECT.
async fn connect_via_proxy(proxy: &Proxy, target: &str) -> Result<Box<dyn Io>, String> {
    let tcp = tokio::net::TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| format!("cannot reach proxy {}:{}: {e}", proxy.host, proxy.port))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("proxy handshake: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!("proxy connection: {e}");
        }
    });
    let mut req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(target)
        .header(hyper::header::HOST, target);
    if let Some(c) = &proxy.credentials {
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_bytes());
        req = req.header(hyper::header::PROXY_AUTHORIZATION, format!("Basic {b64}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("CONNECT request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("CONNECT through the proxy failed: {e}"))?;
    if resp.status() == hyper::StatusCode::PROXY_AUTHENTICATION_REQUIRED
        || resp.status() == hyper::StatusCode::UNAUTHORIZED
    {
        return Err(format!(
            "{PROXY_AUTH}: the proxy at {}:{} refused our credentials for CONNECT {target} ({}); check the user and password in --proxy or HTTPS_PROXY",
            proxy.host,
            proxy.port,
            resp.status()
        ));
    }
    if !resp.status().is_success() {
        return Err(format!(
            "the proxy refused CONNECT {target}: {}",
            resp.status()
        ));
    }
    let up = hyper::upgrade::on(resp)
        .await
        .map_err(|e| format!("proxy tunnel: {e}"))?;
    Ok(Box::new(TokioIo::new(up)))
}

/// A TCP connection to `url`'s host and port, without a proxy.
pub(crate) async fn dial(url: &WsUrl) -> Result<Box<dyn Io>, String> {
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("TCP connect to {}: {e}", url.authority()))?;
    let _ = tcp.set_nodelay(true);
    Ok(Box::new(tcp))
}

/// The proxy the WebSocket to `url` goes through, from the `--proxy`
/// setting or the environment.
fn proxy(setting: Option<&str>, url: &WsUrl) -> Result<Option<Proxy>, String> {
    proxy_for(setting, url, |k| std::env::var(k).ok()).map_err(|e| e.to_string())
}

/// Does the WebSocket to `url` go through a proxy (or is the proxy setting
/// wrong), so that no plain TCP connection can be opened ahead?
pub(crate) fn proxied(setting: Option<&str>, url: &WsUrl) -> bool {
    !matches!(proxy(setting, url), Ok(None))
}

/// Where and how the WebSocket reaches the server: the `--proxy` setting,
/// the pinned fingerprint, the roots a TLS front is checked against.
pub(crate) struct WsDial<'a> {
    pub proxy: Option<&'a str>,
    pub fingerprint: &'a str,
    pub front_roots: Option<rustls::RootCertStore>,
}

/// Opens the WebSocket (TCP or proxy tunnel, TLS when `wss`, upgrade); on
/// `dialed`, a TCP connection to the server already open. Also the
/// server's `Date` header, when it sent one.
pub(crate) async fn open(
    how: WsDial<'_>,
    url: &WsUrl,
    dialed: Option<Box<dyn Io>>,
) -> Result<(Ws, Option<String>), String> {
    let stream: Box<dyn Io> = match dialed {
        Some(s) => s,
        None => match proxy(how.proxy, url)? {
            Some(p) => connect_via_proxy(&p, &url.authority()).await?,
            None => dial(url).await?,
        },
    };
    let stream: Box<dyn Io> = if url.secure {
        let verifier = punch_tls::tcp::FrontVerifier::new(how.fingerprint, how.front_roots)
            .map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(punch_tls::tcp::client_config(verifier));
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("bad server name {:?}: {e}", url.host))?;
        Box::new(
            connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", url.authority()))?,
        )
    } else {
        stream
    };
    let mut cfg = WebSocketConfig::default();
    cfg.max_message_size = Some(ws::MAX_MESSAGE);
    cfg.max_frame_size = Some(ws::MAX_MESSAGE);
    cfg.read_buffer_size = ws::READ_BUFFER;
    let (ws, resp) =
        tokio_tungstenite::client_async_with_config(url.to_string(), stream, Some(cfg))
            .await
            .map_err(|e| format!("WebSocket upgrade at {url}: {e}"))?;
    let date = resp
        .headers()
        .get("date")
        .and_then(|d| d.to_str().ok())
        .map(str::to_string);
    Ok((ws, date))
}

/// Reads the next binary message, skipping control frames.
pub(crate) async fn next_binary(
    ws: &mut Ws,
) -> Result<tokio_tungstenite::tungstenite::Bytes, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(b),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Text(_))) => return Err("text message from the server".into()),
            Some(Ok(Message::Close(c))) => {
                return Err(match c {
                    Some(c) => format!("server closed the channel: {}", c.reason),
                    None => "server closed the channel".into(),
                })
            }
            None => return Err("server closed the channel".into()),
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

/// The server's first message: its nonce.
pub(crate) async fn server_hello(ws: &mut Ws) -> Result<[u8; 32], AgentError> {
    let m = next_binary(ws).await.map_err(AgentError::Io)?;
    match ws::parse(&m) {
        Ok(WsFrame::Auth(b)) => match ws::decode::<WsAuth>(b) {
            Ok(WsAuth::ServerHello { version, nonce }) => {
                // The WebSocket's authentication is the same from the
                // oldest version a server serves on.
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                    return Err(AgentError::BadVersion(format!(
                        "server speaks version {version}, we speak {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
                    )));
                }
                Ok(nonce)
            }
            _ => Err(AgentError::Io("expected the server's hello".into())),
        },
        _ => Err(AgentError::Io("expected the server's hello".into())),
    }
}

/// Sends our key proof.
pub(crate) async fn client_auth(
    identity: &punch_tls::Identity,
    ws: &mut Ws,
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
) -> Result<(), AgentError> {
    let signature = identity.sign(&ws::client_signed(server_nonce, client_nonce))?;
    let m = ws::encode_auth(&WsAuth::ClientAuth {
        nonce: *client_nonce,
        signature,
    });
    ws.send(Message::Binary(m.into()))
        .await
        .map_err(|e| AgentError::Io(e.to_string()))
}

/// Checks the server's proof: its key has the pinned fingerprint and signed
/// both nonces.
pub(crate) fn check_server_auth(
    fingerprint: &str,
    body: &[u8],
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
) -> Result<(), AgentError> {
    let Ok(WsAuth::ServerAuth { key, signature }) = ws::decode::<WsAuth>(body) else {
        return Err(AgentError::Io("expected the server's key proof".into()));
    };
    let got = punch_tls::fingerprint_of(&key);
    if !punch_tls::ct_eq(got.as_bytes(), fingerprint.as_bytes()) {
        return Err(AgentError::FingerprintMismatch {
            expected: fingerprint.to_string(),
            got,
        });
    }
    if !punch_tls::tcp::verify_signature(
        &key,
        &ws::server_signed(server_nonce, client_nonce),
        &signature,
    ) {
        return Err(AgentError::FingerprintMismatch {
            expected: fingerprint.to_string(),
            got: format!("{got} (its signature does not verify)"),
        });
    }
    Ok(())
}

/// How long to wait between checks whether UDP answers again, while the
/// channel runs over TCP: from 5 s, doubling to a minute.
pub(crate) fn udp_retry(attempt: u32) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << attempt.min(4)).min(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = WsUrl::parse("wss://relay.example.com/ws").unwrap();
        assert_eq!((u.secure, u.port, u.path.as_str()), (true, 443, "/ws"));
        let u = WsUrl::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!((u.secure, u.port, u.path.as_str()), (false, 8080, "/ws"));
        let u = WsUrl::parse("wss://[::1]:3478/x/ws").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3478));
        assert_eq!(u.to_string(), "wss://[::1]:3478/x/ws");
        for bad in [
            "https://x",
            "wss://",
            "wss://h:99999",
            "wss://u:p@h/ws",
            "wss://::1/ws",
        ] {
            assert!(WsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proxies_parse_with_credentials() {
        let p = Proxy::parse("http://al%40ice:s%3Acret@proxy.lan:3128/").unwrap();
        assert_eq!(p.host, "proxy.lan");
        assert_eq!(p.port, 3128);
        assert_eq!(p.credentials.as_deref(), Some("al@ice:s:cret"));
        assert_eq!(Proxy::parse("10.0.0.1:8888").unwrap().port, 8888);
        assert!(Proxy::parse("socks5://h:1").is_err());
        assert!(Proxy::parse("https://h:1").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        let l = "localhost, .internal.example, *.corp, 10.0.0.0/8, 192.0.2.7, [::1], fd00::/8";
        for yes in [
            "localhost",
            "a.internal.example",
            "internal.example",
            "x.y.corp",
            "10.1.2.3",
            "192.0.2.7",
            "::1",
            "fd12::1",
        ] {
            assert!(no_proxy_matches(l, yes), "{yes}");
        }
        for no in [
            "notinternal.example",
            "corpx",
            "11.0.0.1",
            "192.0.2.8",
            "example.com",
        ] {
            assert!(!no_proxy_matches(l, no), "{no}");
        }
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("", "anything"));
    }

    #[test]
    fn proxy_choice_follows_flag_env_and_no_proxy() {
        let url = WsUrl::parse("wss://server.example:443/ws").unwrap();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(proxy_for(None, &url, env(&[])).unwrap(), None);
        let p = proxy_for(None, &url, env(&[("https_proxy", "http://p:1")])).unwrap();
        assert_eq!(p.unwrap().host, "p");
        let p = proxy_for(
            Some("http://flag:2"),
            &url,
            env(&[("HTTPS_PROXY", "http://p:1")]),
        )
        .unwrap();
        assert_eq!(p.unwrap().host, "flag");
        let none = proxy_for(
            None,
            &url,
            env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", ".example")]),
        )
        .unwrap();
        assert_eq!(none, None);
        // HTTP_PROXY is for ws:// only.
        assert_eq!(
            proxy_for(None, &url, env(&[("HTTP_PROXY", "http://p:1")])).unwrap(),
            None
        );
    }
}
