//! The data streams the relay opens on one connection, each served toward its target.

use std::sync::Arc;

use quinn::VarInt;
use sallyport_runtime::{limits::StreamCredit, link::Connection};
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::tunnels::Tunnels;
use crate::targets::dial;

/// Serves the data streams the relay opens until the connection ends, raising the relay's stream
/// limit as concurrency grows. Each stream's task is in `open` (this connection's streams) and in
/// the agent's tracker of all streams.
pub(crate) async fn accept_streams(connection: &Connection, tunnels: &Arc<Tunnels>, open: &TaskTracker) {
    let accept = async {
        let mut credit = StreamCredit::default();
        while let Ok((send, mut recv)) = connection.accept_bi().await {
            if let Some(limit) = credit.raise_for(open.len() as u64) {
                debug!(limit, "raising the data stream limit");
                connection.set_max_concurrent_bi_streams(VarInt::from_u32(limit));
            }
            // A target that stops reading holds its stream's window: at most the connection's
            // share of stalled streams.
            connection.watch(&mut recv);
            let targets = tunnels.targets.clone();
            open.spawn(tunnels.streams.track_future(dial::handle_stream(send, recv, targets)));
        }
    };
    tokio::select! {
        () = accept => {}
        never = connection.sweep_stalls() => match never {},
    }
}
