//! The service groups' gauges, read at scrape time: each member's state and open connections, and
//! how many members each group has and how many of them take new connections.

use super::Metrics;

/// One member of a service's group as a scrape sees it.
#[derive(Debug)]
pub(crate) struct MemberGauges<'a> {
    pub(crate) service: &'a str,
    pub(crate) agent: &'a str,
    /// `healthy`, `unknown`, `unhealthy`, `draining` or `away`.
    pub(crate) state: &'static str,
    /// Whether it takes new connections now.
    pub(crate) usable: bool,
    pub(crate) connections: usize,
}

impl Metrics {
    /// The groups' gauges as they stand now (a scrape calls this before rendering).
    pub(crate) fn groups<'a>(&self, members: impl IntoIterator<Item = MemberGauges<'a>>) {
        let (state, connections) = (&self.group_member_state, &self.group_member_connections);
        let (members_of, usable_of) = (&self.group_members, &self.group_members_usable);
        for family in [state, connections, members_of, usable_of] {
            family.clear();
        }
        for m in members {
            let (service, agent) = (m.service.to_owned(), m.agent.to_owned());
            let labels = vec![("service", service.clone()), ("agent", agent)];
            let mut with_state = labels.clone();
            with_state.push(("state", m.state.to_owned()));
            state.get_or_create(&with_state).set(1);
            connections.get_or_create(&labels).set(i64::try_from(m.connections).unwrap_or(i64::MAX));
            let service = vec![("service", service)];
            members_of.get_or_create(&service).inc();
            let usable = usable_of.get_or_create(&service);
            if m.usable {
                usable.inc();
            }
        }
    }
}
