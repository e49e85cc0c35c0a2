//! Each listener asks here whether a client may reach a service (the rules in force, by the
//! client's address, and its rate) and writes its access log lines here. A refusal is counted as
//! `sallyport_refusals_total{listener=SERVICE,reason="denied"|"rate_limited"}`.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use sallyport_runtime::link::Transport;

use crate::{
    access::{
        log::{HttpFields, Record},
        rates::Counted,
    },
    config::Service,
    expose::Exposure,
    metrics::Outcome,
};

/// Whether `client` may reach `service` now: the rules in force, then its rate for `counted`
/// (`None`: what it sends counts against no rate, a datagram of a flow already open). A refusal is
/// counted and named: `denied` (the rules) or `rate_limited`.
pub(crate) fn admit(
    exposure: &Exposure,
    service: &str,
    counted: Option<Counted>,
    client: IpAddr,
) -> Result<(), &'static str> {
    let config = exposure.config.get();
    let refused = if !config.access.admits(service, client) {
        Some("denied")
    } else if counted
        .is_some_and(|c| !exposure.rates.allows(service, c, config.access.rate(service, c), client))
    {
        Some("rate_limited")
    } else {
        None
    };
    match refused {
        None => Ok(()),
        Some(reason) => {
            exposure.runtime.metrics.refused(service, reason);
            Err(reason)
        }
    }
}

/// One client connection or request on its way to the access log.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub(crate) service: &'a str,
    /// The member of the service's group that carried it, once one was chosen. Without one the
    /// line names a one-agent service's agent (and no agent for a group).
    pub(crate) agent: Option<std::sync::Arc<str>>,
    pub(crate) kind: &'static str,
    pub(crate) client: SocketAddr,
    /// The proxy the client came through, when the client is the address it named.
    pub(crate) via: Option<IpAddr>,
    pub(crate) server_name: Option<&'a str>,
    pub(crate) started: Instant,
}

impl<'a> Entry<'a> {
    pub(crate) fn new(service: &'a Service, kind: &'static str, client: SocketAddr) -> Self {
        Self {
            service: &service.name,
            agent: None,
            kind,
            client,
            via: None,
            server_name: None,
            started: Instant::now(),
        }
    }

    /// Writes the line: how it ended, the bytes each way, and for HTTP the request's fields.
    pub(crate) fn log(
        &self,
        exposure: &Exposure,
        result: &'static str,
        up: u64,
        down: u64,
        http: Option<HttpFields<'_>>,
    ) {
        if !exposure.access_log.is_on() {
            return;
        }
        let config = exposure.config.get();
        let agent = match (&self.agent, config.group(self.service).map(|g| g.agents.as_slice())) {
            (Some(agent), _) => agent,
            (None, Some([only])) => only.as_str(),
            (None, _) => "",
        };
        let mut record = Record::now((self.service, agent), self.kind, self.client, result, self.elapsed());
        record.transport = exposure.agents.transport_of(agent).map(|t| match t {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        });
        record.via = self.via;
        record.server_name = self.server_name;
        record.bytes_up = up;
        record.bytes_down = down;
        record.http = http;
        if !exposure.access_log.write(&record) {
            exposure.runtime.metrics.access_log_dropped();
        }
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// The access log's word for how a connection ended.
pub(crate) fn result_of(outcome: Outcome) -> &'static str {
    outcome.word()
}
