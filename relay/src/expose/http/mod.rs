//! The HTTP listener: routes each request by its `Host` (exact, case-insensitive, port ignored) to
//! the service that lists that name, over HTTP/1.1 connections carried on data streams.
//!
//! - Connections toward the agent are pooled per service and client address (a target that reads
//!   PROXY headers then still sees the right client) and kept alive between requests; a pooled
//!   connection found closed before the request went out is replaced, and the request retried.
//! - `Upgrade` requests (WebSocket and others) get a stream of their own; after `101` the two
//!   sides are spliced.
//! - Hop-by-hop headers are dropped; `X-Forwarded-For` and `Forwarded` get the client appended,
//!   `X-Forwarded-Proto` and `X-Forwarded-Host` are set.
//! - Refusals are short plain-text pages: 400 (no or conflicting host), 404 (no service under the
//!   name), 503 (its agent is away), 502 (the target refused or failed).
//! - A request head must arrive within `relay.header_timeout` (else the connection closes; an idle
//!   keep-alive connection waits as long for its next request) and fit `relay.max_header_bytes`
//!   (else 431 and close); malformed requests get 400. The per-address and global caps bound how
//!   many connections anyone holds.

use std::{
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    body::Incoming,
    client::conn::http1 as client,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    server::conn::http1 as server,
    service::service_fn,
    Request, Response, StatusCode, Uri,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use quinn::{RecvStream, SendStream};
use sallyport_proto::Answer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use self::pool::Pool;
use crate::{
    config::Service,
    expose::{tcp, Exposure, Routes},
    metrics::Outcome,
    tunnel::streams,
};

mod pool;

/// The HTTP listener's own state: its host names and its pool of upstream connections.
#[derive(Debug)]
struct Http {
    exposure: Arc<Exposure>,
    routes: Routes,
    pool: Pool,
}

type Body = Either<Incoming, Full<Bytes>>;

/// Accepts HTTP clients until `stop` is cancelled; open connections then finish their current
/// request and close.
pub(crate) async fn serve(
    listener: TcpListener,
    exposure: Arc<Exposure>,
    routes: Routes,
    stop: CancellationToken,
) {
    let http = Arc::new(Http { exposure: exposure.clone(), routes, pool: Pool::default() });
    exposure.runtime.tasks.spawn(pool::sweep_every(POOL_SWEEP, http.clone(), stop.clone()));
    let per_ip = Some(exposure.per_ip.clone());
    tcp::accept_loop(listener, "http", per_ip, exposure, stop.clone(), |stream, peer| {
        connection(stream, peer, http.clone(), stop.clone()).instrument(info_span!("http", %peer))
    })
    .await;
}

/// How often the pool drops closed and long-unused connections.
const POOL_SWEEP: Duration = Duration::from_secs(15);

async fn connection(stream: TcpStream, peer: SocketAddr, http: Arc<Http>, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let limits = &http.exposure.config.limits;
    let metrics = &http.exposure.runtime.metrics;
    let handler = {
        let http = http.clone();
        service_fn(move |req| {
            let http = http.clone();
            async move { Ok::<_, Infallible>(handle(req, peer, &http).await) }
        })
    };
    let conn = server::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(stream), handler)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            info!(timeout = ?limits.header_timeout, "no whole request head in time: closing");
            metrics.refused("http", "header_timeout");
        }
        Err(e) if e.is_parse_too_large() => {
            info!(limit = limits.max_header_bytes, "request head too large: closing");
            metrics.refused("http", "header_too_large");
        }
        Err(e) if e.is_parse() => {
            info!(error = %e, "malformed request: closing");
            metrics.refused("http", "malformed");
        }
        Err(e) => debug!(error = %e, "HTTP connection ended"),
    }
}

/// Why a request got no response from its target.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    reason: String,
    outcome: Outcome,
}

impl Failure {
    fn bad_gateway(reason: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_GATEWAY, reason: reason.into(), outcome: Outcome::StreamFailed }
    }
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, http: &Http) -> Response<Body> {
    let metrics = &http.exposure.runtime.metrics;
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(reason) => {
            metrics.refused("http", "bad_host");
            return page(StatusCode::BAD_REQUEST, &reason);
        }
    };
    let Some(service) = http.routes.get(&host) else {
        metrics.refused("http", "unknown_host");
        return page(StatusCode::NOT_FOUND, &format!("no service is published under the host name {host:?}"));
    };
    let active = metrics.connection(&service.name);
    let response = match forward(req, peer, &host, service, http).await {
        Ok(response) => {
            active.end(Outcome::Completed, 0, 0);
            response
        }
        Err(failure) => {
            debug!(service = %service.name, reason = %failure.reason, status = %failure.status, "request not carried");
            active.end(failure.outcome, 0, 0);
            page(failure.status, &failure.reason)
        }
    };
    metrics.http_response(&service.name, response.status().as_u16());
    response
}

async fn forward(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    host: &str,
    service: &Arc<Service>,
    http: &Http,
) -> Result<Response<Body>, Failure> {
    let Some(connection) = http.exposure.agents.route(&service.agent, &service.name) else {
        return Err(Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("the agent {:?} of service {:?} is not connected", service.agent, service.name),
            outcome: Outcome::NoAgent,
        });
    };
    let upgrade = is_upgrade(req.headers());
    prepare(&mut req, peer, host, upgrade);
    if upgrade {
        return carry_upgrade(req, &connection, service, peer, &http.exposure).await;
    }
    let key = (service.name.clone(), peer.ip());
    let tunnel = connection.stable_id();
    let mut req = Some(req);
    while let Some(request) = req.take() {
        let (mut sender, reused) = match http.pool.take(&key, tunnel) {
            Some(sender) => (sender, true),
            None => (connect(&connection, service, peer, false).await?, false),
        };
        match sender.try_send_request(request).await {
            Ok(mut response) => {
                http.pool.put(key, tunnel, sender);
                strip_hop_by_hop(response.headers_mut(), false);
                return Ok(response.map(Either::Left));
            }
            Err(mut e) => match e.take_message() {
                // A pooled connection that closed before the request went out: try a fresh one.
                Some(request) if reused => req = Some(request),
                _ => return Err(Failure::bad_gateway(reason_of(e.error()))),
            },
        }
    }
    Err(Failure::bad_gateway("the request could not be sent"))
}

/// An `Upgrade` request: its own stream, and after `101` the two connections are spliced.
async fn carry_upgrade(
    mut req: Request<Incoming>,
    connection: &quinn::Connection,
    service: &Service,
    peer: SocketAddr,
    exposure: &Exposure,
) -> Result<Response<Body>, Failure> {
    let client_side = hyper::upgrade::on(&mut req);
    let mut sender = connect(connection, service, peer, true).await?;
    let mut response = sender.send_request(req).await.map_err(|e| Failure::bad_gateway(reason_of(&e)))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let target_side = hyper::upgrade::on(&mut response);
        exposure.runtime.clients.spawn(
            async move {
                match tokio::try_join!(client_side, target_side) {
                    Ok((client, target)) => {
                        let (mut client, mut target) = (TokioIo::new(client), TokioIo::new(target));
                        match tokio::io::copy_bidirectional(&mut client, &mut target).await {
                            Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                            Err(e) => debug!(error = %e, "upgraded connection reset"),
                        }
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            }
            .instrument(info_span!("upgraded", service = %service.name, %peer)),
        );
        strip_hop_by_hop(response.headers_mut(), true);
    } else {
        strip_hop_by_hop(response.headers_mut(), false);
    }
    Ok(response.map(Either::Left))
}

/// A new HTTP/1.1 connection to the service's target, carried on a new data stream.
async fn connect(
    connection: &quinn::Connection,
    service: &Service,
    peer: SocketAddr,
    upgrades: bool,
) -> Result<client::SendRequest<Incoming>, Failure> {
    let (send, recv) = streams::open(connection, service, peer, &[])
        .await
        .map_err(|e| Failure::bad_gateway(format!("cannot open a stream to the agent: {e}")))?;
    let io = TokioIo::new(AgentStream { send, recv, answered: false });
    let (sender, conn) = client::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| Failure::bad_gateway(format!("HTTP handshake: {e}")))?;
    let span = info_span!("upstream", service = %service.name);
    if upgrades {
        tokio::spawn(
            async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "target connection ended");
                }
            }
            .instrument(span),
        );
    } else {
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "target connection ended");
                }
            }
            .instrument(span),
        );
    }
    Ok(sender)
}

/// The reason to show for a failed exchange: the agent's answer when it refused the stream.
fn reason_of(error: &hyper::Error) -> String {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(refusal) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(refusal) = refusal.downcast_ref::<Refusal>() {
                return refusal.0.to_owned();
            }
        }
        source = e.source();
    }
    if error.is_incomplete_message() {
        return "the target closed the connection before answering".into();
    }
    format!("the target connection failed: {error}")
}

/// The agent would not connect the target.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refusal(&'static str);

/// A data stream as a byte stream for hyper: the agent's one-byte answer is checked on the first
/// read, so the request goes out without waiting for it (no added round trip).
#[derive(Debug)]
struct AgentStream {
    send: SendStream,
    recv: RecvStream,
    answered: bool,
}

impl AsyncRead for AgentStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.answered {
            let mut byte = [0u8; 1];
            let mut one = ReadBuf::new(&mut byte);
            ready!(AsyncRead::poll_read(Pin::new(&mut this.recv), cx, &mut one))?;
            let answer = match one.filled() {
                [] => Err(Refusal("the agent closed the stream without answering")),
                [b] => match Answer::try_from(*b) {
                    Ok(Answer::Connected) => Ok(()),
                    Ok(other) => Err(Refusal(other.describe())),
                    Err(_) => Err(Refusal("the agent answered with an invalid byte")),
                },
                _ => unreachable!("a one-byte buffer"),
            };
            answer.map_err(io::Error::other)?;
            this.answered = true;
        }
        AsyncRead::poll_read(Pin::new(&mut this.recv), cx, buf)
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

/// The host a request is for: its `Host` header, lower-cased, without port or trailing dot. An
/// absolute-form target must name the same host.
fn request_host<B>(req: &Request<B>) -> Result<String, String> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (Some(value), None) = (hosts.next(), hosts.next()) else {
        return Err(if req.headers().contains_key(header::HOST) {
            "the request has more than one Host header".into()
        } else {
            "the request has no Host header".into()
        });
    };
    let host = value.to_str().ok().and_then(host_only).ok_or("the Host header is not a host name")?;
    if let Some(authority) = req.uri().authority() {
        let target = host_only(authority.as_str()).unwrap_or_default();
        if target != host {
            return Err(format!("the request target names {target:?} but the Host header names {host:?}"));
        }
    }
    Ok(host)
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` to the lower-case name (brackets dropped).
fn host_only(text: &str) -> Option<String> {
    let name = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty()
            || after.strip_prefix(':').is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
        {
            return None;
        }
        v6
    } else {
        match text.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return None,
            None => text,
        }
    };
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.contains('@') || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Drops hop-by-hop headers (those `Connection` lists, and the fixed set), keeping `Upgrade` and
/// `Connection: upgrade` on an upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [header::TE, header::TRAILER, header::TRANSFER_ENCODING, header::PROXY_AUTHORIZATION] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers.remove(header::CONNECTION);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Makes a client's request fit to send on: hop-by-hop headers out, forwarding headers in, and
/// the target in origin form.
fn prepare<B>(req: &mut Request<B>, peer: SocketAddr, host: &str, upgrade: bool) {
    let original_host = req.headers().get(header::HOST).cloned();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let ip = peer.ip().to_canonical();
    append(headers, HeaderName::from_static("x-forwarded-for"), &ip.to_string());
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("http"));
    if let Some(value) = original_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), value);
    }
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    append(headers, header::FORWARDED, &format!("for={node};host=\"{host}\";proto=http"));
    if req.uri().authority().is_some() {
        let origin = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = origin.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

/// Appends `value` to the comma-separated list in header `name` (joining repeated headers).
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let mut joined: Vec<&str> = headers.get_all(&name).iter().filter_map(|v| v.to_str().ok()).collect();
    joined.push(value);
    if let Ok(value) = HeaderValue::from_str(&joined.join(", ")) {
        headers.insert(name, value);
    }
}

/// A short plain-text page for a request the relay answers itself.
fn page(status: StatusCode, reason: &str) -> Response<Body> {
    let body = format!("{} {}\n{reason}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().uri(target);
        for h in hosts {
            builder = builder.header(header::HOST, *h);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn host_is_exact_case_insensitive_and_port_free() {
        assert_eq!(request_host(&request("/", &["App.Home.LAN:8080"])), Ok("app.home.lan".into()));
        assert_eq!(request_host(&request("/", &["app.home.lan."])), Ok("app.home.lan".into()));
        assert_eq!(request_host(&request("/", &["[fd00::1]:80"])), Ok("fd00::1".into()));
        assert_eq!(
            request_host(&request("http://APP.home.lan:80/x", &["app.home.lan"])),
            Ok("app.home.lan".into())
        );
    }

    #[test]
    fn missing_repeated_or_conflicting_hosts_are_bad_requests() {
        assert!(request_host(&request("/", &[])).unwrap_err().contains("no Host header"));
        assert!(request_host(&request("/", &["a", "b"])).unwrap_err().contains("more than one"));
        let e = request_host(&request("http://other.lan/x", &["app.home.lan"])).unwrap_err();
        assert!(e.contains("\"other.lan\"") && e.contains("\"app.home.lan\""), "{e}");
        assert!(request_host(&request("/", &["a:b:c"])).is_err());
        assert!(request_host(&request("/", &["user@host"])).is_err());
    }

    #[test]
    fn forwarding_headers_are_added_and_hop_by_hop_removed() {
        let mut req = Request::builder()
            .uri("http://app.lan/path?q=1")
            .header(header::HOST, "app.lan")
            .header(header::CONNECTION, "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("x-forwarded-for", "203.0.113.7")
            .body(())
            .expect("request");
        prepare(&mut req, "[2001:db8::9]:4000".parse().unwrap(), "app.lan", false);
        let h = req.headers();
        assert_eq!(req.uri(), "/path?q=1");
        assert!(
            h.get("x-secret").is_none()
                && h.get("keep-alive").is_none()
                && h.get(header::CONNECTION).is_none()
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 2001:db8::9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.lan");
        assert_eq!(h[header::FORWARDED], "for=\"[2001:db8::9]\";host=\"app.lan\";proto=http");
        assert_eq!(h[header::HOST], "app.lan");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut req = Request::builder()
            .uri("/ws")
            .header(header::HOST, "app.lan")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .expect("request");
        assert!(is_upgrade(req.headers()));
        prepare(&mut req, "10.0.0.2:5000".parse().unwrap(), "app.lan", true);
        assert_eq!(req.headers()[header::UPGRADE], "websocket");
        assert_eq!(req.headers()[header::CONNECTION], "upgrade");
        assert_eq!(req.headers()[header::FORWARDED], "for=10.0.0.2;host=\"app.lan\";proto=http");
    }
}
