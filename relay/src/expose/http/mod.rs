//! The HTTP listener: routes each request by its `Host` (exact, case-insensitive, port ignored) to
//! the service that lists that name, over HTTP/1.1 connections carried on data streams.
//!
//! - Connections toward the agent are kept alive between the requests of one client connection and
//!   never serve another: state a target ties to its connection (NTLM or Negotiate authentication,
//!   the client a PROXY header names) stays with the client it belongs to. A kept connection found
//!   closed before the request went out is replaced, and the request retried.
//! - `Upgrade` requests (WebSocket and others) get a stream of their own; after `101` the two
//!   sides are spliced.
//! - Hop-by-hop headers are dropped; `X-Forwarded-For` and `Forwarded` get the client appended,
//!   `X-Forwarded-Proto` and `X-Forwarded-Host` are set.
//! - Refusals are short plain-text pages: 400 (no or conflicting host), 404 (no service under the
//!   name), 403 (the service's access rules refuse the client: the connection's source, or the
//!   address a trusted proxy named in `X-Forwarded-For`), 503 (its agent is away), 502 (the
//!   target refused or failed). Each request is a line of the access log.
//! - A request head must arrive within `relay.header_timeout` (else the connection closes; an idle
//!   keep-alive connection waits as long for its next request) and fit `relay.max_header_bytes`
//!   (else 431 and close); malformed requests get 400. The per-address and global caps bound how
//!   many connections anyone holds.
//! - A connection that answered is closed with a lingering close (see [`linger`]), so a client
//!   still uploading a body reads the refusal instead of a reset.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use sallyport_runtime::{
    flows::{self, Activity},
    watched::Watched,
};

use http_body_util::Either;
use hyper::{
    body::Incoming,
    server::conn::{http1 as server, http2},
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info_span, Instrument};

use self::{
    admission::{admission, log_request, refusal, RequestFields},
    headers::{is_upgrade, prepare, request_host, strip_hop_by_hop},
    idle::{IdleAware, IdleWatch},
    page::{page, Body},
    pool::{Pool, Upstream},
    upstream::{connect, reason_of},
};
use crate::{
    config::Service,
    expose::{
        gate::{self, Entry},
        tcp::{self, Lease},
        Exposure, LiveRoutes,
    },
    groups::Picked,
    metrics::Outcome,
};

mod admission;
mod auth;
mod headers;
mod page;
pub(crate) use headers::host_only;
mod idle;
mod linger;
mod pool;
mod secure;
mod upstream;

use upstream::Failure;

/// Requests one HTTP/2 client connection may have in flight at once: each may hold an upstream
/// connection (a data stream), and the caps count client connections.
const MAX_H2_STREAMS: u32 = 100;

/// A client's TCP stream as the HTTP handling takes it: closed with a lingering close.
pub(crate) type Plain = linger::Lingering;

/// Wraps an accepted client connection for the HTTP handling.
pub(crate) fn plain(stream: TcpStream) -> Plain {
    let _ = stream.set_nodelay(true);
    linger::Lingering::new(stream)
}

/// The state of one listener's HTTP handling: the plain HTTP listener's (its host names), or
/// the HTTPS listener's for the services it terminates (their server names).
#[derive(Debug)]
pub(crate) struct Http {
    pub(crate) exposure: Arc<Exposure>,
    routes: LiveRoutes,
    /// Logins that passed and hosts that failed too often (services with a login).
    logins: auth::Logins,
    /// Requests arrive over TLS the relay terminated: only terminated services are routed.
    tls: bool,
    /// On the plain listener: the HTTPS listener's names, for terminated services that redirect
    /// plain HTTP to HTTPS.
    redirects: Option<LiveRoutes>,
}

impl Http {
    /// The listener requests arrive on, as metrics and the access log name it.
    fn listener(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The HTTP handling of the HTTPS listener's terminated services.
    pub(crate) fn terminated(exposure: Arc<Exposure>, routes: LiveRoutes) -> Self {
        Self { exposure, routes, logins: auth::Logins::default(), tls: true, redirects: None }
    }
}

/// Accepts HTTP clients until `stop` is cancelled; open connections then finish their current
/// request and close.
pub(crate) async fn serve(
    listener: TcpListener,
    exposure: Arc<Exposure>,
    (routes, redirects): (LiveRoutes, LiveRoutes),
    stop: CancellationToken,
) {
    let http = Arc::new(Http {
        exposure: exposure.clone(),
        routes,
        logins: auth::Logins::default(),
        tls: false,
        redirects: Some(redirects),
    });
    tcp::accept_loop(listener, "http", exposure, stop.clone(), |stream, peer, lease| {
        connection(plain(stream), peer, http.clone(), lease, stop.clone(), false)
            .instrument(info_span!("http", %peer))
    })
    .await;
}

/// What every request of one client connection shares: its upstream connections, and its places
/// under the caps (an upgraded connection keeps them until it ends).
#[derive(Debug)]
struct ClientConnection {
    pool: Pool,
    lease: Arc<Lease>,
    /// Closes the connection once nothing moved on it for its service's idle timeout.
    idle: IdleWatch,
}

/// Serves the requests of one client connection (HTTP/2 when `h2`, which only TLS negotiates).
pub(crate) async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    http: Arc<Http>,
    lease: Arc<Lease>,
    stop: CancellationToken,
    h2: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = http.exposure.config.get();
    let limits = &config.relay;
    let metrics = &http.exposure.runtime.metrics;
    // This client connection's own upstream connections; they close with it.
    let client = Arc::new(ClientConnection { pool: Pool::default(), lease, idle: IdleWatch::default() });
    let stream = Watched::new(stream, client.idle.activity.clone());
    let handler = {
        let (http, client) = (http.clone(), client.clone());
        service_fn(move |req| {
            let (http, client) = (http.clone(), client.clone());
            async move { Ok::<_, Infallible>(handle(req, peer, &http, &client).await) }
        })
    };
    // Both kinds of connection end the same way: done, drained on shutdown, or idle.
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = client.idle.expired() => {
                    debug!(%peer, "client connection idle for its service's idle_timeout: closed");
                    return;
                }
            }
        }};
    }
    let result = if h2 {
        drive!(http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .serve_connection(TokioIo::new(stream), handler))
    } else {
        drive!(server::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .serve_connection(TokioIo::new(stream), handler)
            .with_upgrades())
    };
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            sallyport_runtime::limited!(info, timeout = ?limits.header_timeout, "no whole request head in time: closing");
            metrics.refused(http.listener(), "header_timeout");
        }
        Err(e) if e.is_parse_too_large() => {
            sallyport_runtime::limited!(
                info,
                limit = limits.max_header_bytes,
                "request head too large: closing"
            );
            metrics.refused(http.listener(), "header_too_large");
        }
        Err(e) if e.is_parse() => {
            sallyport_runtime::limited!(info, error = %e, "malformed request: closing");
            metrics.refused(http.listener(), "malformed");
        }
        Err(e) => debug!(error = %e, "HTTP connection ended"),
    }
}

async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    http: &Http,
    client: &ClientConnection,
) -> Response<Body> {
    let metrics = &http.exposure.runtime.metrics;
    let challenges = &http.exposure.certs.challenges;
    if let Some(answer) = (!http.tls).then(|| secure::acme_answer(&req, challenges)).flatten() {
        return answer;
    }
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(reason) => {
            metrics.refused(http.listener(), "bad_host");
            return page(StatusCode::BAD_REQUEST, &reason.to_string());
        }
    };
    let listener = http.listener();
    let found = sallyport_runtime::sync::read(&http.routes).get(&host).cloned();
    let Some(served) = found.filter(|s| s.service.terminate.is_some() || !http.tls) else {
        let port = http.exposure.config.get().relay.https_public_port;
        if let Some(response) = http.redirects.as_ref().and_then(|r| secure::redirect(&req, &host, r, port)) {
            return response;
        }
        metrics.refused(listener, "unknown_host");
        return page(StatusCode::NOT_FOUND, &format!("no service is published under the host name {host:?}"));
    };
    let service = &served.service;
    let mut entry = Entry::new(service, listener, peer);
    let (who, admitted) = admission(&req, peer, &service.name, &http.exposure);
    if who != peer.ip() {
        entry.client = SocketAddr::new(who, 0);
        entry.via = Some(peer.ip());
    }
    let mut fields = http.exposure.access_log.is_on().then(|| RequestFields::of(&req, &host));
    if let Err(reason) = admitted {
        let response = refusal(reason, &host);
        log_request(&entry, &http.exposure, reason, fields.as_ref(), &response);
        return response;
    }
    let login = http.exposure.config.get().access.auth(&service.name).cloned();
    if let Some(login) = login {
        match auth::gate(
            &mut req,
            (&service.name, &login),
            who,
            &host,
            (&http.logins, &http.exposure.runtime.clients),
        )
        .await
        {
            auth::Verdict::Pass(user) => {
                if let Some(fields) = fields.as_mut() {
                    fields.user = user;
                }
            }
            auth::Verdict::Refused(response, result) => {
                metrics.refused(&service.name, result);
                log_request(&entry, &http.exposure, result, fields.as_ref(), &response);
                return response;
            }
        }
    }
    client.idle.serve(service.idle_timeout);
    let active = IdleAware { active: Some(metrics.connection(&service.name)), idle: &client.idle };
    let forwarded = tokio::select! {
        r = forward(req, peer, (&host, who), service, &served.retired, (http, client), &mut entry.agent) => r,
        () = served.retired.cancelled() => Err(Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("the service {:?} was removed from the relay's configuration", service.name),
            outcome: Outcome::NoAgent,
        }),
    };
    let (response, outcome) = match forwarded {
        Ok(response) => {
            active.end(Outcome::Completed);
            (response, Outcome::Completed)
        }
        Err(failure) => {
            debug!(service = %service.name, reason = %failure.reason, status = %failure.status, "request not carried");
            active.end(failure.outcome);
            (page(failure.status, &failure.reason), failure.outcome)
        }
    };
    metrics.http_response(&service.name, response.status().as_u16());
    log_request(&entry, &http.exposure, gate::result_of(outcome), fields.as_ref(), &response);
    secure::with_hsts(response, service)
}

/// The member a request went to, for the page when its tunnel died under it.
type Used = Option<(Arc<str>, sallyport_runtime::link::Connection)>;

async fn forward(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    (host, who): (&str, std::net::IpAddr),
    service: &Arc<Service>,
    retired: &CancellationToken,
    (http, client): (&Http, &ClientConnection),
    agent: &mut Option<Arc<str>>,
) -> Result<Response<Body>, Failure> {
    let upgrade = is_upgrade(req.headers());
    prepare(&mut req, peer, host, (upgrade, http.tls));
    let mut used: Used = None;
    let carried = if upgrade {
        carry_upgrade(
            req,
            (service, peer, who),
            &http.exposure,
            client.lease.clone(),
            retired.clone(),
            &mut used,
        )
        .await
    } else {
        carry(req, (service, peer, who), &client.pool, &http.exposure, &mut used).await
    };
    let Some((member, connection)) = used else { return carried };
    *agent = Some(member.clone());
    // A tunnel that died under the request (its agent went silent, or the path went dark): the
    // service is unavailable, and the page says why.
    carried.map_err(|failure| match connection.close_reason() {
        Some(reason) => Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!(
                "the tunnel to agent {member:?} of service {:?} was lost: {reason}",
                service.name
            ),
            outcome: Outcome::NoAgent,
        },
        None => failure,
    })
}

/// The member of `service`'s group that takes a new upstream connection for client `who`.
fn pick(service: &Service, who: std::net::IpAddr, exposure: &Exposure) -> Result<Picked, Failure> {
    exposure.pick(service, who).ok_or_else(|| Failure {
        status: StatusCode::SERVICE_UNAVAILABLE,
        reason: exposure.groups.none_usable(&exposure.config.get(), &service.name),
        outcome: Outcome::NoAgent,
    })
}

/// A plain request, on this client connection's kept upstream connection to the service, or a
/// new one to the member its group gives.
async fn carry(
    req: Request<Incoming>,
    (service, peer, who): (&Arc<Service>, SocketAddr, std::net::IpAddr),
    pool: &Pool,
    exposure: &Exposure,
    used: &mut Used,
) -> Result<Response<Body>, Failure> {
    let mut req = Some(req);
    while let Some(request) = req.take() {
        let (mut upstream, reused) = match pool.take(&service.name) {
            Some(upstream) => (upstream, true),
            None => {
                let picked = pick(service, who, exposure)?;
                *used = Some((picked.agent.clone(), picked.connection.clone()));
                let sender = connect(&picked, service, peer, false, exposure).await?;
                (Upstream { sender, picked }, false)
            }
        };
        *used = Some((upstream.picked.agent.clone(), upstream.picked.connection.clone()));
        // A kept connection whose last response is still going out is ready once it is.
        let ready = if reused { upstream.sender.ready().await.is_ok() } else { true };
        if !ready {
            req = Some(request);
            continue;
        }
        match upstream.sender.try_send_request(request).await {
            Ok(mut response) => {
                pool.put(service.name.clone(), upstream);
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
    (service, peer, who): (&Arc<Service>, SocketAddr, std::net::IpAddr),
    exposure: &Exposure,
    lease: Arc<Lease>,
    retired: CancellationToken,
    used: &mut Used,
) -> Result<Response<Body>, Failure> {
    let client_side = hyper::upgrade::on(&mut req);
    let idle = service.idle_timeout;
    let picked = pick(service, who, exposure)?;
    *used = Some((picked.agent.clone(), picked.connection.clone()));
    let mut sender = connect(&picked, service, peer, true, exposure).await?;
    let mut response = sender.send_request(req).await.map_err(|e| Failure::bad_gateway(reason_of(&e)))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let target_side = hyper::upgrade::on(&mut response);
        exposure.runtime.clients.spawn(
            async move {
                // Holds the client's places under the caps, and its member's count, for as long
                // as the upgraded connection.
                let _lease = lease;
                let spliced = async {
                    match tokio::try_join!(client_side, target_side) {
                        Ok((client, target)) => splice_upgraded(client, target, idle).await,
                        Err(e) => debug!(error = %e, "upgrade failed"),
                    }
                };
                tokio::select! {
                    () = spliced => {}
                    () = retired.cancelled() => debug!("service removed by a reload: upgraded connection ended"),
                    () = picked.cut.cancelled() => debug!(agent = %picked.agent, "the agent's drain grace is over: upgraded connection ended"),
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

/// Copies both ways between an upgraded client connection and its target until both end, or
/// until nothing moved for `idle`.
async fn splice_upgraded(
    client: hyper::upgrade::Upgraded,
    target: hyper::upgrade::Upgraded,
    idle: Option<Duration>,
) {
    let activity = Activity::default();
    let mut client = Watched::new(TokioIo::new(client), &activity);
    let mut target = Watched::new(TokioIo::new(target), &activity);
    let copy = tokio::io::copy_bidirectional(&mut client, &mut target);
    let quiet = async {
        match idle {
            Some(idle) => flows::idle_for(&activity, idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        copied = copy => match copied {
            Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
            Err(e) => debug!(error = %e, "upgraded connection reset"),
        },
        () = quiet => debug!(?idle, "upgraded connection idle: closed"),
    }
}
