//! Process plumbing both binaries share: the shutdown signal, logging, error rendering.

/// Completes on the first SIGTERM or SIGINT (Unix) or Ctrl-C (elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `work` with a shutdown token that the first shutdown signal cancels (see
/// [`shutdown_signal`]), until `work` is done: the signal is awaited beside it, in this task.
pub async fn until_signal<F: std::future::Future>(
    work: impl FnOnce(tokio_util::sync::CancellationToken) -> F,
) -> F::Output {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let work = work(shutdown.clone());
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        () = shutdown_signal() => shutdown.cancel(),
    }
    work.await
}

/// Keeps the process on 4 KiB pages (Linux): no transparent huge pages, whatever the system's
/// setting. With huge pages, touching one byte of an allocation makes 2 MiB of it resident, and
/// quinn's receive buffer (32 slots of 64 packets, 13 MB at 6,500-byte packets, of which a burst
/// fills the start of each slot) then stays resident in full after the first bulk transfer: 33 MiB
/// per side instead of 14-17, with no gain in throughput measured. The allocator is built not to
/// ask for huge pages (mimalloc's `no_thp`); this also covers systems set to `always`. Call it
/// first in `main`, before the runtime and its buffers exist.
pub fn small_pages() {
    #[cfg(target_os = "linux")]
    if let Err(err) = rustix::thread::disable_transparent_huge_pages(true) {
        // Only memory is at stake: note it and go on.
        eprintln!("warning: cannot opt out of transparent huge pages: {err}");
    }
}

/// `SALLYPORT_LOG_FORMAT` names no known format.
#[derive(Debug, thiserror::Error)]
#[error("SALLYPORT_LOG_FORMAT={0:?}: expected \"text\" or \"json\"")]
pub struct LogFormatError(String);

/// Sets up logging to stderr; `RUST_LOG` overrides the default level `info`.
///
/// `SALLYPORT_LOG_FORMAT=json` writes one JSON object per line (for log collectors); `text`, the
/// default, writes readable lines. Any other value is an error naming the variable.
pub fn init_tracing() -> Result<(), LogFormatError> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr);
    match std::env::var("SALLYPORT_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        Ok("json") => builder.json().with_ansi(false).init(),
        Ok(other) => return Err(LogFormatError(other.to_owned())),
    }
    Ok(())
}

/// Renders an error and its causes on one line, leaving out a cause whose text the message before
/// it already contains (our errors embed their source's text).
pub fn describe_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// Runs a command's body and turns an error into `error: ...` on stderr and exit status 1.
pub fn exit_on_error<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: std::ops::Deref<Target = dyn std::error::Error + Send + Sync + 'static>,
{
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe_error(&*err));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: inner broke")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner broke")]
    struct Inner;
    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Inner);

    #[test]
    fn repeated_causes_are_left_out() {
        assert_eq!(describe_error(&Outer(Inner)), "outer: inner broke");
        assert_eq!(describe_error(&Wrapper(Inner)), "wrapper: inner broke");
    }
}
