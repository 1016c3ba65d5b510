//! Turning the global flags into an agent configuration, with the checks
//! that make a bad flag a usage error (exit 2) before anything is sent.

use crate::args::Common;
use punch_agent::portmap::PortMapSettings;
use punch_agent::{AgentConfig, AgentError, RelayMode};
use std::path::PathBuf;
use std::time::Duration;

pub fn secs(v: f64, what: &str) -> Result<Duration, AgentError> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(AgentError::Config(format!(
            "{what} must be between 0 and 86400 seconds, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `<data dir>/punch`: the agent's key and the sharer's hash trees.
pub fn data_dir() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("punch")
}

fn default_key_file() -> PathBuf {
    data_dir().join("agent.key")
}

pub fn config(c: &Common, persistent: bool) -> Result<AgentConfig, AgentError> {
    let server = c.server.clone().ok_or_else(|| {
        AgentError::Config("--server HOST:PORT (or PUNCH_SERVER) is required".into())
    })?;
    let fp = c.server_fingerprint.clone().ok_or_else(|| {
        AgentError::Config(
            "--server-fingerprint (or PUNCH_SERVER_FINGERPRINT) is required; get it with `punch-server fingerprint`"
                .into(),
        )
    })?;
    let mut cfg = AgentConfig::new(server, fp);
    cfg.worker_id = c.id.clone();
    cfg.token = c.token.clone().filter(|t| !t.is_empty());
    cfg.key_file = match (&c.key_file, persistent || c.id.is_some()) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(default_key_file()),
        (None, false) => None,
    };
    cfg.bind = c.bind;
    cfg.punch_timeout = secs(c.punch_timeout, "--punch-timeout")?;
    cfg.relay_after = secs(c.relay_after, "--relay-after")?;
    cfg.stun = c.stun.clone();
    cfg.nat_check = !c.no_nat_check;
    cfg.lan_discovery = c.lan_discovery;
    cfg.server_tcp = c.server_tcp.clone().filter(|s| !s.is_empty());
    cfg.server_ca = c.server_ca.clone();
    cfg.proxy = c.proxy.clone().filter(|s| !s.is_empty());
    cfg.ws_max_age = secs(c.ws_max_age, "--ws-max-age")?;
    if cfg.ws_max_age < Duration::from_secs(10) {
        return Err(AgentError::Config(
            "--ws-max-age must be at least 10 seconds".into(),
        ));
    }
    cfg.port_mapping = port_mapping_settings(c)?;
    cfg.udp_only = c.no_tcp;
    if cfg.udp_only && cfg.server_tcp_only() {
        return Err(AgentError::Config(
            "--no-tcp, but --server names a WebSocket".into(),
        ));
    }
    // Checked here, not by clap: clap would also refuse a harmless
    // PUNCH_NO_RELAY=false beside --force-relay.
    if c.no_relay && c.force_relay {
        return Err(AgentError::Config(
            "--no-relay and --force-relay exclude each other".into(),
        ));
    }
    cfg.relay = if c.no_relay {
        RelayMode::Never
    } else if c.force_relay {
        RelayMode::Force
    } else {
        RelayMode::Auto
    };
    Ok(cfg)
}

pub fn port_mapping_settings(c: &Common) -> Result<PortMapSettings, AgentError> {
    let mut s = PortMapSettings {
        mode: c.port_mapping.parse().map_err(AgentError::Config)?,
        ..PortMapSettings::default()
    };
    if !c.port_mapping_protocols.is_empty() {
        s.protocols = c
            .port_mapping_protocols
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .map_err(AgentError::Config)?;
    }
    if let Some(l) = c.port_mapping_lifetime {
        if l == 0 {
            return Err(AgentError::Config(
                "--port-mapping-lifetime must be at least 1".into(),
            ));
        }
        s.lifetime = Duration::from_secs(l as u64);
    }
    s.gateway = c.port_mapping_gateway;
    Ok(s)
}
