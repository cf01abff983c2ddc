// Ferry browser SDK — served by the Ferry server at /sdk/ferry.js.
// ES module exporting `Ferry` (also set as window.Ferry). Plain JavaScript, no build step.
// Wire protocol: docs/protocol.md. Contract: README.md and docs/sdk.md.

const PROTOCOL = 1;
const REQUEST_TIMEOUT_MS = 10000;
const STREAM_TYPES = ['cam', 'screen'];
const VIDEO_QUALITIES = ['low', 'medium', 'high', 'off'];

// The simulcast layers a video track is published to the relay with, lowest first (rids q, h, f:
// quarter, half and full resolution; the relay ranks them by these names). Bitrate caps scale
// with the source's pixels. Screen share: half and full.
function simulcastEncodings(track, type) {
  const s = track.getSettings ? track.getSettings() : {};
  const pixels = (s.width || 640) * (s.height || 480);
  const full = Math.min(2_500_000, Math.max(300_000, Math.round(pixels * 2.5)));
  const layers = [
    { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: Math.round(full / 8) },
    { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: Math.round(full / 3) },
    { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: full },
  ];
  return type === 'screen' ? layers.slice(1) : layers;
}
// ICE 'disconnected' often heals by itself; restart only if it lasts this long.
const DISCONNECTED_GRACE_MS = 2500;
// On a new connection the polite side lets the impolite one offer first, for at most this long.
const FIRST_OFFER_WAIT_MS = 1500;
// The id that names the Ferry server (the relay) in signaling.
const SERVER = 'server';
// After the room no longer needs the relay, wait this long before going back to P2P (no flapping).
const BACK_TO_P2P_MS = 3000;
// The SDK's own liveness check of the signaling socket: a ping this often, and a socket whose
// ping gets no answer within the timeout is taken for dead (a network change leaves a socket
// that looks open for a long while). At most the server's own figures.
const LINK_PING_MS = 2000;
const LINK_PING_TIMEOUT_MS = 4000;
// Reconnecting: the first try at once, then backoff doubling from this up to the most, each
// with jitter (x0.5-1.5); a new socket must open within CONNECT_TIMEOUT_MS.
const RECONNECT_MIN_MS = 250;
// After a rejoin under the same user id, how long the other members have to come back too.
const REJOIN_GRACE_MS = 15000;
const RECONNECT_MAX_MS = 5000;
const CONNECT_TIMEOUT_MS = 5000;
// Close codes after which the SDK does not reconnect: the server refused this client.
const FINAL_CLOSE_CODES = [1007, 1008, 1009, 4001, 4005];

export class FerryError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'FerryError';
    this.code = code;
  }
}

function wsUrl(url) {
  if (!url) {
    const loc = globalThis.location;
    return (loc.protocol === 'https:' ? 'wss:' : 'ws:') + '//' + loc.host + '/ws';
  }
  const u = new URL(url, globalThis.location ? globalThis.location.href : undefined);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.pathname === '/' || u.pathname === '') u.pathname = '/ws';
  return u.toString();
}

// One RTCPeerConnection: to one remote member (P2P), or to the Ferry server (the relay, remoteId
// 'server'), negotiated with "perfect negotiation": the polite side yields on offer collisions,
// so simultaneous offers never deadlock. Against the server the browser is always polite.
class Link {
  constructor(ferry, remoteId) {
    this.ferry = ferry;
    this.remoteId = remoteId;
    this.isRelay = remoteId === SERVER;
    this.polite = this.isRelay || ferry._userId > remoteId;
    this.everConnected = false;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.settingRemoteAnswer = false;
    this.pendingCandidates = [];
    this.remoteMeta = {}; // remote stream id -> 'cam' | 'screen'
    this.remoteStreams = new Map(); // 'cam' | 'screen' -> MediaStream
    this.senders = new Map(); // 'cam' | 'screen' -> { stream, senders: RTCRtpSender[] }
    this.queue = Promise.resolve();
    this.closed = false;
    this.disconnectTimer = null;
    this.watchdog = null;
    // Counters for debugging a link (see getLinkInfo).
    this.counts = { offersSent: 0, answersSent: 0, descriptionsIn: 0, ignoredOffers: 0, candidatesOut: 0, candidatesIn: 0, candidatesAdded: 0, iceRestarts: 0 };

    // Both sides of a new pair usually want to offer at once (each adds its tracks). Perfect
    // negotiation resolves that by a rollback on the polite side, but Chromium sometimes never
    // gathers candidates on a connection whose very first offer was rolled back. So on a new
    // connection the polite side holds its offer until the impolite side's first offer arrives
    // (its tracks then ride in the answer) or FIRST_OFFER_WAIT_MS passes.
    this.holdOffers = this.polite && !this.isRelay;
    this.heldOffer = false;
    this.holdTimer = this.holdOffers ? setTimeout(() => this._releaseOffers(), FIRST_OFFER_WAIT_MS) : null;
    this.restartsWithoutConnecting = 0;

    // Towards the relay, STUN servers are left out: Chromium treats every packet from a STUN
    // server's address as a STUN-server reply, and Ferry's STUN shares the relay's address and
    // port, so its ICE answers would be swallowed. The relay is reached directly (or via TURN).
    const iceServers = this.isRelay
      ? ferry._iceServers().filter((s) => [].concat(s.urls).some((u) => /^turns?:/.test(u)))
      : ferry._iceServers();
    const config = Object.assign({}, ferry._rtcConfig, { iceServers });
    const pc = (this.pc = new RTCPeerConnection(config));
    pc.onnegotiationneeded = () => this._negotiate();
    pc.onicecandidate = ({ candidate }) => {
      this.counts.candidatesOut++;
      this.ferry._send('candidate', { to: remoteId, candidate: candidate ? candidate.toJSON() : null });
    };
    pc.ontrack = (ev) => this._onTrack(ev);
    pc.oniceconnectionstatechange = () => this._onIceState();
    // The server's connection opens with a data channel, so that even a member who publishes
    // nothing negotiates at once and can receive what the server offers later.
    if (this.isRelay) pc.createDataChannel('ferry');
  }

  // Serialize everything that touches signaling state.
  run(task) {
    this.queue = this.queue.then(task).catch((e) => {
      if (!this.closed) console.warn('ferry: negotiation with', this.remoteId, e);
    });
    return this.queue;
  }

  _meta() {
    const streams = {};
    for (const [type, { stream }] of this.senders) streams[stream.id] = type;
    return { streams };
  }

  _releaseOffers() {
    clearTimeout(this.holdTimer);
    if (!this.holdOffers) return;
    this.holdOffers = false;
    if (this.heldOffer && this.pc.signalingState === 'stable') this._negotiate();
  }

  async _negotiate() {
    if (this.closed) return;
    if (this.holdOffers) {
      this.heldOffer = true;
      return;
    }
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      this.counts.offersSent++;
      await this.ferry._send('offer', { to: this.remoteId, sdp: this.pc.localDescription.sdp, meta: this._meta() });
    } catch (e) {
      if (!this.closed) console.warn('ferry: offer to', this.remoteId, e);
    } finally {
      this.makingOffer = false;
    }
  }

  handleDescription(type, sdp, meta) {
    return this.run(async () => {
      if (this.closed) return;
      if (meta && meta.streams) Object.assign(this.remoteMeta, meta.streams);
      const pc = this.pc;
      const readyForOffer = !this.makingOffer && (pc.signalingState === 'stable' || this.settingRemoteAnswer);
      const collision = type === 'offer' && !readyForOffer;
      this.ignoreOffer = !this.polite && collision;
      this.counts.descriptionsIn++;
      if (this.ignoreOffer) {
        this.counts.ignoredOffers++;
        return;
      }
      this.settingRemoteAnswer = type === 'answer';
      try {
        await pc.setRemoteDescription({ type, sdp });
      } finally {
        this.settingRemoteAnswer = false;
      }
      for (const c of this.pendingCandidates.splice(0)) await this._addCandidate(c);
      this._armWatchdog();
      if (type === 'offer') {
        // Offers held so far are answered here: setRemoteDescription paired our added tracks
        // with the offer's transceivers, and the browser fires negotiationneeded again if not.
        this.holdOffers = false;
        clearTimeout(this.holdTimer);
        await pc.setLocalDescription();
        this.counts.answersSent++;
        await this.ferry._send('answer', { to: this.remoteId, sdp: pc.localDescription.sdp, meta: this._meta() });
      }
    });
  }

  handleCandidate(candidate) {
    this.counts.candidatesIn++;
    return this.run(async () => {
      if (this.closed) return;
      if (!this.pc.remoteDescription) {
        this.pendingCandidates.push(candidate);
        return;
      }
      await this._addCandidate(candidate);
    });
  }

  // A candidate can be stale (it belonged to an offer that was ignored or rolled back in a
  // collision): log it and go on, never let one bad candidate drop the ones after it.
  async _addCandidate(candidate) {
    try {
      await this.pc.addIceCandidate(candidate || undefined);
      this.counts.candidatesAdded++;
    } catch (e) {
      console.warn('ferry: candidate from', this.remoteId, 'not added:', e.message);
    }
  }

  _onTrack({ track, streams }) {
    const stream = streams[0] || new MediaStream([track]);
    if (this.isRelay) {
      this.ferry._onRelayStream(stream);
      return;
    }
    const type = this.remoteMeta[stream.id] || (this.remoteStreams.has('cam') && this.remoteStreams.get('cam') !== stream ? 'screen' : 'cam');
    if (this.remoteStreams.get(type) === stream) return;
    this.remoteStreams.set(type, stream);
    stream.addEventListener('removetrack', () => {
      if (stream.getTracks().length === 0 && this.remoteStreams.get(type) === stream) {
        this.remoteStreams.delete(type);
        this.ferry._presence({ type: 'unsubscribed', userId: this.remoteId, streamType: type, stream });
      }
    });
    this.ferry._presence({ type: 'subscribed', userId: this.remoteId, streamType: type, stream, mode: 'p2p' });
  }

  // A negotiated connection that is not connected within p2pTimeoutMs restarts ICE, so a lost
  // candidate or a stuck check cannot leave a call silent.
  _armWatchdog() {
    if (this.watchdog) return;
    const ms = (this.ferry._welcome && this.ferry._welcome.p2pTimeoutMs) || 5000;
    this.watchdog = setTimeout(() => {
      this.watchdog = null;
      const state = this.pc.iceConnectionState;
      if (this.closed || state === 'connected' || state === 'completed') return;
      if (!this.isRelay && !this.everConnected) {
        // The direct path never came up within p2pTimeoutMs: the pair goes through the relay.
        this.ferry._p2pFailure(this.remoteId, 'p2p_timeout');
        return;
      }
      if (this.isRelay) {
        // Start over with a new connection to the relay.
        this.ferry._resetRelay();
        return;
      }
      this.restartsWithoutConnecting++;
      if (this.restartsWithoutConnecting >= 2 && !this.polite) {
        // An ICE restart did not help either: start over with a new RTCPeerConnection on both sides.
        this.ferry._resetLink(this.remoteId);
      } else {
        this._restartIce();
      }
    }, ms);
  }

  _onIceState() {
    const state = this.pc.iceConnectionState;
    clearTimeout(this.disconnectTimer);
    if (this.closed) return;
    if (state === 'connected' || state === 'completed') {
      clearTimeout(this.watchdog);
      this.watchdog = null;
      this.restartsWithoutConnecting = 0;
      this.everConnected = true;
    }
    if (state === 'failed' && !this.isRelay && !this.everConnected) {
      this.ferry._p2pFailure(this.remoteId, 'ice_failed');
      return;
    }
    if (state === 'failed' && this.isRelay) {
      this.ferry._resetRelay();
    } else if (state === 'failed') {
      this._restartIce();
    } else if (state === 'disconnected') {
      this.disconnectTimer = setTimeout(() => {
        if (!this.closed && this.pc.iceConnectionState === 'disconnected') this._restartIce();
      }, DISCONNECTED_GRACE_MS);
    }
  }

  _restartIce() {
    this.counts.iceRestarts++;
    this.pc.restartIce();
  }

  addStream(type, stream) {
    this.removeStream(type);
    const canSubscribe = this.ferry._welcome.grants.subscribe;
    const codec = this.ferry._videoCodec;
    const opts = this.ferry._publishOptions.get(type) || {};
    const senders = stream.getTracks().map((track) => {
      // Towards the relay each published track has an m-section of its own, send-only: the
      // relay sends what it forwards on m-sections it offers (send-only on its side). Video
      // goes as simulcast layers unless the publish said simulcast: false.
      const init = { direction: 'sendonly', streams: [stream] };
      if (this.isRelay && track.kind === 'video' && opts.simulcast !== false) {
        init.sendEncodings = simulcastEncodings(track, type);
      }
      const sender = this.isRelay
        ? this.pc.addTransceiver(track, init).sender
        : this.pc.addTrack(track, stream);
      const t = this.pc.getTransceivers().find((x) => x.sender === sender);
      if (t && !canSubscribe) t.direction = 'sendonly';
      if (t && codec && track.kind === 'video') preferCodec(t, codec);
      return sender;
    });
    this.senders.set(type, { stream, senders });
  }

  removeStream(type) {
    const entry = this.senders.get(type);
    if (!entry) return;
    this.senders.delete(type);
    for (const s of entry.senders) {
      try {
        this.pc.removeTrack(s);
      } catch (_) {
        // already closed
      }
    }
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.holdTimer);
    clearTimeout(this.disconnectTimer);
    clearTimeout(this.watchdog);
    this.pc.close();
    for (const [type, stream] of this.remoteStreams) {
      this.ferry._presence({ type: 'unsubscribed', userId: this.remoteId, streamType: type, stream });
    }
    this.remoteStreams.clear();
  }
}

export class Ferry extends EventTarget {
  // opts: { token?, identity? (dev-mode display name), rtcConfig? (extra RTCConfiguration),
  //         videoCodec? ('VP8' | 'VP9' | 'H264' | 'AV1': preferred for video we send),
  //         reconnectTimeoutMs? (how long to keep trying to reconnect, default 120000; 0: never
  //         reconnect) }
  constructor(opts = {}) {
    super();
    this._reconnectTimeoutMs = opts.reconnectTimeoutMs === undefined ? 120000 : opts.reconnectTimeoutMs;
    this._url = undefined;
    this._state = 'new'; // 'connected' | 'reconnecting' | 'closed'
    this._resumeToken = undefined;
    this._lostAt = 0;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._connecting = false;
    this._netWatch = null;
    this._videoCodec = opts.videoCodec;
    this._token = opts.token;
    this._identity = opts.identity;
    this._rtcConfig = opts.rtcConfig || {};
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._welcome = null;
    this._userId = undefined;
    this._roomId = undefined;
    this._members = new Map(); // userId -> identity
    this._links = new Map(); // userId -> Link
    this._published = new Map(); // 'cam' | 'screen' -> MediaStream, sent to every member
    this._publishOptions = new Map(); // 'cam' | 'screen' -> the options it was published with
    this._pingTimer = null;
    this._pairs = new Map(); // userId -> { mode: 'p2p' | 'relay', reason }: how media with that member travels
    this._roomMode = 'auto';
    this._p2pFailed = new Map(); // userId -> why the direct connection with that member failed
    this._relay = null; // Link to the server while any pair goes through the relay
    this._relayStreams = new Map(); // userId -> Map('cam' | 'screen' -> MediaStream)
    this._relayOnlyMembers = new Set(); // members whose token says relayOnly
    this._backTimers = new Map(); // userId -> timer before that pair returns to P2P
    this._returning = new Set(); // members not back yet after this client's room moved
    this._returningTimer = null;
  }

  // Connect and say hello. Resolves { userId, identity, iceServers, p2pMaxPeers, p2pTimeoutMs, grants }.
  async init(url) {
    if (this._ws || this._state !== 'new') throw new FerryError('already_initialized', 'init() was already called');
    this._url = url;
    this._attach(await openSocket(url));
    const welcome = await this._request('hello', this._hello());
    this._welcomed(welcome);
    this._setState('connected', {});
    this._watchNetwork();
    return welcome;
  }

  // The state of this client's own link to the server: 'connected', 'reconnecting' or 'closed'.
  getConnectionState() {
    return this._state;
  }

  // rejoin: the last resume token, when the session it resumed is gone (a cluster node gives
  // the same user id back with it, so that the others keep their connections with this member).
  _hello(rejoin) {
    const hello = { protocol: PROTOCOL };
    if (this._token) hello.token = this._token;
    if (this._identity) hello.identity = this._identity;
    if (rejoin) hello.rejoin = rejoin;
    return hello;
  }

  _attach(ws) {
    this._ws = ws;
    ws.onmessage = (ev) => {
      if (this._ws === ws) this._onMessage(ev.data);
    };
    ws.onclose = (ev) => this._onClose(ws, ev);
  }

  _welcomed(welcome) {
    this._welcome = welcome;
    this._userId = welcome.userId;
    this._resumeToken = welcome.resumeToken;
    this._resumeTimeoutMs = welcome.resumeTimeoutMs || 0;
    clearInterval(this._pingTimer);
    const every = Math.max(1000, Math.min(welcome.pingIntervalMs || 10000, LINK_PING_MS));
    const timeout = Math.min(welcome.pingTimeoutMs || 30000, LINK_PING_TIMEOUT_MS);
    this._pingTimer = setInterval(() => this._probe(timeout), every);
  }

  // Ping the server; no answer within `timeout` means the socket is dead.
  _probe(timeout) {
    const ws = this._ws;
    if (!ws) return;
    this._request('ping', {}, timeout).catch((e) => {
      if (e.code === 'timeout' && this._ws === ws) this._lost(ws, 'the server did not answer a ping');
    });
  }

  _setState(state, detail) {
    this._state = state;
    this.dispatchEvent(new CustomEvent('connection', { detail: Object.assign({ state }, detail) }));
  }

  // The browser's own signs of a network change: back online, another connection type. A
  // reconnect is tried at once, or the socket is checked; going offline drops it.
  _watchNetwork() {
    if (typeof window === 'undefined' || !window.addEventListener || this._netWatch) return;
    this._netWatch = {
      online: () => {
        if (this._state === 'reconnecting') this._scheduleReconnect(0);
        else if (this._state === 'connected') this._probe(LINK_PING_TIMEOUT_MS / 2);
      },
      offline: () => {
        if (this._state === 'connected' && this._ws) this._lost(this._ws, 'the browser went offline');
      },
    };
    window.addEventListener('online', this._netWatch.online);
    window.addEventListener('offline', this._netWatch.offline);
    const c = globalThis.navigator && navigator.connection;
    if (c && c.addEventListener) c.addEventListener('change', this._netWatch.online);
  }

  _unwatchNetwork() {
    if (!this._netWatch) return;
    window.removeEventListener('online', this._netWatch.online);
    window.removeEventListener('offline', this._netWatch.offline);
    const c = globalThis.navigator && navigator.connection;
    if (c && c.removeEventListener) c.removeEventListener('change', this._netWatch.online);
    this._netWatch = null;
  }

  getUserId() {
    return this._userId;
  }

  getRoomId() {
    return this._roomId;
  }

  // The identity (token `sub` or dev-mode name) of a member of the current room.
  getIdentity(userId) {
    return userId === this._userId ? this._welcome && this._welcome.identity : this._members.get(userId);
  }

  // opts: { maxPeers?, mode?: 'auto' | 'relay', roomId? }. Resolves { roomId, maxPeers, mode }.
  async createRoom(opts = {}) {
    return this._request('createRoom', opts);
  }

  // Resolves { roomId, members: [userId…] (not me), maxPeers, mode }.
  async joinRoom(roomId) {
    if (typeof roomId !== 'string' || !roomId) throw new FerryError('bad_request', 'joinRoom needs a room id');
    const res = await this._request('joinRoom', { roomId });
    this._roomId = res.roomId;
    this._roomMode = res.mode;
    this._p2pFailed.clear();
    this._pairs.clear();
    this._relayOnlyMembers.clear();
    for (const m of res.members) {
      this._members.set(m.userId, m.identity);
      if (m.relayOnly) this._relayOnlyMembers.add(m.userId);
    }
    this._evaluateMode();
    return { roomId: res.roomId, members: res.members.map((m) => m.userId), maxPeers: res.maxPeers, mode: res.mode };
  }

  // Send `stream` to every member, now and later. type: 'cam' | 'screen'. opts: { simulcast?:
  // false } sends its video to the relay as one encoding (default: simulcast layers, which the
  // relay picks from per subscriber; P2P connections always get one encoding).
  async publish(stream, type = 'cam', opts = {}) {
    this._checkPublish(stream, type);
    this._published.set(type, stream);
    this._publishOptions.set(type, opts);
    for (const link of this._links.values()) link.addStream(type, stream);
    if (this._relay) this._relay.addStream(type, stream);
  }

  // Stop sending the stream of that type to everyone.
  async unpublish(type = 'cam') {
    this._published.delete(type);
    for (const link of this._links.values()) link.removeStream(type);
    if (this._relay) this._relay.removeStream(type);
  }

  // Send `stream` to one member only.
  async publishP2P(userId, type, stream) {
    this._checkPublish(stream, type);
    if (this.getMode(userId) === 'relay') {
      throw new FerryError('unsupported', 'publishP2P needs a direct connection; media with this member goes through the relay');
    }
    const link = this._links.get(userId);
    if (!link) throw new FerryError('target_not_found', `${userId} is not a member of your room`);
    link.addStream(type, stream);
  }

  // What this member receives of `userId`'s video through the relay: 'low' | 'medium' | 'high'
  // (the simulcast layer; default 'high', or the highest the publisher sends) or 'off' (no
  // video). Kept for that member's later tracks; P2P video is not affected.
  async setVideoQuality(userId, quality) {
    if (!VIDEO_QUALITIES.includes(quality)) {
      throw new FerryError('bad_request', `quality must be one of ${VIDEO_QUALITIES.join(', ')}`);
    }
    await this._request('setVideoQuality', { userId, quality });
  }

  // Let the size of `element` (where that member's video is shown) pick the quality, as
  // setVideoQuality would: its height in device pixels up to 180 'low', up to 360 'medium', above
  // that 'high'; 'off' while it has no size (display: none, detached) or is out of view. Sent
  // when the quality changes. Returns a function that stops watching (the last quality stays).
  fitVideoQuality(userId, element) {
    if (!element || typeof element.getBoundingClientRect !== 'function') {
      throw new FerryError('bad_request', 'fitVideoQuality needs an element');
    }
    let visible = true;
    let sent = null;
    const update = () => {
      const r = element.getBoundingClientRect();
      const height = r.height * (window.devicePixelRatio || 1);
      const quality = !visible || r.width === 0 || r.height === 0 ? 'off'
        : height <= 180 ? 'low' : height <= 360 ? 'medium' : 'high';
      if (quality === sent) return;
      sent = quality;
      this.setVideoQuality(userId, quality).catch(() => { sent = null; });
    };
    const resize = new ResizeObserver(update);
    resize.observe(element);
    const view = new IntersectionObserver((entries) => {
      visible = entries[entries.length - 1].isIntersecting;
      update();
    });
    view.observe(element);
    update();
    return () => { resize.disconnect(); view.disconnect(); };
  }

  // The MediaStream received from that member (type 'cam' by default), or undefined.
  getStream(userId, type = 'cam') {
    const link = this._links.get(userId);
    const streams = link ? link.remoteStreams : this._relayStreams.get(userId);
    if (!streams) return undefined;
    return streams.get(type) || (type === 'cam' ? streams.values().next().value : undefined);
  }

  // 'p2p' | 'relay' | undefined: how media with that member travels.
  getMode(userId) {
    if (!this._members.has(userId)) return undefined;
    const pair = this._pairs.get(userId);
    return pair ? pair.mode : 'p2p';
  }

  // Debugging aid: the state of the connection to that member, or undefined.
  getLinkInfo(userId) {
    const link = this._links.get(userId) || (this.getMode(userId) === 'relay' ? this._relay : null);
    if (!link) return undefined;
    const pc = link.pc;
    const pair = this._pairs.get(userId);
    return Object.assign({
      mode: link.isRelay ? 'relay' : 'p2p', reason: pair ? pair.reason : null, polite: link.polite, signalingState: pc.signalingState,
      iceConnectionState: pc.iceConnectionState, iceGatheringState: pc.iceGatheringState,
      connectionState: pc.connectionState,
    }, link.counts);
  }

  // RTCStatsReport of the connection carrying that member's media, or undefined.
  async getStats(userId) {
    const link = this._links.get(userId) || (this.getMode(userId) === 'relay' ? this._relay : null);
    return link ? link.pc.getStats() : undefined;
  }

  async leaveRoom() {
    if (!this._roomId) throw new FerryError('not_in_room', 'not in a room');
    this._closeLinks();
    this._closeRelay();
    this._roomId = undefined;
    this._members.clear();
    this._pairs.clear();
    await this._request('leaveRoom', {});
  }

  close() {
    clearInterval(this._pingTimer);
    clearTimeout(this._reconnectTimer);
    this._unwatchNetwork();
    this._closeLinks();
    this._closeRelay();
    this._roomId = undefined;
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onclose = null;
      ws.close(1000);
    }
    if (this._state !== 'closed' && this._state !== 'new') this._setState('closed', { reason: 'close() was called' });
    this._state = 'closed';
  }

  // --- internals ---

  _checkPublish(stream, type) {
    if (!this._welcome) throw new FerryError('not_connected', 'call init() first');
    if (!STREAM_TYPES.includes(type)) throw new FerryError('bad_request', `stream type must be 'cam' or 'screen'`);
    if (!(stream instanceof MediaStream)) throw new FerryError('bad_request', 'publish needs a MediaStream');
    if (!this._welcome.grants.publish) throw new FerryError('forbidden', 'this token may not publish');
  }

  _iceServers() {
    return (this._welcome && this._welcome.iceServers) || [];
  }

  _link(userId) {
    let link = this._links.get(userId);
    if (!link) {
      if (this.getMode(userId) === 'relay') return null;
      link = new Link(this, userId);
      this._links.set(userId, link);
      for (const [type, stream] of this._published) link.addStream(type, stream);
    }
    return link;
  }

  // Replace the connection with that member by a new one, and tell them to do the same.
  _resetLink(userId) {
    if (!this._links.has(userId)) return;
    this._send('bye', { to: userId, reason: 'reset' });
    this._dropLink(userId);
    this._link(userId);
  }

  _dropLink(userId) {
    const link = this._links.get(userId);
    if (link) {
      this._links.delete(userId);
      link.close();
    }
  }

  _closeLinks() {
    for (const userId of [...this._links.keys()]) this._dropLink(userId);
  }

  // --- P2P or relay, per pair ---

  // Why every pair of this room must go through the relay, or null.
  _roomRelayReason() {
    const w = this._welcome;
    if (this._roomMode === 'relay') return 'room_mode';
    if (w.grants.relayOnly || w.p2pMaxPeers === 0) return 'policy';
    if (this._members.size + 1 > w.p2pMaxPeers) return 'room_size';
    return null;
  }

  // Why media with that member must go through the relay, or null when P2P is fine.
  _relayReason(userId) {
    return this._roomRelayReason()
      || (this._relayOnlyMembers.has(userId) ? 'policy' : null)
      || this._p2pFailed.get(userId)
      || null;
  }

  _evaluateMode() {
    if (!this._roomId) return;
    for (const userId of this._members.keys()) {
      const reason = this._relayReason(userId);
      const relayed = this.getMode(userId) === 'relay';
      if (reason && !relayed) {
        this._pairToRelay(userId, reason);
      } else if (!reason && relayed) {
        // Back to P2P only after a quiet while, and only if nothing asks for the relay again.
        if (!this._backTimers.has(userId)) {
          this._backTimers.set(userId, setTimeout(() => {
            this._backTimers.delete(userId);
            if (this.getMode(userId) === 'relay' && !this._relayReason(userId)) this._pairToP2P(userId, 'room_shrunk');
          }, BACK_TO_P2P_MS));
        }
      } else if (!reason) {
        clearTimeout(this._backTimers.get(userId));
        this._backTimers.delete(userId);
        this._link(userId);
      } else {
        clearTimeout(this._backTimers.get(userId));
        this._backTimers.delete(userId);
      }
    }
  }

  _pairToRelay(userId, reason) {
    clearTimeout(this._backTimers.get(userId));
    this._backTimers.delete(userId);
    this._pairs.set(userId, { mode: 'relay', reason });
    this._dropLink(userId);
    if (!this._relay) {
      this._relay = new Link(this, SERVER);
      for (const [type, stream] of this._published) this._relay.addStream(type, stream);
    }
    if (this._welcome.grants.subscribe) this._send('subscribe', { userId });
    this._send('reportMode', { mode: 'relay', reason, userId });
    this._presence({ type: 'mode', userId, mode: 'relay', reason });
  }

  _pairToP2P(userId, reason) {
    this._pairs.set(userId, { mode: 'p2p', reason });
    this._send('unsubscribe', { userId });
    this._dropRelayStreams(userId);
    this._send('reportMode', { mode: 'p2p', reason, userId });
    // The relay connection goes when no pair needs it any more.
    if (!this._anyPairRelayed()) this._closeRelay();
    this._link(userId);
    this._presence({ type: 'mode', userId, mode: 'p2p', reason });
  }

  _anyPairRelayed() {
    return [...this._pairs.values()].some((p) => p.mode === 'relay');
  }

  _resetRelay() {
    if (!this._relay) return;
    this._relay.close();
    this._send('bye', { to: SERVER, reason: 'reset' });
    this._relay = new Link(this, SERVER);
    for (const [type, stream] of this._published) this._relay.addStream(type, stream);
  }

  _dropRelayStreams(userId) {
    const streams = this._relayStreams.get(userId);
    if (!streams) return;
    this._relayStreams.delete(userId);
    for (const [type, stream] of streams) this._presence({ type: 'unsubscribed', userId, streamType: type, stream });
  }

  _closeRelay() {
    for (const t of this._backTimers.values()) clearTimeout(t);
    this._backTimers.clear();
    if (this._relay) {
      this._relay.close();
      if (this._ws && this._ws.readyState === WebSocket.OPEN && this._roomId) this._send('bye', { to: SERVER, reason: 'done' });
      this._relay = null;
    }
    for (const userId of [...this._relayStreams.keys()]) this._dropRelayStreams(userId);
  }

  // The direct connection with that member never came up: tell the peer, and take this pair
  // through the relay.
  _p2pFailure(userId, reason) {
    if (this.getMode(userId) === 'relay') return;
    this._p2pFailed.set(userId, reason);
    this._send('bye', { to: userId, reason: 'relay:' + reason });
    this._evaluateMode();
  }

  // A stream relayed by the server: its id is `<userId>~<cam|screen>`.
  _onRelayStream(stream) {
    const cut = stream.id.lastIndexOf('~');
    if (cut < 0) return;
    const userId = stream.id.slice(0, cut);
    const type = stream.id.slice(cut + 1);
    let streams = this._relayStreams.get(userId);
    if (!streams) this._relayStreams.set(userId, (streams = new Map()));
    if (streams.get(type) === stream) return;
    streams.set(type, stream);
    stream.addEventListener('removetrack', () => {
      if (stream.getTracks().length === 0 && streams.get(type) === stream) {
        streams.delete(type);
        this._presence({ type: 'unsubscribed', userId, streamType: type, stream });
      }
    });
    this._presence({ type: 'subscribed', userId, streamType: type, stream, mode: 'relay' });
  }

  _presence(detail) {
    this.dispatchEvent(new CustomEvent('presence', { detail }));
  }

  _request(type, fields, timeoutMs = REQUEST_TIMEOUT_MS) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new FerryError('not_connected', 'not connected to the server'));
    }
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new FerryError('timeout', `${type} got no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this._pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify(Object.assign({ id, type }, fields)));
    });
  }

  // Fire-and-forget signaling (errors are logged: the peer may just have left).
  _send(type, fields) {
    return this._request(type, fields).catch((e) => {
      if (e.code !== 'target_not_found' && e.code !== 'not_in_room') console.warn('ferry:', type, e.message);
    });
  }

  _onMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (_) {
      return;
    }
    switch (msg.type) {
      case 'response': {
        const p = this._pending.get(msg.id);
        if (!p) return;
        this._pending.delete(msg.id);
        clearTimeout(p.timer);
        if (msg.error) p.reject(new FerryError(msg.error.code, msg.error.message));
        else p.resolve(msg.result);
        return;
      }
      case 'presence':
        if (msg.roomId !== this._roomId) return;
        if (msg.event === 'join') {
          this._memberJoined(msg);
        } else if (msg.event === 'leave') {
          this._memberLeft(msg.userId, msg.reason);
        } else if (msg.event === 'reconnecting' || msg.event === 'reconnected') {
          // That member's signaling dropped and (for 'reconnected') came back; it stays in the room.
          this._presence({ type: msg.event, userId: msg.userId });
        }
        return;
      case 'offer':
      case 'answer': {
        if (!this._roomId) return;
        if (msg.from === SERVER) {
          if (this._relay) this._relay.handleDescription(msg.type, msg.sdp, msg.meta);
          return;
        }
        // A peer going back to P2P before us (its timer ran first): follow if nothing holds us.
        if (this.getMode(msg.from) === 'relay' && msg.type === 'offer' && !this._relayReason(msg.from)) {
          clearTimeout(this._backTimers.get(msg.from));
          this._backTimers.delete(msg.from);
          this._pairToP2P(msg.from, 'room_shrunk');
        }
        const link = this._link(msg.from);
        if (link) link.handleDescription(msg.type, msg.sdp, msg.meta);
        return;
      }
      case 'layers': {
        // Dynacast: the relay says which simulcast layers of a stream nobody receives; they are
        // not encoded or sent until someone wants them again.
        const entry = this._relay && this._relay.senders.get(msg.streamType);
        const paused = Array.isArray(msg.paused) ? msg.paused : [];
        for (const sender of entry ? entry.senders : []) {
          if (!sender.track || sender.track.kind !== 'video') continue;
          const params = sender.getParameters();
          if (!params.encodings || params.encodings.length < 2) continue;
          let changed = false;
          for (const e of params.encodings) {
            const active = !paused.includes(e.rid);
            if (e.rid && e.active !== active) {
              e.active = active;
              changed = true;
            }
          }
          if (changed) sender.setParameters(params).catch((e) => console.warn('ferry: pausing layers failed:', e));
        }
        return;
      }
      case 'candidate': {
        const link = msg.from === SERVER ? this._relay : this._links.get(msg.from);
        if (link) link.handleCandidate(msg.candidate);
        return;
      }
      case 'bye':
        if (msg.from === SERVER) {
          console.warn('ferry: the relay closed our connection:', msg.reason);
          return;
        }
        if (typeof msg.reason === 'string' && msg.reason.startsWith('relay:')) {
          // The direct path to that member failed on its side: this pair goes through the relay.
          if (this.getMode(msg.from) !== 'relay' && this._members.has(msg.from)) {
            this._p2pFailed.set(msg.from, msg.reason.slice('relay:'.length) || 'p2p_failed');
            this._evaluateMode();
          }
          return;
        }
        // The peer tore its side down but stays in the room: start afresh.
        if (this._links.has(msg.from) && this._members.has(msg.from)) {
          this._dropLink(msg.from);
          this._link(msg.from);
        }
        return;
      case 'draining':
        this.dispatchEvent(new CustomEvent('draining', { detail: { deadlineMs: msg.deadlineMs } }));
        return;
      default:
        return;
    }
  }

  _memberJoined(m) {
    if (this._members.has(m.userId)) {
      // A member coming back under its id after its room moved: its connections go on.
      this._returning.delete(m.userId);
      if (m.relayOnly) this._relayOnlyMembers.add(m.userId);
      // Relayed: subscribe again (asked before it was back, the subscription found no member).
      if (this.getMode(m.userId) === 'relay') this._pairs.delete(m.userId);
      this._evaluateMode();
      return;
    }
    this._members.set(m.userId, m.identity);
    if (m.relayOnly) this._relayOnlyMembers.add(m.userId);
    this._presence({ type: 'join', userId: m.userId, identity: m.identity });
    this._evaluateMode();
  }

  _memberLeft(userId, reason) {
    this._dropLink(userId);
    this._members.delete(userId);
    this._relayOnlyMembers.delete(userId);
    this._p2pFailed.delete(userId);
    this._pairs.delete(userId);
    clearTimeout(this._backTimers.get(userId));
    this._backTimers.delete(userId);
    this._dropRelayStreams(userId);
    this._presence({ type: 'leave', userId, reason });
    this._evaluateMode();
    if (this._relay && !this._anyPairRelayed() && !this._backTimers.size) {
      this._closeRelay();
    }
  }

  _rejectPending(err) {
    for (const p of this._pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this._pending.clear();
  }

  _onClose(ws, ev) {
    if (this._ws !== ws) return;
    const final = FINAL_CLOSE_CODES.includes(ev.code) || !this._welcome || this._reconnectTimeoutMs === 0;
    if (!final) {
      this._lost(ws, closeError(ev).message);
      return;
    }
    this._ended(closeError(ev), ev.code, ev.reason);
  }

  // The session is over for good: everything closes, `disconnected` fires.
  _ended(err, code, reason) {
    clearInterval(this._pingTimer);
    clearTimeout(this._returningTimer);
    clearTimeout(this._reconnectTimer);
    this._unwatchNetwork();
    this._rejectPending(err);
    this._closeLinks();
    this._closeRelay();
    this._roomId = undefined;
    this._ws = null;
    this._setState('closed', { code, reason: reason || err.message });
    this.dispatchEvent(new CustomEvent('disconnected', { detail: { code, reason } }));
  }

  // The signaling socket died (closed without a reason to stop, or silent past the ping
  // timeout): the media connections stay as they are, and the SDK reconnects.
  _lost(ws, why) {
    if (this._ws !== ws) return;
    ws.onclose = null;
    try {
      // 4000 tells the server (if this ever reaches it) to hold the session for a resume.
      ws.close(4000, 'reconnecting');
    } catch (_) {
      // already closed
    }
    this._ws = null;
    this._rejectPending(new FerryError('disconnected', 'the connection to the server dropped: ' + why));
    if (this._state === 'reconnecting') return; // a try's socket: that try goes on with backoff
    clearInterval(this._pingTimer);
    this._lostAt = Date.now();
    this._attempt = 0;
    this._setState('reconnecting', { reason: why });
    this._scheduleReconnect(0);
  }

  _scheduleReconnect(delay) {
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._tryReconnect(), delay);
  }

  async _tryReconnect() {
    if (this._state !== 'reconnecting' || this._connecting) return;
    if (Date.now() - this._lostAt > this._reconnectTimeoutMs) {
      this._ended(new FerryError('disconnected', 'could not reconnect to the server'), 1006, 'could not reconnect');
      return;
    }
    this._connecting = true;
    try {
      this._attach(await openSocket(this._url));
      // Within the server's resume_timeout the session is still there: take it over.
      if (this._resumeToken && Date.now() - this._lostAt < this._resumeTimeoutMs) {
        try {
          this._resumed(await this._request('resume', { token: this._resumeToken }));
          return;
        } catch (e) {
          if (e.code !== 'resume_failed') throw e;
        }
      }
      await this._rejoin();
    } catch (e) {
      if (this._state !== 'reconnecting') return;
      if (this._ws) this._lost(this._ws, e.message);
      this._attempt++;
      const wait = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** this._attempt);
      this._scheduleReconnect(wait * (0.5 + Math.random()));
    } finally {
      this._connecting = false;
    }
  }

  // The session was resumed: the same member of the same room. What changed meanwhile is
  // caught up, then the media connections are repaired: an ICE restart on every direct one (the
  // network may have changed under them) and a fresh connection to the relay (its
  // subscriptions are kept by the server).
  _resumed(res) {
    this._welcomed(res);
    this._state = 'connected';
    const room = res.room;
    if (this._roomId && (!room || room.roomId !== this._roomId)) {
      for (const userId of [...this._members.keys()]) this._memberLeft(userId, 'left');
      this._roomId = undefined;
    } else if (room) {
      const now = new Map(room.members.map((m) => [m.userId, m]));
      for (const userId of [...this._members.keys()]) if (!now.has(userId)) this._memberLeft(userId, 'left');
      for (const m of room.members) if (!this._members.has(m.userId)) this._memberJoined(m);
    }
    for (const link of this._links.values()) link._restartIce();
    if (this._relay) this._resetRelay();
    this.dispatchEvent(new CustomEvent('connection', { detail: { state: 'resumed' } }));
  }

  // The session is gone (the server restarted, or the resume timeout passed): a new session,
  // in the same room if it still exists or may be made again (dev mode, or a token that may
  // create it), with everything published again.
  async _rejoin() {
    const previousUserId = this._userId;
    const welcome = await this._request('hello', this._hello(this._resumeToken));
    const roomId = this._roomId;
    const mode = this._roomMode;
    if (roomId && welcome.userId === previousUserId) {
      await this._rejoinAsBefore(welcome, roomId, mode);
      return;
    }
    for (const userId of [...this._members.keys()]) this._memberLeft(userId, 'disconnected');
    this._closeLinks();
    this._closeRelay();
    this._roomId = undefined;
    this._welcomed(welcome);
    let joined = null;
    if (roomId) {
      joined = await this._joinOrMake(roomId, mode);
      for (const userId of joined.members) this._presence({ type: 'join', userId, identity: this._members.get(userId) });
    }
    this._setState('connected', { resumed: false, rejoined: !!joined });
  }

  // The room, joined again (made again if it is gone and this client may make it).
  async _joinOrMake(roomId, mode) {
    try {
      return await this.joinRoom(roomId);
    } catch (e) {
      if (e.code !== 'room_not_found') throw e;
      try {
        await this.createRoom({ roomId, mode });
      } catch (c) {
        if (c.code !== 'room_exists') throw c;
      }
      return this.joinRoom(roomId);
    }
  }

  // A new session with this member's old user id (a cluster: its room moved to another node):
  // the direct connections with the other members go on untouched, only the relay connection
  // starts afresh (it was to the old node). Members not back in the room yet get a while to
  // rejoin too; those that do not are then gone.
  async _rejoinAsBefore(welcome, roomId, mode) {
    this._roomId = undefined; // no `bye` for the old relay connection: it was another node's
    this._closeRelay();
    this._welcomed(welcome);
    const before = new Set(this._members.keys());
    const joined = await this._joinOrMake(roomId, mode);
    const missing = new Set([...before].filter((u) => !joined.members.includes(u)));
    for (const userId of joined.members) {
      if (!before.has(userId)) this._presence({ type: 'join', userId, identity: this._members.get(userId) });
    }
    this._returning = missing;
    clearTimeout(this._returningTimer);
    this._returningTimer = setTimeout(() => {
      for (const userId of this._returning) if (this._members.has(userId)) this._memberLeft(userId, 'left');
      this._returning = new Set();
    }, REJOIN_GRACE_MS);
    this._setState('connected', { resumed: false, rejoined: true, sameUserId: true });
  }
}

// A WebSocket to the server's /ws, once open (rejects if it closes first or does not open within
// CONNECT_TIMEOUT_MS).
function openSocket(url) {
  const ws = new WebSocket(wsUrl(url));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.onclose = null;
      ws.close();
      reject(new FerryError('timeout', 'the server did not answer within ' + CONNECT_TIMEOUT_MS + ' ms'));
    }, CONNECT_TIMEOUT_MS);
    ws.onopen = () => {
      clearTimeout(timer);
      resolve(ws);
    };
    ws.onclose = (ev) => {
      clearTimeout(timer);
      reject(closeError(ev));
    };
  });
}

// Put `codec` (e.g. 'VP9') first in the transceiver's codec list; the rest keep their order.
function preferCodec(transceiver, codec) {
  if (!transceiver.setCodecPreferences || !globalThis.RTCRtpReceiver || !RTCRtpReceiver.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities('video');
  if (!caps) return;
  const want = 'video/' + codec.toLowerCase();
  const first = caps.codecs.filter((c) => c.mimeType.toLowerCase() === want);
  if (!first.length) {
    console.warn('ferry: this browser cannot send', codec);
    return;
  }
  transceiver.setCodecPreferences(first.concat(caps.codecs.filter((c) => c.mimeType.toLowerCase() !== want)));
}

const CLOSE_CODES = {
  1001: 'going_away',
  1009: 'message_too_large',
  1013: 'try_again_later',
  4001: 'unauthorized',
  4002: 'hello_timeout',
  4003: 'ping_timeout',
  4004: 'slow_consumer',
};

function closeError(ev) {
  const code = CLOSE_CODES[ev.code] || 'disconnected';
  return new FerryError(code, ev.reason || `connection closed (${ev.code})`);
}

if (typeof window !== 'undefined') window.Ferry = Ferry;
export default Ferry;
