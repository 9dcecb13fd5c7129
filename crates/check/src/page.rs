//! `dream check --report FILE.html`: one self-contained page (no script,
//! no network) with the run over time as inline SVG: requests per second,
//! p50 and p99 latency, errors and mixed responses, each deploy, rollback
//! and revert marked on the time axis with its release, and the summary.
//!
//! Elements a reader (or a test) looks for carry names: every mark is a
//! `g.mark` with `data-kind` and `data-release`; the summary's cells have
//! ids (`responses`, `errors`, `mixed`, …).

use std::fmt::Write;

use crate::Report;
use crate::timeline::Slot;

/// Something that happened to the site during the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Seconds since the run began.
    pub t_s: f64,
    /// `deploy`, `rollback` or `revert`.
    pub kind: String,
    pub release: String,
}

const W: f64 = 960.0;
const H: f64 = 170.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 26.0;

/// The page for `report` (which must have its timeline) and `marks`.
pub fn html(report: &Report, marks: &[Mark], title: &str) -> String {
    let slots = report.timeline.clone().unwrap_or_default();
    let span = report.duration_s.max(
        slots
            .last()
            .map_or(0.0, |s| s.t_s + s.width_s)
            .min(report.duration_s + 1.0),
    );
    let span = if span > 0.0 { span } else { 1.0 };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>{STYLE}</style></head>\n<body>\n<h1>{t}</h1>\n<p class=\"verdict {v}\">{verdict}</p>",
        t = esc(title),
        v = if report.ok { "ok" } else { "failed" },
        verdict = if report.ok {
            "no errors, no mixed responses".to_string()
        } else {
            format!(
                "{} errors, {} mixed responses",
                report.error_total, report.mixed
            )
        },
    );
    let rate: Vec<(f64, f64)> = slots
        .iter()
        .map(|s| (s.t_s + s.width_s / 2.0, s.responses as f64 / s.width_s))
        .collect();
    chart(
        &mut out,
        "rate",
        "responses per second",
        span,
        &[("rate", &rate)],
        &[],
        marks,
    );
    let p50: Vec<(f64, f64)> = points(&slots, |s| s.p50_ms);
    let p99: Vec<(f64, f64)> = points(&slots, |s| s.p99_ms);
    chart(
        &mut out,
        "latency",
        "latency, ms: p50 (green), p99 (orange)",
        span,
        &[("p50", &p50), ("p99", &p99)],
        &[],
        marks,
    );
    let errors: Vec<(f64, f64, f64)> = slots
        .iter()
        .map(|s| (s.t_s, s.width_s, s.errors as f64))
        .collect();
    let mixed: Vec<(f64, f64, f64)> = slots
        .iter()
        .map(|s| (s.t_s, s.width_s, s.mixed as f64))
        .collect();
    chart(
        &mut out,
        "errors",
        "errors (red) and mixed responses (magenta), per slot",
        span,
        &[],
        &[("error", &errors), ("mixed", &mixed)],
        marks,
    );
    summary(&mut out, report, marks);
    out.push_str("</body></html>\n");
    out
}

fn points(slots: &[Slot], f: impl Fn(&Slot) -> Option<f64>) -> Vec<(f64, f64)> {
    slots
        .iter()
        .filter_map(|s| f(s).map(|v| (s.t_s + s.width_s / 2.0, v)))
        .collect()
}

type Series<'a> = (&'a str, &'a [(f64, f64)]);
type Bars<'a> = (&'a str, &'a [(f64, f64, f64)]);

/// One chart: lines and bars over the run's time, the marks across it.
fn chart(
    out: &mut String,
    id: &str,
    label: &str,
    span: f64,
    lines: &[Series<'_>],
    bars: &[Bars<'_>],
    marks: &[Mark],
) {
    let top = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .chain(bars.iter().flat_map(|(_, b)| b.iter().map(|(_, _, y)| *y)))
        .fold(0.0f64, f64::max);
    let top = nice(top);
    let x = |t: f64| LEFT + (t / span).clamp(0.0, 1.0) * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - (v / top).clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
    let _ = writeln!(
        out,
        "<figure id=\"{id}\"><figcaption>{}</figcaption>\n<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\">",
        esc(label)
    );
    // Axes and their scale.
    let _ = writeln!(
        out,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\"/><line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\"/>",
        b = H - BOTTOM,
        r = W - RIGHT
    );
    for i in 0..=2 {
        let v = top * i as f64 / 2.0;
        let _ = writeln!(
            out,
            "<text class=\"tick\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT - 6.0,
            y(v) + 4.0,
            short(v)
        );
    }
    for i in 0..=4 {
        let t = span * i as f64 / 4.0;
        let _ = writeln!(
            out,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.1}s</text>",
            x(t),
            H - 8.0,
            t
        );
    }
    for (class, bars) in bars {
        for (t, w, v) in bars.iter().filter(|b| b.2 > 0.0) {
            let _ = writeln!(
                out,
                "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\"><title>{v} at {t:.2}s</title></rect>",
                x(*t),
                y(*v),
                (x(t + w) - x(*t)).max(1.0),
                (H - BOTTOM) - y(*v)
            );
        }
    }
    for (class, pts) in lines {
        let path: Vec<String> = pts
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline class=\"{class}\" points=\"{}\"/>",
            path.join(" ")
        );
    }
    for m in marks {
        let mx = x(m.t_s);
        let _ = writeln!(
            out,
            "<g class=\"mark\" data-kind=\"{k}\" data-release=\"{r}\"><line class=\"mark-{k}\" x1=\"{mx:.1}\" y1=\"{TOP}\" x2=\"{mx:.1}\" y2=\"{b}\"/><text x=\"{tx:.1}\" y=\"{ty}\">{k} {r}</text><title>{k} of {r} at {t:.2}s</title></g>",
            k = esc(&m.kind),
            r = esc(&m.release),
            b = H - BOTTOM,
            tx = mx + 3.0,
            ty = TOP - 6.0,
            t = m.t_s
        );
    }
    out.push_str("</svg></figure>\n");
}

/// The summary table; each value's cell has an id.
fn summary(out: &mut String, r: &Report, marks: &[Mark]) {
    let e = &r.errors;
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    let rows: Vec<(&str, &str, String)> = vec![
        ("url", "URL", esc(&r.url)),
        ("connections", "connections", r.connections.to_string()),
        (
            "client",
            "client",
            if r.keep_alive {
                "keep-alive".into()
            } else {
                "new connection per request".into()
            },
        ),
        ("duration", "duration, s", format!("{:.2}", r.duration_s)),
        ("responses", "responses", r.responses.to_string()),
        (
            "rate",
            "responses per second",
            format!("{:.0}", r.requests_per_s),
        ),
        ("errors", "errors", r.error_total.to_string()),
        ("refused", "refused", e.connect_refused.to_string()),
        (
            "reset",
            "reset",
            (e.connect_reset + e.read_reset).to_string(),
        ),
        (
            "timeout",
            "timed out",
            (e.connect_timeout + e.read_timeout).to_string(),
        ),
        ("status", "status >= 400", e.bad_status.to_string()),
        ("mixed", "mixed responses", r.mixed.to_string()),
        ("p50", "p50, ms", ms(r.latency.p50_us)),
        ("p99", "p99, ms", ms(r.latency.p99_us)),
        ("p999", "p99.9, ms", ms(r.latency.p999_us)),
        ("max", "max, ms", ms(r.latency.max_us)),
        (
            "marks",
            "deploys, rollbacks, reverts",
            marks.len().to_string(),
        ),
    ];
    out.push_str("<table id=\"summary\">\n");
    for (id, label, value) in rows {
        let _ = writeln!(out, "<tr><th>{label}</th><td id=\"{id}\">{value}</td></tr>");
    }
    out.push_str("</table>\n");
    if !r.releases.is_empty() {
        out.push_str("<table id=\"releases\"><tr><th>release</th><th>responses</th></tr>\n");
        for (rel, n) in &r.releases {
            let _ = writeln!(out, "<tr><td>{}</td><td>{n}</td></tr>", esc(rel));
        }
        out.push_str("</table>\n");
    }
}

/// A round top for an axis: 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}\
h1{font-size:18px}figure{margin:0 0 18px}figcaption{font-weight:600;margin-bottom:4px}\
.verdict.ok{color:#17702c}.verdict.failed{color:#b00020;font-weight:600}\
.axis{stroke:#999}.tick{font-size:11px;fill:#555}\
polyline{fill:none;stroke-width:1.5}.rate{stroke:#1f5fbf}.p50{stroke:#2a9d55}.p99{stroke:#d9822b}\
rect.error{fill:#b00020}rect.mixed{fill:#c000c0}\
.mark line{stroke:#444;stroke-dasharray:4 3}.mark text{font-size:11px;fill:#444}\
.mark-revert{stroke:#b00020!important}\
table{border-collapse:collapse;margin-top:8px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}\
td{font-variant-numeric:tabular-nums}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_tops_and_escapes() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(3.2), 5.0);
        assert_eq!(nice(1234.0), 2000.0);
        assert_eq!(esc("<a&\"b\">"), "&lt;a&amp;&quot;b&quot;&gt;");
    }
}
