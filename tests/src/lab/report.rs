//! The matrix's results for people: a table and an SVG heatmap of the
//! direct rate.

use super::matrix::PairResult;
use super::nat::Expect;

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

/// The readable table.
pub fn table(results: &[PairResult]) -> String {
    let mut s = format!(
        "{:<16} {:<16} {:<9} {:>5} {:>8} {:>7} {:>8} {:>5} {:>9} {:>9} {:>7} {:>7}  {}\n",
        "A",
        "B",
        "theory",
        "runs",
        "success",
        "direct",
        "relayed",
        "tcp",
        "med ms",
        "p95 ms",
        "med rt",
        "p95 rt",
        "verdict"
    );
    for r in results {
        s.push_str(&format!(
            "{:<16} {:<16} {:<9} {:>5} {:>7.0}% {:>6.0}% {:>7.0}% {:>4.0}% {:>9} {:>9} {:>7} {:>7}  {}\n",
            r.a,
            r.b,
            r.expect.label(),
            r.runs,
            r.success_rate * 100.0,
            r.direct_rate * 100.0,
            r.relayed as f64 * 100.0 / r.runs as f64,
            r.tcp as f64 * 100.0 / r.runs as f64,
            opt(r.median_ms, 1),
            opt(r.p95_ms, 1),
            opt(r.median_rtts, 1),
            opt(r.p95_rtts, 1),
            {
                let mut v = if r.via_mapped > 0 {
                    format!("{} ({} direct via a port mapping)", r.verdict, r.via_mapped)
                } else {
                    r.verdict.to_string()
                };
                let how: Vec<String> = r
                    .strategies
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .chain(r.relay_reasons.iter().map(|(k, n)| format!("relayed: {k} {n}")))
                    .collect();
                if !how.is_empty() {
                    v.push_str(&format!("  [{}]", how.join(", ")));
                }
                v
            }
        ));
    }
    s
}

/// An SVG heatmap of the direct rate: rows A, columns B.
pub fn svg(results: &[PairResult]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.a.as_str()) {
            names.push(&r.a);
        }
    }
    let cell = 64;
    let left = 130;
    let top = 150;
    let n = names.len();
    let w = left + cell * n + 20;
    let h = top + cell * n + 60;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">punch-lab matrix: direct connections (A connects to B)</text>\n\
         <text x=\"10\" y=\"38\">green: direct, red: no direct path, grey: relay over TCP only (\"tcp N%\": connected); ! marks a pair worse than theory, * better</text>\n"
    );
    for (j, b) in names.iter().enumerate() {
        let x = left + j * cell + cell / 2;
        s.push_str(&format!(
            "<text x=\"{x}\" y=\"{}\" transform=\"rotate(-45 {x} {})\">{b}</text>\n",
            top - 8,
            top - 8
        ));
    }
    for (i, a) in names.iter().enumerate() {
        let y = top + i * cell;
        s.push_str(&format!(
            "<text x=\"8\" y=\"{}\">{a}</text>\n",
            y + cell / 2 + 4
        ));
        for (j, b) in names.iter().enumerate() {
            let Some(r) = results.iter().find(|r| r.a == *a && r.b == *b) else {
                continue;
            };
            let x = left + j * cell;
            // Pairs only a relay over TCP can connect are grey (no direct
            // path exists): their cell says how many connected.
            let (red, green, blue) = if r.expect == Expect::RelayOverTcp && r.direct == 0 {
                (120, 120, 130)
            } else {
                (
                    (255.0 * (1.0 - r.direct_rate)) as u8,
                    (180.0 * r.direct_rate + 40.0) as u8,
                    60,
                )
            };
            let (value, label) = if r.expect == Expect::RelayOverTcp && r.direct == 0 {
                (r.success_rate, "tcp ")
            } else {
                (r.direct_rate, "")
            };
            let mark = match r.verdict {
                "worse-than-theory" | "wrong-transport" => "!",
                "better-than-theory" => "*",
                _ => "",
            };
            s.push_str(&format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({red},{green},{blue})\" stroke=\"white\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"white\">{label}{:.0}%{mark}</text>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"white\" font-size=\"9\">{}</text>\n",
                x + cell / 2,
                y + cell / 2,
                value * 100.0,
                x + cell / 2,
                y + cell / 2 + 14,
                r.median_ms.map(|m| format!("{m:.0} ms")).unwrap_or_default()
            ));
        }
    }
    if let Some(r) = results.iter().find(|r| r.a == "same-nat") {
        s.push_str(&format!(
            "<text x=\"10\" y=\"{}\">two hosts behind one NAT (no hairpin): {:.0}% direct</text>\n",
            h - 20,
            r.direct_rate * 100.0
        ));
    }
    s.push_str("</svg>\n");
    s
}
