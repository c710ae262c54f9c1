//! `lumina2 generate --from-file` on the committed tiny pipeline: each line's
//! PNG is the one `lumina2 generate` writes with the same options; bad lines
//! are reported and the others rendered; shards cover a file exactly once;
//! `--skip-existing` resumes; hostile files end quickly with a message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn pipeline_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lumina2-pipeline/tests/fixtures/pipeline/seed_cfg/pipeline")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lumina2-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lumina2"));
    c.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("LUMINA2_TEST_DECODE_DELAY_MS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` at most `limit`; past it the child is killed and the
/// test fails (a hang is a bug).
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

/// `lumina2 generate --model <tiny pipeline> --max-sequence-length 32 -q ARGS`.
fn lumina2(args: &[&str]) -> Output {
    let model = pipeline_dir();
    let mut all = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--max-sequence-length",
        "32",
    ];
    all.extend_from_slice(args);
    let child = command(&all).spawn().unwrap();
    wait_at_most(child, Duration::from_secs(120), &format!("{args:?}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn manifest(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn lines_with(entries: &[Value], status: &str) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e["status"] == status)
        .map(|e| e["line"].as_u64().unwrap())
        .collect()
}

/// A file with good lines among bad ones: the good lines are rendered, each
/// bad one is named on stderr and in the manifest, and the exit status is 1.
#[test]
fn bad_lines_are_reported_and_the_others_rendered() {
    let dir = tmp_dir("bad-lines");
    let file = dir.join("prompts.jsonl");
    let lines = [
        r#"{"prompt": "a red fox", "size": "32x32", "num_inference_steps": 1, "seed": 1}"#,
        r#"{"prompt": "x", "colour": "red"}"#,
        "",
        r#"{"prompt": "x", "seed": "one"}"#,
        "this is not JSON",
        r#"{"prompt": "a boat", "size": "32x32", "num_inference_steps": 1, "seed": 2}"#,
        r#"["prompt", "x"]"#,
        r#"{"prompt": "x", "size": "40x32"}"#,
        r#"{"size": "32x32"}"#,
        r#"{"prompt": "x", "sampler": "heun"}"#,
        r#"{"prompt": "x", "n": 0}"#,
        "   ",
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = dir.join("img_{line}.png");
    let man = dir.join("manifest.jsonl");
    let r = lumina2(&[
        "--from-file",
        s(&file),
        "-o",
        s(&out),
        "--manifest",
        s(&man),
    ]);
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(dir.join("img_0.png").is_file());
    assert!(dir.join("img_5.png").is_file());
    let entries = manifest(&man);
    assert_eq!(lines_with(&entries, "ok"), vec![0, 5]);
    assert_eq!(lines_with(&entries, "error"), vec![1, 3, 4, 6, 7, 8, 9, 10]);
    let ok = entries.iter().find(|e| e["line"] == 5).unwrap();
    assert_eq!(ok["seed"], 2);
    assert_eq!(ok["output"], s(&dir.join("img_5.png")));
    assert!(ok["timings"]["denoise"].as_f64().unwrap() > 0.0);
    assert!(ok["timings"]["total"].as_f64().unwrap() > 0.0);
    let error_of = |line: u64| {
        entries
            .iter()
            .find(|e| e["line"] == line)
            .unwrap()
            .get("error")
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    for (line, needle) in [
        (1, "unknown field `colour`"),
        (3, "`seed` must be a whole number"),
        (4, "not JSON"),
        (6, "must be a JSON object, not an array"),
        (7, "`size` (width): 40 is not a positive multiple of 16"),
        (8, "no `prompt`"),
        (9, "`sampler`: unknown value `heun` (euler, midpoint)"),
        (10, "`n`"),
    ] {
        let e = error_of(line);
        assert!(e.contains(needle), "line {line}: {e}");
        // stderr names the line by index and by the file's 1-based line number.
        let at = format!("line {line} ({}:{}): error: ", file.display(), line + 1);
        assert!(err.contains(&format!("{at}{e}")), "{err}");
    }
    assert!(err.contains("8 line(s) of"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// PNG text chunks as key/value pairs.
fn png_text(bytes: &[u8]) -> Vec<(String, String)> {
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| (c.keyword.clone(), c.get_text().unwrap()))
        .collect()
}

/// Each line's PNGs are byte for byte those of `lumina2 generate` with the
/// same options and seed: pixels and metadata.
#[test]
fn batch_images_are_the_images_of_generate() {
    let dir = tmp_dir("same");
    let file = dir.join("prompts.jsonl");
    let lines = [
        // The fixture case of tests/cli.rs (diffusers' image).
        r#"{"prompt": "a red fox in the snow", "size": "48x32", "num_inference_steps": 4, "seed": 42}"#,
        // Every other field, two images.
        r#"{"prompt": "a boat", "n": 2, "size": "32x48", "negative_prompt": "blurry", "seed": 9, "num_inference_steps": 3, "guidance_scale": 5.5, "cfg_trunc_ratio": 0.5, "cfg_normalization": false, "system_prompt": "You draw.", "sampler": "midpoint", "guidance_mode": "original", "output": "OUT/boat_{seed}.png"}"#,
    ];
    let text = lines.join("\n").replace("OUT", s(&dir));
    std::fs::write(&file, text).unwrap();
    let r = lumina2(&[
        "--from-file",
        s(&file),
        "-q",
        "-o",
        s(&dir.join("line{line}.png")),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));

    let single = dir.join("generate_fox.png");
    let r = lumina2(&[
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
        "-q",
        "-o",
        s(&single),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let batch = std::fs::read(dir.join("line0.png")).unwrap();
    assert_eq!(batch, std::fs::read(&single).unwrap());
    assert!(png_text(&batch)
        .iter()
        .any(|(k, v)| k == "prompt" && v == "a red fox in the snow"));

    let r = lumina2(&[
        "--prompt",
        "a boat",
        "--num-images-per-prompt",
        "2",
        "--width",
        "32",
        "--height",
        "48",
        "--negative-prompt",
        "blurry",
        "--seed",
        "9",
        "--steps",
        "3",
        "--guidance-scale",
        "5.5",
        "--cfg-trunc-ratio",
        "0.5",
        "--no-cfg-normalization",
        "--system-prompt",
        "You draw.",
        "--sampler",
        "midpoint",
        "--guidance-mode",
        "original",
        "-q",
        "-o",
        s(&dir.join("generate_boat_{seed}.png")),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    for seed in [9, 10] {
        let batch = std::fs::read(dir.join(format!("boat_{seed}.png"))).unwrap();
        let single = std::fs::read(dir.join(format!("generate_boat_{seed}.png"))).unwrap();
        assert_eq!(batch, single, "seed {seed}");
        let meta = png_text(&batch);
        for (k, v) in [
            ("seed", seed.to_string()),
            ("negative_prompt", "blurry".to_string()),
            ("sampler", "midpoint".to_string()),
            ("guidance_mode", "original".to_string()),
            ("system_prompt", "You draw.".to_string()),
        ] {
            assert!(meta.iter().any(|(mk, mv)| mk == k && *mv == v), "{k}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Three workers (`--shard 0/3`, `1/3`, `2/3`, run at the same time) render
/// every good line exactly once and report every bad line exactly once.
#[test]
fn three_shards_cover_the_file_once() {
    let dir = tmp_dir("shards");
    let file = dir.join("prompts.jsonl");
    let mut lines = Vec::new();
    for i in 0..10 {
        lines.push(match i {
            4 => String::new(),
            7 => r#"{"prompt": 7}"#.to_string(),
            _ => format!(
                r#"{{"prompt": "thing {i}", "size": "32x32", "num_inference_steps": 1, "seed": {i}}}"#
            ),
        });
    }
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let model = pipeline_dir();
    let children: Vec<(usize, Child)> = (0..3)
        .map(|i| {
            let shard = format!("{i}/3");
            let man = dir.join(format!("manifest{i}.jsonl"));
            let out = dir.join("img_{line}.png");
            let child = command(&[
                "generate",
                "--model",
                s(&model),
                "--max-sequence-length",
                "32",
                "--threads",
                "1",
                "-q",
                "--from-file",
                s(&file),
                "--shard",
                &shard,
                "--manifest",
                s(&man),
                "-o",
                s(&out),
            ])
            .spawn()
            .unwrap();
            (i, child)
        })
        .collect();
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for (i, child) in children {
        let r = wait_at_most(child, Duration::from_secs(120), &format!("shard {i}"));
        // Line 7 (bad) is shard 1's.
        let expected = if i == 1 { 1 } else { 0 };
        assert_eq!(r.status.code(), Some(expected), "shard {i}: {}", stderr(&r));
        let entries = manifest(&dir.join(format!("manifest{i}.jsonl")));
        for line in lines_with(&entries, "ok") {
            assert_eq!(line % 3, i as u64, "shard {i} took line {line}");
            ok.push(line);
        }
        errors.extend(lines_with(&entries, "error"));
    }
    ok.sort();
    assert_eq!(ok, vec![0, 1, 2, 3, 5, 6, 8, 9]);
    assert_eq!(errors, vec![7]);
    for line in &ok {
        assert!(dir.join(format!("img_{line}.png")).is_file());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A second run with `--skip-existing` renders only the lines whose images
/// are missing, and says how many it skipped.
#[test]
fn skip_existing_resumes_a_run() {
    let dir = tmp_dir("skip");
    let file = dir.join("prompts.jsonl");
    let lines = [
        r#"{"prompt": "a", "size": "32x32", "num_inference_steps": 1, "seed": 1}"#,
        r#"{"prompt": "b", "size": "32x32", "num_inference_steps": 1, "seed": 2, "n": 2}"#,
        r#"{"prompt": "c", "size": "32x32", "num_inference_steps": 1, "seed": 3}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = dir.join("img_{line}_{seed}.png");
    let r = lumina2(&["--from-file", s(&file), "-q", "-o", s(&out)]);
    assert!(r.status.success(), "{}", stderr(&r));
    let names = ["img_0_1.png", "img_1_2.png", "img_1_3.png", "img_2_3.png"];
    for n in names {
        assert!(dir.join(n).is_file(), "{n}");
    }
    // Line 0's image is marked (a skipped line is not rewritten); one of
    // line 1's two images is gone (line 1 is rendered again).
    std::fs::write(dir.join("img_0_1.png"), b"kept").unwrap();
    std::fs::remove_file(dir.join("img_1_3.png")).unwrap();
    let man = dir.join("manifest.jsonl");
    let r = lumina2(&[
        "--from-file",
        s(&file),
        "--skip-existing",
        "--manifest",
        s(&man),
        "-o",
        s(&out),
    ]);
    let err = stderr(&r);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("1 line(s) generated, 0 failed, 2 skipped"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("img_0_1.png")).unwrap(), b"kept");
    assert!(dir.join("img_1_3.png").is_file());
    let entries = manifest(&man);
    assert_eq!(lines_with(&entries, "skipped"), vec![0, 2]);
    assert_eq!(lines_with(&entries, "ok"), vec![1, 1]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Hostile prompts files and options: a clear message, the documented exit
/// status, never a hang or a panic.
#[test]
fn hostile_files_fail_clearly_and_quickly() {
    let dir = tmp_dir("hostile");
    let out = dir.join("x.png");
    let check = |args: &[&str], code: i32, needles: &[&str]| {
        let start = Instant::now();
        let r = lumina2(args);
        let err = stderr(&r);
        assert_eq!(r.status.code(), Some(code), "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: {err}");
        }
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(start.elapsed() < Duration::from_secs(60), "{args:?}");
        err
    };

    // Binary garbage: every line fails as not JSON (or not UTF-8).
    let garbage = dir.join("garbage.jsonl");
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&garbage, &bytes).unwrap();
    check(
        &["--from-file", s(&garbage), "-o", s(&out)],
        1,
        &["line 0 (", "line(s) of"],
    );
    let nested = dir.join("nested.jsonl");
    std::fs::write(&nested, "[".repeat(100_000)).unwrap();
    check(
        &["--from-file", s(&nested), "-o", s(&out)],
        1,
        &["not JSON"],
    );

    // A line past 4 MiB fails alone; the next line is rendered.
    let huge = dir.join("huge.jsonl");
    let long = format!(
        "{{\"prompt\": \"{}\"}}\n{}\n",
        "a".repeat(5 << 20),
        r#"{"prompt": "b", "size": "32x32", "num_inference_steps": 1, "seed": 1}"#
    );
    std::fs::write(&huge, long).unwrap();
    check(
        &["--from-file", s(&huge), "-o", s(&dir.join("h{line}.png"))],
        1,
        &["line 0 (", "more than the 4 MiB a line may hold"],
    );
    assert!(dir.join("h1.png").is_file());
    assert!(!dir.join("h0.png").exists());

    // A file past 64 MiB is refused before it is read.
    let big = dir.join("big.jsonl");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    check(
        &["--from-file", s(&big), "-o", s(&out)],
        1,
        &["--from-file", "over the limit of 67108864 bytes"],
    );

    // Not a regular file: a folder, a missing file, a FIFO (nobody writes it).
    check(
        &["--from-file", s(&dir), "-o", s(&out)],
        1,
        &["not a regular file (a folder)"],
    );
    check(
        &["--from-file", s(&dir.join("none.jsonl")), "-o", s(&out)],
        1,
        &["none.jsonl"],
    );
    #[cfg(unix)]
    {
        let fifo = dir.join("fifo.jsonl");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        check(
            &["--from-file", s(&fifo), "-o", s(&out)],
            1,
            &["not a regular file (a FIFO)"],
        );
        // A manifest that is a FIFO is refused too (writing it would block).
        let good = dir.join("good.jsonl");
        std::fs::write(&good, r#"{"prompt": "x"}"#).unwrap();
        check(
            &[
                "--from-file",
                s(&good),
                "--manifest",
                s(&fifo),
                "-o",
                s(&out),
            ],
            1,
            &["--manifest", "a FIFO"],
        );
    }

    // Usage errors: exit status 2.
    let good = dir.join("good.jsonl");
    std::fs::write(&good, r#"{"prompt": "x"}"#).unwrap();
    for (shard, needle) in [
        ("3/3", "I must be less than N"),
        ("0/0", "N must be at least 1"),
        ("1", "is not I/N"),
        ("-1/3", "is not a whole number"),
    ] {
        let arg = format!("--shard={shard}");
        check(&["--from-file", s(&good), &arg], 2, &[needle]);
    }
    check(
        &["--from-file", s(&good), "--prompt", "x"],
        2,
        &["cannot be used with"],
    );
    check(&["--skip-existing", "--prompt", "x"], 2, &["--from-file"]);
    // The command line's options are each line's defaults, checked first.
    check(
        &["--from-file", s(&good), "--width", "40"],
        2,
        &["--width: 40 is not a positive multiple of 16"],
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png") || n.ends_with(".tmp"))
        .collect();
    assert_eq!(left, vec!["h1.png".to_string()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM during a line: that line is not written, the run stops with 143,
/// the manifest says where it stopped; the lines before it are kept.
#[cfg(unix)]
#[test]
fn sigterm_stops_the_batch_with_nothing_partial() {
    let dir = tmp_dir("sigterm");
    let file = dir.join("prompts.jsonl");
    let lines = [
        r#"{"prompt": "a", "size": "32x32", "num_inference_steps": 1, "seed": 1}"#,
        r#"{"prompt": "b", "size": "32x32", "num_inference_steps": 10000, "seed": 2}"#,
        r#"{"prompt": "c", "size": "32x32", "num_inference_steps": 1, "seed": 3}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let man = dir.join("manifest.jsonl");
    let model = pipeline_dir();
    let child = command(&[
        "generate",
        "--model",
        s(&model),
        "--max-sequence-length",
        "32",
        "-q",
        "--from-file",
        s(&file),
        "--manifest",
        s(&man),
        "-o",
        s(&dir.join("img_{line}.png")),
    ])
    .spawn()
    .unwrap();
    // Wait until line 0 is written (line 1 is then denoising).
    let start = Instant::now();
    while !dir.join("img_0.png").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "line 0 never came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let r = wait_at_most(child, Duration::from_secs(60), "sigterm");
    let err = stderr(&r);
    assert_eq!(r.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, vec!["img_0.png", "manifest.jsonl", "prompts.jsonl"]);
    let entries = manifest(&man);
    let by_status: BTreeMap<String, Vec<u64>> = ["ok", "interrupted"]
        .iter()
        .map(|st| (st.to_string(), lines_with(&entries, st)))
        .collect();
    assert_eq!(by_status["ok"], vec![0]);
    assert_eq!(by_status["interrupted"], vec![1]);
    assert_eq!(entries.len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two lines naming one output fall in different shards: each shard knows
/// the whole file's outputs, so the later line fails in its shard and the
/// earlier one is rendered once in the other.
#[test]
fn an_output_shared_across_shards_is_caught() {
    let dir = tmp_dir("shared-output");
    let file = dir.join("prompts.jsonl");
    let out = dir.join("same.png");
    let line = |i: u32| {
        format!(
            r#"{{"prompt": "thing {i}", "size": "32x32", "num_inference_steps": 1, "seed": {i}, "output": "{}"}}"#,
            s(&out)
        )
    };
    std::fs::write(&file, format!("{}\n{}\n", line(0), line(1))).unwrap();
    // Shard 1 first: line 1 is refused before anything is written.
    let r = lumina2(&["-q", "--from-file", s(&file), "--shard", "1/2"]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    assert!(stderr(&r).contains("is also line 0's"), "{}", stderr(&r));
    assert!(!out.exists());
    let r = lumina2(&["-q", "--from-file", s(&file), "--shard", "0/2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(out.is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A device the build or machine lacks fails before the file is read.
#[test]
fn an_unavailable_device_fails_before_any_line() {
    let dir = tmp_dir("device");
    let file = dir.join("prompts.jsonl");
    std::fs::write(
        &file,
        r#"{"prompt": "a", "size": "32x32", "num_inference_steps": 1, "seed": 1}"#,
    )
    .unwrap();
    let man = dir.join("manifest.jsonl");
    let r = lumina2(&[
        "-q",
        "--from-file",
        s(&file),
        "--device",
        "cuda:7",
        "--manifest",
        s(&man),
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(stderr(&r).contains("--device"), "{}", stderr(&r));
    assert!(!man.exists(), "the manifest was opened");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "something was written"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A line with `cache_threshold` is the image of `lumina2 generate
/// --cache-threshold` (metadata included) and its manifest entry holds the
/// calls TeaCache skipped, as `generate` prints them; a line asking for
/// previews is refused.
#[test]
fn a_cache_threshold_line_is_the_generate_image() {
    let dir = tmp_dir("cache");
    let file = dir.join("prompts.jsonl");
    let lines = [
        r#"{"prompt": "a red fox in the snow", "size": "48x32", "num_inference_steps": 4, "seed": 42, "cache_threshold": 10}"#,
        r#"{"prompt": "a red fox in the snow", "size": "48x32", "num_inference_steps": 4, "seed": 42, "preview_every": 1}"#,
        r#"{"prompt": "x", "cache_threshold": -1}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let man = dir.join("manifest.jsonl");
    let r = lumina2(&[
        "--from-file",
        s(&file),
        "-q",
        "-o",
        s(&dir.join("line{line}.png")),
        "--manifest",
        s(&man),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    let entries = manifest(&man);
    assert_eq!(lines_with(&entries, "ok"), vec![0]);
    assert_eq!(lines_with(&entries, "error"), vec![1, 2]);
    let error_of = |line: u64| {
        entries.iter().find(|e| e["line"] == line).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let e = error_of(1);
    assert!(
        e.contains("`preview_every` is a field of `lumina2 serve` jobs"),
        "{e}"
    );
    let e = error_of(2);
    assert!(
        e.contains("`cache_threshold`: -1 is not a finite number >= 0"),
        "{e}"
    );

    let single = dir.join("generate.png");
    let r = lumina2(&[
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
        "--cache-threshold",
        "10",
        "-o",
        s(&single),
    ]);
    let err = stderr(&r);
    assert!(r.status.success(), "{err}");
    let batch = std::fs::read(dir.join("line0.png")).unwrap();
    assert_eq!(batch, std::fs::read(&single).unwrap());
    assert!(png_text(&batch)
        .iter()
        .any(|(k, v)| k == "cache_threshold" && v == "10"));
    let cache = &entries[0]["cache"];
    let (skipped, calls) = (
        cache["skipped"].as_u64().unwrap(),
        cache["calls"].as_u64().unwrap(),
    );
    assert!(skipped > 0, "{cache}");
    let printed =
        format!("TeaCache: skipped the joint layers in {skipped} of {calls} transformer calls");
    assert!(err.contains(&printed), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
