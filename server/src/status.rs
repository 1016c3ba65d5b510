//! `GET /`: a status page for people. Plain server-rendered HTML that
//! refreshes itself every 5 s: online and stale workers with their
//! addresses and NAT class, recent connects with outcome and time, success
//! rates.

use crate::Shared;
use punch_protocol::view::html_escape as esc;
use std::fmt::Write;

fn pct(n: u64, total: u64) -> String {
    if total == 0 {
        "–".into()
    } else {
        format!("{:.0} %", n as f64 * 100.0 / total as f64)
    }
}

/// Renders the page.
pub fn page(s: &Shared) -> String {
    // The workers and the port allocators they reported, in one look.
    let (workers, allocs): (Vec<_>, Vec<_>) = {
        let reg = s.registry.lock().expect("not poisoned");
        reg.list(None, None, punch_protocol::signal::MAX_LIST)
            .into_iter()
            .map(|w| {
                let a = reg.allocator(&w.id);
                (w, a)
            })
            .unzip()
    };
    let m = s.metrics.snapshot();
    let recent = s.metrics.recent_newest_first();
    let total = m.outcome_direct + m.outcome_relayed + m.outcome_failed;
    let online = workers
        .iter()
        .filter(|w| w.state.as_str() == "online")
        .count();
    let online_tcp = workers
        .iter()
        .filter(|w| {
            w.state.as_str() == "online" && w.transport == punch_protocol::signal::Transport::Tcp
        })
        .count();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5"><title>punch-server</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f3f3f3}}.stale{{color:#999}}.direct{{color:#070}}.relayed{{color:#a60}}.failed{{color:#b00}}
code{{font-size:12px}}</style></head><body>
<h1>punch-server</h1>
<p>fingerprint <code>{fp}</code> · <b id="online">{online}</b> online
(<span id="by-transport">{on_udp} over UDP, {online_tcp} over TCP</span>), {stale} stale ·
{total} connects: <span class="direct">{d} direct</span>, <span class="relayed">{r} relayed</span>,
<span class="failed">{f} failed</span> (success {ok}, direct {dr})</p>
<h2>Workers</h2><table id="workers"><tr><th>worker</th><th>type</th><th>tags</th><th>state</th>
<th>address</th><th>transport</th><th>NAT</th><th>since</th><th>metadata</th></tr>"#,
        fp = esc(&s.fingerprint),
        stale = workers.len() - online,
        on_udp = online - online_tcp,
        d = m.outcome_direct,
        r = m.outcome_relayed,
        f = m.outcome_failed,
        ok = pct(m.outcome_direct + m.outcome_relayed, total),
        dr = pct(m.outcome_direct, total),
    );
    for (w, alloc) in workers.iter().zip(&allocs) {
        let since = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(w.since_ms),
        );
        let meta: Vec<String> = w
            .metadata
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
            .collect();
        let _ = write!(
            h,
            r#"<tr class="{state}"><td class="worker">{id}</td><td>{kind}</td><td>{tags}</td><td>{state}</td><td>{addr}</td><td>{tr}</td><td>{nat}</td><td>{since}</td><td>{meta}</td></tr>"#,
            state = w.state.as_str(),
            id = esc(&w.id),
            kind = esc(w.kind.as_deref().unwrap_or("")),
            tags = esc(&w.tags.join(", ")),
            addr = w.observed,
            tr = w.transport.as_str(),
            nat = {
                match (w.nat, *alloc) {
                    (Some(n), Some(a)) => format!(
                        "{} · {}",
                        n.label(),
                        punch_protocol::view::AllocatorView::from(a).summary()
                    ),
                    (Some(n), None) => n.label(),
                    (None, _) => "–".into(),
                }
            },
            meta = meta.join(" "),
        );
    }
    h.push_str("</table><h2>Recent connects</h2><table id=\"recent\"><tr><th>when</th><th>from</th><th>to</th><th>path</th><th>how</th><th>time</th><th>NAT pair</th></tr>");
    for c in &recent {
        let _ = write!(
            h,
            r#"<tr><td>{at}</td><td>{from}</td><td>{to}</td><td class="{p}">{p}</td><td class="how">{how}</td><td>{ms} ms</td><td>{pair}</td></tr>"#,
            at = humantime::format_rfc3339_seconds(c.at),
            from = esc(&c.requester),
            to = esc(&c.target),
            p = c.path,
            ms = c.connect_ms,
            pair = esc(&c.nat_pair),
            how = esc(c
                .strategy
                .as_deref()
                .or(c.relay_reason.as_deref())
                .unwrap_or("")),
        );
    }
    h.push_str("</table></body></html>\n");
    h
}
