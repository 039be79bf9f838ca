//! Stopping: SIGTERM or SIGINT cancels one token. The scheduler then stops claiming, workers not
//! yet started give up, loads in flight get `shutdown.grace` to finish. A second signal exits
//! at once (loads in flight roll back).

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        for round in 0..2 {
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if round == 0 {
                tracing::info!(signal = which, "stopping: no new loads");
                cancel.cancel();
            } else {
                tracing::warn!(signal = which, "second signal: exiting now; loads in flight roll back");
                std::process::exit(130);
            }
        }
    });
    Ok(token)
}
