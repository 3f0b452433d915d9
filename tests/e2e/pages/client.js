// WHIP / WHEP test client for headless Chromium (driven by selenium, see conftest.py).
// Everything is exposed as window.mm.*; every function returns a Promise of plain JSON.
// Only loopback (127.0.0.1) ICE candidates are ever sent to the server.
'use strict';

const sessions = {};  // id -> {pc, location, token, kind}
let nextId = 1;

function log(...args) { console.log('[mm]', ...args); }

// Keep only 127.0.0.1 host candidates (Chromium also gathers the machine's other interfaces).
function loopbackOnly(sdp) {
  return sdp.split('\r\n').filter((line) => {
    if (!line.startsWith('a=candidate:')) return true;
    const parts = line.split(' ');
    return parts[4] === '127.0.0.1';
  }).join('\r\n');
}

function waitGathering(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
    });
  });
}

function waitConnected(pc, ms) {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (pc.connectionState === 'connected') { clearTimeout(t); resolve(); return true; }
      if (pc.connectionState === 'failed' || pc.connectionState === 'closed') {
        clearTimeout(t); reject(new Error('connectionState ' + pc.connectionState)); return true;
      }
      return false;
    };
    const t = setTimeout(() => reject(new Error(
      `not connected after ${ms} ms (connection=${pc.connectionState}, ice=${pc.iceConnectionState})`)), ms);
    if (!check()) pc.addEventListener('connectionstatechange', check);
  });
}

function preferCodec(transceiver, mime) {
  if (!transceiver.setCodecPreferences || !RTCRtpSender.getCapabilities) return;
  const codecs = RTCRtpSender.getCapabilities(transceiver.sender.track ? transceiver.sender.track.kind : 'video').codecs;
  const first = codecs.filter((c) => c.mimeType.toLowerCase() === mime.toLowerCase());
  const rest = codecs.filter((c) => c.mimeType.toLowerCase() !== mime.toLowerCase());
  if (first.length) transceiver.setCodecPreferences(first.concat(rest));
}

// POST the offer (no trickle: we wait for gathering first), set the answer, wait for connected.
async function negotiate(pc, url, token, timeoutMs) {
  await pc.setLocalDescription(await pc.createOffer());
  await waitGathering(pc, 3000);
  const offer = loopbackOnly(pc.localDescription.sdp);
  const headers = { 'Content-Type': 'application/sdp' };
  if (token) headers['Authorization'] = 'Bearer ' + token;
  const resp = await fetch(url, { method: 'POST', headers, body: offer, mode: 'cors' });
  const body = await resp.text();
  if (resp.status !== 201) throw new Error(`POST ${url} -> ${resp.status}: ${body.slice(0, 300)}`);
  const loc = resp.headers.get('Location');
  if (!loc) {
    throw new Error(`POST ${url} -> 201 but the page cannot read Location ` +
      '(missing, or not listed in Access-Control-Expose-Headers)');
  }
  await pc.setRemoteDescription({ type: 'answer', sdp: body });
  await waitConnected(pc, timeoutMs || 15000);
  return new URL(loc, url).href;
}

function register(pc, location, token, kind, extra) {
  const id = String(nextId++);
  sessions[id] = Object.assign({ pc, location, token, kind }, extra || {});
  return id;
}

const mm = {
  // Publish the (fake) camera + microphone. opts: {simulcast, width, height, frameRate, codec}
  async publish(url, token, opts) {
    opts = opts || {};
    const video = { width: { ideal: opts.width || 640 }, height: { ideal: opts.height || 480 } };
    if (opts.frameRate) video.frameRate = { ideal: opts.frameRate };
    const stream = await navigator.mediaDevices.getUserMedia({ video, audio: opts.audio !== false });
    const pc = new RTCPeerConnection({ iceServers: [] });
    const vtrack = stream.getVideoTracks()[0];
    const init = { direction: 'sendonly', streams: [stream] };
    if (opts.simulcast) {
      init.sendEncodings = [
        { rid: 'q', scaleResolutionDownBy: 4 },
        { rid: 'h', scaleResolutionDownBy: 2 },
        { rid: 'f' },
      ];
    }
    const vt = pc.addTransceiver(vtrack, init);
    preferCodec(vt, opts.codec || 'video/VP8');
    for (const a of stream.getAudioTracks()) pc.addTransceiver(a, { direction: 'sendonly', streams: [stream] });
    try {
      const location = await negotiate(pc, url, token, opts.timeoutMs);
      const s = vtrack.getSettings();
      return { id: register(pc, location, token, 'publish', { stream }), location,
               captureWidth: s.width, captureHeight: s.height };
    } catch (e) {
      pc.close(); stream.getTracks().forEach((t) => t.stop());
      throw e;
    }
  },

  // Play via WHEP: recvonly video + audio.
  async play(url, token, opts) {
    opts = opts || {};
    const pc = new RTCPeerConnection({ iceServers: [] });
    pc.addTransceiver('video', { direction: 'recvonly' });
    pc.addTransceiver('audio', { direction: 'recvonly' });
    try {
      const location = await negotiate(pc, url, token, opts.timeoutMs);
      return { id: register(pc, location, token, 'play'), location };
    } catch (e) {
      pc.close();
      throw e;
    }
  },

  // Inbound stats of a viewer: {video: {framesDecoded, frameWidth, frameHeight, ...}, audio: {...}}
  async inbound(id) {
    const s = sessions[id];
    const out = { connectionState: s.pc.connectionState, video: null, audio: null };
    const report = await s.pc.getStats();
    report.forEach((r) => {
      if (r.type !== 'inbound-rtp') return;
      const codec = r.codecId && report.get(r.codecId);
      out[r.kind] = {
        mimeType: codec ? codec.mimeType : null,
        packetsReceived: r.packetsReceived, bytesReceived: r.bytesReceived,
        framesDecoded: r.framesDecoded, framesReceived: r.framesReceived,
        frameWidth: r.frameWidth, frameHeight: r.frameHeight, keyFramesDecoded: r.keyFramesDecoded,
        totalSamplesReceived: r.totalSamplesReceived, audioLevel: r.audioLevel,
      };
    });
    return out;
  },

  // Outbound stats of a publisher, one entry per encoding (rid).
  async outbound(id) {
    const s = sessions[id];
    const layers = [];
    (await s.pc.getStats()).forEach((r) => {
      if (r.type !== 'outbound-rtp' || r.kind !== 'video') return;
      layers.push({
        rid: r.rid || null, ssrc: r.ssrc, active: r.active, frameWidth: r.frameWidth,
        frameHeight: r.frameHeight, framesEncoded: r.framesEncoded, framesSent: r.framesSent,
        bytesSent: r.bytesSent, qualityLimitationReason: r.qualityLimitationReason,
        targetBitrate: r.targetBitrate, encoderImplementation: r.encoderImplementation,
      });
    });
    layers.sort((a, b) => (a.rid || '').localeCompare(b.rid || ''));
    return { connectionState: s.pc.connectionState, layers };
  },

  // DELETE the resource and close the peer connection; returns the DELETE status.
  async stop(id) {
    const s = sessions[id];
    if (!s) return null;
    delete sessions[id];
    let status = null;
    try {
      const headers = {};
      if (s.token) headers['Authorization'] = 'Bearer ' + s.token;
      status = (await fetch(s.location, { method: 'DELETE', headers, mode: 'cors' })).status;
    } finally {
      s.pc.close();
      if (s.stream) s.stream.getTracks().forEach((t) => t.stop());
    }
    return status;
  },

  // Harness self-check: simulcast from one RTCPeerConnection to another in this page, with the
  // answer munged to accept the three rids (Chromium does not receive simulcast itself), to see
  // how many layers Chromium really encodes for a given capture size.
  async simulcastProbe(width, height, waitMs) {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: width }, height: { ideal: height } }, audio: false });
    const pc1 = new RTCPeerConnection(), pc2 = new RTCPeerConnection();
    pc1.onicecandidate = (e) => e.candidate && e.candidate.address === '127.0.0.1' && pc2.addIceCandidate(e.candidate);
    pc2.onicecandidate = (e) => e.candidate && e.candidate.address === '127.0.0.1' && pc1.addIceCandidate(e.candidate);
    const vt = pc1.addTransceiver(stream.getVideoTracks()[0], {
      direction: 'sendonly',
      sendEncodings: [{ rid: 'q', scaleResolutionDownBy: 4 }, { rid: 'h', scaleResolutionDownBy: 2 }, { rid: 'f' }],
    });
    preferCodec(vt, 'video/VP8');
    const offer = await pc1.createOffer();
    await pc1.setLocalDescription(offer);
    // pc2 sees a plain offer (no rid / simulcast lines)
    const plain = offer.sdp.split('\r\n').filter((l) => !l.startsWith('a=rid:') && !l.startsWith('a=simulcast:')).join('\r\n');
    await pc2.setRemoteDescription({ type: 'offer', sdp: plain });
    const answer = await pc2.createAnswer();
    await pc2.setLocalDescription(answer);
    // pc1 gets an answer that accepts the three layers
    const lines = answer.sdp.split('\r\n');
    const out = [];
    let inVideo = false;
    for (const l of lines) {
      if (l.startsWith('m=')) {
        if (inVideo) out.push('a=rid:q recv', 'a=rid:h recv', 'a=rid:f recv', 'a=simulcast:recv q;h;f');
        inVideo = l.startsWith('m=video');
      }
      if (l === '' && inVideo) { out.push('a=rid:q recv', 'a=rid:h recv', 'a=rid:f recv', 'a=simulcast:recv q;h;f'); inVideo = false; }
      out.push(l);
    }
    await pc1.setRemoteDescription({ type: 'answer', sdp: out.join('\r\n') });
    await waitConnected(pc1, 10000);
    await new Promise((r) => setTimeout(r, waitMs || 4000));
    const id = register(pc1, null, null, 'probe', { stream });
    const res = await mm.outbound(id);
    const s = stream.getVideoTracks()[0].getSettings();
    res.captureWidth = s.width; res.captureHeight = s.height;
    pc1.close(); pc2.close(); stream.getTracks().forEach((t) => t.stop());
    delete sessions[id];
    return res;
  },
};

window.mm = mm;
window.mmReady = true;
