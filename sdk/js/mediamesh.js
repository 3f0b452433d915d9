// mediamesh browser SDK: one ES module, no build step, no dependencies.
//
// Served by every node at `GET /sdk/mediamesh.js`. Two ways to reach a node:
// - `connect()`: a session over the WebSocket signal channel (`/signal`, see
//   proto/proto/signal.proto): join a room, publish, watch, pick tracks and layers, mute, and
//   come back after a dropped connection (resume).
// - `whipPublish()` / `whepPlay()`: plain WHIP / WHEP over HTTP, one peer connection each.
//
// Both report the same statistics (frames, bytes, loss, largest gap between decoded frames).
//
//   import { connect } from '/sdk/mediamesh.js';
//   const client = await connect(location.origin, token, { room: 'demo', role: 'both' });
//   await client.publish(await navigator.mediaDevices.getUserMedia({ video: true, audio: true }));
//   const sub = await client.subscribe();
//   videoElement.srcObject = sub.stream;

/** The SDK version. */
export const VERSION = '0.1.0';

/**
 * Error codes the node sends (`error.code` in signal.proto), plus the SDK's own:
 * `timeout` (no reply in time), `disconnected` (the socket went away before the reply),
 * `closed` (the client was closed), `bad_state` (the call does not fit the client's state),
 * `protocol` (the node sent something the SDK cannot read), `http` (WHIP/WHEP refused),
 * `ice` (the peer connection did not connect).
 */
export class MediameshError extends Error {
  /**
   * @param {string} code machine-readable code, e.g. `not_joined`
   * @param {string} message human-readable text
   * @param {{fatal?: boolean, id?: number, status?: number}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(`${code}: ${message}`);
    this.name = 'MediameshError';
    /** @type {string} */
    this.code = code;
    /** @type {string} the node's message without the code */
    this.detail = message;
    /** @type {boolean} true when the node ends the session after this error */
    this.fatal = !!extra.fatal;
    /** @type {number} the id of the request this error answers (0: none) */
    this.id = extra.id || 0;
    /** @type {number|null} HTTP status (WHIP/WHEP only) */
    this.status = extra.status ?? null;
  }
}

// ------------------------------------------------------------------------------------------------
// small helpers
// ------------------------------------------------------------------------------------------------
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => (typeof performance !== 'undefined' ? performance.now() : Date.now());

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {});  // a deferred nobody awaits must not raise "unhandled rejection"
  return { promise, resolve, reject };
}

function withTimeout(promise, ms, code, message) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new MediameshError(code, message)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

function baseUrl() {
  return typeof location !== 'undefined' ? location.href : undefined;
}

/**
 * The WebSocket signal URL of a node: `http(s)://host:port[/path]` → `ws(s)://host:port[/path]/signal`
 * (a URL that already ends in `/signal` keeps its path), with `?access_token=` when a token is given.
 * @param {string} nodeUrl http, https, ws or wss URL of a node (relative URLs resolve against the page)
 * @param {string} [token] access token (JWT)
 * @returns {string}
 */
export function signalUrl(nodeUrl, token) {
  const url = new URL(nodeUrl, baseUrl());
  if (url.protocol === 'http:') url.protocol = 'ws:';
  else if (url.protocol === 'https:') url.protocol = 'wss:';
  else if (url.protocol !== 'ws:' && url.protocol !== 'wss:') {
    throw new MediameshError('bad_state', `not an http(s) or ws(s) URL: ${nodeUrl}`);
  }
  if (!/\/signal\/?$/.test(url.pathname)) {
    url.pathname = url.pathname.replace(/\/*$/, '') + '/signal';
  }
  url.hash = '';
  if (token) url.searchParams.set('access_token', token);
  return url.href;
}

/**
 * Removes every ICE candidate except 127.0.0.1 host candidates from an SDP (for test machines
 * where the browser's other interfaces cannot reach the node).
 * @param {string} sdp
 * @returns {string}
 */
export function loopbackOnlySdp(sdp) {
  return sdp.split('\r\n').filter((line) => {
    if (!line.startsWith('a=candidate:')) return true;
    return line.split(' ')[4] === '127.0.0.1';
  }).join('\r\n');
}

function waitGathering(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== 'complete') return;
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', done);
      resolve();
    };
    const timer = setTimeout(() => { pc.removeEventListener('icegatheringstatechange', done); resolve(); }, ms);
    pc.addEventListener('icegatheringstatechange', done);
  });
}

function waitConnected(pc, ms) {
  return new Promise((resolve, reject) => {
    let timer;
    const check = () => {
      if (pc.connectionState === 'connected') { finish(); resolve(); }
      else if (pc.connectionState === 'failed' || pc.connectionState === 'closed') {
        finish();
        reject(new MediameshError('ice', `peer connection ${pc.connectionState}`));
      }
    };
    const finish = () => { clearTimeout(timer); pc.removeEventListener('connectionstatechange', check); };
    timer = setTimeout(() => {
      finish();
      reject(new MediameshError('ice', `not connected after ${ms} ms ` +
        `(connection ${pc.connectionState}, ice ${pc.iceConnectionState})`));
    }, ms);
    pc.addEventListener('connectionstatechange', check);
    check();
  });
}

function preferCodec(transceiver, kind, mime) {
  if (!mime || !transceiver.setCodecPreferences || !RTCRtpSender.getCapabilities) return;
  const codecs = (RTCRtpSender.getCapabilities(kind) || {}).codecs || [];
  const first = codecs.filter((c) => c.mimeType.toLowerCase() === mime.toLowerCase());
  if (!first.length) throw new MediameshError('bad_state', `this browser cannot send ${mime}`);
  const rest = codecs.filter((c) => c.mimeType.toLowerCase() !== mime.toLowerCase());
  transceiver.setCodecPreferences(first.concat(rest));
}

function rtcConfig(iceServers) {
  return {
    iceServers: (iceServers || []).map((s) => {
      const out = { urls: s.urls };
      if (s.username) out.username = s.username;
      if (s.credential) out.credential = s.credential;
      return out;
    }),
    bundlePolicy: 'max-bundle',
  };
}

/** Creates the offer, waits for ICE gathering (non-trickle) and returns the SDP to send. */
async function localOffer(pc, { loopbackOnly = false, gatherTimeoutMs = 3000 } = {}) {
  await pc.setLocalDescription(await pc.createOffer());
  await waitGathering(pc, gatherTimeoutMs);
  const sdp = pc.localDescription.sdp;
  return loopbackOnly ? loopbackOnlySdp(sdp) : sdp;
}

/** Applies an RFC 8840 SDP fragment of remote candidates (a=mid, a=candidate, a=end-of-candidates). */
async function applyTrickle(pc, fragment) {
  let mid = null;
  for (const raw of fragment.split(/\r?\n/)) {
    const line = raw.trim();
    if (line.startsWith('a=mid:')) mid = line.slice(6);
    else if (line.startsWith('a=candidate:')) {
      await pc.addIceCandidate({ candidate: line.slice(2), sdpMid: mid ?? '0' });
    } else if (line === 'a=end-of-candidates') {
      await pc.addIceCandidate({ candidate: '', sdpMid: mid ?? '0' }).catch(() => {});
    }
  }
}

function addSendTracks(pc, stream, { simulcast = false, codec = null, audioCodec = null } = {}) {
  const video = stream.getVideoTracks()[0];
  if (video) {
    const init = { direction: 'sendonly', streams: [stream] };
    if (simulcast) {
      init.sendEncodings = [
        { rid: 'q', scaleResolutionDownBy: 4 },
        { rid: 'h', scaleResolutionDownBy: 2 },
        { rid: 'f' },
      ];
    }
    preferCodec(pc.addTransceiver(video, init), 'video', codec || 'video/VP8');
  }
  for (const audio of stream.getAudioTracks()) {
    preferCodec(pc.addTransceiver(audio, { direction: 'sendonly', streams: [stream] }), 'audio', audioCodec);
  }
}

// ------------------------------------------------------------------------------------------------
// statistics
// ------------------------------------------------------------------------------------------------
// Counters that add up over a viewer's connections, by kind.
const PACKET_COUNTERS = ['bytesReceived', 'packetsReceived', 'packetsLost'];
const COUNTERS = {
  video: ['framesDecoded', 'framesReceived', 'framesDropped', 'keyFramesDecoded', ...PACKET_COUNTERS],
  audio: ['totalSamplesReceived', ...PACKET_COUNTERS],
};

function emptyInbound(kind) {
  return Object.fromEntries(COUNTERS[kind].map((k) => [k, 0]));
}

async function readInbound(pc) {
  const out = { video: null, audio: null };
  if (!pc || pc.signalingState === 'closed') return out;
  const report = await pc.getStats();
  report.forEach((r) => {
    if (r.type !== 'inbound-rtp' || (r.kind !== 'video' && r.kind !== 'audio')) return;
    const codec = r.codecId && report.get(r.codecId);
    const prev = out[r.kind];
    // several inbound streams of one kind (renegotiation): keep the busiest
    if (prev && (prev.bytesReceived || 0) > (r.bytesReceived || 0)) return;
    out[r.kind] = {
      mimeType: codec ? codec.mimeType : null,
      framesDecoded: r.framesDecoded ?? 0, framesReceived: r.framesReceived ?? 0,
      framesDropped: r.framesDropped ?? 0, keyFramesDecoded: r.keyFramesDecoded ?? 0,
      bytesReceived: r.bytesReceived ?? 0, packetsReceived: r.packetsReceived ?? 0,
      packetsLost: Math.max(0, r.packetsLost ?? 0), totalSamplesReceived: r.totalSamplesReceived ?? 0,
      frameWidth: r.frameWidth ?? null, frameHeight: r.frameHeight ?? null,
      framesPerSecond: r.framesPerSecond ?? null,
      jitterMs: r.jitter != null ? r.jitter * 1000 : null,
      audioLevel: r.audioLevel ?? null,
    };
  });
  return out;
}

/**
 * Outbound statistics of a peer connection that sends media.
 * @param {RTCPeerConnection} pc
 * @returns {Promise<OutboundStats>}
 */
export async function outboundStats(pc) {
  const out = { connectionState: pc ? pc.connectionState : 'closed', video: null, audio: null };
  if (!pc || pc.signalingState === 'closed') return out;
  const report = await pc.getStats();
  report.forEach((r) => {
    if (r.type !== 'outbound-rtp' || (r.kind !== 'video' && r.kind !== 'audio')) return;
    const codec = r.codecId && report.get(r.codecId);
    const o = out[r.kind] || (out[r.kind] = r.kind === 'video' ? {
      mimeType: null, bytesSent: 0, packetsSent: 0, framesEncoded: 0, framesSent: 0,
      frameWidth: null, frameHeight: null, framesPerSecond: null, layers: [],
    } : { mimeType: null, bytesSent: 0, packetsSent: 0 });
    o.mimeType = o.mimeType || (codec ? codec.mimeType : null);
    o.bytesSent += r.bytesSent ?? 0;
    o.packetsSent += r.packetsSent ?? 0;
    if (r.kind !== 'video') return;
    o.framesEncoded += r.framesEncoded ?? 0;
    o.framesSent += r.framesSent ?? 0;
    if ((r.frameWidth ?? 0) > (o.frameWidth ?? 0)) {
      o.frameWidth = r.frameWidth; o.frameHeight = r.frameHeight ?? null; o.framesPerSecond = r.framesPerSecond ?? null;
    }
    o.layers.push({
      rid: r.rid ?? null, active: r.active ?? null, frameWidth: r.frameWidth ?? null,
      frameHeight: r.frameHeight ?? null, framesEncoded: r.framesEncoded ?? 0, bytesSent: r.bytesSent ?? 0,
      qualityLimitationReason: r.qualityLimitationReason ?? null,
    });
  });
  if (out.video) out.video.layers.sort((a, b) => (a.rid || '').localeCompare(b.rid || ''));
  return out;
}

/**
 * Inbound statistics of a viewer that outlive its peer connections: counters add up over every
 * connection it had (a reconnect makes a new one), and the largest gap between decoded video
 * frames is measured by sampling `getStats()` (so it is accurate to about `intervalMs`; muting
 * and reconnects count as gaps).
 */
class InboundMonitor {
  constructor(intervalMs = 250) {
    this.pc = null;
    this.base = { video: emptyInbound('video'), audio: emptyInbound('audio') };
    this.lastFrames = 0;          // framesDecoded of this.pc at the last sample
    this.lastFrameAt = null;      // time of the last sample that saw a new frame
    this.largestGapMs = 0;
    this.firstFrameAt = null;
    this.startedAt = now();
    this.timer = setInterval(() => this.sample().catch(() => {}), intervalMs);
  }

  async sample() {
    const pc = this.pc;
    if (!pc) return null;
    const stats = await readInbound(pc);
    if (pc !== this.pc) return stats;
    const frames = stats.video ? stats.video.framesDecoded : 0;
    if (frames > this.lastFrames) {
      const t = now();
      if (this.lastFrameAt !== null) this.largestGapMs = Math.max(this.largestGapMs, t - this.lastFrameAt);
      else this.firstFrameAt = t;
      this.lastFrameAt = t;
    }
    this.lastFrames = frames;
    return stats;
  }

  /** Follows a new peer connection; the old one's counters are added to the totals. */
  async attach(pc) {
    const old = this.pc;
    if (old === pc) return;
    if (old) await this.retire();
    this.pc = pc;
    this.lastFrames = 0;
  }

  /** Adds the current connection's counters to the totals and stops following it. */
  async retire() {
    const old = this.pc;
    if (!old) return;
    let last = null;
    try { last = await readInbound(old); } catch { /* closed already */ }
    if (this.pc !== old) return;
    this.pc = null;
    this.lastFrames = 0;
    for (const kind of ['video', 'audio']) {
      if (!last || !last[kind]) continue;
      for (const k of COUNTERS[kind]) this.base[kind][k] += last[kind][k] || 0;
    }
  }

  async stats() {
    const current = this.pc ? await this.sample() : { video: null, audio: null };
    const t = now();
    const out = { connectionState: this.pc ? this.pc.connectionState : 'closed' };
    for (const kind of ['video', 'audio']) {
      const cur = (current && current[kind]) || {};
      const s = { mimeType: cur.mimeType ?? null, jitterMs: cur.jitterMs ?? null };
      for (const k of COUNTERS[kind]) s[k] = this.base[kind][k] + (cur[k] || 0);
      const expected = s.packetsReceived + s.packetsLost;
      s.loss = expected > 0 ? s.packetsLost / expected : 0;
      if (kind === 'audio') s.audioLevel = cur.audioLevel ?? null;
      if (kind === 'video') {
        Object.assign(s, {
          frameWidth: cur.frameWidth ?? null, frameHeight: cur.frameHeight ?? null,
          framesPerSecond: cur.framesPerSecond ?? null,
        });
        const sinceLast = this.lastFrameAt !== null ? t - this.lastFrameAt : null;
        s.largestFrameGapMs = Math.round(this.largestGapMs);
        s.lastFrameAgoMs = sinceLast !== null ? Math.round(sinceLast) : null;
        s.firstFrameMs = this.firstFrameAt !== null ? Math.round(this.firstFrameAt - this.startedAt) : null;
      }
      out[kind] = s;
    }
    return out;
  }

  stop() {
    clearInterval(this.timer);
  }
}

// ------------------------------------------------------------------------------------------------
// event emitter
// ------------------------------------------------------------------------------------------------
/** A minimal event emitter: `on(name, fn)` (returns an unsubscribe function), `off`, `once`. */
export class Emitter {
  constructor() { this._handlers = new Map(); }

  /**
   * @param {string} name event name
   * @param {(data: any) => void} fn
   * @returns {() => void} call to unsubscribe
   */
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, new Set());
    this._handlers.get(name).add(fn);
    return () => this.off(name, fn);
  }

  /** @param {string} name @param {(data: any) => void} fn */
  off(name, fn) {
    const set = this._handlers.get(name);
    if (set) set.delete(fn);
  }

  /**
   * Resolves with the next event of that name.
   * @param {string} name
   * @returns {Promise<any>}
   */
  once(name) {
    return new Promise((resolve) => {
      const off = this.on(name, (data) => { off(); resolve(data); });
    });
  }

  /** @param {string} name @param {any} [data] */
  emit(name, data) {
    for (const fn of [...(this._handlers.get(name) || [])]) {
      try { fn(data); } catch (e) { console.error(`[mediamesh] "${name}" handler failed:`, e); }
    }
    if (name !== '*') {
      for (const fn of [...(this._handlers.get('*') || [])]) {
        try { fn({ event: name, data }); } catch (e) { console.error('[mediamesh] "*" handler failed:', e); }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// the signal session
// ------------------------------------------------------------------------------------------------
// The node will not take these back by retrying.
const FINAL_CODES = new Set(['unauthorized', 'forbidden', 'bad_request']);
const REPLY_OF = { join: 'joined', offer: 'answer', ping: 'pong' };

/**
 * @typedef {object} ConnectOptions
 * @property {string} room room name (1 to 64 characters of A-Z a-z 0-9 _ . -)
 * @property {'publisher'|'subscriber'|'both'} [role='both'] what the session may do; the token must grant it
 * @property {string} [displayName] shown to other participants
 * @property {string} [region] "seoul", "busan" or empty
 * @property {boolean} [loopbackOnly=false] send only 127.0.0.1 host candidates (test machines)
 * @property {boolean} [tokenInJoin=false] send the token in `join.token` instead of `?access_token=`
 * @property {number} [reportPositionMs=0] send the playback position this often (0: never)
 * @property {() => number} [position] the playback position in ms (default: time watched, carried over resumes)
 * @property {boolean} [reconnect=true] reconnect and resume after a dropped socket
 * @property {number} [reconnectForMs=30000] give up reconnecting after this long
 * @property {number} [requestTimeoutMs=10000] a request without reply after this long fails with `timeout`
 * @property {number} [connectTimeoutMs=15000] socket open + join, and peer connection setup
 * @property {number} [iceGatherTimeoutMs=3000] the longest wait for ICE gathering before an offer
 * @property {number} [pingIntervalMs=10000] keepalive period (never more than a third of the node's idle timeout)
 * @property {number} [statsIntervalMs=250] sampling period of the frame-gap measurement
 */

/**
 * @typedef {object} TrackInfo a track in the room (signal.proto `Track`)
 * @property {string} id "<publisher session>/<track id>"
 * @property {'audio'|'video'} kind
 * @property {string} codec MIME type, e.g. "video/VP8"
 * @property {string[]} layers simulcast layer names, lowest first
 * @property {boolean} muted
 * @property {string} publisher the publishing session
 */

/**
 * @typedef {object} InboundKindStats
 * @property {number} framesDecoded
 * @property {number} bytesReceived
 * @property {number} packetsReceived
 * @property {number} packetsLost
 * @property {number} loss packetsLost / (packetsReceived + packetsLost)
 * @property {number} [largestFrameGapMs] video: the longest time without a new decoded frame
 * @property {number|null} frameWidth
 * @property {number|null} frameHeight
 * @property {string|null} mimeType
 */

/**
 * @typedef {object} InboundStats
 * @property {string} connectionState
 * @property {InboundKindStats} video
 * @property {InboundKindStats} audio
 */

/**
 * @typedef {object} OutboundStats
 * @property {string} connectionState
 * @property {?{framesEncoded: number, framesSent: number, bytesSent: number, packetsSent: number,
 *   frameWidth: ?number, frameHeight: ?number, mimeType: ?string, layers: object[]}} video
 * @property {?{bytesSent: number, packetsSent: number, mimeType: ?string}} audio
 */

/**
 * Connects to a node over the WebSocket signal channel and joins a room.
 * @param {string} nodeUrl the node's http(s) URL, e.g. `https://node-1.example:8080`
 * @param {string} token access token (JWT) granting the role's rights in the room
 * @param {ConnectOptions} options
 * @returns {Promise<Client>} once `joined` arrived
 */
export async function connect(nodeUrl, token, options) {
  const client = new Client(nodeUrl, token, options);
  await client._start();
  return client;
}

/**
 * A session with a node (create it with `connect()`).
 *
 * Events (`client.on(name, fn)`): `track_published` (TrackInfo), `track_unpublished`
 * ({track_id, track}), `track_muted` ({track_id, muted, track}), `moved` ({url}),
 * `error` (MediameshError, for errors the node sends without a request id),
 * `reconnecting` ({attempt, delayMs, reason}), `reconnected` ({resumed, session, positionMs,
 * subscriptions, layer}), `stream` (MediaStream: the subscription's tracks changed),
 * `closed` ({reason, error}), `message` (every raw server message), `*` ({event, data}).
 */
export class Client extends Emitter {
  /**
   * @param {string} nodeUrl
   * @param {string} token
   * @param {ConnectOptions} options
   */
  constructor(nodeUrl, token, options) {
    super();
    if (!options || !options.room) throw new MediameshError('bad_state', 'options.room is required');
    this.options = {
      role: 'both', displayName: '', region: '', loopbackOnly: false, tokenInJoin: false,
      reportPositionMs: 0, reconnect: true, reconnectForMs: 30000, requestTimeoutMs: 10000,
      connectTimeoutMs: 15000, iceGatherTimeoutMs: 3000, pingIntervalMs: 10000, statsIntervalMs: 250,
      ...options,
    };
    this._url = nodeUrl;
    this._token = token;
    /** @type {Map<string, TrackInfo>} the room's tracks now, by id */
    this.tracks = new Map();
    /** @type {string|null} the session id */
    this.session = null;
    /** @type {string|null} the node serving the session */
    this.node = null;
    /** @type {object|null} the last `joined` message */
    this.joined = null;
    /** @type {number|null} round-trip time of the last ping, ms */
    this.rttMs = null;
    /** @type {number} reconnects that got a session back (resumed or new) */
    this.reconnects = 0;
    /** @type {number} reconnects that resumed the same session */
    this.resumes = 0;
    /** @type {'connecting'|'joined'|'reconnecting'|'closed'} */
    this.state = 'connecting';
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();
    this._resumeToken = '';
    this._publication = null;
    this._subscription = null;
    this._layer = null;
    this._subscribed = null;     // explicit track ids, or null for the room's default tracks
    this._muted = { audio: false, video: false };
    this._pauseSending = { audio: true, video: true };
    this._timers = [];
    this._ready = deferred();    // resolves while joined; replaced while reconnecting
    this._lastFatal = null;
    this._lastReceived = now();
    this._pingSentAt = null;     // the oldest ping not answered yet
  }

  // ---- public API -------------------------------------------------------------------------------

  /**
   * Publishes a stream's video (first video track) and audio tracks: one peer connection to
   * the node (target "publisher"). One publication per session: the node negotiates each
   * target once, so publishing again after `Publication.close()` needs a new client.
   * @param {MediaStream} stream
   * @param {{codec?: string, audioCodec?: string, simulcast?: boolean}} [options]
   *   codec: preferred video MIME type (default "video/VP8"); simulcast: three layers q/h/f
   * @returns {Promise<Publication>} once the peer connection is connected
   */
  async publish(stream, options = {}) {
    this._requireRole('publisher');
    if (this._publication) throw new MediameshError('bad_state', 'this client publishes already');
    const publication = new Publication(this, stream, options);
    this._publication = publication;
    try {
      await publication._negotiate();
      if (this._muted.video || this._muted.audio) await publication._applyLocalMute();
    } catch (e) {
      this._publication = null;
      publication._stop();
      throw e;
    }
    return publication;
  }

  /**
   * Receives the room's media: one peer connection from the node (target "subscriber") with one
   * video and one audio track. Without `trackIds` the node sends the room's default tracks (the
   * oldest publisher's).
   * @param {{layer?: 'low'|'mid'|'high', trackIds?: string[]}} [options]
   * @returns {Promise<Subscription>} once the peer connection is connected; `.stream` plays it
   */
  async subscribe(options = {}) {
    this._requireRole('subscriber');
    if (this._subscription) throw new MediameshError('bad_state', 'this client subscribes already');
    const subscription = new Subscription(this);
    this._subscription = subscription;
    try {
      await subscription._negotiate();
      if (options.trackIds) await this.subscribeTracks(options.trackIds);
      if (options.layer) await this.setLayer(options.layer);
    } catch (e) {
      this._subscription = null;
      subscription._stop();
      throw e;
    }
    return subscription;
  }

  /**
   * Chooses the tracks the subscription receives (ids from `tracks` / `track_published`).
   * @param {string[]} trackIds
   * @returns {Promise<void>} once the node acknowledged
   */
  async subscribeTracks(trackIds) {
    await this.request('subscribe', { track_ids: trackIds });
    this._subscribed = [...trackIds];
  }

  /**
   * Stops receiving these tracks.
   * @param {string[]} trackIds
   * @returns {Promise<void>}
   */
  async unsubscribeTracks(trackIds) {
    await this.request('unsubscribe', { track_ids: trackIds });
    if (this._subscribed) this._subscribed = this._subscribed.filter((id) => !trackIds.includes(id));
  }

  /**
   * Picks the simulcast layer the subscription receives.
   * @param {'low'|'mid'|'high'} layer
   * @returns {Promise<void>}
   */
  async setLayer(layer) {
    await this.request('set_layer', { layer });
    this._layer = layer;
  }

  /**
   * Mutes or unmutes all of this client's published tracks of a kind: the node is told (viewers
   * get `track_muted`) and, unless `pauseSending` is false, the browser stops sending that kind.
   * @param {'audio'|'video'} kind
   * @param {boolean} muted
   * @param {{pauseSending?: boolean}} [options]
   * @returns {Promise<void>}
   */
  async mute(kind, muted, { pauseSending = true } = {}) {
    if (kind !== 'audio' && kind !== 'video') throw new MediameshError('bad_state', `kind must be audio or video, not ${kind}`);
    this._muted[kind] = !!muted;
    this._pauseSending[kind] = pauseSending !== false;
    if (muted && pauseSending && this._publication) await this._publication._applyLocalMute();
    await this.request('mute', { kind, muted: !!muted });
    if (!muted && this._publication) await this._publication._applyLocalMute();
  }

  /**
   * Reports the playback position (kept by the node for resume). Sent automatically every
   * `reportPositionMs` when that option is set.
   * @param {number} [positionMs] default: `client.position`
   * @returns {Promise<void>}
   */
  async reportPosition(positionMs) {
    const ms = Math.max(0, Math.round(positionMs ?? this.position));
    await this.request('position', { position_ms: ms });
  }

  /**
   * The playback position in ms: `options.position()` if given, else the time watched (carried
   * over a resume from `joined.position_ms`).
   * @type {number}
   */
  get position() {
    if (this.options.position) return this.options.position();
    const s = this._subscription;
    return s ? s._positionMs() : 0;
  }

  /**
   * Statistics of the client: its publisher and subscriber connections (null when absent).
   * @returns {Promise<{session: ?string, node: ?string, state: string, rttMs: ?number,
   *   reconnects: number, resumes: number, publisher: ?OutboundStats, subscriber: ?InboundStats}>}
   */
  async stats() {
    return {
      session: this.session, node: this.node, state: this.state, rttMs: this.rttMs,
      reconnects: this.reconnects, resumes: this.resumes,
      publisher: this._publication ? await this._publication.stats() : null,
      subscriber: this._subscription ? await this._subscription.stats() : null,
    };
  }

  /**
   * Sends one signal message and resolves with the reply's body (`joined`, `answer`, `pong` or
   * `ack`); rejects with a MediameshError when the node answers with `error`. Low level: the
   * methods above keep the client's state, this does not.
   * @param {string} type the message's key, e.g. "set_layer"
   * @param {object} body
   * @returns {Promise<object>}
   */
  async request(type, body) {
    await this._whenJoined();
    return this._request(type, body);
  }

  /**
   * Leaves the room: sends `leave`, closes the peer connections and the socket.
   * @returns {Promise<void>}
   */
  async close() {
    if (this.state === 'closed') return;
    const ws = this._ws;
    this._shutdown('closed by the application');
    if (ws && ws.readyState === WebSocket.OPEN) {
      const closed = new Promise((resolve) => ws.addEventListener('close', resolve));
      try { ws.send(JSON.stringify({ leave: {} })); } catch { /* closing anyway */ }
      await Promise.race([closed, sleep(1000)]);
      try { ws.close(1000, 'leave'); } catch { /* closed */ }
    }
  }

  /**
   * For tests: drops the socket as a network failure would (no `leave`), so the client
   * reconnects and resumes.
   */
  simulateDisconnect() {
    if (this._ws) this._dropSocket(this._ws, 'simulated disconnect');
  }

  // ---- internals ------------------------------------------------------------------------------

  _requireRole(what) {
    const role = this.options.role;
    if (role !== what && role !== 'both') {
      throw new MediameshError('bad_state', `role ${role} cannot ${what === 'publisher' ? 'publish' : 'subscribe'}`);
    }
  }

  async _whenJoined() {
    if (this.state === 'closed') throw new MediameshError('closed', 'the client is closed');
    if (this.state !== 'joined') await this._ready.promise;
  }

  async _start() {
    try {
      const joined = await withTimeout(this._openAndJoin(false), this.options.connectTimeoutMs,
        'timeout', `no joined within ${this.options.connectTimeoutMs} ms`);
      this._onJoined(joined);
    } catch (e) {
      this._shutdown(e.message, e, false);
      throw e;
    }
    const ping = Math.min(this.options.pingIntervalMs, Math.max(1000, (this.joined.idle_timeout_ms || 30000) / 3));
    this._timers.push(setInterval(() => this._keepalive(ping), ping));
    if (this.options.reportPositionMs > 0) {
      this._timers.push(setInterval(() => {
        if (this.state === 'joined' && this._subscription) this.reportPosition().catch(() => {});
      }, this.options.reportPositionMs));
    }
  }

  _onJoined(joined) {
    this.joined = joined;
    this.session = joined.session || null;
    this.node = joined.node || null;
    this._resumeToken = joined.resume_token || this._resumeToken;
    const before = this.tracks;
    this.tracks = new Map((joined.tracks || []).map((t) => [t.id, t]));
    if (before.size) {  // after a reconnect: tell what changed meanwhile
      for (const [id, t] of before) if (!this.tracks.has(id)) this.emit('track_unpublished', { track_id: id, track: t });
      for (const [id, t] of this.tracks) if (!before.has(id)) this.emit('track_published', t);
    }
    this.state = 'joined';
    this._ready.resolve();
  }

  /** Opens a socket and sends `join` (with the resume token when resuming). */
  _openAndJoin(resume) {
    return new Promise((resolve, reject) => {
      const o = this.options;
      let ws;
      try {
        ws = new WebSocket(signalUrl(this._url, o.tokenInJoin ? '' : this._token));
      } catch (e) {
        reject(e instanceof MediameshError ? e : new MediameshError('disconnected', String(e.message || e)));
        return;
      }
      this._ws = ws;
      this._lastFatal = null;
      this._pingSentAt = null;
      let settled = false;
      const fail = (e) => { if (!settled) { settled = true; reject(e); } };
      ws.addEventListener('open', () => {
        const join = { room: o.room, role: o.role };
        if (o.displayName) join.display_name = o.displayName;
        if (o.region) join.region = o.region;
        if (o.tokenInJoin) join.token = this._token;
        if (resume && this._resumeToken) join.resume_token = this._resumeToken;
        this._request('join', join, ws).then((joined) => {
          if (!settled) { settled = true; resolve(joined); }
        }, fail);
      });
      ws.addEventListener('message', (ev) => { if (this._ws === ws) this._onMessage(ev.data); });
      ws.addEventListener('close', (ev) => {
        const err = this._lastFatal || new MediameshError('disconnected',
          `socket closed (${ev.code}${ev.reason ? ' ' + ev.reason : ''}) before joined`);
        fail(err);
        if (this._ws === ws) this._onSocketGone(ws, `socket closed (${ev.code}${ev.reason ? ' ' + ev.reason : ''})`);
      });
    });
  }

  _send(ws, message) {
    if (!ws || ws.readyState !== WebSocket.OPEN) throw new MediameshError('disconnected', 'the socket is not open');
    ws.send(JSON.stringify(message));
  }

  _request(type, body, ws = this._ws) {
    const id = this._nextId++;
    const expect = REPLY_OF[type] || 'ack';
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new MediameshError('timeout', `no reply to ${type} within ${this.options.requestTimeoutMs} ms`));
      }, this.options.requestTimeoutMs);
      this._pending.set(id, { type, expect, ws, resolve, reject, timer });
      try {
        this._send(ws, { id, [type]: body });
      } catch (e) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(e);
      }
    });
  }

  _onMessage(text) {
    this._lastReceived = now();
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.emit('error', new MediameshError('protocol', `not JSON: ${String(text).slice(0, 80)}`));
      return;
    }
    const keys = Object.keys(msg || {}).filter((k) => k !== 'id');
    if (keys.length !== 1) {
      this.emit('error', new MediameshError('protocol', `not one message type: ${String(text).slice(0, 80)}`));
      return;
    }
    const type = keys[0];
    const body = msg[type] || {};
    const id = msg.id || 0;
    this.emit('message', msg);
    if (type === 'error' && body.fatal) {
      this._lastFatal = new MediameshError(body.code || 'internal', body.message || '', { fatal: true, id });
    }
    const pending = id ? this._pending.get(id) : null;
    if (pending) {
      this._pending.delete(id);
      clearTimeout(pending.timer);
      if (type === 'error') {
        pending.reject(new MediameshError(body.code || 'internal', body.message || '', { fatal: body.fatal, id }));
      } else if (type !== pending.expect) {
        pending.reject(new MediameshError('protocol', `${pending.type} answered with ${type}, not ${pending.expect}`));
      } else {
        pending.resolve(body);
      }
      return;
    }
    switch (type) {
      case 'track_published': {
        const t = body.track || {};
        this.tracks.set(t.id, t);
        this.emit('track_published', t);
        break;
      }
      case 'track_unpublished': {
        const t = this.tracks.get(body.track_id);
        this.tracks.delete(body.track_id);
        this.emit('track_unpublished', { track_id: body.track_id, track: t || null });
        break;
      }
      case 'track_muted': {
        const t = this.tracks.get(body.track_id);
        if (t) t.muted = !!body.muted;
        this.emit('track_muted', { track_id: body.track_id, muted: !!body.muted, track: t || null });
        break;
      }
      case 'pong':
        if (body.timestamp_ms) this.rttMs = Math.max(0, Date.now() - body.timestamp_ms);
        break;
      case 'moved':
        this._onMoved(body);
        break;
      case 'trickle': {
        const target = body.target === 'publisher' ? this._publication : this._subscription;
        if (target && target.pc) applyTrickle(target.pc, body.fragment || '').catch((e) => this.emit('error', e));
        break;
      }
      case 'error':
        this.emit('error', new MediameshError(body.code || 'internal', body.message || '', { fatal: body.fatal, id }));
        break;
      default:
        break;  // `offer` from the node and future types: the client always offers
    }
  }

  _keepalive(periodMs) {
    const ws = this._ws;
    if (this.state !== 'joined' || !ws || ws.readyState !== WebSocket.OPEN) return;
    // a ping unanswered (nothing at all received since) for 2 periods: the socket is dead
    // without knowing it. Counted from the ping, so throttled timers (background tabs) are fine.
    const t = now();
    if (this._pingSentAt !== null && this._lastReceived < this._pingSentAt && t - this._pingSentAt > periodMs * 2) {
      this._dropSocket(ws, 'no reply to pings');
      return;
    }
    if (this._pingSentAt === null || this._lastReceived >= this._pingSentAt) this._pingSentAt = t;
    try { this._send(ws, { ping: { timestamp_ms: Date.now() } }); } catch { /* close follows */ }
  }

  _onMoved(body) {
    this.emit('moved', { url: body.url });
    if (body.url) this._url = body.url;
    if (body.resume_token) this._resumeToken = body.resume_token;
    if (this._ws) this._dropSocket(this._ws, `moved to ${body.url}`, 0);
  }

  /** Forgets a socket (no more events from it) and reconnects. */
  _dropSocket(ws, reason, firstDelayMs) {
    try { ws.close(4000, reason.slice(0, 100)); } catch { /* already closed */ }
    this._onSocketGone(ws, reason, firstDelayMs);
  }

  _onSocketGone(ws, reason, firstDelayMs) {
    if (this._ws !== ws) return;
    this._ws = null;
    for (const [id, p] of this._pending) {
      if (p.ws !== ws) continue;
      this._pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new MediameshError('disconnected', `${reason} before the reply to ${p.type}`));
    }
    if (this.state !== 'joined') return;  // connecting (the join fails) or closed
    const fatal = this._lastFatal;
    if (!this.options.reconnect || (fatal && FINAL_CODES.has(fatal.code))) {
      this._shutdown(reason, fatal);
      return;
    }
    this._reconnect(reason, firstDelayMs);
  }

  async _reconnect(reason, firstDelayMs = 250) {
    this.state = 'reconnecting';
    this._ready = deferred();
    const started = now();
    let delay = 250;
    let wait = firstDelayMs;
    let attempt = 0;
    let lastError = null;
    while (this.state === 'reconnecting') {
      attempt += 1;
      this.emit('reconnecting', { attempt, delayMs: wait, reason });
      await sleep(wait);
      if (this.state !== 'reconnecting') return;
      try {
        const joined = await withTimeout(this._openAndJoin(true), this.options.connectTimeoutMs,
          'timeout', 'no joined in time');
        if (this.state !== 'reconnecting') return;
        await this._afterRejoin(joined);
        return;
      } catch (e) {
        lastError = e;
        if (this._ws) { const ws = this._ws; this._ws = null; try { ws.close(); } catch { /* gone */ } }
        if (e && FINAL_CODES.has(e.code)) break;
      }
      if (now() - started + delay > this.options.reconnectForMs) break;
      wait = delay;
      delay = Math.min(delay * 2, 5000);
    }
    if (this.state === 'reconnecting') {
      this._shutdown(`reconnecting failed: ${lastError ? lastError.message : reason}`, lastError);
    }
  }

  async _afterRejoin(joined) {
    this.reconnects += 1;
    if (joined.resumed) this.resumes += 1;
    this._onJoined(joined);
    // new peer connections for the targets that were active, then the viewer state again
    const errors = [];
    if (this._publication) {
      try {
        await this._publication._negotiate();
        if (this._muted.video) await this.request('mute', { kind: 'video', muted: true });
        if (this._muted.audio) await this.request('mute', { kind: 'audio', muted: true });
      } catch (e) { errors.push(e); }
    }
    if (this._subscription) {
      try {
        this._subscription._resumedAt(joined.resumed ? joined.position_ms || 0 : null);
        await this._subscription._negotiate();
        if (this._subscribed) await this.request('subscribe', { track_ids: this._subscribed });
        if (this._layer) await this.request('set_layer', { layer: this._layer });
      } catch (e) { errors.push(e); }
    }
    this.emit('reconnected', {
      resumed: !!joined.resumed, session: this.session, positionMs: joined.position_ms || 0,
      subscriptions: joined.subscriptions || [], layer: joined.layer || '',
      error: errors.length ? errors.map((e) => e.message).join('; ') : null,
    });
  }

  _shutdown(reason, error = null, emit = true) {
    if (this.state === 'closed') return;
    this.state = 'closed';
    for (const t of this._timers) clearInterval(t);
    this._timers = [];
    const err = error || new MediameshError('closed', reason);
    this._ready.reject(err);
    for (const [id, p] of this._pending) {
      this._pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new MediameshError('closed', reason));
    }
    if (this._publication) this._publication._stop();
    if (this._subscription) this._subscription._stop();
    const ws = this._ws;
    this._ws = null;
    if (ws && !error && ws.readyState === WebSocket.CONNECTING) ws.close();
    if (ws && error) { try { ws.close(); } catch { /* closed */ } }
    if (emit) this.emit('closed', { reason, error });
  }

  /** One offer/answer exchange on a fresh peer connection. */
  async _offer(target, pc) {
    const sdp = await localOffer(pc, {
      loopbackOnly: this.options.loopbackOnly, gatherTimeoutMs: this.options.iceGatherTimeoutMs,
    });
    const answer = await this.request('offer', { target, sdp });
    if (!answer.sdp) throw new MediameshError('protocol', 'answer without sdp');
    await pc.setRemoteDescription({ type: 'answer', sdp: answer.sdp });
    await waitConnected(pc, this.options.connectTimeoutMs);
  }

  _iceConfig() {
    return rtcConfig(this.joined ? this.joined.ice_servers : []);
  }
}

/** The client's outgoing media (from `client.publish()`). */
export class Publication {
  constructor(client, stream, options) {
    this._client = client;
    /** @type {MediaStream} the published stream (the application owns its tracks) */
    this.stream = stream;
    this.options = options;
    /** @type {RTCPeerConnection|null} the current peer connection (a new one after a reconnect) */
    this.pc = null;
    this._closed = false;
  }

  async _negotiate() {
    const pc = new RTCPeerConnection(this._client._iceConfig());
    try {
      addSendTracks(pc, this.stream, this.options);
      await this._client._offer('publisher', pc);
    } catch (e) {
      pc.close();
      throw e;
    }
    const old = this.pc;
    this.pc = pc;
    if (old) old.close();
    if (this._closed) pc.close();
    await this._applyLocalMute();
  }

  async _applyLocalMute() {
    if (!this.pc) return;
    const muted = this._client._muted;
    const pause = this._client._pauseSending;
    for (const sender of this.pc.getSenders()) {
      const t = this.pc.getTransceivers().find((x) => x.sender === sender);
      const kind = (sender.track && sender.track.kind) || (t && t.receiver.track && t.receiver.track.kind);
      if (!kind) continue;
      const want = muted[kind] && pause[kind] ? null : this.stream.getTracks().find((x) => x.kind === kind) || null;
      if (sender.track !== want) await sender.replaceTrack(want);
    }
  }

  /**
   * Outbound statistics of the current connection.
   * @returns {Promise<OutboundStats>}
   */
  stats() {
    return outboundStats(this.pc);
  }

  _stop() {
    this._closed = true;
    if (this.pc) this.pc.close();
  }

  /**
   * Stops publishing: closes the peer connection (the node ends the tracks). The stream's
   * tracks keep running; stop them yourself.
   */
  async close() {
    this._stop();
    if (this._client._publication === this) this._client._publication = null;
  }
}

/** The client's incoming media (from `client.subscribe()`). */
export class Subscription {
  constructor(client) {
    this._client = client;
    /** @type {MediaStream} the received video and audio; the same object across reconnects */
    this.stream = new MediaStream();
    /** @type {RTCPeerConnection|null} */
    this.pc = null;
    this._monitor = new InboundMonitor(client.options.statsIntervalMs);
    this._positionBase = 0;
    this._since = now();
    this._closed = false;
  }

  _positionMs() {
    return this._positionBase + (now() - this._since);
  }

  _resumedAt(positionMs) {
    if (positionMs === null) return;  // a new session: keep counting
    this._positionBase = positionMs;
    this._since = now();
  }

  async _negotiate() {
    const pc = new RTCPeerConnection(this._client._iceConfig());
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.addTransceiver('audio', { direction: 'recvonly' });
    const incoming = [];
    pc.addEventListener('track', (ev) => incoming.push(ev.track));
    try {
      await this._client._offer('subscriber', pc);
    } catch (e) {
      pc.close();
      throw e;
    }
    const old = this.pc;
    this.pc = pc;
    await this._monitor.attach(pc);
    if (old) old.close();
    if (this._closed) { pc.close(); return; }
    for (const track of incoming) {
      for (const t of this.stream.getTracks()) if (t.kind === track.kind) this.stream.removeTrack(t);
      this.stream.addTrack(track);
    }
    this._client.emit('stream', this.stream);
  }

  /**
   * Inbound statistics, added up over every connection this subscription had.
   * @returns {Promise<InboundStats>}
   */
  stats() {
    return this._monitor.stats();
  }

  _stop() {
    this._closed = true;
    this._monitor.stop();
    if (this.pc) this.pc.close();
  }

  /** Stops receiving: closes the peer connection. */
  async close() {
    this._stop();
    if (this._client._subscription === this) this._client._subscription = null;
  }
}

// ------------------------------------------------------------------------------------------------
// WHIP / WHEP
// ------------------------------------------------------------------------------------------------
/**
 * @typedef {object} HttpSessionOptions
 * @property {boolean} [loopbackOnly=false] send only 127.0.0.1 host candidates
 * @property {RTCIceServer[]} [iceServers]
 * @property {number} [connectTimeoutMs=15000]
 * @property {number} [iceGatherTimeoutMs=3000]
 * @property {number} [statsIntervalMs=250] (WHEP) sampling period of the frame-gap measurement
 */

async function negotiateHttp(pc, url, token, opts) {
  const offer = await localOffer(pc, { loopbackOnly: opts.loopbackOnly, gatherTimeoutMs: opts.iceGatherTimeoutMs || 3000 });
  const headers = { 'Content-Type': 'application/sdp' };
  if (token) headers.Authorization = 'Bearer ' + token;
  const resp = await fetch(url, { method: 'POST', headers, body: offer, mode: 'cors' });
  const body = await resp.text();
  if (resp.status !== 201) {
    let code = 'http';
    let detail = body.slice(0, 300);
    try { const p = JSON.parse(body); detail = p.detail || p.title || detail; code = p.code || code; } catch { /* not JSON */ }
    throw new MediameshError(code, `POST ${url} -> ${resp.status}: ${detail}`, { status: resp.status });
  }
  const loc = resp.headers.get('Location');
  if (!loc) throw new MediameshError('http', `POST ${url} -> 201 without a readable Location header`);
  await pc.setRemoteDescription({ type: 'answer', sdp: body });
  await waitConnected(pc, opts.connectTimeoutMs || 15000);
  return new URL(loc, new URL(url, baseUrl())).href;
}

async function deleteResource(location, token) {
  const headers = {};
  if (token) headers.Authorization = 'Bearer ' + token;
  return (await fetch(location, { method: 'DELETE', headers, mode: 'cors' })).status;
}

/**
 * A WHIP or WHEP session: `location` is its resource URL; `close()` DELETEs it.
 */
export class HttpSession {
  constructor(pc, location, token, monitor, stream) {
    /** @type {RTCPeerConnection} */
    this.pc = pc;
    /** @type {string} the session resource (absolute URL) */
    this.location = location;
    /** @type {MediaStream} the sent (WHIP) or received (WHEP) media */
    this.stream = stream;
    this._token = token;
    this._monitor = monitor;
  }

  /**
   * Statistics in the shape of `client.stats()`'s publisher (WHIP) or subscriber (WHEP) entry.
   * @returns {Promise<InboundStats|OutboundStats>}
   */
  stats() {
    return this._monitor ? this._monitor.stats() : outboundStats(this.pc);
  }

  /**
   * Ends the session: DELETE on its resource, then closes the peer connection.
   * @returns {Promise<number|null>} the DELETE status (null if the request failed)
   */
  async close() {
    let status = null;
    try { status = await deleteResource(this.location, this._token); } catch { /* closing anyway */ }
    if (this._monitor) this._monitor.stop();
    this.pc.close();
    return status;
  }
}

/**
 * Publishes a stream with WHIP (POST application/sdp, `Authorization: Bearer`).
 * @param {string} url the WHIP endpoint, e.g. `https://node/whip/demo`
 * @param {string} token
 * @param {MediaStream} stream
 * @param {HttpSessionOptions & {codec?: string, audioCodec?: string, simulcast?: boolean}} [options]
 * @returns {Promise<HttpSession>} once connected
 */
export async function whipPublish(url, token, stream, options = {}) {
  const pc = new RTCPeerConnection(rtcConfig(options.iceServers));
  try {
    addSendTracks(pc, stream, options);
    const location = await negotiateHttp(pc, url, token, options);
    return new HttpSession(pc, location, token, null, stream);
  } catch (e) {
    pc.close();
    throw e;
  }
}

/**
 * Plays a room with WHEP (recvonly video + audio).
 * @param {string} url the WHEP endpoint, e.g. `https://node/whep/demo`
 * @param {string} token
 * @param {HttpSessionOptions & {layer?: 'low'|'mid'|'high'}} [options] layer: `?layer=` of the POST
 * @returns {Promise<HttpSession>} once connected; `.stream` plays it
 */
export async function whepPlay(url, token, options = {}) {
  const pc = new RTCPeerConnection(rtcConfig(options.iceServers));
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.addTransceiver('audio', { direction: 'recvonly' });
  const stream = new MediaStream();
  pc.addEventListener('track', (ev) => stream.addTrack(ev.track));
  let target = url;
  if (options.layer) {
    const u = new URL(url, baseUrl());
    u.searchParams.set('layer', options.layer);
    target = u.href;
  }
  const monitor = new InboundMonitor(options.statsIntervalMs || 250);
  try {
    const location = await negotiateHttp(pc, target, token, options);
    await monitor.attach(pc);
    return new HttpSession(pc, location, token, monitor, stream);
  } catch (e) {
    monitor.stop();
    pc.close();
    throw e;
  }
}
