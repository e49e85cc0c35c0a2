//! The loop that keeps a replica in step with its cluster: every `sync_interval` (or at once when
//! woken), the writer recounts the replicas serving; any other replica reports to the writer and
//! takes its revocations and its list of replicas serving.

use std::sync::{atomic::Ordering, Arc};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    cluster::{certificates, Cluster},
    config::Live,
    runtime::Runtime,
    trust::Trust,
};

/// Runs until `stop` is cancelled (after the relay has drained). `local` says which agents hold
/// a tunnel to this replica.
pub(crate) async fn run(
    (cluster, live): (Arc<Cluster>, Arc<Live>),
    trust: Arc<Trust>,
    runtime: Arc<Runtime>,
    local: impl Fn() -> Vec<String>,
    stop: CancellationToken,
) {
    let mut failing = false;
    // Revocations of this replica the writer's last answer lacked.
    let mut writer_lacks = 0;
    loop {
        let here = local();
        if cluster.is_writer() {
            let agents = cluster.refresh(&here);
            // The others report every interval: after two, the writer has heard from them all.
            let known = cluster.started.elapsed() >= cluster.config.sync_interval * 2;
            cluster.warm_up(known, &agents, &here);
        } else {
            match cluster.sync_once(here.clone(), trust.revocations.snapshot()).await {
                Ok(answer) => {
                    if failing {
                        info!(writer = %cluster.config.writer, "the writer answers again");
                        failing = false;
                    }
                    cluster.writer_reachable.store(true, Ordering::Relaxed);
                    cluster.publish(answer.serving, cluster.serves());
                    cluster.warm_up(true, &answer.agents, &here);
                    match certificates::take(&live.get(), answer.certificates) {
                        Ok(written) if !written.is_empty() => {
                            info!(certificates = ?written, "ACME certificates taken from the writer")
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "ACME certificates from the writer not written here"),
                    }
                    match trust.revocations.absorb(answer.revocations) {
                        Ok(absorbed) => {
                            if absorbed.added > 0 {
                                info!(added = absorbed.added, "revocations taken from the writer");
                            }
                            if absorbed.missing != writer_lacks {
                                if absorbed.missing > 0 {
                                    error!(
                                        missing = absorbed.missing,
                                        writer = %cluster.config.writer,
                                        "the writer's revocations lack some this replica holds (did it lose its \
                                         volume?): they hold here, and go back to the writer with each report"
                                    );
                                }
                                writer_lacks = absorbed.missing;
                            }
                            runtime.metrics.revocations_missing_at_writer(absorbed.missing);
                        }
                        Err(e) => warn!(error = %e, "revocations taken from the writer but not saved here"),
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(
                            error = %e,
                            writer = %cluster.config.writer,
                            "cannot sync with the writer: tunnels and traffic go on, known revocations hold, \
                             token and revocation writes fail until it answers"
                        );
                        failing = true;
                    }
                    cluster.writer_reachable.store(false, Ordering::Relaxed);
                    // Whatever else is known stays; this replica's own part follows its drain.
                    let known = cluster.serving.borrow().clone();
                    cluster.publish(known, cluster.serves());
                    cluster.warm_up(false, &[], &here);
                }
            }
        }
        runtime.metrics.cluster(cluster.serving.borrow().len(), cluster.writer_reachable());
        tokio::select! {
            () = tokio::time::sleep(cluster.config.sync_interval) => {}
            () = cluster.sync_now.notified() => {}
            () = stop.cancelled() => break,
        }
    }
}
