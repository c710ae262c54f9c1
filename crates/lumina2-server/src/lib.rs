//! The HTTP server of `lumina2 serve`: an OpenAI-compatible images API and a
//! job API in front of one resident pipeline, with health, readiness and
//! Prometheus metrics.
//!
//! The crate knows nothing of models: a [`Backend`] checks request bodies
//! (before anything is queued) and a [`Renderer`] turns a checked request
//! into PNG files' bytes. Generation is CPU/GPU-bound, so one worker thread
//! renders one job at a time from one bounded FIFO queue; a full queue is
//! answered 429 at once rather than left to grow.

// Request data never reaches an unwrap, expect or panic.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod api;
mod auth;
mod error;
mod jobs;
mod metrics;
mod shutdown;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use error::ApiError;
pub use jobs::Status;

/// A request body that cannot be rendered, reported as a 400 with an
/// OpenAI-style error object naming `param`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest {
    /// What is wrong, for people.
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

impl InvalidRequest {
    /// An error about field `param`.
    pub fn new(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }
}

/// Why a render produced no images.
#[derive(Debug, Clone)]
pub enum RenderError {
    /// The request cannot be rendered by this model (a size or memory
    /// estimate only the loaded model can judge): a 400.
    Invalid(InvalidRequest),
    /// The progress callback asked to stop (a cancelled job).
    Stopped,
    /// Anything else: a 500.
    Failed(String),
}

/// One finished denoising step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps planned.
    pub num_steps: usize,
    /// Time the step took.
    pub elapsed: Duration,
    /// On the steps the request's `preview_every` asks for: the live
    /// preview's PNG bytes, which the job keeps (the latest one) and its
    /// event stream sends.
    pub preview: Option<Vec<u8>>,
}

/// Checks request bodies; shared by the request handlers.
pub trait Backend: Send + Sync + 'static {
    /// A checked request, ready to render.
    type Request: Send + 'static;
    /// What renders requests (owned by the worker thread).
    type Renderer: Renderer<Self::Request>;

    /// Checks the generation fields of a request body (every field but
    /// `response_format`, `model` and `user`, which the server handles).
    fn parse(
        &self,
        body: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self::Request, InvalidRequest>;
}

/// Renders checked requests, one at a time.
pub trait Renderer<R>: Send + 'static {
    /// The PNG bytes of each image of `request`. `progress` is called after
    /// each denoising step; when it returns false the render stops with
    /// [`RenderError::Stopped`].
    fn render(
        &mut self,
        request: &R,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Vec<u8>>, RenderError>;
}

/// Boxed loader of a renderer (run on the worker thread).
pub type Loader<R> = Box<dyn FnOnce() -> Result<R, String> + Send>;

/// The model: loaded already (`--preload`), or loaded by the worker after
/// the server starts listening (`/ready` says 503 until it is).
pub enum Model<R> {
    /// Loaded.
    Ready(R),
    /// To be loaded by the worker.
    Load(Loader<R>),
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Host name or address to listen on.
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Bearer token the `/v1` endpoints require, if any.
    pub api_key: Option<String>,
    /// Jobs that may wait (the running one aside).
    pub max_queue: usize,
    /// How long a running job may go on after SIGTERM/SIGINT before it is cancelled.
    pub shutdown_grace: Duration,
    /// The model name `GET /v1/models` lists.
    pub model_name: String,
    /// The largest request body, in bytes.
    pub body_limit: usize,
    /// Finished jobs kept for `GET /v1/jobs/{id}` (the oldest go first).
    pub finished_jobs_kept: usize,
}

impl Config {
    /// The defaults of `lumina2 serve`.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            max_queue: 16,
            shutdown_grace: Duration::from_secs(30),
            model_name: model_name.into(),
            body_limit: 1 << 20,
            finished_jobs_kept: 256,
        }
    }
}

/// Why the server could not run.
#[derive(Debug)]
pub enum ServeError {
    /// The runtime could not start, or the address could not be bound.
    Io(String, std::io::Error),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::Io(_, e) => Some(e),
        }
    }
}

/// Serves until SIGTERM or SIGINT: then stops accepting connections,
/// cancels the queued jobs, lets the running one finish within
/// `shutdown_grace` (cancelling it at its next step after that) and
/// returns. `on_listening` gets the bound address once connections are
/// accepted.
pub fn run<B: Backend>(
    config: Config,
    backend: B,
    model: Model<B::Renderer>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // HTTP is light next to a render: two threads serve every connection.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ServeError::Io("starting the runtime".into(), e))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
            .await
            .map_err(|e| {
                ServeError::Io(format!("listening on {}:{}", config.host, config.port), e)
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServeError::Io("reading the bound address".into(), e))?;
        let grace = config.shutdown_grace;
        let (shared, queue) = api::Shared::new(config, backend);
        let shared = Arc::new(shared);
        let worker = worker::start(shared.clone(), queue, model)
            .map_err(|e| ServeError::Io("starting the worker thread".into(), e))?;
        on_listening(addr);
        let app = api::router(shared.clone());
        let stopping = shutdown::signal(shared.clone());
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stopping)
            .await;
        if let Err(e) = served {
            tracing::error!("server: {e}");
        }
        // Connections are closed; the worker ends once the running job does
        // (cancelled after the grace period), or is left behind when it is
        // still loading the model.
        worker.wait(grace + Duration::from_secs(5)).await;
        Ok(())
    })
}
