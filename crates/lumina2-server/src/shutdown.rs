//! SIGTERM and SIGINT: stop accepting, cancel what waits, give the running
//! job `shutdown_grace` to finish, then cancel it at its next step.

use std::sync::Arc;

use crate::api::Shared;
use crate::Backend;

/// Resolves on the first SIGTERM or SIGINT, after starting the shutdown.
pub async fn signal<B: Backend>(shared: Arc<Shared<B>>) {
    wait_for_signal().await;
    let grace = shared.config.shutdown_grace;
    tracing::warn!("stopping: no new requests; the running job has {grace:?} to finish");
    shared.begin_shutdown();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        shared.cancel_all("the server is stopping");
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => {
                    if r.is_err() {
                        term.recv().await;
                    }
                }
            }
            return;
        }
    }
    // No signal handling at all: never stop on our own.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}
