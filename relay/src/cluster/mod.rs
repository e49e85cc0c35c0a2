//! Several relay replicas behind one address (`[cluster]` in relay.toml).
//!
//! Each replica serves agents and clients on its own: an agent keeps a tunnel to every replica,
//! so a client reaching any of them reaches the agent, and losing one replica loses only the
//! connections it carried. What must be one across replicas — join tokens (each redeemed once)
//! and revocations — has a single writer: the replica named `cluster.writer` (ordinal 0 of the
//! StatefulSet, with its volume). The others forward writes to it and, every `sync_interval`,
//! report to it and take its revocations (kept in their own file, so they hold across their own
//! restarts while the writer is away) and its list of replicas serving, which they pass on to
//! their agents. No consensus of our own: when the writer is down, tunnels, traffic and
//! enforcement of known revocations go on, and writes fail with a clear error.
//!
//! A replica that has just started holds no agent yet: a client sent to it would be refused. So
//! agents reach every replica that is not draining (their QUIC port is a Service that publishes
//! pods before they are ready), and a replica turns ready for clients (`/readyz`) only once it
//! holds every agent the other replicas hold, or after [`WARM_UP_MAX`].

pub(crate) mod certificates;
pub(crate) mod peer;
pub(crate) mod sync;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hyper::Method;
use sallyport_proto::Replica;
use sallyport_runtime::sync::lock;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::{
    config,
    trust::{enroll::RedeemError, revocations::RevocationFile},
};

/// How far the replicas' clocks may disagree, at most, for revocations to hold across them.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// How long a call to the writer may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a starting replica waits for the agents the cluster holds before it takes clients.
pub(crate) const WARM_UP_MAX: Duration = Duration::from_secs(10);

/// This replica's place in its cluster.
pub(crate) struct Cluster {
    pub(crate) config: config::Cluster,
    /// This replica, with the random number of this start.
    pub(crate) me: Replica,
    /// The replica port's TLS (the relay's own certificate, both ways): replicas prove themselves
    /// to the writer, and the writer to them, with it.
    tls: Arc<rustls::ClientConfig>,
    /// Replicas serving now, sorted (the writer: from their reports; the others: from the writer).
    serving: watch::Sender<Vec<Replica>>,
    /// The writer only: each other replica's latest report.
    reports: Mutex<BTreeMap<String, Report>>,
    /// Whether the writer answered this replica's last report (always true on the writer).
    writer_reachable: AtomicBool,
    /// Wakes the sync loop before its interval is over (a revocation was forwarded, or draining).
    pub(crate) sync_now: Notify,
    /// The writer only: woken by each report of another replica.
    reported: Notify,
    /// When this replica started.
    started: Instant,
    /// Set when the drain begins: out of the replicas serving.
    draining: AtomicBool,
    /// Set once this replica holds the agents the cluster holds (or the warm-up is over).
    warm: AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("config", &self.config)
            .field("me", &self.me)
            .field("serving", &*self.serving.borrow())
            .field("writer_reachable", &self.writer_reachable)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Report {
    boot: u64,
    at: Instant,
    serving: bool,
    agents: Vec<String>,
}

/// A replica's report to the writer (`POST /cluster/v1/sync`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SyncRequest {
    pub(crate) replica: String,
    pub(crate) boot: u64,
    /// Whether it serves (false once it drains).
    pub(crate) serving: bool,
    /// The agents with a tunnel to it.
    pub(crate) agents: Vec<String>,
    /// Its revocations: a writer that lost its own gets them back (revocations only grow).
    #[serde(default)]
    pub(crate) revocations: RevocationFile,
}

/// The writer's answer to a report.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SyncAnswer {
    pub(crate) serving: Vec<Replica>,
    pub(crate) revocations: RevocationFile,
    /// The agents with a tunnel to any replica.
    pub(crate) agents: Vec<String>,
    /// The certificates the writer ordered by ACME (a writer of an older version sends none).
    #[serde(default)]
    pub(crate) certificates: Vec<certificates::SharedCertificate>,
}

/// A join token presented at another replica, redeemed at the writer (`POST /cluster/v1/redeem`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RedeemRequest {
    pub(crate) id: u64,
    /// The secret, hex.
    pub(crate) secret: String,
}

/// The writer's verdict on a token: the agent it was made for, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RedeemAnswer {
    pub(crate) agent: Option<String>,
    pub(crate) refused: Option<RedeemError>,
}

/// Why this replica could not sync with the writer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error(transparent)]
    Peer(#[from] peer::PeerError),
    #[error("the writer answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the writer's answer is not valid: {0}")]
    Answer(#[from] toml::de::Error),
    #[error("the writer's revocations could not be kept here: {0}")]
    Save(crate::trust::state_file::StateError),
}

impl Cluster {
    /// This replica's cluster: it serves alone until it hears otherwise.
    pub(crate) fn new(config: config::Cluster, tls: Arc<rustls::ClientConfig>) -> Self {
        // Under 2^53, so it stays an integer in TOML (and in JSON, for anyone who reads it).
        let me = Replica { name: config.replica.clone(), boot: fastrand::u64(1..1 << 53) };
        Self {
            serving: watch::Sender::new(vec![me.clone()]),
            me,
            tls,
            config,
            reports: Mutex::default(),
            writer_reachable: AtomicBool::new(true),
            sync_now: Notify::new(),
            reported: Notify::new(),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            warm: AtomicBool::new(false),
        }
    }

    /// The drain begins: this replica leaves the replicas serving (at once: the loop is woken).
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.sync_now.notify_one();
    }

    fn serves(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    /// Whether this replica takes clients: it holds the agents the cluster holds, or its
    /// warm-up is over.
    pub(crate) fn is_warm(&self) -> bool {
        self.warm.load(Ordering::Relaxed)
    }

    /// Turns warm when `local` (the agents here) holds every one of `cluster_agents`, once `known`
    /// (this replica has heard from the others), or when the warm-up is over.
    fn warm_up(&self, known: bool, cluster_agents: &[String], local: &[String]) {
        if self.is_warm() {
            return;
        }
        let missing: Vec<&String> = cluster_agents.iter().filter(|a| !local.contains(a)).collect();
        if known && missing.is_empty() {
            tracing::info!(agents = local.len(), took = ?self.started.elapsed(), "warm: this replica holds every agent the cluster holds; taking clients");
            self.warm.store(true, Ordering::Relaxed);
        } else if self.started.elapsed() >= WARM_UP_MAX {
            tracing::warn!(?missing, "warm-up over: taking clients without these agents");
            self.warm.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn is_writer(&self) -> bool {
        self.config.is_writer()
    }

    /// The replicas serving now, and every change to them.
    pub(crate) fn serving(&self) -> watch::Receiver<Vec<Replica>> {
        self.serving.subscribe()
    }

    pub(crate) fn writer_reachable(&self) -> bool {
        self.writer_reachable.load(Ordering::Relaxed)
    }

    /// Whether this replica is one of `held` (the replicas an agent holds tunnels to already).
    pub(crate) fn is_held(&self, held: &[String]) -> bool {
        held.contains(&self.me.name)
    }

    /// Publishes `serving`, with this replica in it exactly when it serves itself.
    fn publish(&self, mut serving: Vec<Replica>, ready: bool) {
        serving.retain(|r| r.name != self.me.name);
        if ready {
            serving.push(self.me.clone());
        }
        serving.sort();
        self.serving.send_if_modified(|now| {
            let changed = *now != serving;
            if changed {
                tracing::info!(serving = ?serving.iter().map(|r| &r.name).collect::<Vec<_>>(), "replicas serving");
                *now = serving;
            }
            changed
        });
    }

    /// The writer: takes a replica's report; answers with the replicas serving and the agents
    /// any replica holds (`local`: the writer's own).
    pub(crate) fn report(&self, request: SyncRequest, local: &[String]) -> (Vec<Replica>, Vec<String>) {
        if request.replica != self.me.name {
            let report = Report {
                boot: request.boot,
                at: Instant::now(),
                serving: request.serving,
                agents: request.agents,
            };
            lock(&self.reports).insert(request.replica, report);
            self.reported.notify_waiters();
        }
        let agents = self.refresh(local);
        (self.serving.borrow().clone(), agents)
    }

    /// The writer: the replicas that reported serving within the member timeout, and itself;
    /// returns the agents any of them holds.
    fn refresh(&self, local: &[String]) -> Vec<String> {
        let timeout = self.config.member_timeout();
        let (serving, mut agents) = {
            let mut reports = lock(&self.reports);
            reports.retain(|_, r| r.at.elapsed() < timeout * 10);
            let fresh: Vec<(&String, &Report)> =
                reports.iter().filter(|(_, r)| r.serving && r.at.elapsed() < timeout).collect();
            let serving: Vec<Replica> =
                fresh.iter().map(|(name, r)| Replica { name: (*name).clone(), boot: r.boot }).collect();
            let agents: Vec<String> = fresh.iter().flat_map(|(_, r)| r.agents.iter().cloned()).collect();
            (serving, agents)
        };
        agents.extend(local.iter().cloned());
        agents.sort();
        agents.dedup();
        self.publish(serving, self.serves());
        agents
    }

    async fn call(&self, method: Method, path: &str, body: String) -> Result<(u16, String), peer::PeerError> {
        peer::call(&self.config.writer_peer, &self.tls, method, path, body, CALL_TIMEOUT).await
    }

    /// Returns once this replica's revocations include the others': at once on a replica that is
    /// not the writer (it keeps its own file and takes the writer's); on the writer, once another
    /// replica has reported since it started (each report carries that replica's revocations,
    /// which hold everything the writer had handed out), or after two `sync_interval`s (the others
    /// report every interval: none reported, none is up), since a writer that lost its file gets
    /// the revocations back from those reports.
    pub(crate) async fn revocations_heard(&self) {
        if !self.is_writer() {
            return;
        }
        let deadline = tokio::time::Instant::from_std(self.started + self.config.sync_interval * 2);
        loop {
            // Registered before the look, so a report arriving in between still wakes it.
            let reported = self.reported.notified();
            if !lock(&self.reports).is_empty() {
                return;
            }
            tokio::select! {
                () = reported => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// How far ahead of its own clock a revocation's cutoff is set in a cluster: a certificate a
    /// replica signs in the moments before it learns of the revocation (at most two reports
    /// later), or with a clock running ahead of the writer's by up to [`CLOCK_SKEW`], is still
    /// issued before the cutoff.
    pub(crate) fn revocation_ahead_secs(&self) -> u64 {
        (self.config.sync_interval * 2 + CLOCK_SKEW).as_secs_f64().ceil() as u64
    }

    /// Another replica, before it signs a renewal: reports to the writer now and takes its
    /// revocations, so it signs nothing the writer revoked a moment ago.
    pub(crate) async fn refresh_revocations(
        &self,
        agents: Vec<String>,
        revocations: &crate::trust::revocations::Revocations,
    ) -> Result<(), SyncError> {
        let answer = self.sync_once(agents, revocations.snapshot()).await?;
        revocations.absorb(answer.revocations).map_err(SyncError::Save)?;
        Ok(())
    }

    /// Another replica: reports to the writer (with `agents`, those it holds, and its revocations)
    /// and takes its answer.
    async fn sync_once(
        &self,
        agents: Vec<String>,
        revocations: RevocationFile,
    ) -> Result<SyncAnswer, SyncError> {
        let request = SyncRequest {
            replica: self.me.name.clone(),
            boot: self.me.boot,
            serving: self.serves(),
            agents,
            revocations,
        };
        let body = toml::to_string(&request).unwrap_or_default();
        let (status, body) = self.call(Method::POST, "/cluster/v1/sync", body).await?;
        if status != 200 {
            return Err(SyncError::Status { status, body: sallyport_runtime::logs::printable(&body, 200) });
        }
        Ok(toml::from_str(&body)?)
    }

    /// Another replica: redeems a join token at the writer, which alone marks tokens used.
    pub(crate) async fn redeem(&self, id: u64, secret: &[u8; 32]) -> Result<String, RedeemError> {
        let request = RedeemRequest { id, secret: sallyport_runtime::hex::encode(secret) };
        let body = toml::to_string(&request).unwrap_or_default();
        let answer = match self.call(Method::POST, "/cluster/v1/redeem", body).await {
            Ok((200, body)) => toml::from_str::<RedeemAnswer>(&body).ok(),
            Ok((status, body)) => {
                tracing::warn!(status, body = %sallyport_runtime::logs::printable(&body, 200), "the writer refused a token check");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, writer = %self.config.writer, "cannot reach the writer to redeem a join token");
                None
            }
        };
        match answer {
            Some(RedeemAnswer { agent: Some(agent), refused: None }) => Ok(agent),
            Some(RedeemAnswer { refused: Some(refused), .. }) => Err(refused),
            _ => Err(RedeemError::WriterUnreachable),
        }
    }

    /// Another replica: passes an operator's write (`path` with its query) to the writer and
    /// returns its answer, or a 503 that says the writer is unreachable.
    pub(crate) async fn forward(&self, method: Method, path: &str) -> (u16, String) {
        match self.call(method, path, String::new()).await {
            Ok(answer) => answer,
            Err(e) => (
                503,
                format!(
                    "this replica forwards writes to the writer replica {:?}, which cannot be reached ({e}): \
                     tunnels and traffic keep working; try again when it is back\n",
                    self.config.writer
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replica port's client TLS, with a throwaway certificate.
    fn tls() -> Arc<rustls::ClientConfig> {
        let made = rcgen::generate_simple_self_signed(vec!["relay".into()]).expect("certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
        let identity = sallyport_runtime::tls::Identity { chain: vec![made.cert.der().clone()], key };
        Arc::new(sallyport_runtime::replica_tls::client(identity).expect("tls"))
    }

    /// The replica's key never shows in a debug print of the cluster (nor so of the relay).
    #[test]
    fn the_key_stays_out_of_debug_prints() {
        let cluster = Cluster::new(
            config::Cluster {
                replica: "relay-1".into(),
                writer: "relay-0".into(),
                writer_peer: "relay-0:9443".into(),
                peer_listen: config::DEFAULT_PEER_LISTEN,
                sync_interval: Duration::from_secs(1),
            },
            tls(),
        );
        let printed = format!("{cluster:?}");
        assert!(
            !printed.contains("PRIVATE") && !printed.contains("key") && printed.contains("relay-1"),
            "{printed}"
        );
    }

    fn cluster(replica: &str) -> Cluster {
        let config = config::Cluster {
            replica: replica.into(),
            writer: "relay-0".into(),
            writer_peer: "127.0.0.1:1".into(),
            peer_listen: config::DEFAULT_PEER_LISTEN,
            sync_interval: Duration::from_millis(100),
        };
        Cluster::new(config, tls())
    }

    fn names(c: &Cluster) -> Vec<String> {
        c.serving().borrow().iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn the_writer_counts_replicas_that_report_serving_and_forgets_silent_ones() {
        let writer = cluster("relay-0");
        assert!(writer.is_writer());
        let report = |name: &str, serving, agents: &[&str]| SyncRequest {
            replica: name.into(),
            boot: 7,
            serving,
            agents: agents.iter().map(|a| (*a).to_owned()).collect(),
            revocations: RevocationFile::default(),
        };
        let (serving, agents) = writer.report(report("relay-1", true, &["nas"]), &["winbox".into()]);
        assert_eq!(serving.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["relay-0", "relay-1"]);
        assert_eq!(agents, ["nas", "winbox"]);
        writer.report(report("relay-2", true, &["winbox"]), &[]);
        assert_eq!(names(&writer), ["relay-0", "relay-1", "relay-2"]);
        // Draining: out at once, and its agents no longer count.
        let (_, agents) = writer.report(report("relay-1", false, &["nas"]), &[]);
        assert_eq!(names(&writer), ["relay-0", "relay-2"]);
        assert_eq!(agents, ["winbox"]);
        // Silent for longer than the member timeout: out.
        std::thread::sleep(writer.config.member_timeout() + Duration::from_millis(20));
        assert!(writer.refresh(&[]).is_empty());
        assert_eq!(names(&writer), ["relay-0"]);
        // The writer itself drains.
        writer.drain();
        writer.refresh(&[]);
        assert!(names(&writer).is_empty());
    }

    #[test]
    fn a_replica_is_in_its_own_list_exactly_when_it_serves() {
        let follower = cluster("relay-1");
        assert!(!follower.is_writer() && follower.is_held(&["relay-1".into()]) && !follower.is_held(&[]));
        let other = Replica { name: "relay-0".into(), boot: 1 };
        follower.publish(vec![other.clone()], true);
        assert_eq!(names(&follower), ["relay-0", "relay-1"]);
        follower.publish(vec![other, follower.me.clone()], false);
        assert_eq!(names(&follower), ["relay-0"]);
    }

    #[test]
    fn a_starting_replica_takes_clients_once_it_holds_the_clusters_agents() {
        let replica = cluster("relay-1");
        let agents = |names: &[&str]| names.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        // Not heard from the others yet: not warm, even with nothing missing.
        replica.warm_up(false, &[], &[]);
        assert!(!replica.is_warm());
        replica.warm_up(true, &agents(&["nas", "winbox"]), &agents(&["winbox"]));
        assert!(!replica.is_warm());
        replica.warm_up(true, &agents(&["nas", "winbox"]), &agents(&["nas", "winbox", "other"]));
        assert!(replica.is_warm());
    }

    #[tokio::test]
    async fn without_the_writer_writes_fail_with_a_clear_error() {
        let follower = cluster("relay-1");
        assert_eq!(follower.redeem(1, &[0; 32]).await, Err(RedeemError::WriterUnreachable));
        let (status, body) = follower.forward(Method::POST, "/tokens?agent=x").await;
        assert_eq!(status, 503);
        assert!(
            body.contains("writer replica \"relay-0\"") && body.contains("tunnels and traffic keep working"),
            "{body}"
        );
    }
}
