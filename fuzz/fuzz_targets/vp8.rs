//! VP8 payload descriptors: parsing any payload, rewriting the picture id and TL0PICIDX in place
//! (read back as written, nothing else touched), and a route's `Vp8Map` under any sequence of
//! packets, layer switches and dropped frames (values within their width; a retransmission
//! under the offsets kept at sending gets the numbers it first had).
#![no_main]

use ferry::fuzzing::{Descriptor, Vp8Map};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as one payload.
    if let Some(d) = Descriptor::parse(data) {
        if let Some((i, long, v)) = d.pid {
            assert!(i + usize::from(long) < data.len());
            assert!(v <= if long { 0x7fff } else { 0x7f });
        }
        if let Some((i, _)) = d.tl0 {
            assert!(i < data.len());
        }
        assert!(d.tid.is_none_or(|t| t < 4));
        let (pid, tl0) = (
            u16::from_be_bytes([data[0], *data.last().unwrap()]),
            data[0],
        );
        let mut copy = data.to_vec();
        d.write(&mut copy, pid, tl0);
        let back = Descriptor::parse(&copy).expect("still a descriptor");
        assert_eq!(back.tid, d.tid);
        let mut touched = Vec::new();
        match (d.pid, back.pid) {
            (Some((i, long, _)), Some((j, long2, v))) => {
                assert_eq!((i, long), (j, long2));
                assert_eq!(v, pid & if long { 0x7fff } else { 0x7f });
                touched.extend([i, i + usize::from(long)]);
            }
            (None, None) => {}
            other => panic!("picture id {other:?}"),
        }
        match (d.tl0, back.tl0) {
            (Some((i, _)), Some((j, v))) => {
                assert_eq!((i, v), (j, tl0));
                touched.push(i);
            }
            (None, None) => {}
            other => panic!("tl0 {other:?}"),
        }
        for (k, (a, b)) in data.iter().zip(&copy).enumerate() {
            assert!(a == b || touched.contains(&k), "byte {k} changed");
        }
    }

    // The input as a route's packets, 4 bytes each: a descriptor of its own, and what happens.
    let mut map = Vp8Map::default();
    for op in data.chunks_exact(4) {
        let long = op[0] & 1 != 0;
        let payload = if long {
            vec![
                0x80,
                0xE0,
                0x80 | (op[1] & 0x7f),
                op[2],
                op[3],
                op[0] & 0xC0,
            ]
        } else {
            vec![0x80, 0xE0, op[1] & 0x7f, op[3], op[0] & 0xC0]
        };
        let d = Descriptor::parse(&payload).unwrap();
        match op[0] >> 1 & 3 {
            0 => map.restart(),
            1 => map.drop_frame(&d),
            _ => {
                let (pid, tl0) = map.map(&d);
                assert!(pid <= if long { 0x7fff } else { 0x7f });
                assert_eq!(Vp8Map::map_again(&d, map.offsets()), (pid, tl0));
                if map.identity() {
                    assert_eq!(
                        (Some(pid), Some(tl0)),
                        (d.pid.map(|p| p.2), d.tl0.map(|t| t.1))
                    );
                }
            }
        }
    }
});
