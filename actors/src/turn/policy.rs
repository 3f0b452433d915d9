//! Which peers the relay may talk to. Default: only mediamesh's own media addresses (this node's
//! and the cluster's media port ranges); everything else — loopback, private, link-local,
//! multicast, the rest of the internet and the nodes' non-media ports — is refused unless the
//! operator allow-lists it (coturn's `denied-peer-ip` lesson, CVE-2020-26262).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// An IP network (`10.0.0.0/8`, `::1/128`; a bare address is a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// The network of exactly one host.
    pub fn host(addr: IpAddr) -> IpNet {
        IpNet {
            addr,
            prefix_len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let addr = canonical(addr);
        let host = IpNet::host(addr);
        let prefix_len = match prefix {
            None => host.prefix_len,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= host.prefix_len)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        };
        Ok(IpNet { addr, prefix_len })
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An inclusive UDP port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// Every port.
    pub const ALL: PortRange = PortRange { min: 1, max: u16::MAX };

    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a port or a MIN-MAX port range");
        let (min, max) = s.split_once('-').unwrap_or((s, s));
        let (min, max): (u16, u16) = (min.parse().map_err(|_| bad())?, max.parse().map_err(|_| bad())?);
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(PortRange { min, max })
    }
}

/// One allowed destination: a network and a port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerRule {
    pub net: IpNet,
    pub ports: PortRange,
}

impl PeerRule {
    pub fn allows(&self, addr: SocketAddr) -> bool {
        self.net.contains(addr.ip()) && self.ports.contains(addr.port())
    }
}

impl FromStr for PeerRule {
    type Err = String;

    /// `CIDR`, `CIDR:PORT` or `CIDR:MIN-MAX` for IPv4; `[CIDR]:PORTS` or a bare `CIDR` for IPv6.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, ports) = rest.split_once(']').ok_or_else(|| format!("{s:?}: missing ']'"))?;
            (net, ports.strip_prefix(':'))
        } else if s.matches(':').count() == 1 {
            let (net, ports) = s.split_once(':').unwrap_or((s, ""));
            (net, Some(ports))
        } else {
            (s, None)
        };
        Ok(PeerRule {
            net: net.parse()?,
            ports: ports.map_or(Ok(PortRange::ALL), str::parse)?,
        })
    }
}

/// The set of peers a relay may reach: a union of rules. Empty allows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    rules: Vec<PeerRule>,
}

impl PeerPolicy {
    pub fn new(rules: Vec<PeerRule>) -> PeerPolicy {
        PeerPolicy { rules }
    }

    /// Whether some port of `ip` may be reached: what a CreatePermission (per IP, RFC 8656 §9)
    /// is checked against. Data is always checked with [`PeerPolicy::allows`].
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        self.rules.iter().any(|r| r.net.contains(ip))
    }

    /// Whether `addr` (IP and port) may be reached or heard from.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        self.rules.iter().any(|r| r.allows(addr))
    }

    pub fn rules(&self) -> &[PeerRule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_rules() {
        let r: PeerRule = "127.0.0.1:40000-40010".parse().unwrap();
        assert!(r.allows(addr("127.0.0.1:40005")));
        assert!(!r.allows(addr("127.0.0.1:8080")));
        let r: PeerRule = "10.1.0.0/16".parse().unwrap();
        assert!(r.allows(addr("10.1.200.3:9")));
        assert!(!r.allows(addr("10.2.0.1:9")));
        let r: PeerRule = "[2001:db8::/32]:5000".parse().unwrap();
        assert!(r.allows(addr("[2001:db8::1]:5000")));
        assert!(!r.allows(addr("[2001:db8::1]:5001")));
        let r: PeerRule = "::1".parse().unwrap();
        assert!(r.allows(addr("[::1]:1")));
        assert!("10.0.0.0/33".parse::<PeerRule>().is_err());
        assert!("10.0.0.1:0".parse::<PeerRule>().is_err());
        assert!("10.0.0.1:9-8".parse::<PeerRule>().is_err());
        assert!("nope".parse::<PeerRule>().is_err());
        let any: PeerRule = "0.0.0.0/0".parse().unwrap();
        assert!(any.allows(addr("8.8.8.8:53")));
    }

    #[test]
    fn empty_policy_refuses_everything_and_ports_matter() {
        let none = PeerPolicy::default();
        for a in [
            "127.0.0.1:50000",
            "10.0.0.1:1",
            "192.168.1.1:1",
            "224.0.0.1:1",
            "169.254.1.1:1",
        ] {
            assert!(!none.allows(addr(a)));
            assert!(!none.allows_ip(addr(a).ip()));
        }
        let mesh = PeerPolicy::new(vec!["127.0.0.1:50000-50999".parse().unwrap()]);
        assert!(mesh.allows(addr("127.0.0.1:50000")));
        assert!(mesh.allows_ip("127.0.0.1".parse().unwrap()));
        assert!(!mesh.allows(addr("127.0.0.1:8080")));
        assert!(!mesh.allows_ip("10.0.0.1".parse().unwrap()));
        // IPv4-mapped IPv6 is the same host.
        assert!(mesh.allows(addr("[::ffff:127.0.0.1]:50001")));
    }
}
