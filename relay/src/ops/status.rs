//! The status page on the admin port (`/`, HTML) and its text twin (`/status.txt`, printed by
//! `sallyport-relay status`): agents, services with their traffic, service groups and drains,
//! containers.

use std::{fmt::Write, time::SystemTime};

use sallyport_runtime::sync::lock;

use crate::{config::Listen, ops::Ops};

/// `text` an agent sent, safe to print on an operator's terminal: control characters (escape
/// sequences, line breaks) become `?`, and it is cut at 200 characters.
pub(crate) fn printable(text: &str) -> String {
    text.chars().take(200).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// What the page shows, read once.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub ready: bool,
    pub agents: Vec<AgentRow>,
    pub services: Vec<ServiceRow>,
    /// The members of every service with several agents or a health check, and of any service
    /// with a draining member: (service, strategy, member).
    pub members: Vec<(String, &'static str, crate::groups::MemberView)>,
    pub drains: Vec<(crate::groups::DrainView, usize)>,
    /// The certificates of terminated HTTPS services.
    pub certificates: Vec<CertificateRow>,
}

#[derive(Debug)]
pub(crate) struct CertificateRow {
    pub name: String,
    pub names: String,
    pub issuer: String,
    /// The end of validity as a date, and the days left.
    pub expires: String,
    /// Its file, or the ACME challenge and directory it is ordered from.
    pub source: String,
    /// Why its files could not be read at the last look (the served one stays), or `-`.
    pub problem: String,
}

#[derive(Debug)]
pub(crate) struct AgentRow {
    pub name: String,
    pub remote: String,
    pub software: String,
    pub connected_for: String,
    pub rtt_ms: f64,
    /// The transport the tunnel runs over, and why the agent chose it.
    pub transport: String,
    /// The tunnel's connection and its lanes.
    pub connections: usize,
    pub containers: Vec<(String, String, Option<u64>)>,
}

#[derive(Debug)]
pub(crate) struct ServiceRow {
    pub name: String,
    /// Who may reach it: its rules (`own:N`, `default:N`, `open`), then `login`, `rate` and `cap`
    /// when it has them.
    pub access: String,
    pub agent: String,
    pub listen: String,
    pub up: bool,
    pub active: i64,
    pub total: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

pub(crate) fn snapshot(ops: &Ops) -> Snapshot {
    let agents = ops.agents.subscribe().borrow().clone();
    let agent_rows = agents
        .values()
        .map(|s| AgentRow {
            name: s.name.clone(),
            remote: s.remote.to_string(),
            software: printable(&s.software),
            connected_for: SystemTime::now()
                .duration_since(s.connected_at)
                .map(|d| humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string())
                .unwrap_or_default(),
            rtt_ms: s.connection.rtt().as_secs_f64() * 1000.0,
            transport: match lock(&s.transport_why).as_str() {
                "" => s.transport().to_string(),
                why => format!("{} ({})", s.transport(), printable(why)),
            },
            connections: s.connections(),
            containers: lock(&s.containers)
                .iter()
                .map(|c| (printable(&c.name), printable(&c.state), c.cold_start_ms))
                .collect(),
        })
        .collect();
    let (config, bound) = (ops.config.get(), sallyport_runtime::sync::read(&ops.bound).clone());
    let groups = ops.groups.members(&ops.agents, &config);
    let services = config
        .services
        .values()
        .map(|s| {
            let listen = match (bound.get(&s.name), &s.listen) {
                (Some(bound), Listen::Tcp(_)) => format!("tcp {bound}"),
                (Some(bound), Listen::Udp(_)) => format!("udp {bound}"),
                _ => s.listen.to_string(),
            };
            let (active, total, bytes_up, bytes_down) = ops.runtime.metrics.service_figures(&s.name);
            let members = groups.get(&s.name).map(Vec::as_slice).unwrap_or_default();
            ServiceRow {
                name: s.name.clone(),
                access: config.access.summary(&s.name),
                agent: members.iter().map(|m| m.agent.as_str()).collect::<Vec<_>>().join(","),
                listen,
                up: members.iter().any(|m| m.usable),
                active,
                total,
                bytes_up,
                bytes_down,
            }
        })
        .collect();
    let members = groups
        .into_iter()
        .filter_map(|(service, members)| {
            let group = config.group(&service)?;
            let shown = group.agents.len() > 1
                || group.health.is_some()
                || members.iter().any(|m| m.state == crate::groups::State::Draining);
            shown.then(|| {
                let strategy = group.strategy.word();
                members.into_iter().map(move |m| (service.clone(), strategy, m))
            })
        })
        .flatten()
        .collect();
    let drains = ops
        .groups
        .drains()
        .into_iter()
        .map(|d| {
            let live = ops.groups.live_of(&d.agent);
            (d, live)
        })
        .collect();
    let now = sallyport_runtime::clock::unix_now() as i64;
    let certificates = ops
        .certs
        .list()
        .into_iter()
        .map(|(name, held)| {
            let source = match &held.files.acme {
                Some(acme) => format!("ACME {} ({})", acme.challenge.word(), acme.directory),
                None => held.files.cert.display().to_string(),
            };
            let problem = held.error.as_deref().map(printable);
            let Some(loaded) = held.loaded else {
                let names = held.files.acme.as_ref().map(|a| a.names.join(", ")).unwrap_or_default();
                let problem = problem.unwrap_or_else(|| "not issued yet".into());
                return CertificateRow {
                    name,
                    names,
                    issuer: "-".into(),
                    expires: "-".into(),
                    source,
                    problem,
                };
            };
            CertificateRow {
                name,
                names: loaded.names.join(", "),
                issuer: printable(&loaded.issuer),
                expires: format!(
                    "{} ({} d)",
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH
                            + std::time::Duration::from_secs(loaded.not_after_unix.max(0) as u64)
                    ),
                    (loaded.not_after_unix - now).div_euclid(86_400)
                ),
                source,
                problem: problem.unwrap_or_else(|| "-".into()),
            }
        })
        .collect();
    Snapshot { ready: ops.is_ready(), agents: agent_rows, services, members, drains, certificates }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One table of the page: the HTML and the text rendering share it.
struct Table {
    id: &'static str,
    title: String,
    header: &'static [&'static str],
    rows: Vec<Vec<String>>,
    /// Said instead of an empty table (`None`: an empty table is left out).
    empty: Option<&'static str>,
}

fn cold(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
}

fn seconds(d: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}

fn tables(s: &Snapshot) -> [Table; 6] {
    let agents = s
        .agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.remote.clone(),
                a.connected_for.clone(),
                format!("{:.1} ms", a.rtt_ms),
                a.transport.clone(),
                a.connections.to_string(),
                a.software.clone(),
            ]
        })
        .collect();
    let services = s
        .services
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.agent.clone(),
                r.listen.clone(),
                if r.up { "up" } else { "agent away" }.into(),
                r.active.to_string(),
                r.total.to_string(),
                bytes(r.bytes_up),
                bytes(r.bytes_down),
                r.access.clone(),
            ]
        })
        .collect();
    let members = s
        .members
        .iter()
        .map(|(service, strategy, m)| {
            let detail = if m.detail.is_empty() { "-".to_owned() } else { printable(&m.detail) };
            vec![
                service.clone(),
                (*strategy).into(),
                m.agent.clone(),
                m.state.word().into(),
                m.live.to_string(),
                detail,
            ]
        })
        .collect();
    let drains = s
        .drains
        .iter()
        .map(|(d, live)| vec![d.agent.clone(), seconds(d.since), seconds(d.grace_left), live.to_string()])
        .collect();
    let containers = s
        .agents
        .iter()
        .flat_map(|a| a.containers.iter().map(move |(name, state, ms)| (a, name, state, ms)))
        .map(|(a, name, state, ms)| vec![a.name.clone(), name.clone(), state.clone(), cold(*ms)])
        .collect();
    let certificates = s
        .certificates
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.names.clone(),
                c.issuer.clone(),
                c.expires.clone(),
                c.source.clone(),
                c.problem.clone(),
            ]
        })
        .collect();
    [
        Table {
            id: "agents",
            title: format!("Agents ({})", s.agents.len()),
            header: &["agent", "from", "connected for", "RTT", "transport", "connections", "software"],
            rows: agents,
            empty: Some("No agent connected."),
        },
        Table {
            id: "services",
            title: "Services".into(),
            header: &["service", "agent", "listens", "state", "open", "total", "up", "down", "access"],
            rows: services,
            empty: Some("No service configured."),
        },
        Table {
            id: "groups",
            title: "Service groups".into(),
            header: &["service", "strategy", "member", "health", "open", "why"],
            rows: members,
            empty: None,
        },
        Table {
            id: "drains",
            title: "Draining".into(),
            header: &["agent", "draining for", "grace left", "open"],
            rows: drains,
            empty: None,
        },
        Table {
            id: "containers",
            title: "Containers".into(),
            header: &["agent", "container", "state", "last cold start"],
            rows: containers,
            empty: None,
        },
        Table {
            id: "certificates",
            title: "Certificates".into(),
            header: &["certificate", "names", "issuer", "expires", "from", "problem"],
            rows: certificates,
            empty: None,
        },
    ]
}

/// The page: the tables, refreshed every 5 s, no scripts, no external assets.
pub(crate) fn html(s: &Snapshot) -> String {
    let mut out = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>Sallyport relay</title><style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin-bottom:2em}th,td{border:1px solid #ccc;padding:.3em .8em;text-align:left}\
         th{background:#f3f3f3}.up{color:#070}.down{color:#a00}</style></head><body>",
    );
    let _ = write!(
        out,
        "<h1>Sallyport relay</h1><p>{}</p>",
        if s.ready { "<span class=\"up\">ready</span>" } else { "<span class=\"down\">draining</span>" }
    );
    for table in tables(s) {
        if table.rows.is_empty() && table.empty.is_none() {
            continue;
        }
        let _ = write!(out, "<h2>{}</h2>", escape(&table.title));
        if table.rows.is_empty() {
            let _ = write!(out, "<p>{}</p>", table.empty.unwrap_or_default());
            continue;
        }
        let _ = write!(out, "<table id=\"{}\"><tr>", table.id);
        for h in table.header {
            let _ = write!(out, "<th>{h}</th>");
        }
        out.push_str("</tr>");
        for row in &table.rows {
            out.push_str("<tr>");
            for (column, cell) in row.iter().enumerate() {
                // The services' state column is coloured.
                let class = match (table.id, column, cell.as_str()) {
                    ("services", 3, "up") => Some("up"),
                    ("services", 3, _) => Some("down"),
                    ("groups", 3, "healthy") => Some("up"),
                    ("groups", 3, _) => Some("down"),
                    _ => None,
                };
                let _ = match class {
                    Some(class) => write!(out, "<td><span class=\"{class}\">{}</span></td>", escape(cell)),
                    None => write!(out, "<td>{}</td>", escape(cell)),
                };
            }
            out.push_str("</tr>");
        }
        out.push_str("</table>");
    }
    out.push_str("<p><a href=\"/metrics\">metrics</a></p></body></html>\n");
    out
}

/// The same as aligned text.
pub(crate) fn text(s: &Snapshot) -> String {
    let mut out = format!("relay: {}\n\n", if s.ready { "ready" } else { "draining" });
    for table in tables(s) {
        if table.rows.is_empty() && table.empty.is_none() {
            continue;
        }
        let mut rows = vec![table.header.iter().map(|h| h.to_uppercase()).collect::<Vec<_>>()];
        rows.extend(table.rows);
        let columns = rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |v| v.chars().count())).max().unwrap_or(0))
            .collect();
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_strings_print_without_control_characters() {
        assert_eq!(printable("running\u{1b}[2J\nroot"), "running?[2J?root");
        assert_eq!(printable(&"x".repeat(500)).len(), 200);
    }
}
