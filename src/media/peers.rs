//! The connection table: every relayed connection of a shard, and who a datagram belongs to. A
//! connection is found by its member (`by_user`), by the ICE ufrag in a STUN check (`by_ufrag`),
//! and by the addresses its authenticated checks came from (`by_addr`, the packet path's lookup).
//! The table keeps the three indexes in step with the connections; nothing else writes them.

use super::*;

pub(super) struct Peers {
    next_key: PeerKey,
    map: FxHashMap<PeerKey, Peer>,
    /// SipHash: the member ids come from tokens.
    by_user: HashMap<String, PeerKey>,
    /// SipHash: looked up with the ufrag of any STUN check, which an outsider chooses.
    by_ufrag: HashMap<String, PeerKey>,
    /// Fx: only addresses whose checks carried our password's integrity are inserted.
    by_addr: FxHashMap<SocketAddr, PeerKey>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            next_key: 1,
            map: FxHashMap::default(),
            by_user: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: FxHashMap::default(),
        }
    }
}

impl Peers {
    /// Connections with an address at `ip` that are not connected yet (in their ICE/DTLS
    /// handshake). A scan: done once per new connection's first check.
    pub(super) fn handshakes_from(&self, ip: std::net::IpAddr) -> usize {
        self.map
            .values()
            .filter(|p| !p.connected && p.addrs.iter().any(|(a, _)| a.ip() == ip))
            .count()
    }

    /// How many connections the table holds.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The sizes of the indexes: by user, by ufrag, by address.
    pub(super) fn index_sizes(&self) -> (usize, usize, usize) {
        (self.by_user.len(), self.by_ufrag.len(), self.by_addr.len())
    }

    pub(super) fn get(&self, key: &PeerKey) -> Option<&Peer> {
        self.map.get(key)
    }

    pub(super) fn get_mut(&mut self, key: &PeerKey) -> Option<&mut Peer> {
        self.map.get_mut(key)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&PeerKey, &Peer)> {
        self.map.iter()
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&PeerKey, &mut Peer)> {
        self.map.iter_mut()
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.map.values_mut()
    }

    /// The connection of member `user_id`.
    pub(super) fn key_of(&self, user_id: &str) -> Option<PeerKey> {
        self.by_user.get(user_id).copied()
    }

    /// The connection whose ICE ufrag is `ufrag`.
    pub(super) fn by_ufrag(&self, ufrag: &str) -> Option<PeerKey> {
        self.by_ufrag.get(ufrag).copied()
    }

    /// The connection that authenticated from `addr`.
    pub(super) fn by_addr(&self, addr: &SocketAddr) -> Option<PeerKey> {
        self.by_addr.get(addr).copied()
    }

    /// An ICE ufrag no connection has.
    pub(super) fn fresh_ufrag(&self) -> String {
        loop {
            let u = random_token(8);
            if !self.by_ufrag.contains_key(&u) {
                return u;
            }
        }
    }

    /// Add a connection (its member and ufrag indexed); its key.
    pub(super) fn insert(&mut self, peer: Peer) -> PeerKey {
        let key = self.next_key;
        self.next_key += 1;
        self.by_user.insert(peer.user_id.clone(), key);
        self.by_ufrag.insert(peer.ufrag.clone(), key);
        self.map.insert(key, peer);
        key
    }

    /// Remove `key`'s connection and its index entries; `forget` is told each address that no
    /// longer leads to a connection.
    pub(super) fn remove(
        &mut self,
        key: PeerKey,
        mut forget: impl FnMut(&SocketAddr),
    ) -> Option<Peer> {
        let p = self.map.remove(&key)?;
        if self.by_user.get(&p.user_id) == Some(&key) {
            self.by_user.remove(&p.user_id);
        }
        self.by_ufrag.remove(&p.ufrag);
        for (a, _) in &p.addrs {
            if self.by_addr.get(a) == Some(&key) {
                self.by_addr.remove(a);
                forget(a);
            }
        }
        Some(p)
    }

    /// An address an authenticated ICE check of `key`'s connection came from: datagrams from it
    /// go to that connection until its consent expires ([`CONSENT_TIMEOUT`]). At most
    /// [`MAX_ADDRESSES_PER_CONNECTION`] per connection: the oldest makes room.
    pub(super) fn learn_address(&mut self, key: PeerKey, from: SocketAddr, now: Instant) {
        let Some(p) = self.map.get_mut(&key) else {
            return;
        };
        if let Some(a) = p.addrs.iter_mut().find(|(a, _)| *a == from) {
            a.1 = now;
            self.by_addr.insert(from, key);
            return;
        }
        if p.addrs.len() >= MAX_ADDRESSES_PER_CONNECTION {
            let (i, _) = p
                .addrs
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, t))| *t)
                .expect("not empty");
            let (old, _) = p.addrs.swap_remove(i);
            if self.by_addr.get(&old) == Some(&key) {
                self.by_addr.remove(&old);
            }
        }
        p.addrs.push((from, now));
        self.by_addr.insert(from, key);
    }

    /// `addr` is gone (its TCP connection closed).
    pub(super) fn forget_address(&mut self, addr: &SocketAddr) {
        if let Some(k) = self.by_addr.remove(addr)
            && let Some(p) = self.map.get_mut(&k)
        {
            p.addrs.retain(|(a, _)| a != addr);
        }
    }

    /// Forget the addresses no authenticated check came from within [`CONSENT_TIMEOUT`];
    /// `forget` is told each.
    pub(super) fn expire_consent(&mut self, now: Instant, mut forget: impl FnMut(&SocketAddr)) {
        for (k, p) in self.map.iter_mut() {
            p.addrs.retain(|(a, t)| {
                let fresh = now.saturating_duration_since(*t) < CONSENT_TIMEOUT;
                if !fresh && self.by_addr.get(a) == Some(k) {
                    debug!(user = %p.user_id, addr = %a, "address lost ICE consent");
                    self.by_addr.remove(a);
                    forget(a);
                }
                fresh
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_keeps_at_most_its_share_of_addresses_and_they_expire() {
        let mut peers = Peers::default();
        let key = peers.insert(test_peer("alice"));
        let t0 = Instant::now();
        for i in 0..(MAX_ADDRESSES_PER_CONNECTION as u16 + 2) {
            let a = SocketAddr::from(([10, 0, 0, 1], 1000 + i));
            peers.learn_address(key, a, t0 + Duration::from_millis(u64::from(i)));
        }
        let first = SocketAddr::from(([10, 0, 0, 1], 1000));
        let last = SocketAddr::from((
            [10, 0, 0, 1],
            1000 + MAX_ADDRESSES_PER_CONNECTION as u16 + 1,
        ));
        assert_eq!(peers.by_addr(&first), None, "the oldest made room");
        assert_eq!(peers.by_addr(&last), Some(key));
        assert_eq!(
            peers.get(&key).unwrap().addrs.len(),
            MAX_ADDRESSES_PER_CONNECTION
        );
        let mut forgotten = Vec::new();
        peers.expire_consent(t0 + CONSENT_TIMEOUT + Duration::from_secs(1), |a| {
            forgotten.push(*a)
        });
        assert_eq!(forgotten.len(), MAX_ADDRESSES_PER_CONNECTION);
        assert_eq!(peers.by_addr(&last), None);
    }

    #[test]
    fn removing_a_connection_clears_every_index() {
        let mut peers = Peers::default();
        let key = peers.insert(test_peer("bob"));
        let ufrag = peers.get(&key).unwrap().ufrag.clone();
        let a = SocketAddr::from(([10, 0, 0, 2], 5000));
        peers.learn_address(key, a, Instant::now());
        let mut forgotten = Vec::new();
        assert!(peers.remove(key, |a| forgotten.push(*a)).is_some());
        assert_eq!(forgotten, vec![a]);
        assert_eq!(peers.key_of("bob"), None);
        assert_eq!(peers.by_ufrag(&ufrag), None);
        assert_eq!(peers.by_addr(&a), None);
    }

    fn test_peer(user: &str) -> Peer {
        let pc = build_connection(
            &srtp::KeyCapture::new(),
            srtp::PROFILES.to_vec(),
            &Arc::new(Metrics::new()),
            ("ufrag1234".into(), "p".repeat(24)),
            Instant::now(),
        )
        .expect("connection");
        Peer::new(
            user,
            "room",
            pc.0,
            pc.1,
            "ufrag1234".into(),
            "p".repeat(24),
            true,
        )
    }
}
