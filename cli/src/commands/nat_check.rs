//! `punch-agent nat-check`: classify this host's NAT and ask the gateway
//! for a port mapping, without registering anywhere.

use crate::args::Common;
use crate::config::port_mapping_settings;
use punch_agent::AgentError;
use serde_json::json;

pub async fn run(c: &Common, json: bool) -> Result<(), AgentError> {
    let target = c.stun.first().or(c.server.as_ref()).ok_or_else(|| {
        AgentError::Config("nat-check needs --server HOST:PORT or --stun HOST:PORT".into())
    })?;
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|e| AgentError::ServerUnreachable {
            server: target.clone(),
            reason: format!("cannot resolve: {e}"),
        })?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| AgentError::Config(format!("{target} has no IPv4 address")))?;
    let bind = if c.bind.ip().is_unspecified() {
        std::net::SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        c.bind
    };
    let settings = port_mapping_settings(c)?;
    let (r, pm) = tokio::join!(
        punch_agent::natcheck::check(addr, bind, true),
        punch_agent::portmap::nat_check(&settings, bind, target)
    );
    let r = r?;
    if json {
        let mut v = serde_json::to_value(&r).map_err(|e| AgentError::Io(e.to_string()))?;
        v["port_mapping"] = json!(pm);
        println!("{v}");
        return Ok(());
    }
    match &pm {
        None => println!(
            "port mapping:   not asked (--port-mapping off, or a loopback socket or server)"
        ),
        Some(p) => {
            let said = |name: &str, r: &Option<String>| match r {
                None => format!("{name} mapped"),
                Some(e) => format!("{name}: {e}"),
            };
            println!(
                "port mapping:   gateway {}: {}",
                p.gateway.as_deref().unwrap_or("none"),
                [
                    ("PCP", &p.errors.pcp, p.pcp),
                    ("NAT-PMP", &p.errors.nat_pmp, p.nat_pmp),
                    ("UPnP", &p.errors.upnp, p.upnp)
                ]
                .iter()
                .map(|(n, e, ok)| if *ok { said(n, &None) } else { said(n, e) })
                .collect::<Vec<_>>()
                .join("; ")
            );
            if let Some(m) = &p.mapped_addr {
                println!("mapped address: {m} (via {})", p.protocol.unwrap_or("?"));
            }
        }
    }
    if r.udp == "blocked" {
        println!("UDP: blocked (no STUN answer from {addr})");
    } else {
        println!("UDP:            ok");
        println!(
            "public address: {}",
            r.public_addr.clone().unwrap_or_default()
        );
        println!("mapping:        {}", r.mapping);
        println!("filtering:      {}", r.filtering);
        println!("port preserved: {}", r.port_preserved.unwrap_or(false));
        println!("hairpinning:    {}", r.hairpin.unwrap_or(false));
        let a = &r.allocator;
        let how = match (a.shape.stride, a.shape.block_base, a.shape.block_size) {
            (Some(s), _, _) => format!("sequential, stride {s}"),
            (_, Some(b), Some(n)) => format!("from a {n}-port block at {b}"),
            _ => a.shape.kind.to_string(),
        };
        let ports = a
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        println!("port allocator: {how} (ports {ports})");
        if let Some(b) = a.shape.budget {
            println!("port budget:    {b} mappings toward one peer per punch");
        }
        if r.other_addr.is_none() {
            println!("(the server has no alternate address: start punch-server with --alt-listen)");
        }
    }
    Ok(())
}
