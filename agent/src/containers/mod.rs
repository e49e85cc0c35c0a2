//! The containers the agent owns, through the Docker Engine API: created from `agent.toml`,
//! started when a connection arrives (on-demand) or kept running (always), stopped when idle, and
//! followed through the engine's event stream. Containers the agent creates carry its labels; it
//! never touches any other.

mod check;
mod engine;
mod model;
pub mod spec;

use sallyport_runtime::sync::lock;
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use engine::{DockerSettings, DEFAULT_ENDPOINT};
use engine::{Engine, Inspected};
pub use spec::ContainerSpec;
use spec::{Ready, StartPolicy};

use crate::backoff::Backoff;
pub use model::{ContainerError, ContainerState, LABEL_AGENT, LABEL_CONTAINER, LABEL_PREFIX, LABEL_SPEC};

impl ContainerState {
    /// One word for listings: `running`, `stopped`, `absent`, ...
    pub fn word(&self) -> String {
        match self {
            Self::Unknown => "unknown".into(),
            Self::EngineDown => "engine-down".into(),
            Self::Absent => "absent".into(),
            Self::Stopped { oom_killed: true, .. } => "stopped (out of memory)".into(),
            Self::Stopped { exit_code: Some(code), .. } => format!("stopped (exit {code})"),
            Self::Stopped { .. } => "stopped".into(),
            Self::Starting => "starting".into(),
            Self::Running { health: Some(health) } => format!("running ({health})"),
            Self::Running { health: None } => "running".into(),
        }
    }
}

/// Counters of one container, for tests and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerStats {
    /// Starts the agent made.
    pub starts: u64,
    /// Of those, the ones that failed.
    pub failed_starts: u64,
    /// The latest start failed (a health check counts the container out until one succeeds).
    pub last_start_failed: bool,
    /// Stops for idleness.
    pub idle_stops: u64,
    /// The latest cold start: from the start request to the first accepted connection.
    pub last_cold_start: Option<Duration>,
}

#[derive(Debug)]
struct Slot {
    /// Replaced by a reload; a new spec applies at the container's next start.
    spec: RwLock<Arc<ContainerSpec>>,
    state: watch::Sender<ContainerState>,
    /// Connections holding the container up.
    leases: AtomicUsize,
    /// Bumped by every new lease: an idle timer armed before it does not stop the container.
    generation: AtomicU64,
    /// Starts, stops and restarts of this container run one at a time; concurrent connections
    /// waiting for a cold start share it.
    lifecycle: tokio::sync::Mutex<()>,
    idle: tokio::sync::Notify,
    stats: Mutex<ContainerStats>,
}

impl Slot {
    /// The spec in force.
    fn spec(&self) -> Arc<ContainerSpec> {
        sallyport_runtime::sync::read(&self.spec).clone()
    }

    /// Counts a failed start; a health check counts the container out until a start succeeds.
    fn start_failed(&self) {
        let mut stats = lock(&self.stats);
        stats.failed_starts += 1;
        stats.last_start_failed = true;
    }
}

/// The manager of the agent's declared containers.
#[derive(Debug, Clone)]
pub struct Containers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Engine,
    slots: BTreeMap<String, Arc<Slot>>,
    /// The idle timers and the starts the reconcile loop begins: they end with `run`.
    tasks: tokio_util::task::TaskTracker,
}

/// Holds a container up while a connection uses it; dropping it may arm the idle stop.
#[derive(Debug)]
pub struct Lease {
    slot: Arc<Slot>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.slot.leases.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.slot.idle.notify_one();
        }
    }
}

impl Containers {
    /// A manager for `specs` of agent `agent`. Nothing is contacted until [`run`](Self::run).
    pub fn new(
        agent: &str,
        settings: DockerSettings,
        specs: impl IntoIterator<Item = ContainerSpec>,
    ) -> Self {
        let slots = specs
            .into_iter()
            .map(|spec| {
                let name = spec.name.clone();
                let slot = Slot {
                    spec: RwLock::new(Arc::new(spec)),
                    state: watch::Sender::new(ContainerState::Unknown),
                    leases: AtomicUsize::new(0),
                    generation: AtomicU64::new(0),
                    lifecycle: tokio::sync::Mutex::new(()),
                    idle: tokio::sync::Notify::new(),
                    stats: Mutex::default(),
                };
                (name, Arc::new(slot))
            })
            .collect();
        Self {
            inner: Arc::new(Inner { engine: Engine::new(agent, settings), slots, tasks: Default::default() }),
        }
    }

    /// Takes the specs of a reloaded configuration: each declared container's spec is replaced
    /// and applies at its next start (a running container goes on as it is).
    pub fn update_specs(&self, specs: impl IntoIterator<Item = ContainerSpec>) {
        for spec in specs {
            if let Some(slot) = self.inner.slots.get(&spec.name) {
                if *slot.spec() != spec {
                    *sallyport_runtime::sync::write(&slot.spec) = Arc::new(spec);
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// The state of every declared container.
    pub fn states(&self) -> BTreeMap<String, ContainerState> {
        self.inner.slots.iter().map(|(name, slot)| (name.clone(), slot.state.borrow().clone())).collect()
    }

    /// The state of every declared container, as the control stream reports it.
    pub fn reports(&self) -> Vec<sallyport_proto::ContainerReport> {
        self.inner
            .slots
            .iter()
            .map(|(name, slot)| sallyport_proto::ContainerReport {
                name: name.clone(),
                state: slot.state.borrow().word(),
                cold_start_ms: lock(&slot.stats)
                    .last_cold_start
                    .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64),
            })
            .collect()
    }

    /// Failed starts of every declared container since the agent started.
    pub fn start_failures(&self) -> Vec<(String, u64)> {
        self.inner.slots.iter().map(|(name, slot)| (name.clone(), lock(&slot.stats).failed_starts)).collect()
    }

    /// Follows the state of `name`.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<ContainerState>> {
        self.inner.slots.get(name).map(|slot| slot.state.subscribe())
    }

    pub fn stats(&self, name: &str) -> Option<ContainerStats> {
        self.inner.slots.get(name).map(|slot| lock(&slot.stats).clone())
    }

    fn slot(&self, name: &str) -> Result<&Arc<Slot>, ContainerError> {
        self.inner.slots.get(name).ok_or_else(|| ContainerError::NotDeclared(name.to_owned()))
    }

    /// Follows the engine until `stop`: re-lists the agent's containers whenever the event stream
    /// (re)connects, keeps `always` containers running, arms idle stops, and survives the engine
    /// going away and coming back.
    pub async fn run(self, stop: CancellationToken) {
        if self.is_empty() {
            return;
        }
        let idle_timers: Vec<_> = self
            .inner
            .slots
            .values()
            .filter(|slot| slot.spec().start == StartPolicy::OnDemand && slot.spec().idle_stop.is_some())
            .map(|slot| self.inner.tasks.spawn(self.clone().idle_stop(slot.clone())))
            .collect();
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut engine_down_logged = false;
        while !stop.is_cancelled() {
            let followed = tokio::select! {
                _ = stop.cancelled() => break,
                result = self.follow_engine(&mut backoff) => result,
            };
            if let Err(e) = followed {
                for slot in self.inner.slots.values() {
                    slot.state.send_replace(ContainerState::EngineDown);
                }
                if !engine_down_logged {
                    warn!(error = %e, "Docker engine unavailable; waiting for it");
                    engine_down_logged = true;
                }
            } else {
                engine_down_logged = false;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
        for timer in idle_timers {
            timer.abort();
        }
        // A start under way finishes (a container half created is worse than one started).
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// One life of the engine connection: list, reconcile, then apply events until the stream
    /// ends. `Ok` when the stream ended after working, `Err` when the engine could not be reached.
    async fn follow_engine(&self, backoff: &mut Backoff) -> Result<(), ContainerError> {
        let mut events = self.inner.engine.events().await?;
        let owned = self.inner.engine.list_owned().await?;
        info!(owned = owned.len(), "Docker engine connected");
        backoff.reset();
        for (name, slot) in &self.inner.slots {
            let state = owned.get(name).cloned().unwrap_or(ContainerState::Absent);
            slot.state.send_replace(state);
            self.reconcile(slot);
        }
        while let Some(event) = events.next().await {
            let Some(slot) = self.inner.slots.get(&event.container) else { continue };
            let previous = slot.state.borrow().clone();
            let next = match event.action.as_str() {
                "start" => ContainerState::Running { health: None },
                "die" => ContainerState::Stopped {
                    exit_code: event.exit_code,
                    oom_killed: matches!(previous, ContainerState::Stopped { oom_killed: true, .. })
                        || event.oom_seen,
                },
                "oom" => {
                    warn!(container = %event.container, "container ran out of memory");
                    ContainerState::Stopped { exit_code: None, oom_killed: true }
                }
                "destroy" => ContainerState::Absent,
                action if action.starts_with("health_status") => {
                    let health = action.split_once(':').map(|(_, h)| h.trim().to_owned());
                    ContainerState::Running { health }
                }
                _ => continue,
            };
            if next != previous {
                info!(container = %event.container, state = %next.word(), "container state");
                slot.state.send_replace(next);
            }
            if matches!(event.action.as_str(), "die" | "destroy") {
                self.reconcile(slot);
            }
        }
        Ok(())
    }

    /// Brings one container toward its policy: `always` ones are (re)started; running on-demand
    /// ones with no connection get their idle timer armed.
    fn reconcile(&self, slot: &Arc<Slot>) {
        let running = matches!(*slot.state.borrow(), ContainerState::Running { .. });
        match slot.spec().start {
            StartPolicy::Always if !running => {
                let (this, slot) = (self.clone(), slot.clone());
                self.inner.tasks.spawn(async move {
                    if let Err(e) = this.ensure_running(&slot).await {
                        warn!(container = %slot.spec().name, error = %e, "cannot start container");
                    }
                });
            }
            StartPolicy::OnDemand if running && slot.leases.load(Ordering::Acquire) == 0 => {
                slot.idle.notify_one();
            }
            _ => {}
        }
    }

    /// Stops an on-demand container `idle_stop` after its last connection closed.
    async fn idle_stop(self, slot: Arc<Slot>) {
        let Some(after) = slot.spec().idle_stop else { return };
        loop {
            slot.idle.notified().await;
            let armed = slot.generation.load(Ordering::Acquire);
            tokio::time::sleep(after).await;
            let _guard = slot.lifecycle.lock().await;
            if slot.leases.load(Ordering::Acquire) != 0 || slot.generation.load(Ordering::Acquire) != armed {
                continue;
            }
            if !matches!(*slot.state.borrow(), ContainerState::Running { .. }) {
                continue;
            }
            match self.inner.engine.stop(&slot.spec()).await {
                Ok(()) => {
                    info!(container = %slot.spec().name, idle = ?after, "container stopped after idling");
                    lock(&slot.stats).idle_stops += 1;
                }
                Err(e) => warn!(container = %slot.spec().name, error = %e, "cannot stop idle container"),
            }
        }
    }

    /// Connects to `port` of container `name`, starting it first when it is stopped (bounded by
    /// the start timeout); the lease keeps it from idling out while the connection lives.
    pub async fn connect(&self, name: &str, port: u16) -> Result<(TcpStream, Lease), ContainerError> {
        let slot = self.slot(name)?.clone();
        slot.generation.fetch_add(1, Ordering::AcqRel);
        slot.leases.fetch_add(1, Ordering::AcqRel);
        let lease = Lease { slot: slot.clone() };
        let limit = self.inner.engine.settings().start_timeout;
        let started = Instant::now();
        let result = tokio::time::timeout(limit, async {
            let (ip, cold) = self.ensure_running(&slot).await?;
            let ready = async {
                let tcp = self.until_ready(&slot, SocketAddr::new(ip, port)).await?;
                if cold {
                    // A container that exited at once frees its address, and the engine may give it
                    // to another container at once: the connection counts only if ours still runs (a
                    // running container keeps its address).
                    self.inner.engine.check_alive(&slot.spec()).await?;
                }
                Ok(tcp)
            };
            match ready.await {
                Ok(tcp) if cold => {
                    let took = started.elapsed();
                    info!(container = %name, cold_start = ?took, "container started for a connection");
                    lock(&slot.stats).last_cold_start = Some(took);
                    Ok(tcp)
                }
                // The engine started it, and it exited (or ran out of memory) before it took a
                // connection: a failed start too.
                Err(e @ (ContainerError::ExitedDuringStart { .. } | ContainerError::OutOfMemory { .. }))
                    if cold =>
                {
                    slot.start_failed();
                    Err(e)
                }
                other => other,
            }
        })
        .await;
        match result {
            Ok(Ok(tcp)) => Ok((tcp, lease)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ContainerError::NotReady { name: name.to_owned(), waited: limit }),
        }
    }

    /// The container's address, starting it when it is not running; `true` when this call (or one
    /// it waited for) started it.
    async fn ensure_running(&self, slot: &Arc<Slot>) -> Result<(IpAddr, bool), ContainerError> {
        let _guard = slot.lifecycle.lock().await;
        let inspected = self.created(slot).await?;
        if let Inspected { running: true, address: Some(ip), .. } = inspected {
            return Ok((ip, false));
        }
        let ip = self.start_locked(slot).await?;
        Ok((ip, true))
    }

    /// Creates the container if it is not there (the caller holds its lifecycle lock); a failure
    /// (no engine, no image, ...) counts as a failed start.
    async fn created(&self, slot: &Arc<Slot>) -> Result<Inspected, ContainerError> {
        let created = self.inner.engine.ensure_created(&slot.spec()).await;
        if created.is_err() {
            slot.start_failed();
        }
        created
    }

    /// Starts the container (the caller holds its lifecycle lock) and returns its address.
    async fn start_locked(&self, slot: &Arc<Slot>) -> Result<IpAddr, ContainerError> {
        slot.state.send_replace(ContainerState::Starting);
        lock(&slot.stats).starts += 1;
        let result = self.inner.engine.start(&slot.spec()).await;
        match &result {
            Ok(_) => {
                lock(&slot.stats).last_start_failed = false;
                slot.state.send_replace(ContainerState::Running { health: None });
            }
            Err(e) => {
                slot.start_failed();
                warn!(
                    event_id = crate::events::id::CONTAINER_START_FAILED,
                    container = %slot.spec().name,
                    error = %e,
                    "container did not start"
                );
                let state = self.inner.engine.state_of(&slot.spec()).await.unwrap_or(ContainerState::Unknown);
                slot.state.send_replace(state);
            }
        }
        result
    }

    /// Waits until the container is ready and returns the first accepted connection.
    async fn until_ready(&self, slot: &Arc<Slot>, addr: SocketAddr) -> Result<TcpStream, ContainerError> {
        loop {
            let healthy = match slot.spec().ready {
                Ready::Port => true,
                Ready::Health => self.inner.engine.is_healthy(&slot.spec()).await?,
            };
            if healthy {
                if let Ok(Ok(tcp)) =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
                {
                    return Ok(tcp);
                }
            }
            // Not accepting yet: still starting, or gone?
            self.inner.engine.check_alive(&slot.spec()).await?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts `name` (a command from the relay).
    pub async fn start(&self, name: &str) -> Result<String, ContainerError> {
        let slot = self.slot(name)?.clone();
        let (ip, _) = self.ensure_running(&slot).await?;
        Ok(format!("{name} running at {ip}"))
    }

    /// Stops `name` (a command from the relay).
    pub async fn stop(&self, name: &str) -> Result<String, ContainerError> {
        let slot = self.slot(name)?.clone();
        let _guard = slot.lifecycle.lock().await;
        self.inner.engine.stop(&slot.spec()).await?;
        slot.state.send_replace(self.inner.engine.state_of(&slot.spec()).await?);
        Ok(format!("{name} stopped"))
    }

    /// Restarts `name` (a command from the relay).
    pub async fn restart(&self, name: &str) -> Result<String, ContainerError> {
        let slot = self.slot(name)?.clone();
        let _guard = slot.lifecycle.lock().await;
        self.created(&slot).await?;
        self.inner.engine.stop(&slot.spec()).await?;
        let ip = self.start_locked(&slot).await?;
        Ok(format!("{name} restarted, running at {ip}"))
    }

    /// The state of `name` as the engine reports it now.
    pub async fn status(&self, name: &str) -> Result<String, ContainerError> {
        let slot = self.slot(name)?.clone();
        let state = self.inner.engine.state_of(&slot.spec()).await?;
        slot.state.send_replace(state.clone());
        Ok(format!("{name}: {}", state.word()))
    }

    /// The last `tail` lines of the container's output, at most its last `max` bytes.
    pub async fn logs(&self, name: &str, tail: u32, max: usize) -> Result<String, ContainerError> {
        let slot = self.slot(name)?.clone();
        self.inner.engine.logs(&slot.spec(), tail, max).await
    }
}
