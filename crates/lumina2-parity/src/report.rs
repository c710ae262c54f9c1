//! Report rows: one per case and expected tensor.

use crate::Comparison;

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// Case path relative to the cases folder.
    pub case: String,
    /// The component.
    pub component: String,
    /// Expected tensor name (`-` when the case could not run).
    pub tensor: String,
    /// Shape of the expected tensor.
    pub shape: String,
    /// max |ours - expected| (NaN when there was no comparison).
    pub max_abs: f64,
    /// max |ours - expected| / (atol + rtol |expected|).
    pub worst: f64,
    /// ||ours - expected|| / ||expected||.
    pub rel_rms: f64,
    /// Whether the row passes.
    pub pass: bool,
    /// Why a row failed without a comparison.
    pub note: String,
}

impl Row {
    /// A row judged by the format's pass rule.
    pub fn compared(
        case: &str,
        component: &str,
        tensor: &str,
        shape: &[usize],
        c: &Comparison,
    ) -> Self {
        Self {
            case: case.to_string(),
            component: component.to_string(),
            tensor: tensor.to_string(),
            shape: format!("{shape:?}"),
            max_abs: c.max_abs,
            worst: c.worst,
            rel_rms: c.rel_rms,
            pass: c.passes(),
            note: String::new(),
        }
    }

    /// A failed row that did not get to a comparison; `note` says why.
    pub fn failed(case: &str, component: &str, tensor: &str, shape: String, note: String) -> Self {
        Self {
            case: case.to_string(),
            component: component.to_string(),
            tensor: tensor.to_string(),
            shape,
            max_abs: f64::NAN,
            worst: f64::INFINITY,
            rel_rms: f64::NAN,
            pass: false,
            note,
        }
    }
}

/// One row of the table.
pub fn format_row(r: &Row) -> String {
    let sci = |v: f64| {
        if v.is_nan() {
            "-".to_string()
        } else {
            format!("{v:.3e}")
        }
    };
    format!(
        "{:<44} {:<12} {:<24} {:<20} {:>11} {:>10} {:>10} {}{}",
        r.case,
        r.component,
        r.tensor,
        r.shape,
        sci(r.max_abs),
        sci(r.rel_rms),
        if r.worst.is_infinite() {
            "inf".to_string()
        } else {
            format!("{:.4}", r.worst)
        },
        if r.pass { "pass" } else { "FAIL" },
        if r.note.is_empty() {
            String::new()
        } else {
            format!("  ({})", r.note)
        }
    )
}

/// The report table: a header and one line per row.
pub fn format_report(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<44} {:<12} {:<24} {:<20} {:>11} {:>10} {:>10} {}\n",
        "case", "component", "tensor", "shape", "max_abs", "rel_rms", "worst", "result"
    );
    for r in rows {
        s.push_str(&format_row(r));
        s.push('\n');
    }
    s
}
