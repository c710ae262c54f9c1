//! The chat-template renderer against jinja2, and its limits on hostile
//! templates. No Python, no download.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lumina2_text_encoder::{ChatMessage, ChatTemplate, Error};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat_template")
        .join(name)
}

#[derive(serde::Deserialize)]
struct Input {
    messages: Vec<Message>,
    add_generation_prompt: bool,
    vars: BTreeMap<String, serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// features.jinja (string methods, namespace, loops and loop controls,
/// slicing, tojson and its options, tests, Python's printing of values)
/// renders as transformers 5.24 renders it with jinja2 3.1.6: expected.txt
/// and input.json are written by
/// `xtask/parity/gen_qwen3_tokenizer.py --fixture` in the parity venv, not
/// by hand.
#[test]
fn features_render_as_jinja2() {
    let source = std::fs::read_to_string(fixture("features.jinja")).unwrap();
    let input: Input =
        serde_json::from_str(&std::fs::read_to_string(fixture("input.json")).unwrap()).unwrap();
    let expected = std::fs::read_to_string(fixture("expected.txt")).unwrap();
    let messages: Vec<ChatMessage> = input
        .messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content,
        })
        .collect();
    let template = ChatTemplate::new(&source, "features.jinja").unwrap();
    let got = template
        .render(&messages, input.add_generation_prompt, &input.vars)
        .unwrap();
    if got != expected {
        for (i, (a, b)) in got.lines().zip(expected.lines()).enumerate() {
            if a != b {
                panic!("line {}: got\n{a}\nexpected\n{b}", i + 1);
            }
        }
        panic!(
            "same lines, different text: got {} bytes, expected {}",
            got.len(),
            expected.len()
        );
    }
}

/// Renders `source` with one user message; the error's text.
fn render_err(source: &str) -> String {
    let start = Instant::now();
    let result = ChatTemplate::new(source, "hostile.jinja")
        .and_then(|t| t.render(&[ChatMessage::user("hi")], true, &BTreeMap::new()));
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    match result {
        Err(e @ Error::ChatTemplate { .. }) => {
            let text = e.to_string();
            assert!(text.contains("hostile.jinja"), "{text}");
            text
        }
        other => panic!("expected a chat template error, got {other:?}"),
    }
}

#[test]
fn endless_loops_run_out_of_fuel() {
    let e = render_err(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    );
    assert!(e.contains("instructions"), "{e}");
}

#[test]
fn unbounded_recursion_stops() {
    render_err("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
    // Self-including templates have nothing to include: one template only.
    render_err("{% include 'chat_template' %}");
}

#[test]
fn huge_output_is_refused() {
    let e = render_err("{% for i in range(100000) %}{{ 'x' * 10000000 }}{% endfor %}");
    assert!(e.contains("longer than"), "{e}");
}

#[test]
fn raise_exception_and_syntax_errors_are_typed() {
    let e = render_err("{{ raise_exception('Only user and assistant roles') }}");
    assert!(e.contains("Only user and assistant roles"), "{e}");
    render_err("{% for m in messages %}");
    render_err("{{ messages.content.no_such_method() }}");
}

#[test]
fn engine_panics_are_errors() {
    // minijinja 2.24 indexes past the end reversing an empty string.
    let e = render_err("{{ ''[::-1] }}");
    assert!(e.contains("template engine failed"), "{e}");
    let e = ChatTemplate::new("x", "t.jinja")
        .unwrap()
        .render(&[], true, &BTreeMap::new())
        .unwrap_err();
    assert!(e.to_string().contains("empty conversation"), "{e}");
}

#[test]
fn jinja_file_takes_priority_over_the_config() {
    let dir = std::env::temp_dir().join(format!("lumina2-chat-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "config {{ messages[0].content }}"}"#,
    )
    .unwrap();
    let render = |dir: &Path| {
        ChatTemplate::from_tokenizer_folder(dir)
            .unwrap()
            .unwrap()
            .render(&[ChatMessage::user("hi")], false, &BTreeMap::new())
            .unwrap()
    };
    assert_eq!(render(&dir), "config hi");
    std::fs::write(
        dir.join("chat_template.jinja"),
        "file {{ messages[0].content }}\n",
    )
    .unwrap();
    // jinja2 drops one trailing newline of the source.
    assert_eq!(render(&dir), "file hi");
    std::fs::remove_dir_all(&dir).unwrap();

    let list = serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "default {{ add_generation_prompt }}"}
    ]});
    let t = ChatTemplate::from_tokenizer_config(&list, "tokenizer_config.json")
        .unwrap()
        .unwrap();
    assert_eq!(
        t.render(&[ChatMessage::user("hi")], true, &BTreeMap::new())
            .unwrap(),
        "default True"
    );
}
