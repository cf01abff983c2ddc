#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus/<target>/seed-*: real STUN, RTP, RTCP and
transport-cc packets, VP8 payload descriptors, the signaling requests of docs/protocol.md, SDPs,
the sample config of docs/configuration.md, a JWT. Run from anywhere: `python3 fuzz/seeds.py`."""
import base64, hashlib, hmac, json, os, re, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- STUN (RFC 5389) -----------------------------------------------------------------------
def stun(typ, attrs, txid=b"\x11" * 12, integrity_key=None, fingerprint=False):
    body = b""
    for t, v in attrs:
        body += struct.pack("!HH", t, len(v)) + v + b"\0" * (-len(v) % 4)
    if integrity_key is not None:
        hdr = struct.pack("!HHI", typ, len(body) + 24, 0x2112A442) + txid
        mac = hmac.new(integrity_key, hdr + body, hashlib.sha1).digest()
        body += struct.pack("!HH", 0x0008, 20) + mac
    if fingerprint:
        hdr = struct.pack("!HHI", typ, len(body) + 8, 0x2112A442) + txid
        crc = (zlib.crc32(hdr + body) ^ 0x5354554E) & 0xFFFFFFFF
        body += struct.pack("!HHI", 0x8028, 4, crc)
    return struct.pack("!HHI", typ, len(body), 0x2112A442) + txid + body


binding = stun(0x0001, [])
check = stun(0x0001, [(0x0006, b"srv1:cli2"), (0x0024, struct.pack("!I", 0x6E7F1EFF)),
                      (0x802A, b"\0" * 8)], integrity_key=b"our-password", fingerprint=True)
xor = struct.pack("!BBH", 0, 1, 40000 ^ 0x2112) + bytes(a ^ b for a, b in zip(bytes([198, 51, 100, 7]), b"\x21\x12\xa4\x42"))
success = stun(0x0101, [(0x0020, xor)], fingerprint=True)
indication = stun(0x0011, [])
error = stun(0x0111, [(0x0009, b"\0\0\x04\x01Unauthorized")])

# --- RTP / RTCP ------------------------------------------------------------------------------
def rtp(pt=96, seq=4000, ts=123456, ssrc=0xDEADBEEF, payload=b"\x90\xe0\x81\x23\x45\x60" + b"\x11" * 20,
        marker=False, csrc=(), ext=None, padding=0):
    b0 = 0x80 | (0x20 if padding else 0) | (0x10 if ext else 0) | len(csrc)
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq, ts, ssrc)
    for c in csrc:
        out += struct.pack("!I", c)
    if ext:
        profile, elems = ext
        body = b""
        for i, p in elems:
            body += bytes([(i << 4) | (len(p) - 1)]) + p if profile == 0xBEDE else bytes([i, len(p)]) + p
        body += b"\0" * (-len(body) % 4)
        out += struct.pack("!HH", profile, len(body) // 4) + body
    out += payload
    if padding:
        out += b"\0" * (padding - 1) + bytes([padding])
    return out


one_byte = rtp(ext=(0xBEDE, [(1, b"\x30"), (3, b"\x00\x01\x02"), (5, b"\xbe\xef")]))
two_byte = rtp(ext=(0x1000, [(1, b"\x30"), (20, b"x" * 20), (4, b"")]), csrc=(7, 8), marker=True)
audio = rtp(pt=111, seq=65535, ts=960, ssrc=0x01020304, payload=b"\xfc" + b"\x55" * 40,
            ext=(0xBEDE, [(1, b"\x30"), (2, b"\x80\x00\x10")]))
padded = rtp(padding=4)
sr = struct.pack("!BBHI", 0x80, 200, 6, 0x01020304) + struct.pack("!IIIII", 0xE0000000, 0, 1234, 10, 1000)
rr = struct.pack("!BBHI", 0x81, 201, 7, 1) + struct.pack("!IIIIII", 0xDEADBEEF, 0, 4000, 0, 0, 0)
pli = struct.pack("!BBHII", 0x81, 206, 2, 1, 0xDEADBEEF)
nack = struct.pack("!BBHII", 0x81, 205, 3, 1, 0xDEADBEEF) + struct.pack("!HH", 4000, 0x0005)
# transport-cc: base 0, 5 packets, ref time 1, fb count 0: one run-length chunk of "received,
# small delta" x5, five 1-byte deltas, padded.
twcc = struct.pack("!HHBBBB", 0, 5, 0, 0, 1, 0) + struct.pack("!H", 0x2005) + bytes([4, 4, 8, 4, 200])
twcc += b"\0" * (-len(twcc) % 4)
twcc = struct.pack("!BBHII", 0x8F, 205, (len(twcc) + 8) // 4 - 1, 1, 0xDEADBEEF) + twcc
# a status vector chunk (2-bit symbols), a large delta and a loss
twcc2 = struct.pack("!HHBBBB", 3, 7, 0, 0, 2, 1) + struct.pack("!H", 0xD968) + struct.pack("!H", 0x2001)
twcc2 += bytes([1]) + struct.pack("!h", -300) + bytes([2, 3])
twcc2 += b"\0" * (-len(twcc2) % 4)
twcc2 = struct.pack("!BBHII", 0x8F, 205, (len(twcc2) + 8) // 4 - 1, 1, 0xDEADBEEF) + twcc2
dtls = bytes([22, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12]) + bytes([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])

for n, d in [("binding", binding), ("check", check), ("success", success), ("indication", indication),
             ("error", error), ("rtp-one-byte", one_byte), ("rtp-two-byte", two_byte), ("rtp-audio", audio),
             ("rtp-padded", padded), ("rtcp-sr", sr), ("rtcp-rr", rr), ("rtcp-pli", pli), ("rtcp-nack", nack),
             ("rtcp-twcc", twcc), ("dtls", dtls)]:
    put("stun_demux", n, d)

route = bytes([3, 7, 100, 5, 0x12, 0x34, 0xFF, 0xF0])
for n, d in [("one-byte", one_byte), ("two-byte", two_byte), ("audio", audio), ("padded", padded),
             ("plain", rtp())]:
    put("rtp_rewrite", n, route + d)
    put("rtp_rewrite", n + "-no-twcc", bytes([4, 1, 111, 0, 0, 0, 0, 1]) + d)

for n, d in [("cm", one_byte), ("gcm128", bytes([0x90]) + one_byte[1:]), ("gcm256", bytes([0xA0]) + two_byte[1:]),
             ("audio", audio), ("rtcp-sr", sr + b"\x80\x00\x00\x01" + b"\x00" * 10),
             ("not-rtp", b"\x00\x01\x02hello, srtp")]:
    put("srtp", n, d)

for n, d in [("twcc", twcc), ("twcc-vector", twcc2)]:
    put("twcc_feedback", n, bytes([20, 100, 20, 30]) + struct.pack("!H", len(d)) + d
        + struct.pack("!H", len(d)) + d)

# --- VP8 payload descriptors (RFC 7741) ---------------------------------------------------------
vp8 = {
    "short": b"\x10\x00\x9d\x01\x2a",
    "pid7": b"\x90\x80\x21\x9d\x01\x2a",
    "pid15-tl0-tid": b"\x90\xe0\x81\x23\x45\x60\x9d\x01\x2a",
    "tl0-only": b"\x90\x40\x07\x00",
    "tid-key": b"\x90\x30\x80\x00",
}
for n, d in vp8.items():
    put("vp8", n, d)
put("vp8", "route", bytes([4, 1, 2, 3, 5, 1, 2, 4, 2, 0, 0, 0, 4, 3, 2, 5, 6, 9, 9, 9, 4, 4, 3, 6]))

# --- munger: ops of 4 bytes (packet, drop, insert, restart) --------------------------------------
put("munger", "stream", bytes([0, 0, 100, 1, 0, 0, 0, 1, 0x40, 0, 0, 1, 0, 0, 0, 1, 4, 0, 0, 0,
                               0, 0, 0, 1, 6, 0x11, 0x94, 0, 0, 0, 0, 1, 3, 0, 0, 2, 0, 0, 0, 1]))
put("munger", "wrap", bytes([0x80, 0xFF, 0xF0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 4, 0, 0, 0, 0, 0, 0, 8]))

# --- signaling -------------------------------------------------------------------------------
sdp_offer = ("v=0\r\no=- 4611 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
             "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n"
             "a=rtpmap:111 opus/48000/2\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=recvonly\r\n"
             "a=rtpmap:96 VP8/90000\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n")
protocol = open(os.path.join(ROOT, "docs", "protocol.md")).read()
for i, line in enumerate(sorted(set(re.findall(r'\{"id"[^`\n]*\}', protocol)))):
    put("signal_message", "doc-%02d" % i, line)
put("signal_message", "offer-full", json.dumps({"id": 30, "type": "offer", "to": "server", "sdp": sdp_offer}))
put("signal_message", "sdp", sdp_offer)
put("signal_message", "sdp-session-level", "v=0\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv:x\r\n"
    "m=video 0 UDP/TLS/RTP/SAVPF 96\r\n")
put("signal_message", "bad-id", '{"id":[1],"type":"ping"}')
put("signal_message", "unknown-type", '{"id":"x","type":"shout","loud":true}')

# --- tokens ----------------------------------------------------------------------------------
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(claims, secret=b"0123456789abcdef0123456789abcdef", kid="k", alg="HS256"):
    h = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    c = b64(json.dumps(claims).encode())
    sig = hmac.new(secret, (h + "." + c).encode(), hashlib.sha256).digest()
    return h + "." + c + "." + b64(sig)


grants = {"room": "k3x9p2m4ab", "create": True, "publish": False, "subscribe": True, "relayOnly": False}
put("token", "expired", jwt({"sub": "alice", "exp": 1000, "iat": 900, "grants": grants}))
put("token", "other-secret", jwt({"sub": "alice", "exp": 4102444800, "iat": 0}, secret=b"x" * 32))
put("token", "other-kid", jwt({"sub": "bob", "exp": 4102444800}, kid="k2"))
put("token", "alg-none", jwt({"sub": "bob", "exp": 4102444800}, alg="none"))
put("token", "identity", "alice\nrest")

# --- config ----------------------------------------------------------------------------------
doc = open(os.path.join(ROOT, "docs", "configuration.md")).read()
for i, block in enumerate(re.findall(r"```toml\n(.*?)```", doc, re.S)):
    put("config", "doc-%d" % i, block)
put("config", "full", '''http_listen = "0.0.0.0:8080"
media_listen = "0.0.0.0:3478"
media_shards = 2
announce = ["203.0.113.7"]
api_key = "k"
api_secret = "0123456789abcdef0123456789abcdef"
p2p_timeout = "5s"
ping_interval = "10s"
ping_timeout = "30s"
srtp_profiles = ["aes128-gcm", "aes128-cm-sha1-80"]
allowed_origins = ["https://App.example.com/"]
[[ice_servers]]
urls = ["stun:stun.example.org:3478"]
[[turn_servers]]
urls = ["turn:turn.example.org:3478?transport=udp"]
secret = "s3cret"
ttl = "12h"
''')
