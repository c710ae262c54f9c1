//! Chat templates: transformers' `apply_chat_template(..., tokenize=False)`
//! (transformers 5.24, `utils/chat_template_utils.py`) on minijinja.
//!
//! transformers renders a tokenizer's Jinja template in a sandboxed jinja2
//! environment with `trim_blocks=True, lstrip_blocks=True` (and jinja2's
//! default of dropping one trailing newline of the source), the loop-control
//! extension (`break`, `continue`), a `tojson` filter that is Python's
//! `json.dumps` (no HTML escaping, `ensure_ascii=False`), and the globals
//! `raise_exception`, `strftime_now`, `dict` and `namespace`. The context is
//! `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's
//! named special tokens (`eos_token`, `pad_token`, ...) and every extra
//! keyword argument (such as `enable_thinking`), the latter overriding the
//! tokens. Python's string methods (`startswith`, `split`, `strip`, ...) come
//! from minijinja-contrib's `pycompat`.
//!
//! Templates come with downloaded files and are untrusted: rendering is
//! bounded in instructions ([`TEMPLATE_FUEL`]), nesting and recursion
//! ([`TEMPLATE_RECURSION_LIMIT`]) and output size ([`MAX_RENDERED_BYTES`]),
//! and every failure is an [`Error::ChatTemplate`] naming the template's file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};

/// Instructions one rendering may execute (minijinja's fuel). A chat of a
/// few messages takes a few thousand; a template that loops without end
/// stops here instead of hanging.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// The deepest nesting of blocks, macro calls and includes a template may
/// reach (recursive macros stop here).
pub const TEMPLATE_RECURSION_LIMIT: usize = 128;

/// The longest rendered text, in bytes.
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// The longest template source, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// One chat message as the template sees it (`message.role`,
/// `message.content`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".to_string(),
            content: content.into(),
        }
    }
}

/// A parsed chat template with the environment transformers renders it in.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

const NAME: &str = "chat_template";

fn template_err(origin: &str, reason: impl Into<String>) -> Error {
    Error::ChatTemplate {
        origin: origin.to_string(),
        reason: reason.into(),
    }
}

/// A minijinja error as one line with its location and cause chain.
fn describe(e: &minijinja::Error) -> String {
    let mut s = match e.kind() {
        ErrorKind::OutOfFuel => format!(
            "rendering took more than {TEMPLATE_FUEL} instructions (a template that does not end?)"
        ),
        _ => e.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl ChatTemplate {
    /// Parses `source`; `origin` names where it came from in errors (the
    /// file, and the key within it).
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(template_err(
                &origin,
                format!(
                    "template of {} bytes (at most {MAX_TEMPLATE_BYTES})",
                    source.len()
                ),
            ));
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| template_err(&origin, describe(&e)))?;
        Ok(Self { env, origin })
    }

    /// The template of a transformers tokenizer folder, found as
    /// transformers 5.24 finds it: `chat_template.jinja` when present (it
    /// takes priority), else `tokenizer_config.json`'s `chat_template` (a
    /// string, or a list of `{"name", "template"}` of which `default` is
    /// taken). `None` when the folder has neither.
    pub fn from_tokenizer_folder(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source = read_text(&jinja, MAX_TEMPLATE_BYTES as u64)?;
            return Self::new(&source, jinja.display().to_string()).map(Some);
        }
        let config = dir.join("tokenizer_config.json");
        if !config.exists() {
            return Ok(None);
        }
        let json = read_json(&config)?;
        Self::from_tokenizer_config(&json, &config.display().to_string())
    }

    /// The `chat_template` of a parsed `tokenizer_config.json` (see
    /// [`ChatTemplate::from_tokenizer_folder`]); `origin` names the file.
    pub fn from_tokenizer_config(config: &serde_json::Value, origin: &str) -> Result<Option<Self>> {
        let origin = format!("{origin}: chat_template");
        match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Self::new(s, origin).map(Some),
            Some(serde_json::Value::Array(list)) => {
                let default = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                match default
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(s) => Self::new(s, format!("{origin}[default]")).map(Some),
                    None => Err(template_err(
                        &origin,
                        "a list of templates without a `default` one holding a `template` string",
                    )),
                }
            }
            Some(other) => Err(template_err(
                &origin,
                format!("expected a string or a list of named templates, found {other}"),
            )),
        }
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=..., **vars)`: `vars` holds the tokenizer's
    /// named special tokens and the extra keyword arguments (an extra
    /// argument overrides a token of the same name). `tools` and
    /// `documents` are none.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        vars: &BTreeMap<String, serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            // transformers' "Cannot apply chat template to an empty conversation".
            return Err(template_err(
                &self.origin,
                "no messages (an empty conversation)",
            ));
        }
        let mut ctx: BTreeMap<&str, Value> = vars
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from_serialize(v)))
            .collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("tools", Value::from(()));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| template_err(&self.origin, describe(&e)))?;
        let mut out = BoundedWriter {
            buf: Vec::new(),
            limit: MAX_RENDERED_BYTES,
        };
        // minijinja 2.24 panics on some inputs (a reverse slice `[::-1]` of
        // an empty string or list indexes past its end): such a panic is
        // this template's error, not the caller's crash.
        let rendered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            template.render_captured_to(ctx, &mut out).map(|_| ())
        }));
        match rendered {
            Ok(r) => r.map_err(|e| template_err(&self.origin, describe(&e)))?,
            Err(_) => {
                return Err(template_err(
                    &self.origin,
                    "the template engine failed (minijinja panicked; a reverse slice of an empty string or list?)",
                ))
            }
        }
        String::from_utf8(out.buf)
            .map_err(|_| template_err(&self.origin, "rendered text is not UTF-8"))
    }
}

/// Collects the output and fails past `limit` bytes.
struct BoundedWriter {
    buf: Vec<u8>,
    limit: usize,
}

impl Write for BoundedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            return Err(std::io::Error::other(format!(
                "rendered text longer than {} bytes",
                self.limit
            )));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) fn read_text(path: &Path, limit: u64) -> Result<String> {
    lumina2_weights::fs::read_to_string_bounded(path, limit).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_text(path, lumina2_weights::fs::MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        origin: path.display().to_string(),
        source,
    })
}

/// How jinja2 prints a value in `{{ ... }}`: Python's `str()`, so `True`,
/// `None`, `2.0`, `['a', 1]`, `{'k': None}` (minijinja's own formatting is
/// `true`, `none`, `2`, `["a", 1]`). Strings and undefined values print as
/// minijinja prints them (the text; nothing). Only printing goes through
/// here: `~` and the `string` filter still use minijinja's spelling.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::String | ValueKind::Undefined => minijinja::escape_formatter(out, state, value),
        _ => {
            let mut s = String::new();
            python_repr(value, 0, &mut s)?;
            std::fmt::Write::write_str(out, &s)
                .map_err(|_| invalid("cannot write the rendered text"))
        }
    }
}

/// Python's `repr()` of a value (its `str()` for all but strings).
fn python_repr(
    v: &Value,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(invalid("value nested too deeply to print"));
    }
    match v.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => {
            let f = f64::try_from(v.clone())?;
            out.push_str(&match python_float_repr(f).as_str() {
                "NaN" => "nan".to_string(),
                "Infinity" => "inf".to_string(),
                "-Infinity" => "-inf".to_string(),
                r => r.to_string(),
            });
        }
        ValueKind::String => python_str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, depth + 1, out)?;
            }
            out.push(']');
        }
        ValueKind::Map
            if v.as_object()
                .is_some_and(|o| o.repr() == minijinja::value::ObjectRepr::Map) =>
        {
            out.push('{');
            for (i, key) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, depth + 1, out)?;
                out.push_str(": ");
                python_repr(&v.get_item(&key)?, depth + 1, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the text has one and no
/// double quote; backslash, the quote, `\n`, `\r`, `\t` and other ASCII
/// control characters escaped (other non-printable characters, which Python
/// also escapes, are written as they are).
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// transformers' `raise_exception(message)`: the template's own error.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`: `json.dumps` with those arguments,
/// positional or by keyword.
fn tojson(value: Value, args: Rest<Value>) -> std::result::Result<String, minijinja::Error> {
    type Args = (
        Option<bool>,
        Option<Value>,
        Option<Value>,
        Option<bool>,
        Kwargs,
    );
    let (ensure_ascii, indent, separators, sort_keys, kwargs): Args = from_args(&args)?;
    let ensure_ascii = kwargs
        .get::<Option<bool>>("ensure_ascii")?
        .or(ensure_ascii)
        .unwrap_or(false);
    let indent = kwargs.get::<Option<Value>>("indent")?.or(indent);
    let separators = kwargs.get::<Option<Value>>("separators")?.or(separators);
    let sort_keys = kwargs
        .get::<Option<bool>>("sort_keys")?
        .or(sort_keys)
        .unwrap_or(false);
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    invalid(format!(
                        "tojson: indent must be an integer or a string, got {v}"
                    ))
                })?;
                " ".repeat(usize::try_from(n).unwrap_or(0).min(64))
            }
        }),
    };
    // Python's defaults: (", ", ": "), or ("," , ": ") with an indent.
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => return Err(invalid("tojson: separators must be two strings")),
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    dump(&value, &opts, 0, &mut out)?;
    Ok(out)
}

fn invalid(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Deepest structure `tojson` walks (Python stops at its recursion limit).
const MAX_JSON_DEPTH: usize = 128;

fn dump(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(invalid("tojson: structure nested too deeply"));
    }
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => dump_str(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            dump_container(&items, '[', ']', o, depth, out, |item, out| {
                dump(item, o, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut pairs = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                pairs.push((json_key(&key)?, item));
            }
            if o.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            dump_container(&pairs, '{', '}', o, depth, out, |(k, item), out| {
                dump_str(k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                dump(item, o, depth + 1, out)
            })?;
        }
        other => {
            return Err(invalid(format!(
                "tojson: object of kind {other} is not JSON serializable"
            )))
        }
    }
    Ok(())
}

/// A dict key as `json.dumps` writes it (strings as they are; numbers,
/// booleans and None converted).
fn json_key(k: &Value) -> std::result::Result<String, minijinja::Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => python_float_repr(f64::try_from(k.clone())?),
        other => {
            return Err(invalid(format!(
                "tojson: keys must be str, int, float, bool or None, not {other}"
            )))
        }
    })
}

fn dump_container<T>(
    items: &[T],
    open: char,
    close: char,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
    mut each: impl FnMut(&T, &mut String) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |level: usize, out: &mut String| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&o.item_sep);
        }
        newline(depth + 1, out);
        each(item, out)?;
    }
    newline(depth, out);
    out.push(close);
    Ok(())
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn dump_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            // Python escapes all but " ".."~" with ensure_ascii (DEL too).
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits
/// that round-trip, in positional notation for exponents -4..16, else
/// `d.ddde+XX`; `NaN`, `Infinity`, `-Infinity`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp < 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else if exp + 1 >= n {
            format!("{sign}{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{sign}{a}.{b}")
        }
    } else {
        let (a, b) = digits.split_at(1);
        let frac = if b.is_empty() {
            String::new()
        } else {
            format!(".{b}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{a}{frac}e{esign}{:02}", exp.abs())
    }
}

/// transformers' `strftime_now(format)`: the current time formatted with
/// C `strftime` directives. Python uses the local time zone; this is UTC
/// (the same in a container without a zone set). Directives: `%Y %y %m %d
/// %e %H %I %M %S %p %j %a %A %b %B %h %%`; others are an error.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `secs` since the Unix epoch (UTC) formatted as `strftime`.
fn strftime(secs: i64, format: &str) -> std::result::Result<String, minijinja::Error> {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (hour, minute, second) = (tod / 3600, tod % 3600 / 60, tod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let piece = match chars.next() {
            Some('Y') => year.to_string(),
            Some('y') => format!("{:02}", year.rem_euclid(100)),
            Some('m') => format!("{month:02}"),
            Some('d') => format!("{day:02}"),
            Some('e') => format!("{day:2}"),
            Some('H') => format!("{hour:02}"),
            Some('I') => format!("{hour12:02}"),
            Some('M') => format!("{minute:02}"),
            Some('S') => format!("{second:02}"),
            Some('p') => if hour < 12 { "AM" } else { "PM" }.to_string(),
            Some('j') => format!("{yday:03}"),
            Some('a') => WEEKDAYS[weekday][..3].to_string(),
            Some('A') => WEEKDAYS[weekday].to_string(),
            Some('b') | Some('h') => month_name[..3].to_string(),
            Some('B') => month_name.to_string(),
            Some('%') => "%".to_string(),
            other => {
                return Err(invalid(format!(
                    "strftime_now: unsupported directive %{}",
                    other.map(String::from).unwrap_or_default()
                )))
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_is_pythons() {
        // Expected strings: Python 3.11 repr().
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strftime_on_known_dates() {
        // 2024-02-29 13:05:09 UTC (a Thursday, day 60).
        let t = 1_709_211_909;
        assert_eq!(
            strftime(t, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %I%p %y %%").unwrap(),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 01PM 24 %"
        );
        assert_eq!(strftime(0, "%d %B %Y").unwrap(), "01 January 1970");
        assert!(strftime(0, "%Z").is_err());
    }
}
