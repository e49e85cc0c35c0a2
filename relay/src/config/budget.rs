//! What the relay may hold in memory, and how many client connections that makes.

use sallyport_runtime::splice;

/// The default number of runtime threads: half the cores this process may use (its CPU quota
/// where a cgroup sets one), at least one. Each thread that moves tunnel traffic brings about as
/// much kernel work with it (TCP, UDP, and in a pod the node's forwarding), which runs on the other
/// half; on 2 cores a second thread only adds hand-offs (docs/benchmarks.md).
pub fn default_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) / 2).max(1)
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// How a memory budget is spent, at worst, and so how many client connections it holds.
///
/// A client connection holds at most its request head (`max_header_bytes`, while an HTTP client
/// is still sending it), one read on its way into the tunnel (64 KiB, while the tunnel's flow
/// control holds it back) and its own state (task, socket, HTTP or TLS state:
/// [`Budget::CONNECTION_STATE`]). Data in flight inside the tunnels is bounded per tunnel, not per
/// connection, by the windows (an agent's lanes share its tunnel's, over QUIC and TCP alike); the
/// budget sets that aside for [`Budget::TUNNELS`] tunnels, along with the runtime and the
/// connections still proving who they are, over either transport. Over TCP a stream's send buffer
/// is one read, the one already counted per client connection.
///
/// Kernel socket buffers are not in it: they are the kernel's (charged to the pod's memory cgroup
/// on cgroup v2 only under the kernel's own TCP memory limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes for the runtime and the tunnels.
    pub reserved: u64,
    /// Bytes one client connection may hold at most.
    pub per_connection: u64,
    /// Client connections that fit in the rest.
    pub connections: usize,
}

impl Budget {
    /// The code, runtime, TLS and metrics of an idle relay, with room for the allocator's slack.
    pub const RUNTIME: u64 = 64 * MIB;
    /// Tunnels the budget provides for (a homelab's agents).
    pub const TUNNELS: u64 = 4;
    /// A client connection's own state besides its buffers.
    pub const CONNECTION_STATE: u64 = 16 * KIB;
    /// A connection still proving who it is, over QUIC: its small windows, its datagram buffer and
    /// handshake state.
    const UNAUTHENTICATED_QUIC: u64 = sallyport_runtime::limits::UNAUTHENTICATED_RECEIVE_WINDOW as u64
        + sallyport_runtime::limits::DATAGRAM_RECEIVE_BUFFER as u64
        + 32 * KIB;
    /// A connection still proving who it is, on either transport (the gate counts both alike).
    const UNAUTHENTICATED: u64 = if Self::UNAUTHENTICATED_QUIC > sallyport_runtime::tcp::UNAUTHENTICATED_HOLD
    {
        Self::UNAUTHENTICATED_QUIC
    } else {
        sallyport_runtime::tcp::UNAUTHENTICATED_HOLD
    };

    /// The budget `memory_budget` makes with these limits; `connections` is 0 when nothing is
    /// left for them.
    pub fn new(memory_budget: u64, max_header_bytes: usize, max_unauthenticated: usize) -> Self {
        let tunnel = u64::from(sallyport_runtime::limits::CONNECTION_RECEIVE_WINDOW)
            + sallyport_runtime::limits::SEND_WINDOW;
        let reserved =
            Self::RUNTIME + Self::TUNNELS * tunnel + max_unauthenticated as u64 * Self::UNAUTHENTICATED;
        let per_connection = max_header_bytes as u64 + splice::MAX_READ as u64 + Self::CONNECTION_STATE;
        let connections =
            usize::try_from(memory_budget.saturating_sub(reserved) / per_connection).unwrap_or(usize::MAX);
        Self { reserved, per_connection, connections }
    }
}

/// The default memory budget: the shipped StatefulSet's memory limit.
pub const DEFAULT_MEMORY_BUDGET: u64 = 512 * MIB;
