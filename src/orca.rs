//! ORCA load reports in the TEXT format (DESIGN section 10), as vLLM's OpenAI server and
//! the reference chat node send them when asked with `endpoint-load-metrics-format: TEXT`:
//!
//! ```text
//! endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.42, named_metrics.num_requests_waiting=3
//! ```
//!
//! The header comes from an upstream the filter does not control: any report that is not
//! exactly this shape (no `TEXT ` prefix, a pair without `=`, an empty or duplicate name,
//! a value that is not a finite number, over [`MAX_REPORT_BYTES`], over [`MAX_PAIRS`]
//! pairs) is ignored as a whole. Never a panic; no allocation.

/// Request header that asks the upstream for a report, and its value.
pub const FORMAT_HEADER: &str = "endpoint-load-metrics-format";
pub const FORMAT_TEXT: &str = "TEXT";
/// Response header that carries the report.
pub const REPORT_HEADER: &str = "endpoint-load-metrics";

/// Longer reports are ignored.
pub const MAX_REPORT_BYTES: usize = 2048;
/// Reports with more pairs are ignored.
pub const MAX_PAIRS: usize = 64;

/// The value of `named_metrics.<metric>` in a TEXT report, or `None` when the report is
/// malformed or does not carry the metric.
pub fn named_metric(report: &[u8], metric: &str) -> Option<f64> {
    if report.len() > MAX_REPORT_BYTES {
        return None;
    }
    let body = report.strip_prefix(b"TEXT ")?;
    let mut found = None;
    let mut count = 0usize;
    for pair in body.split(|b| *b == b',') {
        count += 1;
        if count > MAX_PAIRS {
            return None;
        }
        let pair = trim(pair);
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (name, value) = (trim(&pair[..eq]), trim(&pair[eq + 1..]));
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let value = parse_number(value)?;
        if let Some(n) = name.strip_prefix(b"named_metrics.") {
            if n == metric.as_bytes() {
                if found.is_some() {
                    return None; // the same metric twice: which one?
                }
                found = Some(value);
            }
        }
    }
    found
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !matches!(c, b' ' | b'\t')).map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or_default()
}

/// A finite number in JSON's grammar (`0.42`, `3`, `1e-3`, `-0`, what vLLM writes);
/// nothing else (`nan`, `inf`, hex, `+1`, `.5`, empty, out of range).
///
/// serde_json's number parser, already in the module for the configuration, instead of
/// `str::parse::<f64>`: that one links core's exact decimal-to-float tables (~15 KB of the
/// `.wasm`), a precision a threshold comparison does not need.
fn parse_number(b: &[u8]) -> Option<f64> {
    if b.is_empty() || b.len() > 32 || !b.iter().all(|c| c.is_ascii_digit() || b"+-.eE".contains(c)) {
        return None;
    }
    let v: f64 = serde_json::from_slice(b).ok()?;
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KV: &str = "kv_cache_usage_perc";

    #[test]
    fn reads_the_named_metric() {
        for (report, metric, want) in [
            ("TEXT named_metrics.kv_cache_usage_perc=0.42, named_metrics.num_requests_waiting=3", KV, Some(0.42)),
            (
                "TEXT named_metrics.kv_cache_usage_perc=0.42, named_metrics.num_requests_waiting=3",
                "num_requests_waiting",
                Some(3.0),
            ),
            ("TEXT named_metrics.num_requests_waiting=3,named_metrics.kv_cache_usage_perc=1", KV, Some(1.0)),
            ("TEXT cpu_utilization=0.5, named_metrics.kv_cache_usage_perc=1e-2", KV, Some(0.01)),
            ("TEXT  named_metrics.kv_cache_usage_perc = 0.9 ", KV, Some(0.9)),
            ("TEXT named_metrics.kv_cache_usage_perc=1e-05", KV, Some(1e-5)),
            ("TEXT named_metrics.kv_cache_usage_perc=-0", KV, Some(0.0)),
            ("TEXT named_metrics.num_requests_waiting=12.0", "num_requests_waiting", Some(12.0)),
            ("TEXT named_metrics.other=0.9", KV, None),
            ("TEXT kv_cache_usage_perc=0.9", KV, None),
        ] {
            assert_eq!(named_metric(report.as_bytes(), metric), want, "{report}");
        }
    }

    #[test]
    fn malformed_reports_are_ignored_whole() {
        let long = format!("TEXT named_metrics.kv_cache_usage_perc=0.5{}", ", a=1".repeat(500));
        let many = format!("TEXT named_metrics.kv_cache_usage_perc=0.5{}", ",a=1".repeat(MAX_PAIRS));
        for report in [
            "",
            "TEXT",
            "TEXT ",
            "JSON {\"named_metrics\":{\"kv_cache_usage_perc\":0.5}}",
            "text named_metrics.kv_cache_usage_perc=0.5",
            "named_metrics.kv_cache_usage_perc=0.5",
            "TEXT named_metrics.kv_cache_usage_perc",
            "TEXT named_metrics.kv_cache_usage_perc=",
            "TEXT named_metrics.kv_cache_usage_perc=nan",
            "TEXT named_metrics.kv_cache_usage_perc=inf",
            "TEXT named_metrics.kv_cache_usage_perc=1e999",
            "TEXT named_metrics.kv_cache_usage_perc=0x1",
            "TEXT named_metrics.kv_cache_usage_perc=+1",
            "TEXT named_metrics.kv_cache_usage_perc=.5",
            "TEXT named_metrics.kv_cache_usage_perc=5.",
            "TEXT named_metrics.kv_cache_usage_perc=1e",
            "TEXT named_metrics.kv_cache_usage_perc=0.5e-3.1",
            "TEXT named_metrics.kv_cache_usage_perc=--1",
            "TEXT named_metrics.kv_cache_usage_perc=0.5, =1",
            "TEXT named_metrics.kv_cache_usage_perc=0.5,, b=1",
            "TEXT named_metrics.kv_cache_usage_perc=0.5, named_metrics.kv_cache_usage_perc=0.1",
            "TEXT named_metrics.kv_cache_usage_perc=0.5, bad name=1",
            "TEXT named_metrics.kv_cache_usage_perc=0.5, x=y",
            long.as_str(),
            many.as_str(),
        ] {
            assert_eq!(named_metric(report.as_bytes(), KV), None, "{report:.80}");
        }
        assert_eq!(named_metric(b"TEXT named_metrics.kv_cache_usage_perc=0.5\xff", KV), None);
        assert_eq!(named_metric(b"TEXT \xffnamed_metrics.kv_cache_usage_perc=0.5", KV), None);
    }
}
