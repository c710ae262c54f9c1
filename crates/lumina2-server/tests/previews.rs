//! A job's previews over HTTP, on a stand-in renderer: each preview the
//! renderer hands over is sent on the job's event stream, byte for byte,
//! and the job shows the latest.

use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use lumina2_server::{Backend, Config, InvalidRequest, Model, Progress, RenderError, Renderer};
use serde_json::{Map, Value};

const STEPS: usize = 3;

struct Fake;

/// A request: `preview_every`, if any.
struct Request(Option<usize>);

struct FakeRenderer;

impl Backend for Fake {
    type Request = Request;
    type Renderer = FakeRenderer;

    fn parse(&self, body: Map<String, Value>) -> Result<Request, InvalidRequest> {
        Ok(Request(
            body.get("preview_every")
                .and_then(Value::as_u64)
                .map(|k| k as usize),
        ))
    }
}

/// The preview of a step: bytes that name it.
fn preview_of(step: usize) -> Vec<u8> {
    vec![0x89, b'P', b'N', b'G', step as u8]
}

impl Renderer<Request> for FakeRenderer {
    fn render(
        &mut self,
        request: &Request,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Vec<Vec<u8>>, RenderError> {
        for step in 1..=STEPS {
            // Slow enough for the client to watch every step.
            std::thread::sleep(Duration::from_millis(300));
            let preview = request
                .0
                .filter(|k| step % k == 0)
                .map(|_| preview_of(step));
            let p = Progress {
                step,
                num_steps: STEPS,
                elapsed: Duration::from_millis(300),
                preview,
            };
            if !progress(p) {
                return Err(RenderError::Stopped);
            }
        }
        Ok(vec![b"image".to_vec()])
    }
}

fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

#[test]
fn a_job_sends_each_preview_on_its_stream() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut config = Config::new("fake");
        config.port = 0;
        let _ = lumina2_server::run(config, Fake, Model::Ready(FakeRenderer), |addr| {
            let _ = tx.send(addr);
        });
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let base = format!("http://{addr}");
    let job: Value = ureq::post(&format!("{base}/v1/jobs"))
        .send_string(r#"{"prompt": "p", "preview_every": 1}"#)
        .unwrap()
        .into_json()
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let stream = ureq::get(&format!("{base}/v1/jobs/{id}/events"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let events = events(&stream);
    assert_eq!(events.last().unwrap().0, "succeeded", "{stream}");
    let previews: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "preview")
        .map(|(_, d)| d)
        .collect();
    let steps: Vec<u64> = previews
        .iter()
        .map(|p| p["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3], "{stream}");
    for p in &previews {
        assert_eq!(p["num_steps"], STEPS);
        let step = p["step"].as_u64().unwrap() as usize;
        assert_eq!(b64(&p["b64_png"]), preview_of(step));
    }
    // Each preview comes before the progress of its step.
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let first = names.iter().position(|n| *n == "preview").unwrap();
    assert_eq!(names[first + 1], "progress");
    assert_eq!(events[first + 1].1["step"], 1);

    let plain: Value = ureq::get(&format!("{base}/v1/jobs/{id}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(
        plain["preview"],
        serde_json::json!({"step": 3, "num_steps": 3})
    );
    let full: Value = ureq::get(&format!("{base}/v1/jobs/{id}?preview=1"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(b64(&full["preview"]["b64_png"]), preview_of(3));

    // Without preview_every: no preview anywhere.
    let job: Value = ureq::post(&format!("{base}/v1/jobs"))
        .send_string(r#"{"prompt": "p"}"#)
        .unwrap()
        .into_json()
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let stream = ureq::get(&format!("{base}/v1/jobs/{id}/events"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(!stream.contains("event: preview"), "{stream}");
    assert!(stream.contains("event: succeeded"), "{stream}");
}
