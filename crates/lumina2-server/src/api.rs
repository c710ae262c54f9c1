//! The routes, the state they share, and the request handlers.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use futures_util::StreamExt as _;
use serde_json::{json, Map, Value};
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::jobs::{images_json, Job, JobStore, Preview, Status};
use crate::metrics::Metrics;
use crate::worker::Queued;
use crate::{auth, Backend, Config};

/// What every handler and the worker share.
pub struct Shared<B: Backend> {
    pub config: Config,
    backend: B,
    /// The queue's sending end; taken away on shutdown.
    queue: Mutex<Option<SyncSender<Queued<B::Request>>>>,
    jobs: Mutex<JobStore>,
    pub metrics: Metrics,
    /// The model is loaded.
    pub loaded: AtomicBool,
    /// Why the model could not be loaded.
    pub load_error: Mutex<Option<String>>,
    /// SIGTERM/SIGINT arrived.
    closing: AtomicBool,
    next_id: AtomicU64,
    /// Unix seconds when the server started.
    started: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A job id: a counter (unique in this process) and a random part (unique
/// across restarts and replicas).
fn job_id(n: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    format!("job_{n}_{:016x}", h.finish())
}

impl<B: Backend> Shared<B> {
    pub fn new(config: Config, backend: B) -> (Self, Receiver<Queued<B::Request>>) {
        let (tx, rx) = sync_channel(config.max_queue);
        let keep = config.finished_jobs_kept;
        let shared = Self {
            config,
            backend,
            queue: Mutex::new(Some(tx)),
            jobs: Mutex::new(JobStore::new(keep)),
            metrics: Metrics::new(),
            loaded: AtomicBool::new(false),
            load_error: Mutex::new(None),
            closing: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            started: now_secs(),
        };
        (shared, rx)
    }

    fn job(&self, id: &str) -> Result<Arc<Job>, ApiError> {
        lock(&self.jobs).get(id).ok_or_else(|| {
            ApiError::not_found(format!(
                "no job `{id}` (finished jobs are kept for a while only)"
            ))
        })
    }

    /// Records that `job` is over (the store forgets the oldest finished ones).
    pub fn finished(&self, job: &Job) {
        lock(&self.jobs).finished(&job.id);
    }

    /// Stops taking jobs and cancels those waiting; the running one goes on.
    pub fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // The worker ends once the queue is drained and this end is gone.
        lock(&self.queue).take();
        for job in lock(&self.jobs).unfinished() {
            if job.snapshot().status == Status::Queued {
                job.cancel("the server is stopping");
            }
        }
    }

    /// Cancels every unfinished job (the running one at its next step).
    pub fn cancel_all(&self, why: &str) {
        for job in lock(&self.jobs).unfinished() {
            job.cancel(why);
        }
    }

    /// Seconds a client should wait before retrying: about one job.
    fn retry_after(&self) -> u64 {
        self.metrics
            .request_seconds
            .mean()
            .map_or(10, |s| s.ceil().clamp(1.0, 600.0) as u64)
    }

    /// Checks a request body and queues it; `kind` is the endpoint's.
    fn submit(
        &self,
        body: Result<Bytes, BytesRejection>,
        kind: Endpoint,
    ) -> Result<Arc<Job>, ApiError> {
        let checked = body
            .map_err(|r| {
                if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(self.config.body_limit)
                } else {
                    ApiError::invalid(r.body_text(), None)
                }
            })
            .and_then(|bytes| parse_body(&bytes, kind))
            .and_then(|fields| self.backend.parse(fields).map_err(ApiError::from));
        let request = match checked {
            Ok(r) => r,
            Err(e) => {
                self.metrics.invalid.fetch_add(1, Ordering::SeqCst);
                return Err(e);
            }
        };
        self.enqueue(request).inspect_err(|_| {
            self.metrics.rejected.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn enqueue(&self, request: B::Request) -> Result<Arc<Job>, ApiError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the server is stopping"));
        }
        if let Some(e) = lock(&self.load_error).as_ref() {
            return Err(ApiError::unavailable(format!(
                "the model could not be loaded: {e}"
            )));
        }
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let job = Arc::new(Job::new(job_id(n), now_secs()));
        let queue = lock(&self.queue);
        let Some(tx) = queue.as_ref() else {
            return Err(ApiError::unavailable("the server is stopping"));
        };
        // In the store before the worker can see it, so it can be finished there.
        lock(&self.jobs).insert(job.clone());
        self.metrics.queued.fetch_add(1, Ordering::SeqCst);
        let queued = Queued {
            job: job.clone(),
            request,
        };
        match tx.try_send(queued) {
            Ok(()) => Ok(job),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Ordering::SeqCst);
                lock(&self.jobs).remove(&job.id);
                Err(match e {
                    TrySendError::Full(_) => {
                        ApiError::queue_full(self.config.max_queue, self.retry_after())
                    }
                    TrySendError::Disconnected(_) => {
                        ApiError::unavailable("the worker has stopped")
                    }
                })
            }
        }
    }

    /// Ready for work: the model is loaded, the server not stopping and
    /// the queue has room; otherwise why not.
    fn readiness(&self) -> Result<(), &'static str> {
        if lock(&self.load_error).is_some() {
            return Err("the model could not be loaded");
        }
        if !self.loaded.load(Ordering::SeqCst) {
            return Err("loading the model");
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err("stopping");
        }
        let queued = self.metrics.queued.load(Ordering::SeqCst);
        let running = self.metrics.running.load(Ordering::SeqCst);
        // With no queue, a job can be taken only while none runs.
        let room = match self.config.max_queue {
            0 => running == 0 && queued == 0,
            max => queued < max,
        };
        if room {
            Ok(())
        } else {
            Err("the queue is full")
        }
    }
}

/// Which endpoint a generation request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `POST /v1/images/generations`: the images come back in the response.
    Images,
    /// `POST /v1/jobs`: the job is watched, its previews included.
    Jobs,
}

/// The body of a generation request, without the fields the server itself
/// handles (`response_format`, `model`, `user`).
fn parse_body(bytes: &[u8], kind: Endpoint) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}"), None))?;
    let Value::Object(mut fields) = value else {
        return Err(ApiError::invalid("the body must be a JSON object", None));
    };
    match fields.remove("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "b64_json" => {}
        Some(Value::String(f)) if f == "url" => {
            return Err(ApiError::invalid(
                "response_format `url` is not supported: this server keeps no image files to link to; use `b64_json`",
                Some("response_format"),
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                format!("`response_format` must be \"b64_json\", not {other}"),
                Some("response_format"),
            ))
        }
    }
    // A synchronous request has no stream to send previews on; the backend
    // checks the value of a job's.
    if kind == Endpoint::Images && fields.get("preview_every").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "`preview_every` is for jobs: previews are sent on a job's event stream (POST /v1/jobs, then GET /v1/jobs/{id}/events)",
            Some("preview_every"),
        ));
    }
    // Any model name is accepted (one model is served); `user` is ignored.
    for key in ["model", "user"] {
        match fields.remove(key) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("`{key}` must be a string"),
                    Some(key),
                ))
            }
        }
    }
    Ok(fields)
}

/// All routes; `/v1` ones need the API key when one is set.
pub fn router<B: Backend>(shared: Arc<Shared<B>>) -> Router {
    let key = Arc::new(shared.config.api_key.clone());
    let v1 = Router::new()
        .route("/v1/images/generations", post(generations::<B>))
        .route("/v1/jobs", post(create_job::<B>))
        .route("/v1/jobs/{id}", get(get_job::<B>).delete(delete_job::<B>))
        .route("/v1/jobs/{id}/events", get(job_events::<B>))
        .route("/v1/models", get(models::<B>))
        .route_layer(middleware::from_fn_with_state(key, auth::require_key));
    let limit = shared.config.body_limit;
    Router::new()
        .route("/health", get(health::<B>))
        .route("/ready", get(ready::<B>))
        .route("/metrics", get(metrics::<B>))
        .merge(v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        // A bug must cost one request a 500, not the connection or the worker.
        .layer(CatchPanicLayer::new())
        .with_state(shared)
}

/// Cancels a synchronous request's job when the handler is dropped before
/// the job ended (the client disconnected).
struct CancelOnDrop(Arc<Job>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.0.snapshot().status.finished() {
            self.0.cancel("the client disconnected");
        }
    }
}

async fn generations<B: Backend>(
    State(s): State<Arc<Shared<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let job = match s.submit(body, Endpoint::Images) {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let _cancel = CancelOnDrop(job.clone());
    let mut rx = job.watch();
    let snap = match rx.wait_for(|s| s.status.finished()).await {
        Ok(r) => r.clone(),
        Err(_) => job.snapshot(),
    };
    match (snap.status, snap.images, snap.error) {
        (Status::Succeeded, Some(images), _) => {
            Json(images_json(job.created, &images)).into_response()
        }
        (_, _, Some(e)) => e.into_response(),
        _ => ApiError::internal("the job ended without a result").into_response(),
    }
}

async fn create_job<B: Backend>(
    State(s): State<Arc<Shared<B>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match s.submit(body, Endpoint::Jobs) {
        Ok(job) => {
            let location = format!("/v1/jobs/{}", job.id);
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(json!({"id": job.id, "status": "queued"})),
            )
                .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Whether the query asks for the preview's PNG (`preview=1` or `preview=true`).
fn wants_preview_png(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "preview=1" | "preview=true"))
    })
}

async fn get_job<B: Backend>(
    State(s): State<Arc<Shared<B>>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    match s.job(&id) {
        Ok(job) => Json(job.to_json(wants_preview_png(query.as_deref()))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_job<B: Backend>(
    State(s): State<Arc<Shared<B>>>,
    Path(id): Path<String>,
) -> Response {
    match s.job(&id) {
        Ok(job) => {
            job.cancel("cancelled by DELETE");
            Json(job.to_json(false)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Server-sent events: `progress` events while the job waits and runs
/// (status, step, num_steps), a `preview` event (step, num_steps, b64_png)
/// before the progress of each step that made a new preview, then one event
/// named after the final status carrying the whole job (its images when it
/// succeeded), then the end. Events show the job's state when the stream
/// looks: a client slower than the steps gets the latest progress and
/// preview, not every one (a preview made in the job's last steps is still
/// sent before the final event).
async fn job_events<B: Backend>(
    State(s): State<Arc<Shared<B>>>,
    Path(id): Path<String>,
) -> Response {
    let job = match s.job(&id) {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let rx = job.watch();
    let state = EventsState {
        rx,
        job,
        started: false,
        done: false,
        sent_preview: None,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let gone = st.started && st.rx.changed().await.is_err();
        st.started = true;
        // The job gone without a final state: report what it has.
        let snap = if gone {
            st.job.snapshot()
        } else {
            st.rx.borrow_and_update().clone()
        };
        let mut events = Vec::with_capacity(2);
        if let Some(p) = &snap.preview {
            let new = !st
                .sent_preview
                .as_ref()
                .is_some_and(|sent| Arc::ptr_eq(sent, p));
            if new {
                events.push(
                    Event::default()
                        .event("preview")
                        .data(p.to_json(true).to_string()),
                );
                st.sent_preview = Some(p.clone());
            }
        }
        if gone || snap.status.finished() {
            events.push(
                Event::default()
                    .event(snap.status.name())
                    .data(st.job.to_json(false).to_string()),
            );
            st.done = true;
        } else {
            let data = json!({
                "id": st.job.id,
                "status": snap.status.name(),
                "step": snap.step,
                "num_steps": snap.num_steps,
            });
            events.push(Event::default().event("progress").data(data.to_string()));
        }
        let events = events.into_iter().map(Ok::<_, Infallible>);
        Some((futures_util::stream::iter(events), st))
    })
    .flatten();
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Where a job's event stream is.
struct EventsState {
    rx: tokio::sync::watch::Receiver<crate::jobs::Snapshot>,
    job: Arc<Job>,
    /// The first events are sent.
    started: bool,
    /// The final event is sent.
    done: bool,
    /// The last preview sent.
    sent_preview: Option<Arc<Preview>>,
}

async fn models<B: Backend>(State(s): State<Arc<Shared<B>>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.config.model_name,
            "object": "model",
            "created": s.started,
            "owned_by": "lumina2-rs",
        }],
    }))
    .into_response()
}

async fn health<B: Backend>(State(s): State<Arc<Shared<B>>>) -> Response {
    match lock(&s.load_error).as_ref() {
        // A server that cannot load its model should be restarted.
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "error", "error": format!("the model could not be loaded: {e}")}),
            ),
        )
            .into_response(),
        None => Json(json!({"status": "ok"})).into_response(),
    }
}

async fn ready<B: Backend>(State(s): State<Arc<Shared<B>>>) -> Response {
    match s.readiness() {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reason": why})),
        )
            .into_response(),
    }
}

async fn metrics<B: Backend>(State(s): State<Arc<Shared<B>>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_found() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> ApiError {
        parse_body(body.as_bytes(), Endpoint::Jobs).unwrap_err()
    }

    #[test]
    fn the_server_fields_are_taken_out_and_checked() {
        let fields = parse_body(
            br#"{"prompt": "p", "n": 2, "model": "dall-e-3", "user": "u", "response_format": "b64_json"}"#,
            Endpoint::Images,
        )
        .unwrap();
        let keys: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["n", "prompt"]);
        let nulls = parse_body(
            br#"{"prompt": "p", "model": null, "response_format": null}"#,
            Endpoint::Images,
        )
        .unwrap();
        assert_eq!(nulls.len(), 1);

        let e = refused(r#"{"prompt": "p", "response_format": "url"}"#);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("response_format"));
        assert!(e.message.contains("b64_json"), "{}", e.message);
        let e = refused(r#"{"response_format": 1}"#);
        assert_eq!(e.param.as_deref(), Some("response_format"));
        let e = refused(r#"{"user": ["u"]}"#);
        assert_eq!(e.param.as_deref(), Some("user"));
        for bad in ["", "{", "null", "\"p\"", "[]", "{\"a\": 1} x"] {
            let e = refused(bad);
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, None),
                "{bad}"
            );
        }
    }

    #[test]
    fn previews_are_for_jobs_only() {
        let body = br#"{"prompt": "p", "preview_every": 2}"#;
        let e = parse_body(body, Endpoint::Images).unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (StatusCode::BAD_REQUEST, Some("preview_every"))
        );
        assert!(e.message.contains("/v1/jobs"), "{}", e.message);
        // A job's is left to the backend, which checks its value.
        let fields = parse_body(body, Endpoint::Jobs).unwrap();
        assert_eq!(fields["preview_every"], 2);
        let null = br#"{"prompt": "p", "preview_every": null}"#;
        assert!(parse_body(null, Endpoint::Images).is_ok());
    }

    #[test]
    fn the_preview_png_is_shown_on_request() {
        assert!(wants_preview_png(Some("preview=1")));
        assert!(wants_preview_png(Some("a=b&preview=true")));
        for q in [None, Some(""), Some("preview=0"), Some("xpreview=1")] {
            assert!(!wants_preview_png(q), "{q:?}");
        }
    }

    #[test]
    fn errors_are_openai_error_objects() {
        let body = ApiError::invalid("bad size", Some("size")).body();
        assert_eq!(
            body,
            json!({"error": {"message": "bad size", "type": "invalid_request_error", "param": "size", "code": null}})
        );
        let r = ApiError::queue_full(4, 7).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
    }
}
