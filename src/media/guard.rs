//! What the media port lets reach a relay connection: the checks that run before rtc sees a
//! datagram, so that nobody can make the relay keep state it did not authenticate.
//!
//! - [`Admission`]: the SSRCs a connection may send SRTP and SRTCP on. rtc makes a context (with
//!   its replay window) for every SSRC it is shown, before it checks the packet's tag, and keeps
//!   it until the connection closes; the relay shows it only SSRCs whose first packet
//!   authenticated, and at most [`MAX_STREAMS_PER_CONNECTION`] of each.
//! - [`SourceLimiter`]: STUN requests per source address, a token bucket in a fixed table (no
//!   allocation, bounded memory whoever sends).
//! - [`RefusalLog`]: one log line per connection for refused packets, then at most one summary
//!   per [`REFUSAL_LOG_INTERVAL`].

use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::srtp;

/// SSRCs a relay connection may send SRTP on, and (apart) SRTCP on. A browser uses about 14 for
/// a camera and a screen share in simulcast with RTX, and one more for its receiver reports.
pub const MAX_STREAMS_PER_CONNECTION: usize = 64;

/// Why [`Admission::admit`] refused a datagram: a `ferry_media_dropped_total` reason.
pub type Refused = &'static str;

/// The SSRCs of one connection whose packets rtc may see.
#[derive(Default)]
pub struct Admission {
    rtp: Vec<u32>,
    rtcp: Vec<u32>,
    /// Checks the first SRTCP packet of an SSRC (set when DTLS completes).
    pub rtcp_auth: Option<srtp::RtcpAuth>,
}

impl Admission {
    /// Whether the SRTP or SRTCP datagram `buf` may go to the connection's rtc pipeline: its SSRC
    /// was admitted before, or this packet authenticates (with `opener`, the connection's
    /// receiving SRTP keys) and there is room for one more SSRC.
    pub fn admit(
        &mut self,
        buf: &[u8],
        opener: Option<&mut srtp::Opener>,
        scratch: &mut Vec<u8>,
    ) -> Result<(), Refused> {
        match srtp::rtp_header(buf) {
            Some((header_len, ssrc, seq)) => {
                if self.rtp.contains(&ssrc) {
                    return Ok(());
                }
                let opener = opener.ok_or("undecryptable")?;
                if !opener.authentic_first(buf, header_len, ssrc, seq, scratch) {
                    return Err("undecryptable");
                }
                admit(&mut self.rtp, ssrc)
            }
            None => {
                if buf.len() < 8 {
                    return Err("malformed");
                }
                let ssrc = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                if self.rtcp.contains(&ssrc) {
                    return Ok(());
                }
                let auth = self.rtcp_auth.as_mut().ok_or("undecryptable")?;
                if !auth.authentic(buf, scratch) {
                    return Err("undecryptable");
                }
                admit(&mut self.rtcp, ssrc)
            }
        }
    }
}

fn admit(list: &mut Vec<u32>, ssrc: u32) -> Result<(), Refused> {
    if list.len() >= MAX_STREAMS_PER_CONNECTION {
        return Err("too_many_streams");
    }
    list.push(ssrc);
    Ok(())
}

/// STUN requests a source address may send to the media port: sustained per second, and burst.
/// A browser sends a few checks per candidate pair while connecting, then one every few seconds;
/// many clients behind one NAT share an address, hence the margin.
pub const STUN_PER_SOURCE_RATE: f64 = 200.0;
pub const STUN_PER_SOURCE_BURST: f64 = 400.0;
/// Buckets in the table: addresses that hash alike share one.
const SOURCE_BUCKETS: usize = 4096;

/// Token buckets per source IP address, in a fixed table indexed by a keyed hash (an outsider
/// chooses the addresses: the hash is SipHash with a random key, so they cannot aim at the bucket
/// of another source).
pub struct SourceLimiter {
    hasher: std::collections::hash_map::RandomState,
    buckets: Box<[(f32, Option<Instant>)]>,
    rate: f64,
    burst: f64,
}

impl SourceLimiter {
    pub fn new(rate: f64, burst: f64) -> SourceLimiter {
        SourceLimiter {
            hasher: Default::default(),
            buckets: vec![(burst as f32, None); SOURCE_BUCKETS].into_boxed_slice(),
            rate,
            burst,
        }
    }

    /// Take a token for a request from `ip`; false: over its rate.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let mut h = self.hasher.build_hasher();
        ip.hash(&mut h);
        let i = (std::hash::Hasher::finish(&h) as usize) % self.buckets.len();
        let (tokens, last) = &mut self.buckets[i];
        let refill = last.map_or(self.burst, |t| {
            now.saturating_duration_since(t).as_secs_f64() * self.rate
        });
        let t = (f64::from(*tokens) + refill).min(self.burst);
        *last = Some(now);
        if t >= 1.0 {
            *tokens = (t - 1.0) as f32;
            true
        } else {
            *tokens = t as f32;
            false
        }
    }
}

/// Refused packets of one connection are logged at most this often (with a count).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Rate-limits one connection's log lines about refused packets.
#[derive(Default)]
pub struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// Count a refusal; `Some(n)` when a line is due now, `n` being the refusals it stands for.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.suppressed += 1;
        match self.last {
            Some(t) if now.saturating_duration_since(t) < REFUSAL_LOG_INTERVAL => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_over_its_rate_is_refused_and_others_are_not() {
        let mut l = SourceLimiter::new(10.0, 20.0);
        let t = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let allowed = (0..100).filter(|_| l.allow(a, t)).count();
        assert_eq!(allowed, 20, "the burst");
        // One second later, the rate's worth more.
        let later = t + Duration::from_secs(1);
        let allowed = (0..100).filter(|_| l.allow(a, later)).count();
        assert_eq!(allowed, 10);
        // Unless both hash to one bucket (1 in 4096), another source is untouched.
        let allowed_b = (0..100).filter(|_| l.allow(b, later)).count();
        assert!(allowed_b == 20 || allowed_b == 0);
    }

    #[test]
    fn refusals_are_logged_once_then_summarised() {
        let mut log = RefusalLog::default();
        let t = Instant::now();
        assert_eq!(log.note(t), Some(1));
        for _ in 0..999 {
            assert_eq!(log.note(t + Duration::from_secs(1)), None);
        }
        assert_eq!(log.note(t + REFUSAL_LOG_INTERVAL), Some(1000));
    }

    #[test]
    fn ssrcs_are_admitted_only_authenticated_and_up_to_the_cap() {
        let mut a = Admission::default();
        let mut scratch = Vec::new();
        // No keys yet: nothing passes.
        let rtp = [0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 1, 2, 3];
        assert_eq!(a.admit(&rtp, None, &mut scratch), Err("undecryptable"));
        let rtcp = [0x81, 201, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0];
        assert_eq!(a.admit(&rtcp, None, &mut scratch), Err("undecryptable"));
        assert_eq!(a.admit(&rtcp[..6], None, &mut scratch), Err("malformed"));
        // Admitted SSRCs pass without a check (rtc authenticates them in its context).
        for ssrc in 0..MAX_STREAMS_PER_CONNECTION as u32 {
            admit(&mut a.rtp, ssrc).unwrap();
        }
        let mut known = rtp;
        known[8..12].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(a.admit(&known, None, &mut scratch), Ok(()));
        assert_eq!(admit(&mut a.rtp, 1000), Err("too_many_streams"));
        assert_eq!(a.rtp.len(), MAX_STREAMS_PER_CONNECTION);
    }
}
