//! One load-generator client: a [`Peer`] opened through a server's [`Signal`], sending frames
//! when it publishes and counting what it receives until the run's stop time.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::measure::{Shared, StreamLoss};
use super::peer::{Peer, Signal, Source};

pub struct ClientResult {
    pub(super) join_ms: Option<f64>,
    pub(super) loss: Vec<StreamLoss>,
    pub(super) error: Option<String>,
}

/// What every client task shares.
#[derive(Clone)]
pub struct Ctx {
    pub(super) shared: Arc<Shared>,
    /// When clients stop (set once the measured window is known).
    pub(super) stop_at: Arc<Mutex<Option<tokio::time::Instant>>>,
    pub(super) source: Source,
    pub(super) local_ip: IpAddr,
    /// Between two joins.
    pub(super) pace: Duration,
}

impl Ctx {
    /// Start a client on `sig`: publishing as stream `publishing` when given; `receives`: it
    /// must get media (an error otherwise).
    pub(super) fn spawn<S: Signal>(
        &self,
        sig: S,
        publishing: Option<u32>,
        receives: bool,
    ) -> JoinHandle<ClientResult> {
        tokio::spawn(client(self.clone(), sig, publishing, receives))
    }
}

/// One client: its peer connection, opened through `sig`, sending when it publishes and
/// counting what it receives, until the run's stop time.
async fn client<S: Signal>(
    ctx: Ctx,
    mut sig: S,
    publishing: Option<u32>,
    receives: bool,
) -> ClientResult {
    let joined = Instant::now();
    let mut result = ClientResult {
        join_ms: None,
        loss: Vec::new(),
        error: None,
    };
    let publish = publishing.map(|s| (ctx.source, s));
    let mut p = match Peer::new(ctx.local_ip, publish, ctx.shared.clone()).await {
        Ok(p) => p,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    if let Err(e) = sig.open(&mut p).await {
        result.error = Some(format!("{}: {e}", sig.who()));
        return result;
    }
    let src = publish.map(|(s, _)| s);
    let frame_every = src.map_or(Duration::from_secs(3600), |s| {
        Duration::from_secs_f64(1.0 / f64::from(s.fps))
    });
    let frame_bytes = src.map_or(0, |s| (s.video_bps / 8 / u64::from(s.fps)) as usize);
    let audio_every = Duration::from_millis(20);
    let mut next_frame = tokio::time::Instant::now();
    let mut next_audio = tokio::time::Instant::now();
    loop {
        let stop = *ctx.stop_at.lock().expect("lock");
        let now = tokio::time::Instant::now();
        if stop.is_some_and(|s| now >= s) {
            break;
        }
        if let Some(s) = src
            && p.connected
        {
            if now >= next_frame {
                p.send_frame(
                    true,
                    frame_bytes,
                    s.packet_bytes,
                    s.packet_gap(),
                    Instant::now(),
                );
                next_frame += frame_every;
                if next_frame < now {
                    next_frame = now + frame_every;
                }
            }
            if s.audio && now >= next_audio {
                p.send_frame(false, 100, s.packet_bytes, None, Instant::now());
                next_audio += audio_every;
                if next_audio < now {
                    next_audio = now + audio_every;
                }
            }
        }
        let mut until = now + Duration::from_millis(50);
        if let Some(at) = p.send_due(Instant::now()) {
            until = until.min(tokio::time::Instant::from_std(at));
        }
        if src.is_some() && p.connected {
            until = until.min(next_frame).min(if src.is_some_and(|s| s.audio) {
                next_audio
            } else {
                until
            });
        }
        if let Some(s) = stop {
            until = until.min(s);
        }
        p.pump(&mut sig, until).await;
    }
    if receives && p.first_media_at.is_none() {
        result.error = Some(format!(
            "{}: no media received (connection {})",
            sig.who(),
            if p.connected {
                "connected"
            } else {
                "never connected"
            }
        ));
    }
    result.join_ms = p
        .first_media_at
        .map(|t| t.saturating_duration_since(joined).as_secs_f64() * 1000.0);
    result.loss = std::mem::take(&mut p.loss).into_values().collect();
    result
}
