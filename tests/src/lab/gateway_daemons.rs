//! The port-mapping daemons (miniupnpd) on the gateways of the sites that
//! ask for one, and what they granted.

use super::*;

impl Lab {
    /// Starts miniupnpd on every site's gateway that asks for one and has
    /// none yet. It learns its public address by STUN from the lab server
    /// (so the server must run): with a documentation-range address on
    /// `wan0` it would refuse to forward otherwise.
    pub fn start_port_mapping(&mut self) -> Result<()> {
        for i in 0..self.sites.len() {
            if self.sites[i].port_mapping.is_some() && self.sites[i].lease_file.is_none() {
                self.start_miniupnpd(i)?;
            }
        }
        Ok(())
    }

    fn start_miniupnpd(&mut self, site: usize) -> Result<()> {
        if !have("miniupnpd") {
            bail!("port-mapping sites run miniupnpd: apt-get install -y miniupnpd-nftables");
        }
        let s = &self.sites[site];
        let d = s.port_mapping.context("no daemon asked for")?;
        let ns = s.edge_ns.clone();
        let tag = format!("s{site}");
        let lan = format!("10.{}.0.0/24", site + 1);
        let lease = self.path(&format!("{tag}-upnp.leases"));
        let pid = self.path(&format!("{tag}-miniupnpd.pid"));
        let conf = format!(
            "# punch-lab: the port-mapping daemon of site {tag}\n\
             ext_ifname=wan0\n\
             ext_perform_stun=yes\n\
             ext_stun_host={SERVER_IP}\n\
             ext_stun_port=3478\n\
             listening_ip=lan0\n\
             ipv6_disable=yes\n\
             http_port=0\n\
             enable_natpmp={natpmp}\n\
             enable_upnp={upnp}\n\
             secure_mode=yes\n\
             min_lifetime=2\n\
             lease_file={lease}\n\
             uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d{site:03x}\n\
             allow 1024-65535 {lan} 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            natpmp = if d.pcp || d.nat_pmp { "yes" } else { "no" },
            upnp = if d.upnp { "yes" } else { "no" },
            lease = lease.display(),
        );
        let conf_path = self.path(&format!("{tag}-miniupnpd.conf"));
        std::fs::write(&conf_path, conf)?;
        // It logs to stderr in the foreground (-d): read it as stdout.
        let mut cmd = in_ns(&ns, "sh");
        cmd.arg("-c").arg(format!(
            "exec miniupnpd -f '{}' -P '{}' -d 2>&1",
            conf_path.display(),
            pid.display()
        ));
        let log = self.path(&format!("{tag}-miniupnpd.log"));
        let mut p = Proc::spawn_tee(&format!("{tag}-miniupnpd"), cmd, &log)?;
        // Ready once STUN told it its address and its listeners are up.
        let ready = if d.pcp || d.nat_pmp {
            "Listening for NAT-PMP/PCP traffic"
        } else {
            "HTTP listening on port"
        };
        p.wait_line(ready, Duration::from_secs(20))
            .with_context(|| format!("miniupnpd in {ns}; log {}", log.display()))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("impossible") || text.contains("does not support port forwarding") {
            bail!("miniupnpd in {ns} will not forward:\n{text}");
        }
        self.procs.push(p);
        let s = &mut self.sites[site];
        s.lease_file = Some(lease);
        s.daemon_log = Some(log);
        Ok(())
    }

    /// The mappings a site's daemon holds now: its lease file's lines
    /// (`UDP:40000:10.1.0.10:40000:…`).
    pub fn port_mapping_leases(&self, site: usize) -> Vec<String> {
        self.sites[site]
            .lease_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The DNAT rules the daemon put in its gateway's nftables.
    pub fn port_mapping_rules(&self, site: usize) -> Result<Vec<String>> {
        let out = sh(in_ns(&self.sites[site].edge_ns, "nft").args([
            "list",
            "chain",
            "inet",
            "filter",
            "prerouting_miniupnpd",
        ]))?;
        Ok(out
            .lines()
            .filter(|l| l.contains("dnat"))
            .map(|l| l.trim().to_string())
            .collect())
    }

    /// Packets the site's LAN sent the daemon: (PCP/NAT-PMP to port 5351,
    /// SSDP to port 1900), from nftables counters on the gateway.
    pub fn port_mapping_requests(&self, site: usize) -> Result<(u64, u64)> {
        let ns = &self.sites[site].edge_ns;
        let get = |name: &str| -> Result<u64> {
            let out = sh(in_ns(ns, "nft").args(["list", "counter", "inet", "filter", name]))?;
            let n = out
                .split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no packet count in {out:?}"))?;
            Ok(n)
        };
        Ok((get("pmp_requests")?, get("ssdp_requests")?))
    }
}
