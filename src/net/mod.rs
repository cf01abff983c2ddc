//! The media port's plain functions: what a datagram is ([`classify`]), what to do with STUN
//! ([`stun::handle`]), and which addresses to advertise ([`advertised`]). The socket itself is
//! owned by the media task ([`crate::media::MediaCore`]).

pub mod stun;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;

/// What a datagram on the media port is, by its first byte (RFC 7983).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    Dtls,
    RtpRtcp,
    Unknown,
}

pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(0..=3) => Kind::Stun,
        Some(20..=63) => Kind::Dtls,
        Some(128..=191) => Kind::RtpRtcp,
        _ => Kind::Unknown,
    }
}

/// The media addresses to advertise: the `announce` addresses on the bound port; else the bound
/// address; else every interface address the socket receives on (0.0.0.0: IPv4; `[::]`, which
/// the media port binds dual-stack: IPv4 and IPv6), loopback only when there is nothing else.
/// Link-local IPv6 addresses are left out (a candidate cannot carry their scope).
pub fn advertised(bound: SocketAddr, announce: &[std::net::IpAddr]) -> Vec<SocketAddr> {
    if !announce.is_empty() {
        return announce
            .iter()
            .map(|ip| SocketAddr::new(*ip, bound.port()))
            .collect();
    }
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let ips: Vec<std::net::IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| bound.is_ipv6() || ip.is_ipv4())
        .filter(|ip| match ip {
            std::net::IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            std::net::IpAddr::V4(_) => true,
        })
        .collect();
    let public: Vec<_> = ips.iter().filter(|ip| !ip.is_loopback()).collect();
    let chosen: Vec<_> = if public.is_empty() {
        ips.iter().collect()
    } else {
        public
    };
    chosen
        .into_iter()
        .map(|ip| SocketAddr::new(*ip, bound.port()))
        .collect()
}

/// A UDP host candidate for `addr`, as a peer connection's local candidate (the relay's advertised
/// addresses; the load generator's and the tests' own sockets).
pub fn host_candidate(
    addr: SocketAddr,
) -> rtc::shared::error::Result<rtc::peer_connection::transport::RTCIceCandidateInit> {
    use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
    let cand = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()?;
    RTCIceCandidate::from(&cand).to_json()
}

/// A passive TCP host candidate for `addr` (ICE-TCP, RFC 6544): the relay's media port over TCP.
pub fn tcp_host_candidate(
    addr: SocketAddr,
) -> rtc::shared::error::Result<rtc::peer_connection::transport::RTCIceCandidateInit> {
    use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
    let cand = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "tcp".to_owned(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        tcp_type: rtc::ice::tcp_type::TcpType::Passive,
    }
    .new_candidate_host()?;
    RTCIceCandidate::from(&cand).to_json()
}

/// An active TCP host candidate on `ip` (ICE-TCP, RFC 6544): a client that opens TCP connections
/// to passive candidates (port 9 by convention: it listens on none).
pub fn tcp_active_candidate(
    ip: std::net::IpAddr,
) -> rtc::shared::error::Result<rtc::peer_connection::transport::RTCIceCandidateInit> {
    use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
    let cand = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "tcp".to_owned(),
            address: ip.to_string(),
            port: 9,
            component: 1,
            ..Default::default()
        },
        tcp_type: rtc::ice::tcp_type::TcpType::Active,
    }
    .new_candidate_host()?;
    RTCIceCandidate::from(&cand).to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_told_apart_by_their_first_byte() {
        assert_eq!(classify(&[0, 1]), Kind::Stun);
        assert_eq!(classify(&[22, 254, 253]), Kind::Dtls);
        assert_eq!(classify(&[0x80, 96]), Kind::RtpRtcp);
        assert_eq!(classify(&[0x47]), Kind::Unknown);
        assert_eq!(classify(&[]), Kind::Unknown);
    }

    #[test]
    fn announce_wins_then_the_bound_address() {
        let bound: SocketAddr = "0.0.0.0:3478".parse().unwrap();
        let a = advertised(bound, &["203.0.113.7".parse().unwrap()]);
        assert_eq!(a, vec!["203.0.113.7:3478".parse::<SocketAddr>().unwrap()]);
        let b: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertised(b, &[]), vec![b]);
        let any = advertised(bound, &[]);
        assert!(!any.is_empty());
        assert!(
            any.iter()
                .all(|a| a.is_ipv4() && a.port() == 3478 && !a.ip().is_unspecified())
        );
        // Dual-stack: the IPv4 addresses too.
        let both = advertised("[::]:3478".parse().unwrap(), &[]);
        assert!(any.iter().all(|a| both.contains(a)), "{any:?} in {both:?}");
    }
}
