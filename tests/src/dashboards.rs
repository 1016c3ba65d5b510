//! The check that the Grafana dashboard and the Prometheus alert rules in
//! deploy/ query only metrics, and labels, that a live server exposes: a
//! renamed metric or label would leave a panel empty or an alert silent,
//! with nothing failing.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One query and where it comes from (`dashboard panel "…"`, `alert …`).
#[derive(Debug, Clone)]
pub struct Query {
    pub origin: String,
    pub expr: String,
}

/// The dashboard's panel queries.
pub fn dashboard_queries(path: &Path) -> Result<Vec<Query>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let d: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().context("no panels")? {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(Query {
                    origin: format!("dashboard panel {title:?}"),
                    expr: e.to_string(),
                });
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "{}: no queries", path.display());
    Ok(out)
}

/// The alert rules' expressions.
pub fn rule_queries(path: &Path) -> Result<Vec<Query>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let d: serde_json::Value =
        serde_norway::from_str(&text).with_context(|| format!("{}: not YAML", path.display()))?;
    let mut out = Vec::new();
    for g in d["groups"].as_array().context("no groups")? {
        for r in g["rules"].as_array().into_iter().flatten() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            let expr = r["expr"].as_str().context("a rule without expr")?;
            out.push(Query {
                origin: format!("alert {name}"),
                expr: expr.to_string(),
            });
        }
    }
    anyhow::ensure!(!out.is_empty(), "{}: no rules", path.display());
    Ok(out)
}

/// Metric name → the label names its series carry, from a `/metrics` text.
pub fn exposed(metrics: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_string()).or_default();
        if let Some(body) = line[end..]
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
        {
            for kv in split_labels(body.0) {
                if let Some((k, _)) = kv.split_once('=') {
                    labels.insert(k.trim().to_string());
                }
            }
        }
    }
    out.retain(|k, _| !k.is_empty());
    out
}

/// `a="x",b="y,z"` split at the commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&body[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

/// A metric a query names, with the labels it matches on or groups by.
#[derive(Debug, PartialEq, Eq)]
pub struct Use {
    pub metric: String,
    pub labels: BTreeSet<String>,
}

/// The `punch_*` metrics `expr` selects and the labels it needs of each:
/// those in its matchers (`{path="direct"}`) and those an enclosing
/// `by (…)` groups on. Other metrics (`up`) are Prometheus' own.
pub fn uses(expr: &str) -> Vec<Use> {
    let code = blank_strings(expr);
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts = code[i..].starts_with("punch_") && (i == 0 || !ident(b[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let end = i + code[i..].bytes().take_while(|c| ident(*c)).count();
        let mut labels = BTreeSet::new();
        if b.get(end) == Some(&b'{') {
            let close = code[end..].find('}').map_or(b.len(), |c| end + c);
            for m in code[end + 1..close].split(',') {
                let name: String = m
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    labels.insert(name);
                }
            }
        }
        labels.extend(grouping_around(&code, i));
        out.push(Use {
            metric: code[i..end].to_string(),
            labels,
        });
        i = end;
    }
    out
}

fn ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// The expression with each string literal's contents replaced by spaces,
/// so that names inside strings are not read as metrics.
fn blank_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let (mut quoted, mut escaped) = (false, false);
    for c in expr.chars() {
        if quoted {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => quoted = false,
                _ => {}
            }
            out.push(if quoted { ' ' } else { c });
        } else {
            quoted = c == '"';
            out.push(c);
        }
    }
    out
}

/// Labels of every `by (…)` whose aggregated expression contains `at`.
fn grouping_around(code: &str, at: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = code[from..].find("by") {
        let k = from + k;
        from = k + 2;
        let b = code.as_bytes();
        if (k > 0 && ident(b[k - 1])) || b.get(k + 2).is_some_and(|c| ident(*c)) {
            continue;
        }
        let rest = &code[k + 2..];
        let Some(open) = rest.find('(').filter(|o| rest[..*o].trim().is_empty()) else {
            continue;
        };
        let list_start = k + 2 + open + 1;
        let Some(list_end) = code[list_start..].find(')').map(|e| list_start + e) else {
            continue;
        };
        // The aggregated expression: the parenthesised group after the list.
        let after = &code[list_end + 1..];
        let Some(o) = after.find('(').filter(|o| after[..*o].trim().is_empty()) else {
            continue;
        };
        let body_start = list_end + 1 + o;
        let body_end = matching(code, body_start);
        if (body_start..body_end).contains(&at) {
            out.extend(
                code[list_start..list_end]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    out
}

/// The index just past the parenthesis that closes the one at `open`.
fn matching(code: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// What the queries need that `metrics` (a live `/metrics`) lacks, one
/// line each; empty when every metric and label is there.
pub fn missing(queries: &[Query], metrics: &str) -> Vec<String> {
    let have = exposed(metrics);
    let mut out = Vec::new();
    for q in queries {
        for u in uses(&q.expr) {
            match have.get(&u.metric) {
                None => out.push(format!("{}: metric {} is not exposed", q.origin, u.metric)),
                Some(labels) => {
                    for l in u.labels.difference(labels) {
                        out.push(format!(
                            "{}: metric {} has no label {l:?} (it has {:?})",
                            q.origin, u.metric, labels
                        ));
                    }
                }
            }
        }
    }
    out
}

/// The dashboard's queries as a Prometheus rules file of recording rules,
/// Grafana's range variables replaced, for `promtool check rules` to parse.
pub fn as_recording_rules(queries: &[Query]) -> String {
    let mut s = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let expr = q
            .expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$__interval", "1m");
        s.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a string")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_and_grouping_are_the_labels_a_query_needs() {
        let u = uses(
            r#"sum by (nat_pair) (increase(punch_x_total{path="direct"}[5m])) / clamp_min(sum(punch_y), 1) + up{job="punch_z"}"#,
        );
        assert_eq!(
            u,
            [
                Use {
                    metric: "punch_x_total".into(),
                    labels: ["nat_pair".to_string(), "path".to_string()].into(),
                },
                Use {
                    metric: "punch_y".into(),
                    labels: BTreeSet::new(),
                },
            ]
        );
        let h = uses("histogram_quantile(0.5, sum by (le, path) (rate(punch_t_bucket[1m])))");
        assert_eq!(h[0].labels, ["le".to_string(), "path".to_string()].into());
    }

    #[test]
    fn a_renamed_metric_or_label_is_reported() {
        let metrics = "# TYPE punch_a counter\npunch_a_total{path=\"direct\",x=\"a,b\"} 1\npunch_g 3\n# EOF\n";
        let q = |e: &str| Query {
            origin: "test".into(),
            expr: e.into(),
        };
        assert!(missing(
            &[q("rate(punch_a_total{path=\"x\"}[1m]) + punch_g")],
            metrics
        )
        .is_empty());
        let m = missing(&[q("rate(punch_b_total[1m])")], metrics);
        assert_eq!(m, ["test: metric punch_b_total is not exposed"]);
        let m = missing(&[q("sum by (nat) (punch_a_total)")], metrics);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].contains("no label \"nat\""), "{m:?}");
    }
}
