//! Reading the operator's `/metrics` text (Prometheus/OpenMetrics exposition format): the
//! `_sum` and `_count` of its histograms, and gauges, by name and labels.

/// The value of the sample `name{labels}` (labels in any order, all of them given), if the
/// text has it.
pub(super) fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, rest) = split_series(line)?;
            let (sample_name, sample_labels) = parse_series(series)?;
            if sample_name != name || !same_labels(&sample_labels, labels) {
                return None;
            }
            // A timestamp may follow the value.
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// A histogram's total of observations and their number.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Totals {
    pub(super) sum: f64,
    pub(super) count: u64,
}

impl Totals {
    /// The `_sum` and `_count` of histogram `name{labels}`; zero when the histogram has none
    /// (a labelled histogram before its first observation).
    pub(super) fn of(text: &str, name: &str, labels: &[(&str, &str)]) -> Self {
        let sum = value(text, &format!("{name}_sum"), labels).unwrap_or(0.0);
        let count = value(text, &format!("{name}_count"), labels).unwrap_or(0.0);
        Self {
            sum,
            count: count as u64,
        }
    }

    /// What was observed between `earlier` and `self`.
    pub(super) fn since(self, earlier: Self) -> Self {
        Self {
            sum: self.sum - earlier.sum,
            count: self.count.saturating_sub(earlier.count),
        }
    }
}

/// `series value…` → (`series`, `value…`); the series may hold spaces inside label values.
fn split_series(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    match line.find('{') {
        Some(open) if line[..open].chars().all(is_name_char) => {
            let close = open + closing_brace(&line[open..])?;
            Some((&line[..=close], &line[close + 1..]))
        }
        _ => line.split_once(' '),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The offset of the `}` closing the label set that `s` starts with (quotes respected).
fn closing_brace(s: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// `name{a="1",b="x"}` → (`name`, [(a, 1), (b, x)]), label values unescaped.
fn parse_series(series: &str) -> Option<(&str, Vec<(String, String)>)> {
    let Some(open) = series.find('{') else {
        return Some((series, Vec::new()));
    };
    let name = &series[..open];
    let mut inner = series[open + 1..].strip_suffix('}')?;
    let mut labels = Vec::new();
    loop {
        inner = inner.trim_start_matches([',', ' ']);
        if inner.is_empty() {
            return Some((name, labels));
        }
        let (key, rest) = inner.split_once('=')?;
        let rest = rest.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        inner = &rest[end + 1..];
    }
}

fn same_labels(found: &[(String, String)], wanted: &[(&str, &str)]) -> bool {
    found.len() == wanted.len()
        && wanted
            .iter()
            .all(|(k, v)| found.iter().any(|(fk, fv)| fk == k && fv == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP session_operator_pass_cpu_seconds CPU time the operator spent computing a pass.
# TYPE session_operator_pass_cpu_seconds histogram
session_operator_pass_cpu_seconds_sum 0.0123
session_operator_pass_cpu_seconds_count 7
session_operator_pass_cpu_seconds_bucket{le="0.0001"} 0
session_operator_pass_cpu_seconds_bucket{le="+Inf"} 7
# TYPE session_operator_store_latency_seconds histogram
session_operator_store_latency_seconds_sum{op="CountsByWorker"} 2.5
session_operator_store_latency_seconds_count{op="CountsByWorker"} 2
session_operator_store_latency_seconds_sum{op="WorkersWithSessions"} 0.25
session_operator_policy_workers{policy_namespace="bench",policy="a } b, \"c\"",state="ready"} 10000
session_operator_reconciles_total{result="ok"} 9 1700000000
# EOF
"#;

    #[test]
    fn reads_samples_by_name_and_labels() {
        assert_eq!(
            value(TEXT, "session_operator_pass_cpu_seconds_count", &[]),
            Some(7.0)
        );
        assert_eq!(
            value(
                TEXT,
                "session_operator_store_latency_seconds_sum",
                &[("op", "WorkersWithSessions")]
            ),
            Some(0.25)
        );
        // Labels in another order, with quotes, braces and commas in a value.
        assert_eq!(
            value(
                TEXT,
                "session_operator_policy_workers",
                &[
                    ("state", "ready"),
                    ("policy", "a } b, \"c\""),
                    ("policy_namespace", "bench")
                ]
            ),
            Some(10000.0)
        );
        // A timestamp after the value is not the value.
        assert_eq!(
            value(
                TEXT,
                "session_operator_reconciles_total",
                &[("result", "ok")]
            ),
            Some(9.0)
        );
        // A subset of the labels, or a prefix of a name, is not a match.
        assert_eq!(
            value(
                TEXT,
                "session_operator_policy_workers",
                &[("state", "ready")]
            ),
            None
        );
        assert_eq!(value(TEXT, "session_operator_pass_cpu_seconds", &[]), None);
        assert_eq!(value("", "x", &[]), None);
    }

    #[test]
    fn histogram_totals_and_their_difference() {
        let cpu = Totals::of(TEXT, "session_operator_pass_cpu_seconds", &[]);
        assert_eq!(
            cpu,
            Totals {
                sum: 0.0123,
                count: 7
            }
        );
        let counts = Totals::of(
            TEXT,
            "session_operator_store_latency_seconds",
            &[("op", "CountsByWorker")],
        );
        assert_eq!(counts.count, 2);
        // Not observed yet: zero, not an error.
        assert_eq!(
            Totals::of(TEXT, "session_operator_pass_store_seconds", &[]),
            Totals::default()
        );
        let later = Totals {
            sum: 0.0223,
            count: 8,
        };
        let one = later.since(cpu);
        assert_eq!(one.count, 1);
        assert!((one.sum - 0.01).abs() < 1e-12);
    }
}
