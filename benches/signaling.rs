//! The control path under many rooms: `createRoom` when the server already holds 45 000 (the
//! figure an adversarial pass reached within the rate limits). Placement is O(shards): the time
//! does not grow with the rooms held. `cargo bench --bench signaling`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use ferry::auth::Grants;
use ferry::config::Config;
use ferry::media::MediaControl;
use ferry::metrics::Metrics;
use ferry::signal::hub::Hub;
use ferry::signal::protocol::CreateRoom;

fn hub(rooms: usize) -> Arc<Hub> {
    let cfg = Config {
        max_rooms: usize::MAX,
        max_rooms_per_session: usize::MAX,
        ..Config::default()
    };
    let h = Hub::new(
        Arc::new(cfg),
        Arc::new(Metrics::new()),
        Vec::new(),
        (0..2)
            .map(|_| MediaControl {
                commands: tokio::sync::mpsc::channel(1).0,
                control: tokio::sync::mpsc::unbounded_channel().0,
            })
            .collect(),
    );
    for i in 0..rooms {
        h.create_room(
            &format!("u-{}", i % 200),
            &Grants::default(),
            CreateRoom::default(),
        )
        .expect("room");
    }
    h
}

fn create_room(c: &mut Criterion) {
    let mut g = c.benchmark_group("create_room");
    for held in [0usize, 45_000] {
        let h = hub(held);
        let grants = Grants::default();
        g.bench_function(format!("with_{held}_rooms_held"), |b| {
            b.iter(|| {
                h.create_room("u-bench", &grants, CreateRoom::default())
                    .expect("room")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, create_room);
criterion_main!(benches);
