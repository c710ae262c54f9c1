//! `lumina2 serve` on the committed tiny pipeline: every endpoint, the error
//! statuses, the queue bound, cancellation, graceful SIGTERM, and the API's
//! image equal, byte for byte, to the PNG `lumina2 generate` writes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

fn pipeline_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
}

/// The tiny pipeline with the real model's 16 latent channels, the only
/// count the preview's latent-to-RGB matrix is made for.
fn latent16_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/latent16_preview/pipeline")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The longest any one wait of these tests may take.
const PATIENCE: Duration = Duration::from_secs(120);

/// A `lumina2 serve --port 0` process, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_model(&pipeline_dir(), extra, env)
    }

    fn start_model(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lumina2"));
        cmd.args([
            "serve",
            "--model",
            model.to_str().unwrap(),
            "--port",
            "0",
            "--max-sequence-length",
            "32",
            "--steps",
            "4",
            "-q",
        ])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("LUMINA2_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(PATIENCE).expect("no `listening on` line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// A request: (status, Retry-After, body as JSON or a string).
    fn call(&self, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> Reply {
        let mut req = ureq::request(method, &self.url(path)).timeout(PATIENCE);
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let result = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let retry_after = resp.header("Retry-After").map(str::to_string);
        let text = resp.into_string().unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            retry_after,
            json,
        }
    }

    fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None, None)
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, Some(&body.to_string()), None)
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").json;
        let text = text.as_str().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// Waits until `cond` holds, polling.
    fn wait_until(&self, what: &str, mut cond: impl FnMut(&Server) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn job_status(&self, id: &str) -> String {
        self.get(&format!("/v1/jobs/{id}")).json["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits for the process to exit; its status code.
    fn wait_exit(mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(start.elapsed() < PATIENCE, "the server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

impl Reply {
    fn images(&self) -> Vec<Vec<u8>> {
        self.json["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no data in {}", self.json))
            .iter()
            .map(|d| {
                base64::engine::general_purpose::STANDARD
                    .decode(d["b64_json"].as_str().unwrap())
                    .unwrap()
            })
            .collect()
    }
}

/// The `seed_cfg` fixture case (seed 42, 48x32, 4 steps) as a request.
fn fox(extra: Value) -> Value {
    let mut body = json!({
        "prompt": "a red fox in the snow",
        "size": "48x32",
        "seed": 42,
        "num_inference_steps": 4,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// `lumina2 generate` of the fixture case with `extra` arguments; its PNGs.
fn cli_pngs(dir: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    cli_pngs_model(&pipeline_dir(), dir, extra)
}

/// As [`cli_pngs`], from the pipeline folder `model`.
fn cli_pngs_model(model: &Path, dir: &Path, extra: &[&str]) -> Vec<Vec<u8>> {
    let out = dir.join("fox_{seed}.png");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox in the snow",
        "--width",
        "48",
        "--height",
        "32",
        "--steps",
        "4",
        "--seed",
        "42",
        "--max-sequence-length",
        "32",
        "-q",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = Command::new(env!("CARGO_BIN_EXE_lumina2"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn the_api_image_is_the_cli_png_and_the_endpoints_answer() {
    let server = Server::start(&["--preload"], &[]);
    let health = server.get("/health");
    assert_eq!((health.status, &health.json["status"]), (200, &json!("ok")));
    assert_eq!(server.get("/ready").status, 200);
    let models = server.get("/v1/models");
    assert_eq!(models.status, 200);
    assert_eq!(
        models.json["data"][0]["id"].as_str(),
        pipeline_dir().to_str()
    );

    // Any model name; `user` ignored; b64_json is the one format.
    let r = server.post(
        "/v1/images/generations",
        &fox(json!({"model": "dall-e-3", "user": "u1", "response_format": "b64_json"})),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(r.json["created"].as_u64().unwrap() > 1_600_000_000);
    let api = r.images();
    let cli = cli_pngs(&tmp_dir("one"), &[]);
    assert_eq!(api.len(), 1);
    assert!(api[0] == cli[0], "the API's PNG differs from the CLI's");

    // Several images: seeds 42 and 43, as `--num-images-per-prompt 2`.
    let r = server.post(
        "/v1/images/generations",
        &fox(json!({"n": 2, "negative_prompt": "blurry", "guidance_scale": 3.5})),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    let cli = cli_pngs(
        &tmp_dir("two"),
        &[
            "--num-images-per-prompt",
            "2",
            "--negative-prompt",
            "blurry",
            "--guidance-scale",
            "3.5",
        ],
    );
    assert_eq!(r.images(), cli);

    assert_eq!(server.metric("lumina2_jobs_completed_total"), 2.0);
    assert_eq!(server.metric("lumina2_step_duration_seconds_count"), 8.0);
    assert_eq!(server.metric("lumina2_request_duration_seconds_count"), 2.0);
    assert_eq!(server.metric("lumina2_queue_depth"), 0.0);
    assert_eq!(server.get("/nowhere").status, 404);
}

#[test]
fn bad_requests_are_refused_before_they_are_queued() {
    let key = "s3cret-key";
    let server = Server::start(&[], &[("LUMINA2_API_KEY", key)]);
    // Probes need no key; the API does.
    assert_eq!(server.get("/health").status, 200);
    server.wait_until("ready", |s| s.get("/ready").status == 200);
    let models = |k: Option<&str>| server.call("GET", "/v1/models", None, k);
    assert_eq!(models(None).status, 401);
    let wrong = models(Some("s3cret-kez"));
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json["error"]["code"], "invalid_api_key");
    assert_eq!(models(Some("s3cret")).status, 401);
    assert_eq!(models(Some(key)).status, 200);
    let unauthorised = server.post("/v1/images/generations", &fox(json!({})));
    assert_eq!(unauthorised.status, 401);

    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("{\"prompt\": ".into(), None, "not valid JSON"),
        ("[1, 2]".into(), None, "JSON object"),
        (
            json!({"size": "32x32"}).to_string(),
            Some("prompt"),
            "`prompt` is required",
        ),
        (
            json!({"prompt": 1}).to_string(),
            Some("prompt"),
            "must be a string",
        ),
        (
            fox(json!({"size": "40x32"})).to_string(),
            Some("size"),
            "multiple of 16",
        ),
        (
            fox(json!({"size": "big"})).to_string(),
            Some("size"),
            "WIDTHxHEIGHT",
        ),
        (fox(json!({"n": -1})).to_string(), Some("n"), "whole number"),
        (fox(json!({"n": 0})).to_string(), Some("n"), "`n`"),
        (
            fox(json!({"seed": "42"})).to_string(),
            Some("seed"),
            "whole number",
        ),
        (
            fox(json!({"guidance_scale": 1000})).to_string(),
            Some("guidance_scale"),
            "guidance_scale",
        ),
        (
            fox(json!({"num_inference_steps": 0})).to_string(),
            Some("num_inference_steps"),
            "num_inference_steps",
        ),
        (
            fox(json!({"cfg_trunc_ratio": 2})).to_string(),
            Some("cfg_trunc_ratio"),
            "cfg_trunc_ratio",
        ),
        (
            fox(json!({"cfg_normalization": "yes"})).to_string(),
            Some("cfg_normalization"),
            "true or false",
        ),
        (
            fox(json!({"sampler": "ddim"})).to_string(),
            Some("sampler"),
            "euler, midpoint",
        ),
        (
            fox(json!({"cache_threshold": -0.5})).to_string(),
            Some("cache_threshold"),
            "`cache_threshold`: -0.5 is not a finite number >= 0",
        ),
        (
            fox(json!({"cache_threshold": "high"})).to_string(),
            Some("cache_threshold"),
            "`cache_threshold` must be a number",
        ),
        // Refused by both endpoints: a job's for its value, a synchronous
        // request's for being there.
        (
            fox(json!({"preview_every": 0})).to_string(),
            Some("preview_every"),
            "`preview_every`",
        ),
        (
            fox(json!({"preview_every": 1.5})).to_string(),
            Some("preview_every"),
            "`preview_every`",
        ),
        (
            fox(json!({"steps": 3})).to_string(),
            Some("steps"),
            "unknown field `steps`",
        ),
        (
            fox(json!({"response_format": "url"})).to_string(),
            Some("response_format"),
            "b64_json",
        ),
        (
            fox(json!({"model": 3})).to_string(),
            Some("model"),
            "must be a string",
        ),
    ];
    for (body, param, needle) in &cases {
        for path in ["/v1/images/generations", "/v1/jobs"] {
            let r = server.call("POST", path, Some(body), Some(key));
            assert_eq!(r.status, 400, "{body}: {}", r.json);
            let e = &r.json["error"];
            assert_eq!(e["type"], "invalid_request_error", "{body}");
            assert_eq!(e["param"].as_str(), *param, "{body}: {e}");
            let msg = e["message"].as_str().unwrap();
            assert!(msg.contains(needle), "{body}: {msg}");
        }
    }
    assert_eq!(
        server.metric("lumina2_requests_invalid_total"),
        2.0 * cases.len() as f64
    );
    assert_eq!(server.metric("lumina2_jobs_completed_total"), 0.0);

    // Far over the memory of any machine: refused by the loaded model's
    // estimate before it is queued.
    let r = server.call(
        "POST",
        "/v1/images/generations",
        Some(&fox(json!({"size": "16384x16384", "n": 256})).to_string()),
        Some(key),
    );
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["param"], "size");
    assert!(r.json["error"]["message"].as_str().unwrap().contains("MiB"));
    assert_eq!(
        server.metric("lumina2_requests_invalid_total"),
        2.0 * cases.len() as f64 + 1.0
    );
    assert_eq!(server.metric("lumina2_jobs_failed_total"), 0.0);

    // A body over the 1 MiB limit: 413, read or not.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let big = 2 << 20;
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {big}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(&vec![b' '; big]);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
}

#[test]
fn a_full_queue_is_429_and_jobs_are_cancelled() {
    let server = Server::start(&["--preload", "--max-queue", "1"], &[]);
    let long = fox(json!({"num_inference_steps": 10000, "size": "32x32"}));
    let a = server.post("/v1/jobs", &long);
    assert_eq!(a.status, 202, "{}", a.json);
    let a = a.json["id"].as_str().unwrap().to_string();
    server.wait_until("job a running", |s| {
        s.get(&format!("/v1/jobs/{a}")).json["progress"]["step"]
            .as_u64()
            .unwrap()
            >= 1
    });
    assert_eq!(server.job_status(&a), "running");

    // Its events: progress now, the final status when it ends.
    let mut events = TcpStream::connect(server.addr()).unwrap();
    events.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        events,
        "GET /v1/jobs/{a}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();

    let b = server.post("/v1/jobs", &long);
    assert_eq!(b.status, 202);
    let b = b.json["id"].as_str().unwrap().to_string();
    assert_eq!(server.job_status(&b), "queued");
    assert_eq!(server.get("/ready").status, 503, "the queue is full");
    let c = server.post("/v1/jobs", &long);
    assert_eq!(c.status, 429, "{}", c.json);
    assert!(c.retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    let sync = server.post("/v1/images/generations", &fox(json!({})));
    assert_eq!(sync.status, 429);
    assert_eq!(server.metric("lumina2_requests_rejected_total"), 2.0);
    assert_eq!(server.metric("lumina2_queue_depth"), 1.0);
    assert_eq!(server.metric("lumina2_jobs_running"), 1.0);

    // A queued job is cancelled at once; the running one at its next step.
    let r = server.call("DELETE", &format!("/v1/jobs/{b}"), None, None);
    assert_eq!(
        (r.status, r.json["status"].as_str()),
        (200, Some("cancelled"))
    );
    assert_eq!(
        server
            .call("DELETE", &format!("/v1/jobs/{a}"), None, None)
            .status,
        200
    );
    server.wait_until("job a cancelled", |s| s.job_status(&a) == "cancelled");
    let job = server.get(&format!("/v1/jobs/{a}")).json;
    assert!(job["progress"]["step"].as_u64().unwrap() < 10000);
    assert_eq!(job["progress"]["num_steps"], 10000);

    let mut stream = String::new();
    let _ = events.read_to_string(&mut stream);
    assert!(stream.contains("event: progress"), "{stream}");
    assert!(stream.contains("event: cancelled"), "{stream}");
    assert!(stream.contains("text/event-stream"), "{stream}");

    // A job that finishes: its result is the images response.
    let d = server.post("/v1/jobs", &fox(json!({})));
    assert_eq!(d.status, 202);
    let d = d.json["id"].as_str().unwrap().to_string();
    server.wait_until("job d done", |s| s.job_status(&d) == "succeeded");
    let job = server.get(&format!("/v1/jobs/{d}")).json;
    assert_eq!(job["progress"], json!({"step": 4, "num_steps": 4}));
    let result = Reply {
        status: 200,
        retry_after: None,
        json: job["result"].clone(),
    };
    assert_eq!(result.images().len(), 1);
    let done = server.call("GET", &format!("/v1/jobs/{d}/events"), None, None);
    let text = done.json.as_str().unwrap();
    assert!(text.starts_with("event: succeeded\ndata: {"), "{text}");
    assert_eq!(server.get("/v1/jobs/job_nope").status, 404);
    assert_eq!(
        server
            .call("DELETE", "/v1/jobs/job_nope", None, None)
            .status,
        404
    );

    // A client that leaves a synchronous request cancels its job.
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let body = long.to_string();
    write!(
        s,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    server.wait_until("the sync job running", |s| {
        s.metric("lumina2_jobs_running") == 1.0
    });
    drop(s);
    server.wait_until("the sync job cancelled", |s| {
        s.metric("lumina2_jobs_cancelled_total") == 3.0
    });
    assert_eq!(server.metric("lumina2_jobs_running"), 0.0);
}

#[test]
fn sigterm_finishes_the_running_job_and_exits_0() {
    // Within the grace period: the request in flight gets its image.
    let server = Server::start(&[], &[]);
    server.wait_until("ready", |s| s.get("/ready").status == 200);
    let url = server.url("/v1/images/generations");
    let body = fox(json!({"num_inference_steps": 300, "size": "32x32"})).to_string();
    let request = std::thread::spawn(move || {
        ureq::post(&url)
            .timeout(PATIENCE)
            .send_string(&body)
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    });
    server.wait_until("running", |s| s.metric("lumina2_jobs_running") == 1.0);
    server.signal("-TERM");
    assert_eq!(request.join().unwrap(), Ok(200));
    assert_eq!(server.wait_exit(), Some(0));

    // Past it: the running job is cancelled at its next step, and the process still exits 0.
    let server = Server::start(&["--preload", "--shutdown-grace", "0"], &[]);
    let a = server.post("/v1/jobs", &fox(json!({"num_inference_steps": 10000})));
    assert_eq!(a.status, 202);
    server.wait_until("running", |s| s.metric("lumina2_jobs_running") == 1.0);
    let start = Instant::now();
    server.signal("-INT");
    assert_eq!(server.wait_exit(), Some(0));
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// The events of a finished SSE stream: (name, data as JSON).
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(d).unwrap());
                }
            }
            Some((name?, data?))
        })
        .collect()
}

/// A job's previews on the 16-channel pipeline: the stream sends the newest
/// preview whenever it reports (a slow reader misses the ones in between),
/// in step order, the last one after step 4 and the very bytes `generate
/// --preview` writes for the same request; the image is the one `generate`
/// makes.
#[test]
fn job_previews_are_the_files_generate_preview_writes() {
    let model = latent16_dir();
    let server = Server::start_model(&model, &["--preload"], &[]);
    let job = server.post("/v1/jobs", &fox(json!({"preview_every": 1})));
    assert_eq!(job.status, 202, "{}", job.json);
    let id = job.json["id"].as_str().unwrap().to_string();
    let stream = server.get(&format!("/v1/jobs/{id}/events"));
    let events = sse_events(stream.json.as_str().unwrap());
    assert_eq!(events.last().unwrap().0, "succeeded", "{events:?}");
    let previews: Vec<(u64, Vec<u8>)> = events
        .iter()
        .filter(|(name, _)| name == "preview")
        .map(|(_, d)| {
            let png = base64::engine::general_purpose::STANDARD
                .decode(d["b64_png"].as_str().unwrap())
                .unwrap();
            (d["step"].as_u64().unwrap(), png)
        })
        .collect();
    let steps: Vec<u64> = previews.iter().map(|p| p.0).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&4), "{events:?}");

    let dir = tmp_dir("preview16");
    let file = dir.join("preview.png");
    let out = tmp_dir("preview16-image");
    let cli = cli_pngs_model(
        &model,
        &out,
        &["--preview", file.to_str().unwrap(), "--preview-every", "1"],
    );
    assert_eq!(previews.last().unwrap().1, std::fs::read(&file).unwrap());
    let done = server.get(&format!("/v1/jobs/{id}")).json;
    let image = Reply {
        status: 200,
        retry_after: None,
        json: done["result"].clone(),
    };
    assert_eq!(image.images(), cli);
}

/// The 4-channel tiny pipeline has no preview matrix: `generate --preview`
/// writes no preview (a warning) and a job sends none; `preview_every` is
/// still taken by jobs, leaves the image as it is, and is refused by the
/// synchronous endpoint.
#[test]
fn a_job_with_previews_is_the_job_without() {
    let server = Server::start(&["--preload"], &[]);
    let job = server.post("/v1/jobs", &fox(json!({"preview_every": 1})));
    assert_eq!(job.status, 202, "{}", job.json);
    let id = job.json["id"].as_str().unwrap().to_string();
    let stream = server.get(&format!("/v1/jobs/{id}/events"));
    let events = sse_events(stream.json.as_str().unwrap());
    assert_eq!(events.last().unwrap().0, "succeeded", "{events:?}");
    assert!(events.iter().all(|(name, _)| name != "preview"));

    let dir = tmp_dir("preview");
    let preview = dir.join("preview.png");
    let out = tmp_dir("preview-image");
    let cli = cli_pngs(&out, &["--preview", preview.to_str().unwrap()]);
    assert!(!preview.exists(), "a 4-channel preview was written");
    let done = server.get(&format!("/v1/jobs/{id}?preview=1")).json;
    assert!(done.get("preview").is_none(), "{done}");
    let image = Reply {
        status: 200,
        retry_after: None,
        json: done["result"].clone(),
    };
    assert_eq!(image.images(), cli);

    // A synchronous request has no stream for previews.
    let r = server.post("/v1/images/generations", &fox(json!({"preview_every": 1})));
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["param"], "preview_every");
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/jobs"));
}

#[test]
fn cache_threshold_gives_the_image_of_generate_cache_threshold() {
    let server = Server::start(&["--preload"], &[]);
    let r = server.post(
        "/v1/images/generations",
        &fox(json!({"cache_threshold": 10.0})),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    let api = r.images();
    let cli = cli_pngs(&tmp_dir("cache"), &["--cache-threshold", "10"]);
    assert_eq!(api, cli);
    // Caching took effect: not the image without it.
    assert!(api != cli_pngs(&tmp_dir("no-cache"), &[]));
    // As a job too.
    let job = server.post("/v1/jobs", &fox(json!({"cache_threshold": 10})));
    assert_eq!(job.status, 202, "{}", job.json);
    let id = job.json["id"].as_str().unwrap().to_string();
    server.wait_until("the job done", |s| s.job_status(&id) == "succeeded");
    let result = Reply {
        status: 200,
        retry_after: None,
        json: server.get(&format!("/v1/jobs/{id}")).json["result"].clone(),
    };
    assert_eq!(result.images(), cli);
}
