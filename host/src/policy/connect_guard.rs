//! A loopback HTTP CONNECT proxy that the MQTT connections of agents limited to public
//! addresses go through. rumqttc takes a host name and resolves it itself when it connects,
//! so a check made beforehand could be answered differently at connect time (DNS
//! rebinding). Through this proxy the name is resolved here, every address checked, and
//! the connection made to an address that passed.
//!
//! rumqttc reaches it with its `proxy` feature (HTTP CONNECT with Basic auth). The
//! password is random per host, so no other local process can use it as a way out.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::allowed_hosts::resolve_public;
use crate::kit::tasks::TaskGuard;

/// Longest CONNECT request head accepted.
const MAX_HEAD: usize = 4096;

/// Longest time from accepting a client to the tunnel being open: a client that sends
/// nothing, or a target that never answers, does not hold a task and a socket for good.
const SETUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The user name rumqttc presents; the password is the secret.
const USER: &str = "tether";

/// The running proxy; dropping it stops it.
pub(crate) struct ConnectGuard {
    port: u16,
    password: String,
    _task: TaskGuard,
}

/// How the guard resolves and checks a target: [`resolve_public`] in the host.
type Resolve = fn(String, u16) -> futures_util::future::BoxFuture<'static, Result<Vec<SocketAddr>, String>>;

impl ConnectGuard {
    /// Listens on a free loopback port, resolving targets to public addresses only.
    pub async fn start(io: &tokio::runtime::Handle) -> io::Result<ConnectGuard> {
        ConnectGuard::start_with(io, |host, port| Box::pin(async move { resolve_public(&host, port).await.map_err(|e| e.to_string()) })).await
    }

    async fn start_with(io: &tokio::runtime::Handle, resolve: Resolve) -> io::Result<ConnectGuard> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let mut secret = [0u8; 16];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
        let password = hex::encode(secret);
        let expected: Arc<str> = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"))).into();
        let task = TaskGuard::spawn(io, async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream, expected.clone(), resolve));
                    }
                    Err(e) => {
                        tracing::warn!("connect guard: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(ConnectGuard { port, password, _task: task })
    }

    /// The proxy setting for an MQTT connection that must reach public addresses only.
    pub fn proxy(&self) -> rumqttc::Proxy {
        rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: rumqttc::ProxyAuth::Basic { username: USER.into(), password: self.password.clone() },
            addr: Ipv4Addr::LOCALHOST.to_string(),
            port: self.port,
        }
    }
}

/// The status line a refusal of the guard carries.
pub(crate) const DENIED_STATUS: u16 = 403;

/// One client: its CONNECT request, the checked connection, then bytes both ways.
async fn serve(mut client: TcpStream, expected: Arc<str>, resolve: Resolve) {
    let setup = tokio::time::timeout(SETUP_TIMEOUT, tunnel(&mut client, &expected, resolve)).await;
    let (status, reason) = match setup.unwrap_or_else(|_| Err((504, "timed out".into()))) {
        Ok((mut upstream, early)) => {
            if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() || upstream.write_all(&early).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            return;
        }
        Err(refusal) => refusal,
    };
    let _ = client.write_all(format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
}

/// Reads and checks the request; the connection to the target and any bytes the client
/// sent after its request, or the status and reason to refuse with.
async fn tunnel(client: &mut TcpStream, expected: &str, resolve: Resolve) -> Result<(TcpStream, Vec<u8>), (u16, String)> {
    let mut head = Vec::with_capacity(512);
    let end = loop {
        let mut chunk = [0u8; 512];
        let n = client.read(&mut chunk).await.map_err(|e| (400, e.to_string()))?;
        if n == 0 {
            return Err((400, "request ended early".into()));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if head.len() > MAX_HEAD {
            return Err((431, "request head too large".into()));
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&head[..end]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err((400, "malformed request".into())),
    }
    if request.method != Some("CONNECT") {
        return Err((405, "only CONNECT".into()));
    }
    let authorized = request.headers.iter().any(|h| h.name.eq_ignore_ascii_case("proxy-authorization") && h.value == expected.as_bytes());
    if !authorized {
        return Err((407, "proxy authentication required".into()));
    }
    let target = request.path.unwrap_or_default();
    let (host, port) = target
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.trim_start_matches('[').trim_end_matches(']'), port.parse::<u16>().ok()?)))
        .ok_or_else(|| (400, format!("bad target {target:?}")))?;
    let addrs = resolve(host.to_owned(), port).await.map_err(|e| (DENIED_STATUS, e))?;
    let upstream = TcpStream::connect(&addrs[..]).await.map_err(|e| (502, e.to_string()))?;
    Ok((upstream, head[end..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    fn any_address(host: String, port: u16) -> futures_util::future::BoxFuture<'static, Result<Vec<SocketAddr>, String>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await.map_err(|e| e.to_string())?.collect()) })
    }

    /// Opens a tunnel the way rumqttc does (its proxy client is async-http-proxy).
    async fn through(guard: &ConnectGuard, password: &str, host: &str, port: u16) -> Result<TcpStream, async_http_proxy::HttpError> {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, guard.port)).await?;
        async_http_proxy::http_connect_tokio_with_basic_auth(&mut stream, host, port, USER, password).await?;
        Ok(stream)
    }

    #[tokio::test]
    async fn tunnels_to_checked_addresses_only() {
        let io = tokio::runtime::Handle::current();
        let echo = echo_server().await;
        let open = ConnectGuard::start_with(&io, any_address).await.expect("guard");
        let mut stream = through(&open, &open.password, "localhost", echo.port()).await.expect("tunnel");
        stream.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"ping");

        // The host's guard: loopback is not public.
        let guard = ConnectGuard::start(&io).await.expect("guard");
        let refused = through(&guard, &guard.password, "localhost", echo.port()).await.err();
        assert!(matches!(refused, Some(async_http_proxy::HttpError::HttpCode200(DENIED_STATUS))), "{refused:?}");
        let refused = through(&open, "wrong", "localhost", echo.port()).await.err();
        assert!(matches!(refused, Some(async_http_proxy::HttpError::HttpCode200(407))), "{refused:?}");
    }

    #[tokio::test]
    async fn malformed_requests_get_an_error_status() {
        let guard = ConnectGuard::start_with(&tokio::runtime::Handle::current(), any_address).await.expect("guard");
        for (request, status) in [
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "405"),
            (b"\x00\x01garbage\r\n\r\n".to_vec(), "400"),
            ([b"CONNECT x:1 HTTP/1.1\r\nX: ".to_vec(), vec![b'a'; MAX_HEAD]].concat(), "431"),
        ] {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, guard.port)).await.expect("connect");
            stream.write_all(&request).await.expect("write");
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer:?}");
        }
    }
}
