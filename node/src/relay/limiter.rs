//! Token-bucket rate limiters for relay reservations and circuits, keyed by peer or by IP.
//! Allowed peers (see [`AllowList`]) are never limited: a person's own devices may reconnect as
//! often as their networks change.
//!
//! They plug into `relay::Config::reservation_rate_limiters` and
//! `relay::Config::circuit_src_rate_limiters`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, relay};

use super::AllowList;

/// Buckets kept before full (idle) ones are dropped.
const PRUNE_AT: usize = 16_384;

/// A rate: up to `burst` events at once, refilled by one every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Bucket size.
    pub burst: NonZeroU32,
    /// Time to refill one token.
    pub interval: Duration,
}

/// What a limiter counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// The remote's PeerId.
    Peer,
    /// The remote's IP address (connections without one are not limited).
    Ip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum BucketKey {
    Peer(PeerId),
    Ip(IpAddr),
}

/// A token bucket per key.
#[derive(Debug)]
pub struct TokenBuckets<K> {
    rate: Rate,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Eq + Hash + Copy> TokenBuckets<K> {
    /// Empty buckets for `rate`.
    pub fn new(rate: Rate) -> TokenBuckets<K> {
        TokenBuckets {
            rate,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `key` at `now`; `false` if its bucket is empty.
    pub fn try_take(&mut self, key: K, now: Instant) -> bool {
        let burst = f64::from(self.rate.burst.get());
        let per_sec = 1.0 / self.rate.interval.as_secs_f64().max(1e-9);
        if self.buckets.len() >= PRUNE_AT {
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = self.buckets.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A relay rate limiter that skips allowed peers.
pub struct Limiter {
    key: Key,
    allow: AllowList,
    buckets: TokenBuckets<BucketKey>,
}

impl Limiter {
    /// A limiter counting by `key` at `rate`, skipping peers in `allow`.
    pub fn new(key: Key, rate: Rate, allow: AllowList) -> Limiter {
        Limiter {
            key,
            allow,
            buckets: TokenBuckets::new(rate),
        }
    }

    /// Boxed for `relay::Config`.
    pub fn boxed(key: Key, rate: Rate, allow: AllowList) -> Box<dyn relay::RateLimiter> {
        Box::new(Limiter::new(key, rate, allow))
    }
}

impl relay::RateLimiter for Limiter {
    fn try_next(&mut self, peer: PeerId, addr: &Multiaddr, now: Instant) -> bool {
        if self.allow.contains(&peer) {
            return true;
        }
        let key = match self.key {
            Key::Peer => BucketKey::Peer(peer),
            Key::Ip => match ip_of(addr) {
                Some(ip) => BucketKey::Ip(ip),
                None => return true,
            },
        };
        self.buckets.try_take(key, now)
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iom_protocol::keys::{DeviceKey, PersonKey};
    use relay::RateLimiter;

    fn rate(burst: u32, secs: u64) -> Rate {
        Rate {
            burst: NonZeroU32::new(burst).unwrap(),
            interval: Duration::from_secs(secs),
        }
    }

    #[test]
    fn bucket_drains_and_refills() {
        let mut b = TokenBuckets::new(rate(2, 10));
        let t0 = Instant::now();
        assert!(b.try_take(1u8, t0));
        assert!(b.try_take(1u8, t0));
        assert!(!b.try_take(1u8, t0));
        assert!(b.try_take(2u8, t0), "other keys have their own bucket");
        assert!(!b.try_take(1u8, t0 + Duration::from_secs(9)));
        assert!(b.try_take(1u8, t0 + Duration::from_secs(20)));
    }

    #[test]
    fn per_ip_limits_strangers_but_not_allowed_peers() {
        let allow = AllowList::new();
        let mut l = Limiter::new(Key::Ip, rate(1, 60), allow.clone());
        let addr: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        let stranger = DeviceKey::from_seed([2; 32]).id().to_peer_id();
        let friend = DeviceKey::from_seed([3; 32]).id().to_peer_id();
        let now = Instant::now();
        assert!(l.try_next(stranger, &addr, now));
        assert!(!l.try_next(stranger, &addr, now));
        assert!(!l.try_next(friend, &addr, now), "same IP, not yet allowed");
        allow.insert(friend, PersonKey::from_seed([1; 32]).id());
        assert!(l.try_next(friend, &addr, now));
        assert!(l.try_next(friend, &addr, now));
    }

    #[test]
    fn a_bucket_refills_in_proportion_to_the_time_passed_up_to_its_burst() {
        let mut b = TokenBuckets::new(rate(3, 10));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(b.try_take(1u8, t0));
        }
        assert!(!b.try_take(1u8, t0));
        // Half an interval: half a token, not enough.
        assert!(!b.try_take(1u8, t0 + Duration::from_secs(5)));
        // The other half: one token.
        assert!(b.try_take(1u8, t0 + Duration::from_secs(10)));
        assert!(!b.try_take(1u8, t0 + Duration::from_secs(10)));
        // A long idle time refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(1000);
        for _ in 0..3 {
            assert!(b.try_take(1u8, later));
        }
        assert!(!b.try_take(1u8, later));
    }

    #[test]
    fn full_buckets_are_pruned_and_busy_ones_are_kept() {
        let mut b = TokenBuckets::new(rate(1, 60));
        let t0 = Instant::now();
        for k in 0..PRUNE_AT as u32 {
            assert!(b.try_take(k, t0));
        }
        assert_eq!(b.buckets.len(), PRUNE_AT);
        // Much later every bucket is full again: all pruned, the new key gets a fresh one.
        assert!(b.try_take(u32::MAX, t0 + Duration::from_secs(3600)));
        assert_eq!(b.buckets.len(), 1);
        // A drained bucket survives pruning, so pruning never resets a limit.
        let mut b = TokenBuckets::new(rate(1, 60));
        assert!(b.try_take(0u32, t0));
        for k in 1..PRUNE_AT as u32 {
            b.try_take(k, t0 + Duration::from_secs(3600));
        }
        assert!(!b.try_take(0u32, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn per_peer_limits_count_each_peer_and_addresses_without_an_ip_are_not_limited() {
        let mut by_peer = Limiter::new(Key::Peer, rate(1, 60), AllowList::new());
        let a = DeviceKey::from_seed([2; 32]).id().to_peer_id();
        let b = DeviceKey::from_seed([3; 32]).id().to_peer_id();
        let addr: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        let other_addr: Multiaddr = "/ip4/10.0.0.2/tcp/1".parse().unwrap();
        let now = Instant::now();
        assert!(by_peer.try_next(a, &addr, now));
        assert!(
            !by_peer.try_next(a, &other_addr, now),
            "same peer, other IP"
        );
        assert!(by_peer.try_next(b, &addr, now));

        let mut by_ip = Limiter::new(Key::Ip, rate(1, 60), AllowList::new());
        let no_ip: Multiaddr = "/dns4/relay.example/tcp/1".parse().unwrap();
        for _ in 0..5 {
            assert!(by_ip.try_next(a, &no_ip, now));
        }
        let v6: Multiaddr = "/ip6/::1/tcp/1".parse().unwrap();
        assert!(by_ip.try_next(a, &v6, now));
        assert!(
            !by_ip.try_next(b, &v6, now),
            "IPv6 addresses are limited too"
        );
        assert_eq!(ip_of(&v6), Some("::1".parse().unwrap()));
    }
}
