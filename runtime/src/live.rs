//! What relay and agent share to reload their configuration while they run: the configuration in
//! force ([`Live`]), the hash that names a file's content, SIGHUP ([`Hangups`]), the one reload
//! watcher ([`watch`]) and the one-line form of an error for the log.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// The configuration in force: read where it is used, replaced whole by a reload.
#[derive(Debug)]
pub struct Live<T> {
    current: RwLock<Arc<T>>,
    /// Told of every replacement, for those who act on a change rather than read at each use.
    replaced: tokio::sync::watch::Sender<()>,
}

impl<T> Live<T> {
    pub fn new(config: Arc<T>) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(config), replaced: tokio::sync::watch::Sender::new(()) })
    }

    /// The configuration in force now.
    pub fn get(&self) -> Arc<T> {
        crate::sync::read(&self.current).clone()
    }

    pub fn set(&self, config: Arc<T>) {
        *crate::sync::write(&self.current) = config;
        self.replaced.send_replace(());
    }

    /// A receiver that sees each replacement from now on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.replaced.subscribe()
    }
}

/// The first 12 hex digits of the SHA-256 of `bytes`: which configuration file content is live.
pub fn hash(bytes: &[u8]) -> String {
    crate::hex::encode(&crate::tls::cert_sha256(bytes)[..6])
}

/// `text` on one line (a TOML error points at its line over several), for the log.
pub fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "|").collect::<Vec<_>>().join(" ")
}

/// SIGHUP, where there is such a thing.
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts listening (must run inside the async runtime).
    pub fn new() -> Self {
        Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// The next SIGHUP; never, where there is none.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Self::new()
    }
}

/// A configuration read from a file: where it came from and the hash of what it said.
pub trait Sourced {
    fn path(&self) -> &Path;
    fn hash(&self) -> &str;
}

/// Where reloads are asked for besides SIGHUP and the file (the relay's admin API, the Windows
/// service's parameter-change control), each with what the asker is answered through.
pub trait Asked {
    type Reply;

    /// The next request; `None` once no one can ask any more.
    fn next(&mut self) -> impl std::future::Future<Output = Option<Self::Reply>> + Send;
}

impl<R: Send> Asked for mpsc::Receiver<R> {
    type Reply = R;

    async fn next(&mut self) -> Option<R> {
        self.recv().await
    }
}

impl Asked for Arc<Notify> {
    type Reply = ();

    async fn next(&mut self) -> Option<()> {
        self.notified().await;
        Some(())
    }
}

/// How often the watcher reads the file.
pub const POLL: Duration = Duration::from_secs(1);

/// The one reload watcher: calls `reload(why, reply)` on SIGHUP, when the file's content changes
/// (read every [`POLL`] and compared by hash with the configuration in force, so an in-place
/// edit, an editor's rename and a Kubernetes ConfigMap's symlink swap are all seen), and on each
/// request `asked` brings (`why_asked` says where it came from); until `stop` is cancelled. `reload` says whether the new file was
/// taken: a content that was refused is tried again only once it changes again.
pub async fn watch<T: Sourced, A: Asked>(
    live: &Live<T>,
    (mut asked, why_asked): (A, &'static str),
    stop: CancellationToken,
    mut reload: impl FnMut(&'static str, Option<A::Reply>) -> bool,
) {
    let mut hangups = Hangups::new();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused: Option<String> = None;
    let mut asking = true;
    loop {
        let (why, reply) = tokio::select! {
            () = hangups.next() => ("SIGHUP", None),
            _ = poll.tick() => {
                let current = live.get();
                let Ok(bytes) = std::fs::read(current.path()) else { continue };
                let hash = hash(&bytes);
                if hash == current.hash() || refused.as_deref() == Some(hash.as_str()) {
                    continue;
                }
                refused = Some(hash);
                ("the file changed", None)
            }
            request = asked.next(), if asking => match request {
                Some(reply) => (why_asked, Some(reply)),
                None => {
                    asking = false;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        if reload(why, reply) {
            refused = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_name_content_and_errors_fit_one_line() {
        assert_eq!(hash(b"a"), hash(b"a"));
        assert_ne!(hash(b"a"), hash(b"b"));
        assert_eq!(hash(b"").len(), 12);
        let toml =
            "TOML parse error at line 9, column 1\n  |\n9 | bogus = 1\n  | ^^^^^\nunknown field `bogus`";
        assert_eq!(
            one_line(toml),
            "TOML parse error at line 9, column 1 9 | bogus = 1 | ^^^^^ unknown field `bogus`"
        );
        let live = Live::new(Arc::new(1));
        live.set(Arc::new(2));
        assert_eq!(*live.get(), 2);
    }

    struct File {
        path: std::path::PathBuf,
        hash: String,
    }

    impl Sourced for File {
        fn path(&self) -> &Path {
            &self.path
        }

        fn hash(&self) -> &str {
            &self.hash
        }
    }

    /// A changed file is reloaded once (a refused content not again until it changes), an
    /// unchanged one never, and a request is answered with where it came from.
    #[tokio::test(start_paused = true)]
    async fn the_watcher_reloads_on_a_change_and_on_a_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "a").expect("write");
        let live = Live::new(Arc::new(File { path: path.clone(), hash: hash(b"a") }));
        let (asks, asked) = mpsc::channel::<u8>(1);
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let watcher = {
            let (live, stop) = (live.clone(), stop.clone());
            tokio::spawn(async move {
                watch(&live, (asked, "asked"), stop, |why, reply| {
                    let _ = seen_tx.send((why, reply));
                    false
                })
                .await;
            })
        };
        tokio::time::sleep(POLL * 3).await;
        assert!(seen.try_recv().is_err(), "an unchanged file is not reloaded");
        std::fs::write(&path, "b").expect("write");
        assert_eq!(seen.recv().await, Some(("the file changed", None)));
        tokio::time::sleep(POLL * 3).await;
        assert!(seen.try_recv().is_err(), "a refused content is not tried again");
        asks.send(7).await.expect("ask");
        assert_eq!(seen.recv().await, Some(("asked", Some(7))));
        stop.cancel();
        watcher.await.expect("the watcher ends with its stop");
    }
}
