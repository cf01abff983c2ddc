//! Thin wrappers over the media path's private functions, for the fuzz targets (`fuzz/`) only:
//! no behaviour of their own. Not an API.

pub use super::bwe::Downlink;
pub use super::munger::Munger;
pub use super::vp8::{Descriptor, Vp8Map};

/// [`super::forward::write_header`]: a forwarded copy's RTP header appended to `buf` (the
/// publisher's header `from`, the route's payload type, SSRC, extension id map, sequence number
/// and timestamp, the publisher's extensions, the subscriber's transport-cc stamp); its length.
#[allow(clippy::too_many_arguments)]
pub fn write_header(
    buf: &mut Vec<u8>,
    from: &rtc::rtp::header::Header,
    payload_type: u8,
    ssrc: u32,
    ext_map: &[u8; 256],
    (seq, ts): (u16, u32),
    extensions: &[rtc::rtp::header::Extension],
    twcc: Option<(u8, u16)>,
) -> usize {
    super::forward::write_header(
        buf,
        &super::forward::CopyHeader {
            from,
            payload_type,
            ssrc,
            ext_map,
            seq,
            ts,
            extensions,
            twcc,
        },
    )
}

/// [`super::forward::remap_extensions`]: `from`'s extensions under the ids of `map`, into `out`.
pub fn remap_extensions(
    from: &[rtc::rtp::header::Extension],
    map: &[u8; 256],
    out: &mut rtc::rtp::header::Header,
) {
    super::forward::remap_extensions(from, map, out)
}
