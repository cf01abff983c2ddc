//! The shapes' arithmetic: how many clients a run has, which of them must receive media, and how
//! many receivers each published packet has. Each server's module ([`ferry`](super::ferry),
//! [`janus`](super::janus)) builds a room of the shape through its own signaling.

use super::cli::{LoadgenArgs, Shape};

/// What a run's shape makes of its flags.
pub(super) struct Plan {
    /// Every client, publishers and subscribers.
    pub(super) clients: u32,
    /// Clients that must receive media: subscribers, and in a meeting publishers that have others
    /// to receive from.
    pub(super) expected_receivers: u64,
    /// Clients that receive, for memory per subscriber: subscribers, and in a meeting every member.
    pub(super) subscribers: u64,
    /// Receivers of each published packet.
    pub(super) fanout: u32,
}

impl Plan {
    pub(super) fn new(args: &LoadgenArgs) -> Self {
        let expected_receivers = u64::from(args.rooms)
            * match args.shape {
                Shape::Meeting if args.publishers > 1 => {
                    u64::from(args.subscribers + args.publishers)
                }
                _ => u64::from(args.subscribers),
            }
            * u64::from(args.publishers > 0);
        let subscribers = u64::from(args.rooms * args.subscribers)
            + if args.shape == Shape::Meeting {
                u64::from(args.rooms * args.publishers)
            } else {
                0
            };
        let fanout = match args.shape {
            Shape::Broadcast => args.subscribers,
            Shape::Meeting => args.subscribers + args.publishers.saturating_sub(1),
        };
        Plan {
            clients: args.rooms * (args.publishers + args.subscribers),
            expected_receivers,
            subscribers,
            fanout,
        }
    }
}
