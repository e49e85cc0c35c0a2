//! The data streams the relay opens, each served toward its target.

use std::sync::Arc;

use quinn::VarInt;
use sallyport_runtime::{limits::StreamCredit, link::Connection};
use tracing::debug;

use super::*;
use crate::targets::dial;

/// Serves the data streams the relay opens until the connection ends, raising the relay's stream
/// limit as concurrency grows.
pub(super) async fn accept_streams(connection: &Connection, tunnels: &Arc<Tunnels>, open: &Arc<()>) {
    let mut credit = StreamCredit::default();
    // One clone per stream being served: its strong count, less the caller's, is the number open.
    while let Ok((send, recv)) = connection.accept_bi().await {
        if let Some(limit) = credit.raise_for(Arc::strong_count(open) as u64) {
            debug!(limit, "raising the data stream limit");
            connection.set_max_concurrent_bi_streams(VarInt::from_u32(limit));
        }
        let served = open.clone();
        let targets = tunnels.targets.clone();
        tunnels.streams.spawn(async move {
            dial::handle_stream(send, recv, targets).await;
            drop(served);
        });
    }
}
