//! The worker: one thread that loads the model (unless it came loaded) and
//! renders the queued jobs one at a time, in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use base64::Engine as _;

use crate::api::Shared;
use crate::error::ApiError;
use crate::jobs::{cancelled, Job, Preview, Status};
use crate::{Backend, Model, RenderError, Renderer};

/// A checked request waiting for the worker.
pub struct Queued<R> {
    pub job: Arc<Job>,
    pub request: R,
}

/// Tells when the worker thread is done.
pub struct Worker {
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Worker {
    /// Waits for the worker to end, at most `limit` (a model still loading
    /// cannot be interrupted; it is left to the process exit).
    pub async fn wait(self, limit: Duration) {
        if tokio::time::timeout(limit, self.done).await.is_err() {
            tracing::warn!("the worker did not stop within {limit:?}; leaving it");
        }
    }
}

/// Starts the worker thread on `queue`.
pub fn start<B: Backend>(
    shared: Arc<Shared<B>>,
    queue: Receiver<Queued<B::Request>>,
    model: Model<B::Renderer>,
) -> std::io::Result<Worker> {
    // A loaded model is ready before the address is announced.
    if matches!(model, Model::Ready(_)) {
        shared.loaded.store(true, Ordering::SeqCst);
    }
    let (tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lumina2-worker".into())
        .spawn(move || {
            work(&shared, &queue, model);
            let _ = tx.send(());
        })?;
    Ok(Worker { done })
}

fn work<B: Backend>(
    shared: &Shared<B>,
    queue: &Receiver<Queued<B::Request>>,
    model: Model<B::Renderer>,
) {
    let loaded = match model {
        Model::Ready(r) => Ok(r),
        Model::Load(load) => {
            tracing::info!("loading the model ...");
            catch_unwind(AssertUnwindSafe(load))
                .unwrap_or_else(|_| Err("the model loader panicked".to_string()))
        }
    };
    let mut renderer = match loaded {
        Ok(r) => {
            shared.loaded.store(true, Ordering::SeqCst);
            tracing::info!("model loaded; ready");
            r
        }
        Err(e) => {
            tracing::error!("the model could not be loaded: {e}");
            let message = format!("the model could not be loaded: {e}");
            *shared
                .load_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(e);
            // Every job that arrives fails: the server has nothing to render with.
            while let Ok(q) = queue.recv() {
                shared.metrics.queued.fetch_sub(1, Ordering::SeqCst);
                if q.job.start() {
                    shared.metrics.failed.fetch_add(1, Ordering::SeqCst);
                    q.job
                        .finish(Status::Failed, None, Some(ApiError::unavailable(&message)));
                }
                shared.finished(&q.job);
            }
            return;
        }
    };
    while let Ok(q) = queue.recv() {
        shared.metrics.queued.fetch_sub(1, Ordering::SeqCst);
        run_job(shared, &mut renderer, &q);
        shared.finished(&q.job);
    }
}

fn run_job<B: Backend>(shared: &Shared<B>, renderer: &mut B::Renderer, q: &Queued<B::Request>) {
    let m = &shared.metrics;
    let job = &q.job;
    if !job.start() {
        // Cancelled while it waited.
        m.cancelled.fetch_add(1, Ordering::SeqCst);
        return;
    }
    m.running.fetch_add(1, Ordering::SeqCst);
    let mut progress = |p: crate::Progress| {
        m.step_seconds.observe(p.elapsed);
        let preview = p.preview.as_ref().map(|png| Preview {
            step: p.step,
            num_steps: p.num_steps,
            b64_png: base64::engine::general_purpose::STANDARD.encode(png),
        });
        job.progress(p.step, p.num_steps, preview);
        !job.cancel_requested()
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        renderer.render(&q.request, &mut progress)
    }))
    .unwrap_or_else(|_| Err(RenderError::Failed("the renderer panicked".into())));
    m.running.fetch_sub(1, Ordering::SeqCst);
    // The metrics first: whoever the finished job wakes sees them counted.
    match result {
        Ok(pngs) => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let images = pngs.iter().map(|p| b64.encode(p)).collect();
            m.completed.fetch_add(1, Ordering::SeqCst);
            m.request_seconds.observe(job.submitted.elapsed());
            job.finish(Status::Succeeded, Some(images), None);
        }
        Err(RenderError::Stopped) => {
            m.cancelled.fetch_add(1, Ordering::SeqCst);
            job.finish(
                Status::Cancelled,
                None,
                Some(cancelled("stopped at a step")),
            );
        }
        Err(RenderError::Invalid(e)) => {
            m.failed.fetch_add(1, Ordering::SeqCst);
            m.request_seconds.observe(job.submitted.elapsed());
            job.finish(Status::Failed, None, Some(e.into()));
        }
        Err(RenderError::Failed(e)) => {
            tracing::error!("job {}: {e}", job.id);
            m.failed.fetch_add(1, Ordering::SeqCst);
            m.request_seconds.observe(job.submitted.elapsed());
            job.finish(Status::Failed, None, Some(ApiError::internal(e)));
        }
    }
}
