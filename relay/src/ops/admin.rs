//! The admin HTTP server: `/livez` (the process runs) and `/readyz` (the relay accepts work; it
//! turns 503 while draining, independent of agents).

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use sallyport_proto::ContainerAction;

use sallyport_runtime::{hex, sync::lock};

use crate::{
    metrics::AgentGauges,
    ops::{
        auth::{self, authorize_with},
        commands::CommandError,
        replicas, status, Ops,
    },
};

pub(crate) async fn serve(listener: TcpListener, ops: Arc<Ops>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        let Ok((stream, _)) = accepted else { continue };
        let (ops, tasks) = (ops.clone(), ops.runtime.background.clone());
        tasks.spawn(async move {
            let service = service_fn(move |req| respond(req, ops.clone()));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Reads that say something about agents: open on a loopback admin address, behind the admin
/// token on any other.
const GUARDED_READS: [&str; 5] = ["/agents", "/metrics", "/", "/status", "/status.txt"];

async fn respond(req: Request<Incoming>, ops: Arc<Ops>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let text = "text/plain; charset=utf-8";
    let loopback = ops.config.get().relay.admin.ip().is_loopback();
    let refused = match (GUARDED_READS.contains(&path.as_str()), loopback) {
        (false, _) => None,
        (true, false) => authorize_read(&req, &ops).err(),
        (true, true) => rebinding_refusal(&req, &ops),
    };
    let (status, content_type, body): (StatusCode, &str, String) = if let Some((status, body)) = refused {
        (status, text, body)
    } else {
        match (req.method(), path.as_str()) {
            (&Method::GET, "/livez") => (StatusCode::OK, text, "ok\n".into()),
            (&Method::GET, "/readyz") if ops.is_ready() => (StatusCode::OK, text, "ready\n".into()),
            (&Method::GET, "/readyz") if ops.runtime.is_ready() => (
                StatusCode::SERVICE_UNAVAILABLE,
                text,
                "warming up: waiting for the cluster's agents\n".into(),
            ),
            (&Method::GET, "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, text, "draining\n".into()),
            (&Method::GET, "/agents") => (StatusCode::OK, text, agent_listing(&ops)),
            (&Method::GET, "/metrics") => {
                let agents = ops.agents.subscribe().borrow().clone();
                let gauges = agents.values().map(|s| AgentGauges {
                    name: &s.name,
                    transport: s.transport(),
                    rtt: s.connection.rtt(),
                    connections: s.connections(),
                    containers: lock(&s.containers).clone(),
                    start_failures: lock(&s.start_failures).clone(),
                    cert_not_after_unix: s.cert_not_after_unix,
                });
                let config = ops.config.get();
                let named = config.groups.values().flat_map(|g| g.agents.iter().cloned()).collect();
                // Groups of several agents, or with a health check (a lone agent has sallyport_agent_up).
                let mut members = ops.groups.members(&ops.agents, &config);
                members.retain(|service, _| {
                    config.group(service).is_some_and(|g| g.agents.len() > 1 || g.health.is_some())
                });
                ops.runtime.metrics.groups(members.iter().flat_map(|(service, members)| {
                    members.iter().map(move |m| crate::metrics::groups::MemberGauges {
                        service,
                        agent: &m.agent,
                        state: m.state.word(),
                        usable: m.usable,
                        connections: m.live,
                    })
                }));
                ops.runtime.metrics.tasks(
                    ops.runtime.accepting.len() + ops.runtime.clients.len() + ops.runtime.background.len(),
                );
                ops.runtime.metrics.set_ready(ops.is_ready());
                let certificates = ops
                    .certs
                    .list()
                    .into_iter()
                    .filter_map(|(n, h)| Some((n, h.loaded?.not_after_unix)))
                    .collect();
                ops.runtime.metrics.service_certificates(certificates);
                let body = ops.runtime.metrics.render(gauges, &named, ops.runtime.udp.figures());
                (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
            }
            (&Method::GET, "/" | "/status") => {
                (StatusCode::OK, "text/html; charset=utf-8", status::html(&status::snapshot(&ops)))
            }
            (&Method::GET, "/status.txt") => (StatusCode::OK, text, status::text(&status::snapshot(&ops))),
            (method, p)
                if replicas::is_write(method, p) && ops.cluster.as_ref().is_some_and(|c| !c.is_writer()) =>
            {
                let Some(cluster) = &ops.cluster else { return Ok(Response::new(Full::new(Bytes::new()))) };
                let (status, body) = replicas::forward(&req, &ops, cluster).await;
                (status, text, body)
            }
            (_, p) if p == "/tokens" || p.starts_with("/tokens/") => {
                let (status, body) = tokens(&req, &ops);
                (status, text, body)
            }
            (&Method::POST, "/reload") => {
                let (status, body) = reload(&req, &ops).await;
                (status, text, body)
            }
            (&Method::POST, p) if p.starts_with("/agents/") && p.ends_with("/revoke") => {
                let (status, body) = revoke_agent(&req, &ops);
                (status, text, body)
            }
            (&Method::POST, p)
                if p.starts_with("/agents/") && (p.ends_with("/drain") || p.ends_with("/undrain")) =>
            {
                let (status, body) = super::drain::drain(&req, &ops);
                (status, text, body)
            }
            (&Method::POST, p) if p.starts_with("/agents/") => {
                let (status, body) = container_command(&req, &ops).await;
                (status, text, body)
            }
            _ => (StatusCode::NOT_FOUND, text, "not found\n".into()),
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    let nosniff = hyper::header::HeaderValue::from_static("nosniff");
    response.headers_mut().insert(hyper::header::X_CONTENT_TYPE_OPTIONS, nosniff);
    Ok(response)
}

/// Connected agents, their services and their containers' states, one line each.
fn agent_listing(ops: &Ops) -> String {
    let agents = ops.agents.subscribe().borrow().clone();
    let mut out = String::new();
    for (name, session) in &agents {
        let services: Vec<&str> = session.services.iter().map(String::as_str).collect();
        out.push_str(&format!(
            "agent {name} remote={} software={:?} services={} connections={} transport={} why={:?}\n",
            session.remote,
            status::printable(&session.software),
            services.join(","),
            session.connections(),
            session.transport(),
            lock(&session.transport_why),
        ));
        for c in lock(&session.containers).iter() {
            out.push_str(&format!(
                "  container {} {}\n",
                status::printable(&c.name),
                status::printable(&c.state)
            ));
        }
    }
    if agents.is_empty() {
        out.push_str("no agents connected\n");
    }
    out
}

/// Reads on the loopback admin server need no token, so a web page the relay's host opens could
/// read them through a name it points at 127.0.0.1 (DNS rebinding): such a read must name the
/// server as `localhost` or by an IP address (what local tools send), or bring the admin token.
fn rebinding_refusal(req: &Request<Incoming>, ops: &Ops) -> Option<(StatusCode, String)> {
    let host = req.headers().get(hyper::header::HOST)?;
    let tokens = (ops.admin_token.as_ref(), ops.read_token.as_ref());
    if host.to_str().is_ok_and(names_this_machine) || auth::authorize_read(req, tokens.0, tokens.1).is_ok() {
        return None;
    }
    Some((
        StatusCode::FORBIDDEN,
        "a read on the loopback admin server names it as localhost or by its address (or brings the admin token)\n"
            .into(),
    ))
}

/// Whether a `Host` value is `localhost` or an IP address, with or without a port.
fn names_this_machine(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// Reads about agents on an admin server that is reachable from the network need the admin token
/// or the read-only one; without either configured they are off there.
fn authorize_read(req: &Request<Incoming>, ops: &Ops) -> Result<(), (StatusCode, String)> {
    if ops.admin_token.is_none() && ops.read_token.is_none() {
        return Err((
            StatusCode::FORBIDDEN,
            "the admin server listens beyond loopback: reads about agents need relay.admin_token_file or \
             relay.read_token_file\n"
                .into(),
        ));
    }
    auth::authorize_read(req, ops.admin_token.as_ref(), ops.read_token.as_ref())
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `GET /tokens`, `POST /tokens?agent=NAME&ttl_secs=N` (answers `ID SECRET_HEX`),
/// `POST /tokens/ID/revoke`; all with the admin bearer token.
fn tokens(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    if let Err(refusal) = authorize_with(req, ops.admin_token.as_ref(), ops.read_token.as_ref()) {
        return refusal;
    }
    tokens_for(req, ops)
}

/// [`tokens`] for a caller already authorized (the operator here, or another replica forwarding
/// its operator's call over the replica port).
pub(crate) fn tokens_for(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    let Some(enrollment) = &ops.trust.enrollment else {
        return (StatusCode::FORBIDDEN, "enrollment is off: set relay.ca_key\n".into());
    };
    let parts: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["tokens"]) => {
            let mut out = String::new();
            for t in enrollment.tokens.list() {
                out.push_str(&format!(
                    "{:016x} agent={} state={:?} created={} expires={}\n",
                    t.id, t.agent, t.state, t.created_unix, t.expires_unix
                ));
            }
            (StatusCode::OK, out)
        }
        (&Method::POST, ["tokens"]) => {
            let Some(agent) = query(req, "agent").filter(|a| sallyport_proto::is_valid_name(a)) else {
                return (StatusCode::BAD_REQUEST, "agent=NAME (a valid agent name) is required\n".into());
            };
            let ttl = query(req, "ttl_secs").and_then(|t| t.parse::<u64>().ok()).unwrap_or(86_400);
            if !(1..=30 * 86_400).contains(&ttl) {
                return (StatusCode::BAD_REQUEST, "ttl_secs must be 1 s to 30 days\n".into());
            }
            let (id, secret) = match enrollment.tokens.create(agent, Duration::from_secs(ttl)) {
                Ok(created) => created,
                Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("token not created: {e}\n")),
            };
            let secret = hex::encode(&secret);
            tracing::info!(agent, token = format!("{id:016x}"), ttl_secs = ttl, "join token created");
            (StatusCode::OK, format!("{id:016x} {secret}\n"))
        }
        (&Method::POST, ["tokens", id, "revoke"]) => {
            match u64::from_str_radix(id, 16).map(|id| (id, enrollment.tokens.revoke(id))) {
                Ok((_, Err(e))) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, format!("revoked until the relay restarts: {e}\n"))
                }
                Ok((id, Ok(true))) => {
                    tracing::info!(token = format!("{id:016x}"), "join token revoked");
                    (StatusCode::OK, format!("{id:016x} revoked\n"))
                }
                _ => (StatusCode::NOT_FOUND, format!("no token {id}\n")),
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// `POST /agents/AGENT/revoke[?serial=HEX]`: refuses every certificate of the agent issued up to
/// now (renewals included), the certificate it is connected with, and the given serial, on this
/// relay and after restarts; closes its tunnel.
/// `POST /reload`: reads relay.toml again and applies it (operator token), or says why not.
async fn reload(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    if let Err(refusal) = authorize_with(req, ops.admin_token.as_ref(), ops.read_token.as_ref()) {
        return refusal;
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    if ops.reload.send(reply).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the relay is stopping\n".into());
    }
    match answer.await {
        Ok(Ok(message)) => (StatusCode::OK, format!("{message}\n")),
        Ok(Err(reason)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{reason}\n")),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the relay is stopping\n".into()),
    }
}

fn revoke_agent(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    if let Err(refusal) = authorize_with(req, ops.admin_token.as_ref(), ops.read_token.as_ref()) {
        return refusal;
    }
    revoke_agent_for(req, ops)
}

/// [`revoke_agent`] for a caller already authorized.
pub(crate) fn revoke_agent_for(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    let parts: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    let ["agents", agent, "revoke"] = parts.as_slice() else {
        return (StatusCode::NOT_FOUND, "expected /agents/AGENT/revoke\n".into());
    };
    if !sallyport_proto::is_valid_name(agent) {
        return (StatusCode::BAD_REQUEST, format!("{agent:?} is not an agent name\n"));
    }
    let session = ops.agents.subscribe().borrow().get(*agent).cloned();
    let mut serials: Vec<String> = session.iter().map(|s| s.serial.clone()).collect();
    if let Some(serial) = query(req, "serial") {
        if sallyport_runtime::hex::decode(serial).is_none_or(|bytes| bytes.is_empty()) {
            return (StatusCode::BAD_REQUEST, format!("serial {serial:?} is not hex\n"));
        }
        serials.push(serial.to_ascii_lowercase());
    }
    let ahead = ops.cluster.as_ref().map_or(0, |c| c.revocation_ahead_secs());
    let cutoff = match ops.trust.revocations.revoke_agent(agent, &serials, ahead) {
        Ok(cutoff) => cutoff,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    tracing::warn!(agent, ?serials, issued_up_to_unix = cutoff, "agent certificates revoked");
    // Its tunnel and lanes are closed by the tunnel plane's watch on the revocations
    // (`tunnel::revoked`), which also closes them when a revocation comes from the writer.
    let listed = if serials.is_empty() { String::new() } else { format!(" and {}", serials.join(", ")) };
    (
        StatusCode::OK,
        format!("agent {agent}: certificates issued up to {cutoff} (unix time){listed} revoked\n"),
    )
}

/// `POST /agents/AGENT/containers/NAME/ACTION[?tail=N]`, with the admin bearer token.
async fn container_command(req: &Request<Incoming>, ops: &Ops) -> (StatusCode, String) {
    if let Err(refusal) = authorize_with(req, ops.admin_token.as_ref(), ops.read_token.as_ref()) {
        return refusal;
    }
    if !ops.config.get().relay.container_commands {
        return (
            StatusCode::FORBIDDEN,
            "container commands are off (relay.container_commands = false)\n".into(),
        );
    }
    let parts: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    let ["agents", agent, "containers", container, action] = parts.as_slice() else {
        return (StatusCode::NOT_FOUND, "expected /agents/AGENT/containers/NAME/ACTION\n".into());
    };
    let tail = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("tail=")))
        .and_then(|t| t.parse().ok())
        .unwrap_or(100);
    let Some(action) = ContainerAction::parse(action, tail) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("unknown action {action:?}: start, stop, restart, status or logs\n"),
        );
    };
    match ops.commands.send(&ops.agents, agent, container, action).await {
        Ok(output) if output.ends_with('\n') || output.is_empty() => (StatusCode::OK, output),
        Ok(output) => (StatusCode::OK, format!("{output}\n")),
        Err(CommandError::NoAgent) => (StatusCode::NOT_FOUND, format!("agent {agent:?} is not connected\n")),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_localhost_and_addresses_name_the_loopback_admin_server() {
        for local in ["127.0.0.1:9090", "127.0.0.1", "localhost:9090", "LOCALHOST", "[::1]:9090", "[::1]"] {
            assert!(names_this_machine(local), "{local}");
        }
        for foreign in ["evil.example", "evil.example:9090", "127.0.0.1.nip.io:9090", "[evil]:80", ""] {
            assert!(!names_this_machine(foreign), "{foreign}");
        }
    }
}
