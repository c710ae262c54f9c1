//! The `lumina2` command against hostile input: absurd numbers, files that
//! are not files, output paths that must not be replaced, signals. Every
//! case ends quickly (a run that hangs is killed and fails the test), with a
//! message naming the culprit, the documented exit status, and no file left.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn pipeline_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lumina2"));
    c.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("LUMINA2_TEST_DECODE_DELAY_MS");
    c
}

/// Waits for `child` at most `limit`; past it the child is killed and the
/// test fails (a hang is a bug, not a slow test).
fn wait_at_most(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `lumina2 args` with a time limit, output captured.
fn run(cmd: &mut Command, limit: Duration, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_at_most(child, limit, what)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every numeric option is checked before anything is loaded or sized by
/// it: the model folder does not exist, so an option that got past the
/// checks would fail on the model instead (exit 1, another message). Each
/// refusal is immediate, whatever the number.
#[test]
fn numeric_options_are_bounded_before_anything_is_loaded() {
    let dir = tmp_dir("numbers");
    let out = dir.join("x.png");
    let o = out.to_str().unwrap();
    let lora = dir.join("l.safetensors");
    let lora_huge = format!("{}:1e300", lora.display());
    let lora_nan = format!("{}:NaN", lora.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--num-images-per-prompt", "1000000000"],
            "--num-images-per-prompt: 1000000000 is more than 256 images",
        ),
        (
            vec!["--num-images-per-prompt", "18446744073709551615"],
            "--num-images-per-prompt",
        ),
        (
            vec![
                "--num-images-per-prompt",
                "100",
                "--prompt",
                "y",
                "--prompt",
                "z",
            ],
            "makes 300 images, more than 256",
        ),
        (vec!["--threads", "1000000"], "--threads 1000000: at most"),
        (vec!["--threads", "0"], "--threads 0: at least 1"),
        (vec!["--steps", "10001"], "more than 10000"),
        (vec!["--steps", "0"], "at least 1"),
        (vec!["--sigmas", "1,0.5,2"], "--sigmas: 2 is not in [0, 1]"),
        (vec!["--sigmas", "1,NaN"], "--sigmas: NaN is not in [0, 1]"),
        (
            vec!["--guidance-scale", "1e300"],
            "--guidance-scale: 1e300 is not in [0, 100]",
        ),
        (
            vec!["--guidance-scale=-1"],
            "--guidance-scale: -1 is not in [0, 100]",
        ),
        (vec!["--guidance-scale", "inf"], "--guidance-scale"),
        (
            vec!["--cfg-trunc-ratio", "2"],
            "--cfg-trunc-ratio: 2 is not in [0, 1]",
        ),
        (vec!["--cfg-trunc-ratio", "NaN"], "--cfg-trunc-ratio"),
        (
            vec!["--max-sequence-length", "0"],
            "--max-sequence-length: 0 is not in [1, 512]",
        ),
        (
            vec!["--max-sequence-length", "100000"],
            "is not in [1, 512]",
        ),
        (
            vec!["--width", "16400"],
            "--width: 16400 is larger than 16384 pixels",
        ),
        (
            vec!["--height", "18446744073709551600"],
            "larger than 16384 pixels",
        ),
        (vec!["--width", "40"], "multiple of 16"),
        (
            vec![
                "--seed",
                "18446744073709551615",
                "--num-images-per-prompt",
                "2",
            ],
            "--seed 18446744073709551615: seed + 1 overflows",
        ),
        (vec!["--lora", &lora_huge], "is not in [-100, 100]"),
        (vec!["--lora", &lora_nan], "is not in [-100, 100]"),
        // clap: numbers past the type's range.
        (
            vec!["--steps", "99999999999999999999999"],
            "--num-inference-steps",
        ),
        (vec!["--threads=-1"], "invalid value '-1' for '--threads"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "generate",
            "--model",
            "/nonexistent/lumina2-model",
            "--offline",
            "--prompt",
            "x",
            "-o",
            o,
            "-q",
        ];
        args.extend(extra.iter().copied());
        let start = Instant::now();
        let r = run(&mut command(&args), Duration::from_secs(30), needle);
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{extra:?} took {:?}",
            start.elapsed()
        );
    }

    // RAYON_NUM_THREADS is a thread count too (rayon and candle read it).
    let r = run(
        command(&[
            "generate",
            "--model",
            "/nonexistent/lumina2-model",
            "--offline",
            "--prompt",
            "x",
            "-o",
            o,
            "-q",
        ])
        .env("RAYON_NUM_THREADS", "1000000"),
        Duration::from_secs(30),
        "RAYON_NUM_THREADS",
    );
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains("RAYON_NUM_THREADS=1000000: at most"), "{err}");
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The thread limit is 4 per core this process may use.
#[test]
fn the_thread_limit_is_four_per_core() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let too_many = (4 * cores + 1).to_string();
    let r = run(
        &mut command(&[
            "generate",
            "--model",
            "/nonexistent/lumina2-model",
            "--offline",
            "--prompt",
            "x",
            "-q",
            "--threads",
            &too_many,
        ]),
        Duration::from_secs(30),
        "threads",
    );
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(2), "{err}");
    let expected = format!(
        "--threads {too_many}: at most {} (4 x the {cores} cores this process may use)",
        4 * cores
    );
    assert!(err.contains(&expected), "{err}");
    // At the limit the options pass and the run goes on to the model.
    let at_limit = (4 * cores).to_string();
    let r = run(
        &mut command(&[
            "generate",
            "--model",
            "/nonexistent/lumina2-model",
            "--offline",
            "--prompt",
            "x",
            "-q",
            "--threads",
            &at_limit,
        ]),
        Duration::from_secs(30),
        "threads",
    );
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("lumina2-model"), "{err}");
}

/// A component folder whose `config.json` is `what`, next to the fixture's
/// real weights.
#[cfg(unix)]
fn folder_with_config(dir: &Path, make: impl FnOnce(&Path)) -> PathBuf {
    let folder = dir.join("transformer");
    std::fs::create_dir_all(&folder).unwrap();
    let src = pipeline_dir().join("transformer");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::os::unix::fs::symlink(&p, folder.join(p.file_name().unwrap())).unwrap();
        }
    }
    make(&folder.join("config.json"));
    folder
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(ok.success(), "mkfifo {}", path.display());
}

/// `lumina2 inspect` on a folder whose `config.json` is a FIFO (which would
/// block a reader forever), `/dev/zero` (endless), a folder, or not JSON:
/// an error naming the file and what it is, exit 1, at once.
#[cfg(unix)]
#[test]
fn inspect_refuses_a_config_that_is_not_a_file() {
    type Make = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(&str, Make, &str)> = vec![
        ("fifo", Box::new(|p: &Path| mkfifo(p)), "FIFO"),
        (
            "zero",
            Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap()),
            "character device",
        ),
        (
            "dir",
            Box::new(|p: &Path| std::fs::create_dir(p).unwrap()),
            "a folder",
        ),
        (
            "dangling",
            Box::new(|p: &Path| std::os::unix::fs::symlink("/nonexistent/config", p).unwrap()),
            "No such file",
        ),
        (
            "not-json",
            Box::new(|p: &Path| std::fs::write(p, b"{\"a\": ").unwrap()),
            "not valid JSON",
        ),
        (
            "not-object",
            Box::new(|p: &Path| std::fs::write(p, b"[1, 2]").unwrap()),
            "not a JSON object",
        ),
        (
            "huge",
            Box::new(|p: &Path| {
                let f = std::fs::File::create(p).unwrap();
                f.set_len(2 << 20).unwrap();
            }),
            "over the limit of 1048576 bytes",
        ),
    ];
    for (name, make, needle) in cases {
        let dir = tmp_dir(&format!("inspect-{name}"));
        let folder = folder_with_config(&dir, make);
        let r = run(
            &mut command(&["inspect", folder.to_str().unwrap()]),
            Duration::from_secs(20),
            name,
        );
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("config.json") && err.contains(needle),
            "{name}: {err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // A FIFO or a device given as the checkpoint itself.
    let dir = tmp_dir("inspect-files");
    let fifo = dir.join("model.safetensors");
    mkfifo(&fifo);
    let gguf = dir.join("model.gguf");
    std::os::unix::fs::symlink("/dev/zero", &gguf).unwrap();
    for (p, needle) in [(&fifo, "FIFO"), (&gguf, "character device")] {
        let r = run(
            &mut command(&["inspect", p.to_str().unwrap()]),
            Duration::from_secs(20),
            needle,
        );
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(1), "{err}");
        assert!(
            err.contains(p.to_str().unwrap()) && err.contains(needle),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `-o` naming something that is not a regular file (a device, a FIFO, a
/// socket, a folder, a symbolic link, `/dev/stdout`) is refused before any
/// model is loaded, and the node is left as it was.
#[cfg(unix)]
#[test]
fn outputs_that_are_not_regular_files_are_refused() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tmp_dir("outputs");
    let fifo = dir.join("fifo.png");
    mkfifo(&fifo);
    let socket = dir.join("socket.png");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let folder = dir.join("folder.png");
    std::fs::create_dir(&folder).unwrap();
    let regular = dir.join("regular.png");
    std::fs::write(&regular, b"keep").unwrap();
    let link_file = dir.join("link-file.png");
    std::os::unix::fs::symlink(&regular, &link_file).unwrap();
    let link_null = dir.join("link-null.png");
    std::os::unix::fs::symlink("/dev/null", &link_null).unwrap();
    let model = pipeline_dir();
    let cases: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from("/dev/full"), "is a character device"),
        (PathBuf::from("/dev/null"), "is a character device"),
        (PathBuf::from("/dev/stdout"), "is a symbolic link"),
        (fifo.clone(), "is a FIFO"),
        (socket.clone(), "is a socket"),
        (folder.clone(), "is a folder"),
        (link_file.clone(), "is a symbolic link to a regular file"),
        (
            link_null.clone(),
            "is a symbolic link to a character device",
        ),
    ];
    for (out, needle) in &cases {
        if std::fs::symlink_metadata(out).is_err() {
            continue; // a system without that node
        }
        let before = std::fs::symlink_metadata(out).unwrap().file_type();
        for flag in ["-o", "--output-latents"] {
            let mut args = vec![
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "x",
                "--width",
                "32",
                "--height",
                "32",
                "--steps",
                "1",
                "-q",
                flag,
                out.to_str().unwrap(),
            ];
            if flag == "--output-latents" {
                args.extend(["-o", "unused.png", "--latents-only"]);
            }
            let r = run(&mut command(&args), Duration::from_secs(30), needle);
            let err = stderr(&r);
            assert_eq!(r.status.code(), Some(1), "{out:?}: {err}");
            assert!(
                err.contains(needle) && err.contains("must be a new path or a regular file"),
                "{out:?}: {err}"
            );
            // Refused before the model: no stage ran.
            assert!(!err.contains("denois"), "{err}");
            let after = std::fs::symlink_metadata(out).unwrap().file_type();
            assert_eq!(before, after, "{out:?} changed");
        }
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(std::fs::read(&regular).unwrap(), b"keep");
    assert_eq!(
        files_in(&dir),
        vec![
            "fifo.png",
            "folder.png",
            "link-file.png",
            "link-null.png",
            "regular.png",
            "socket.png"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A process id that no longer exists: that of a child that has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// Temporary files left by a killed run (`.NAME.lumina2-PID-NONCE.tmp`) are
/// removed by the next run for the same output when their process is gone;
/// a live process's, another output's, and anything not of the pattern stay.
#[cfg(target_os = "linux")]
#[test]
fn stale_temporary_files_of_killed_runs_are_removed() {
    let dir = tmp_dir("stale");
    let dead = dead_pid();
    let live = std::process::id();
    let stale = format!(".fox.png.lumina2-{dead}-0123456789abcdef.tmp");
    let stale_latents = format!(".fox.safetensors.lumina2-{dead}-00000000000000ff.tmp");
    let kept = [
        format!(".fox.png.lumina2-{live}-0123456789abcdef.tmp"),
        format!(".other.png.lumina2-{dead}-0123456789abcdef.tmp"),
        format!(".fox.png.lumina2-{dead}-0123456789abcdef.tmp.keep"),
        format!(".fox.png.lumina2-{dead}-notanonce.tmp"),
        format!(".fox.png.{dead}.tmp"),
    ];
    for name in kept.iter().chain([&stale, &stale_latents]) {
        std::fs::write(dir.join(name), b"partial").unwrap();
    }
    // A link of the pattern is not a file we made: it stays, its target too.
    let target = dir.join("target");
    std::fs::write(&target, b"t").unwrap();
    let link = format!(".fox.png.lumina2-{dead}-fedcba9876543210.tmp");
    std::os::unix::fs::symlink(&target, dir.join(&link)).unwrap();

    let out = dir.join("fox.png");
    let latents = dir.join("fox.safetensors");
    let model = pipeline_dir();
    let r = run(
        &mut command(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "1",
            "--max-sequence-length",
            "32",
            "-q",
            "-o",
            out.to_str().unwrap(),
            "--output-latents",
            latents.to_str().unwrap(),
        ]),
        Duration::from_secs(120),
        "stale",
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let mut expected: Vec<String> = kept.to_vec();
    expected.extend([
        link,
        "fox.png".to_string(),
        "fox.safetensors".to_string(),
        "target".to_string(),
    ]);
    expected.sort();
    assert_eq!(files_in(&dir), expected);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A running `lumina2 generate` whose stderr lines arrive on a channel.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(out: &Path, steps: &str, decode_delay_ms: Option<u64>) -> Self {
        let model = pipeline_dir();
        let mut cmd = command(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            steps,
            "--max-sequence-length",
            "32",
            // Stage names on stderr: the test waits for one before signalling.
            "-v",
            "-o",
            out.to_str().unwrap(),
        ]);
        if let Some(ms) = decode_delay_ms {
            cmd.env("LUMINA2_TEST_DECODE_DELAY_MS", ms.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most a minute) for a stderr line holding `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = self.child.kill();
        panic!("no `{needle}` on stderr: {:?}", self.seen);
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits (at most `limit`) for the exit; its status and all of stderr.
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let elapsed = start.elapsed();
                // The reader thread ends with the pipe.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return (status.code(), self.seen.join("\n"), elapsed);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("still running {limit:?} after the signal: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGTERM during denoising: the run stops after the step, exit 143, no
/// image, no temporary file.
#[cfg(unix)]
#[test]
fn sigterm_during_denoising_writes_nothing() {
    let dir = tmp_dir("sigterm-denoise");
    let mut run = Running::start(&dir.join("fox.png"), "10000", None);
    run.wait_for("denoise ...");
    run.signal("TERM");
    let (code, err, _) = run.finish(Duration::from_secs(60));
    assert_eq!(code, Some(143), "{err}");
    assert!(
        err.contains("interrupted by SIGTERM after step") && err.contains("no image was written"),
        "{err}"
    );
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A signal once decoding started: the decoded images are dropped, not
/// written (exit 143 for SIGTERM, 130 for SIGINT); a second signal quits at
/// once. The decode stage is held open by `LUMINA2_TEST_DECODE_DELAY_MS`.
#[cfg(unix)]
#[test]
fn a_signal_while_decoding_writes_nothing() {
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let dir = tmp_dir(&format!("sig{sig}-decode"));
        let mut run = Running::start(&dir.join("fox.png"), "2", Some(1500));
        run.wait_for("decode ...");
        run.signal(sig);
        let (status, err, _) = run.finish(Duration::from_secs(60));
        assert_eq!(status, Some(code), "{err}");
        assert!(
            err.contains(&format!(
                "interrupted by SIG{sig} after decoding; no image was written"
            )),
            "{err}"
        );
        assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // Twice: the second quits without waiting for the decode to end.
    let dir = tmp_dir("sigterm-twice");
    let mut run = Running::start(&dir.join("fox.png"), "2", Some(60_000));
    run.wait_for("decode ...");
    run.signal("TERM");
    run.wait_for("stopping after this step");
    run.signal("TERM");
    let (status, err, elapsed) = run.finish(Duration::from_secs(30));
    assert_eq!(status, Some(143), "{err}");
    assert!(err.contains("SIGTERM again: quitting now"), "{err}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copies the tiny pipeline folder (files only, one level of components).
fn copy_pipeline(to: &Path) {
    for entry in std::fs::read_dir(pipeline_dir()).unwrap() {
        let from = entry.unwrap().path();
        let dest = to.join(from.file_name().unwrap());
        if from.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, dest.join(f.file_name().unwrap())).unwrap();
            }
        } else {
            std::fs::copy(&from, &dest).unwrap();
        }
    }
}

/// Sets `key` to the raw JSON `value` in `file` (a component's config).
fn set_config_number(file: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key] = serde_json::Value::String("\u{1}".into());
    let text = serde_json::to_string(&v)
        .unwrap()
        .replace("\"\\u0001\"", value);
    std::fs::write(file, text).unwrap();
}

/// A pipeline folder whose component configs ask for absurd sizes (10^8
/// transformer layers, 10^11 training timesteps, a feed-forward multiplier
/// of 1e308, 2^62 VAE channels): each run is refused at once, naming the
/// file's field and the limit, before anything is allocated for it (the
/// memory estimate used to build a list of every layer's weights).
#[test]
fn absurd_component_configs_are_refused_with_the_limit() {
    let cases = [
        (
            "transformer/config.json",
            "num_layers",
            "100000000",
            "num_layers",
        ),
        (
            "transformer/config.json",
            "ffn_dim_multiplier",
            "1e308",
            "ffn_dim_multiplier",
        ),
        (
            "transformer/config.json",
            "in_channels",
            "4611686018427387904",
            "in_channels",
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            "100000000000",
            "num_train_timesteps",
        ),
        (
            "vae/config.json",
            "latent_channels",
            "4611686018427387904",
            "latent_channels",
        ),
        (
            "text_encoder/config.json",
            "num_hidden_layers",
            "100000000",
            "num_hidden_layers",
        ),
    ];
    for (file, key, value, culprit) in cases {
        let dir = tmp_dir("absurd-config");
        copy_pipeline(&dir);
        set_config_number(&dir.join(file), key, value);
        let out_png = dir.join("out.png");
        let o = run(
            command(&[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "a fox",
                "--width",
                "32",
                "--height",
                "32",
                "--steps",
                "1",
                "-o",
                out_png.to_str().unwrap(),
            ])
            .env("HF_HUB_OFFLINE", "1"),
            Duration::from_secs(60),
            file,
        );
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{file} {key}: {e}");
        assert!(
            e.contains(culprit) && e.contains("limit"),
            "{file} {key}: {e}"
        );
        assert!(!out_png.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
