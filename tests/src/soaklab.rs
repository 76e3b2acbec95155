//! Hosts on one switch, each in its own network namespace, for the soak (`tests/tests/soak.rs`):
//! partitions are iptables `DROP` rules in the hosts' namespaces, and one host can get a
//! point-to-point link to the test process (the root namespace), where the fake Messages API
//! listens.
//!
//! ```text
//! {p}-n0 (10.77.0.1) ──┐
//! {p}-n1 (10.77.0.2) ──┤ br0 in {p}-hub
//! {p}-n2 (10.77.0.3) ──┘ ...
//! root namespace (10.78.0.1) ── {p}-n0 (10.78.0.2)   (link_to_root)
//! ```
//!
//! Namespaces are `iomlab-<tag>-<pid>-<role>` as in [`natlab`](crate::natlab) (so stale ones of
//! a crashed run are removed the same way); dropping the lab deletes them.

use std::net::Ipv4Addr;

use crate::natlab::{NatLabError, check_prerequisites, delete_netns, remove_stale, run};

/// Hosts on one switch.
#[derive(Debug)]
pub struct StarLab {
    prefix: String,
    hosts: usize,
    up: bool,
}

/// The root namespace's end of [`StarLab::link_to_root`].
pub const ROOT_LINK_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);

impl StarLab {
    /// Builds `hosts` namespaces (at most 200) wired to a bridge, for test `tag`.
    pub fn up(tag: &str, hosts: usize) -> Result<StarLab, NatLabError> {
        check_prerequisites()?;
        remove_stale(tag);
        let mut lab = StarLab {
            prefix: format!("iomlab-{tag}-{}", std::process::id()),
            hosts: hosts.min(200),
            up: true,
        };
        lab.teardown();
        let hub = lab.hub();
        run("ip", &["netns", "add", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        for i in 0..lab.hosts {
            let ns = lab.ns(i);
            let port = format!("port{i}");
            let cidr = format!("{}/24", Self::ip(i));
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                    "netns", &hub,
                ],
            )?;
            run(
                "ip",
                &["-n", &hub, "link", "set", &port, "master", "br0", "up"],
            )?;
            run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(lab)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    /// Host `i`'s address on the switch (10.77.0.`i+1`).
    pub fn ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, (i + 1).min(254) as u8)
    }

    /// A veth between the root namespace ([`ROOT_LINK_IP`]) and host `i` (10.78.0.2), so a
    /// server in the test process is reachable from that host only. Removed with the lab.
    pub fn link_to_root(&self, i: usize) -> Result<(), NatLabError> {
        let ns = self.ns(i);
        let name = format!("iomsk{}", std::process::id());
        run(
            "ip",
            &[
                "link", "add", &name, "type", "veth", "peer", "name", "api0", "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["addr", "add", &format!("{ROOT_LINK_IP}/30"), "dev", &name],
        )?;
        run("ip", &["link", "set", &name, "up"])?;
        run(
            "ip",
            &["-n", &ns, "addr", "add", "10.78.0.2/30", "dev", "api0"],
        )?;
        run("ip", &["-n", &ns, "link", "set", "api0", "up"])?;
        Ok(())
    }

    /// Cuts every host with `side[i] == true` off from every host with `side[j] == false`
    /// (packets dropped both ways, as a broken link does: no resets). Replaces any earlier
    /// partition.
    pub fn partition(&self, side: &[bool]) -> Result<(), NatLabError> {
        self.heal()?;
        for i in 0..self.hosts {
            let ns = self.ns(i);
            for j in 0..self.hosts {
                if side.get(i) == side.get(j) {
                    continue;
                }
                let peer = Self::ip(j).to_string();
                for rule in [
                    ["-A", "INPUT", "-s", peer.as_str(), "-j", "DROP"],
                    ["-A", "OUTPUT", "-d", peer.as_str(), "-j", "DROP"],
                ] {
                    let mut args = vec!["netns", "exec", ns.as_str(), "iptables"];
                    args.extend_from_slice(&rule);
                    run("ip", &args)?;
                }
            }
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<(), NatLabError> {
        for i in 0..self.hosts {
            let ns = self.ns(i);
            for chain in ["INPUT", "OUTPUT"] {
                run("ip", &["netns", "exec", &ns, "iptables", "-F", chain])?;
            }
        }
        Ok(())
    }

    fn teardown(&mut self) {
        let mut names: Vec<String> = (0..self.hosts).map(|i| self.ns(i)).collect();
        names.push(self.hub());
        for ns in names {
            delete_netns(&ns);
        }
    }
}

impl Drop for StarLab {
    fn drop(&mut self) {
        if self.up {
            self.teardown();
        }
    }
}
