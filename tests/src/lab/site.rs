//! Building a site: its NAT gateway (nftables rules of its type, carrier
//! NAT in front for `cgnat`, a port-mapping daemon or an HTTP proxy when
//! asked), its LAN and hosts, IPv6 where dual-stack.

use super::*;

impl Lab {
    /// Adds a site; returns its index in [`Lab::sites`].
    pub fn add_site(&mut self, spec: &SiteSpec) -> Result<usize> {
        spec.impair.validate()?;
        if spec.hosts == 0 || spec.hosts > 8 {
            bail!("a site has 1 to 8 hosts");
        }
        let i = self.sites.len();
        if i >= 200 {
            bail!("too many sites");
        }
        if spec.port_mapping.is_some() && !spec.nat.takes_port_mapping() {
            bail!("{} cannot run a port-mapping daemon", spec.nat);
        }
        let tag = format!("s{i}");
        let public_ip = Ipv4Addr::new(203, 0, 113, 10 + i as u8);
        let mut hosts = Vec::new();
        let mut host_ips = Vec::new();
        if spec.nat == NatType::None {
            // Public hosts: one address each on the internet.
            let h = self.add_ns(&format!("{tag}-h0"))?;
            self.uplink(&h, &tag, spec.impair)?;
            ip(&[
                "-n",
                &h,
                "addr",
                "add",
                &format!("{public_ip}/24"),
                "dev",
                "wan0",
            ])?;
            let mut host_ips6 = Vec::new();
            if spec.ipv6 {
                host_ips6.push(self.ipv6_uplink(&h, i, false)?);
            }
            hosts.push(h.clone());
            host_ips.push(public_ip);
            self.sites.push(Site {
                index: i,
                nat: spec.nat,
                hosts,
                host_ips,
                host_ips6,
                edge_ns: h,
                nat_ns: vec![],
                public_ip,
                proxy: None,
                port_mapping: None,
                lease_file: None,
                daemon_log: None,
            });
            return Ok(i);
        }
        let lan_net = format!("10.{}.0", i + 1);
        let mut nat_ns = Vec::new();
        let edge;
        let inner;
        if spec.nat == NatType::Cgnat {
            // Carrier NAT on the internet, home NAT behind it in 100.64/10.
            let cgn = self.add_ns(&format!("{tag}-cgn"))?;
            self.uplink(&cgn, &tag, spec.impair)?;
            ip(&[
                "-n",
                &cgn,
                "addr",
                "add",
                &format!("{public_ip}/24"),
                "dev",
                "wan0",
            ])?;
            let home = self.add_ns(&format!("{tag}-nat"))?;
            ip(&[
                "link", "add", "lan0", "netns", &cgn, "type", "veth", "peer", "name", "wan0",
                "netns", &home,
            ])?;
            let carrier_net = format!("100.64.{i}");
            ip(&[
                "-n",
                &cgn,
                "addr",
                "add",
                &format!("{carrier_net}.1/24"),
                "dev",
                "lan0",
            ])?;
            ip(&["-n", &cgn, "link", "set", "lan0", "up"])?;
            ip(&[
                "-n",
                &home,
                "addr",
                "add",
                &format!("{carrier_net}.2/24"),
                "dev",
                "wan0",
            ])?;
            ip(&["-n", &home, "link", "set", "wan0", "up"])?;
            ip(&[
                "-n",
                &home,
                "route",
                "add",
                "default",
                "via",
                &format!("{carrier_net}.1"),
            ])?;
            sysctl(&cgn, "net.ipv4.ip_forward=1")?;
            nft(
                &cgn,
                &nat::ruleset(
                    NatType::PortRestricted,
                    &NatAddrs {
                        lan: format!("{carrier_net}.0/24"),
                        wan_ip: public_ip.to_string(),
                        block_base: 0,
                    },
                ),
            )?;
            if spec.ipv6 {
                // The carrier routes the site's prefix to the home gateway
                // and filters nothing; the home gateway's firewall does.
                self.ipv6_uplink(&cgn, i, true)?;
                let (carrier, home6) = (site_ip6(i, CARRIER6, 1), site_ip6(i, CARRIER6, 2));
                addr6(&cgn, carrier, "lan0")?;
                addr6(&home, home6, "wan0")?;
                route6(&home, "default", carrier)?;
                route6(&cgn, &lan6_prefix(i), home6)?;
            }
            nat_ns.push(cgn.clone());
            nat_ns.push(home.clone());
            edge = cgn;
            inner = (home, format!("{carrier_net}.2"));
        } else {
            let n = self.add_ns(&format!("{tag}-nat"))?;
            self.uplink(&n, &tag, spec.impair)?;
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{public_ip}/24"),
                "dev",
                "wan0",
            ])?;
            if spec.ipv6 {
                self.ipv6_uplink(&n, i, true)?;
            }
            nat_ns.push(n.clone());
            edge = n.clone();
            inner = (n, public_ip.to_string());
        }
        let (nat_inner, inner_wan_ip) = inner;
        ip(&["-n", &nat_inner, "link", "add", "lan0", "type", "bridge"])?;
        ip(&[
            "-n",
            &nat_inner,
            "addr",
            "add",
            &format!("{lan_net}.1/24"),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", &nat_inner, "link", "set", "lan0", "up"])?;
        // A proxy-only gateway routes nothing (its ruleset drops all
        // forwarding as well).
        let forward = spec.nat != NatType::ProxyOnly;
        sysctl(
            &nat_inner,
            &format!("net.ipv4.ip_forward={}", u8::from(forward)),
        )?;
        let kind = if spec.nat == NatType::Cgnat {
            NatType::PortRestricted
        } else {
            spec.nat
        };
        nft(
            &nat_inner,
            &nat::ruleset_with(
                kind,
                &NatAddrs {
                    lan: format!("{lan_net}.0/24"),
                    wan_ip: inner_wan_ip,
                    block_base: 20480 + 64 * i as u16,
                },
                spec.port_mapping,
            ),
        )?;
        let mut host_ips6 = Vec::new();
        if spec.ipv6 {
            let gw6 = site_ip6(i, LAN6, 1);
            addr6(&nat_inner, gw6, "lan0")?;
            sysctl(&nat_inner, "net.ipv6.conf.all.forwarding=1")?;
            nft(&nat_inner, nat::IPV6_FIREWALL)?;
            for h in 0..spec.hosts {
                host_ips6.push(site_ip6(i, LAN6, 0x10 + h as u16));
            }
        }
        if matches!(
            spec.nat,
            NatType::Cloudnat
                | NatType::CloudnatEim
                | NatType::CloudnatInorder
                | NatType::CloudnatDpa
                | NatType::Seq
                | NatType::Seq2
        ) {
            // Cloud NAT drops idle UDP mappings after 30 s (the module is
            // loaded by the ruleset above, so the knobs exist now).
            for k in [
                "net.netfilter.nf_conntrack_udp_timeout=30",
                "net.netfilter.nf_conntrack_udp_timeout_stream=30",
            ] {
                sysctl(&nat_inner, k)?;
            }
        }
        for h in 0..spec.hosts {
            let hn = self.add_ns(&format!("{tag}-h{h}"))?;
            let port = format!("h{h}");
            ip(&[
                "link", "add", &port, "netns", &nat_inner, "type", "veth", "peer", "name", "eth0",
                "netns", &hn,
            ])?;
            ip(&[
                "-n", &nat_inner, "link", "set", &port, "master", "lan0", "up",
            ])?;
            let addr = Ipv4Addr::new(10, i as u8 + 1, 0, 10 + h as u8);
            ip(&[
                "-n",
                &hn,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &hn, "link", "set", "eth0", "up"])?;
            if spec.nat == NatType::CloudnatEim {
                sysctl(&hn, &eim_port_window(h, spec.hosts))?;
            }
            ip(&[
                "-n",
                &hn,
                "route",
                "add",
                "default",
                "via",
                &format!("{lan_net}.1"),
            ])?;
            if let Some(a6) = host_ips6.get(h) {
                addr6(&hn, *a6, "eth0")?;
                route6(&hn, "default", site_ip6(i, LAN6, 1))?;
            }
            hosts.push(hn);
            host_ips.push(addr);
        }
        let proxy = if spec.nat == NatType::ProxyOnly {
            let gw: Ipv4Addr = format!("{lan_net}.1").parse()?;
            Some(self.start_proxy(&tag, &nat_inner, gw, &format!("{lan_net}.0/24"))?)
        } else {
            None
        };
        self.sites.push(Site {
            index: i,
            nat: spec.nat,
            hosts,
            host_ips,
            host_ips6,
            edge_ns: edge,
            nat_ns,
            public_ip,
            proxy,
            port_mapping: spec.port_mapping,
            lease_file: None,
            daemon_log: None,
        });
        Ok(i)
    }

    /// Gives a dual-stack site's outermost namespace `ns` its address on
    /// the IPv6 internet and a default route; for a gateway (`routes`),
    /// the internet's router learns the site's LAN prefix through it.
    /// Returns the address.
    fn ipv6_uplink(&mut self, ns: &str, site: usize, routes: bool) -> Result<Ipv6Addr> {
        let wan6 = site_ip6(site, 0, 0);
        addr6(ns, wan6, "wan0")?;
        route6(ns, "default", INET_IP6)?;
        if routes {
            sysctl(ns, "net.ipv6.conf.all.forwarding=1")?;
            let inet = self.inet();
            route6(&inet, &lan6_prefix(site), wan6)?;
        }
        Ok(wan6)
    }

    /// Runs tinyproxy in the gateway namespace `ns`, listening on the LAN
    /// address `gw`, open to `lan` only; returns its URL. Its own
    /// connections leave from the gateway's WAN address. Config and log go
    /// in the lab directory; the process is killed with the lab.
    fn start_proxy(&mut self, tag: &str, ns: &str, gw: Ipv4Addr, lan: &str) -> Result<String> {
        if !have("tinyproxy") {
            bail!("proxy-only sites run tinyproxy: apt-get install -y tinyproxy");
        }
        let port = nat::PROXY_PORT;
        let connect_ports: String = PROXY_CONNECT_PORTS
            .iter()
            .map(|p| format!("ConnectPort {p}\n"))
            .collect();
        // No LogFile: in the foreground (-d) tinyproxy logs to stdout, which
        // is copied to the log file and read for its readiness line. No
        // PidFile, no daemon. It binds as root, then runs as nobody.
        let conf = format!(
            "# punch-lab: the HTTP CONNECT proxy of proxy-only site {tag}\n\
             User nobody\n\
             Group nogroup\n\
             Listen {gw}\n\
             Port {port}\n\
             Timeout 600\n\
             MaxClients 100\n\
             LogLevel Info\n\
             DisableViaHeader Yes\n\
             Allow {lan}\n\
             {connect_ports}"
        );
        let conf_path = self.path(&format!("{tag}-tinyproxy.conf"));
        std::fs::write(&conf_path, conf)?;
        let mut cmd = in_ns(ns, "tinyproxy");
        cmd.arg("-d").arg("-c").arg(&conf_path);
        let log = self.path(&format!("{tag}-tinyproxy.log"));
        let mut p = Proc::spawn_tee(&format!("{tag}-tinyproxy"), cmd, &log)?;
        p.wait_line("Accepting connections", Duration::from_secs(10))
            .with_context(|| format!("tinyproxy in {ns}; log {}", log.display()))?;
        self.procs.push(p);
        Ok(format!("http://{gw}:{port}"))
    }
}
