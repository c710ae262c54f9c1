//! Jobs: their state as the worker changes it, watched by the handlers
//! (a synchronous request, `GET /v1/jobs/{id}`, the event stream), and the
//! store of recent jobs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::error::ApiError;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Waiting in the queue.
    Queued,
    /// Rendering.
    Running,
    /// Done, with images.
    Succeeded,
    /// Done, with an error.
    Failed,
    /// Stopped before it finished.
    Cancelled,
}

impl Status {
    /// The lower-case name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the job is over.
    pub fn finished(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

/// What a job's watchers see.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub status: Status,
    /// Denoising steps done, and planned (0 until the first step).
    pub step: usize,
    pub num_steps: usize,
    /// The images, base64 PNG, once succeeded.
    pub images: Option<Arc<Vec<String>>>,
    /// Why it failed or was cancelled.
    pub error: Option<ApiError>,
    /// The latest live preview (a job with `preview_every`).
    pub preview: Option<Arc<Preview>>,
}

/// A live preview: the clean-image prediction at a step, as PNG.
#[derive(Debug)]
pub struct Preview {
    /// The step it was made at (1-based).
    pub step: usize,
    /// Steps planned.
    pub num_steps: usize,
    /// The PNG, base64.
    pub b64_png: String,
}

impl Preview {
    /// The `preview` event's data; the PNG only with `png`.
    pub fn to_json(&self, png: bool) -> Value {
        let mut v = json!({"step": self.step, "num_steps": self.num_steps});
        if png {
            v["b64_png"] = Value::String(self.b64_png.clone());
        }
        v
    }
}

/// One request being served.
pub struct Job {
    pub id: String,
    /// Unix seconds when it was submitted.
    pub created: u64,
    pub submitted: Instant,
    /// Set to stop the job at its next step (or before it starts).
    cancel: AtomicBool,
    state: watch::Sender<Snapshot>,
}

impl Job {
    pub fn new(id: String, created: u64) -> Self {
        let (state, _) = watch::channel(Snapshot {
            status: Status::Queued,
            step: 0,
            num_steps: 0,
            images: None,
            error: None,
            preview: None,
        });
        Self {
            id,
            created,
            submitted: Instant::now(),
            cancel: AtomicBool::new(false),
            state,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.state.subscribe()
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Asks the job to stop; a queued one is cancelled at once (the worker
    /// skips it). Returns whether the job was still unfinished.
    pub fn cancel(&self, why: &str) -> bool {
        self.cancel.store(true, Ordering::SeqCst);
        let mut unfinished = false;
        self.state.send_if_modified(|s| {
            unfinished = !s.status.finished();
            if s.status == Status::Queued {
                s.status = Status::Cancelled;
                s.error = Some(cancelled(why));
                true
            } else {
                false
            }
        });
        unfinished
    }

    /// Moves a queued job to running; false when it was cancelled meanwhile.
    pub fn start(&self) -> bool {
        self.state.send_if_modified(|s| {
            if s.status == Status::Queued && !self.cancel.load(Ordering::SeqCst) {
                s.status = Status::Running;
                true
            } else {
                false
            }
        })
    }

    /// A step is done; `preview`, made at it, becomes the latest. One
    /// change, so a watcher sees the step and its preview together.
    pub fn progress(&self, step: usize, num_steps: usize, preview: Option<Preview>) {
        self.state.send_modify(|s| {
            s.step = step;
            s.num_steps = num_steps;
            if let Some(p) = preview {
                s.preview = Some(Arc::new(p));
            }
        });
    }

    /// Ends the job (once; later calls change nothing).
    pub fn finish(&self, status: Status, images: Option<Vec<String>>, error: Option<ApiError>) {
        self.state.send_if_modified(|s| {
            if s.status.finished() {
                return false;
            }
            s.status = status;
            s.images = images.map(Arc::new);
            s.error = error;
            true
        });
    }

    /// The job as `GET /v1/jobs/{id}` shows it: the latest preview's step,
    /// and its PNG only with `preview_png` (`?preview=1`).
    pub fn to_json(&self, preview_png: bool) -> Value {
        let s = self.snapshot();
        let mut v = json!({
            "id": self.id,
            "object": "image.generation.job",
            "created": self.created,
            "status": s.status.name(),
            "progress": {"step": s.step, "num_steps": s.num_steps},
        });
        if let Some(images) = &s.images {
            v["result"] = images_json(self.created, images);
        }
        if let Some(e) = &s.error {
            v["error"] = e.body()["error"].clone();
        }
        if let Some(p) = &s.preview {
            v["preview"] = p.to_json(preview_png);
        }
        v
    }
}

/// The error object of a cancelled job.
pub fn cancelled(why: &str) -> ApiError {
    let mut e = ApiError::unavailable(format!("the job was cancelled ({why})"));
    e.code = Some("cancelled");
    e
}

/// OpenAI's images response: `{"created", "data": [{"b64_json"}, ...]}`.
pub fn images_json(created: u64, images: &[String]) -> Value {
    let data: Vec<Value> = images.iter().map(|b| json!({"b64_json": b})).collect();
    json!({"created": created, "data": data})
}

/// The jobs the API can name: all unfinished ones and the latest finished.
pub struct JobStore {
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
    keep: usize,
}

impl JobStore {
    pub fn new(keep: usize) -> Self {
        Self {
            jobs: HashMap::new(),
            finished: VecDeque::new(),
            keep,
        }
    }

    pub fn insert(&mut self, job: Arc<Job>) {
        self.jobs.insert(job.id.clone(), job);
    }

    pub fn remove(&mut self, id: &str) {
        self.jobs.remove(id);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.get(id).cloned()
    }

    /// Records that `id` finished, forgetting the oldest finished jobs past the bound.
    pub fn finished(&mut self, id: &str) {
        self.finished.push_back(id.to_string());
        while self.finished.len() > self.keep {
            if let Some(old) = self.finished.pop_front() {
                self.jobs.remove(&old);
            }
        }
    }

    /// Every job not finished.
    pub fn unfinished(&self) -> Vec<Arc<Job>> {
        self.jobs
            .values()
            .filter(|j| !j.snapshot().status.finished())
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_latest_finished_jobs_are_kept() {
        let mut store = JobStore::new(2);
        for i in 0..4 {
            store.insert(Arc::new(Job::new(format!("j{i}"), 0)));
        }
        for i in 0..3 {
            store.finished(&format!("j{i}"));
        }
        assert!(store.get("j0").is_none());
        assert!(store.get("j1").is_some() && store.get("j2").is_some());
        assert!(store.get("j3").is_some(), "unfinished jobs stay");
    }

    #[test]
    fn a_queued_job_is_cancelled_at_once_and_never_starts() {
        let job = Job::new("j".into(), 0);
        assert!(job.cancel("test"));
        assert_eq!(job.snapshot().status, Status::Cancelled);
        assert!(!job.start());
        job.finish(Status::Succeeded, Some(vec![]), None);
        assert_eq!(job.snapshot().status, Status::Cancelled, "finished once");
    }

    #[test]
    fn the_latest_preview_is_kept_and_its_png_shown_on_request() {
        let job = Job::new("j".into(), 0);
        assert!(job.to_json(true).get("preview").is_none());
        for step in [1, 2] {
            let preview = Preview {
                step,
                num_steps: 3,
                b64_png: format!("png{step}"),
            };
            job.progress(step, 3, Some(preview));
        }
        job.progress(3, 3, None);
        assert_eq!(
            job.to_json(false)["preview"],
            json!({"step": 2, "num_steps": 3})
        );
        assert_eq!(job.to_json(true)["preview"]["b64_png"], "png2");
    }
}
