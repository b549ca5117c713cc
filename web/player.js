// The player page's script (served as /assets/player.js; no build step).
//
// Asks the playback API for the intake's recording and shows one of its
// states. A signed URL works for a limited time, so it is renewed before it
// runs out (and after a playback error), keeping the position: long
// listens and late seeks keep working.
'use strict';

(() => {
  const POLL_PROCESSING_MS = 5000;
  const RETRY_MS = 5000;
  const MAX_MEDIA_ERRORS = 3;

  const root = document.getElementById('player');
  const message = document.getElementById('message');
  const controls = document.getElementById('controls');
  const audio = document.getElementById('audio');
  const durationLabel = document.getElementById('duration');
  const notice = document.getElementById('notice');

  const segments = location.pathname.split('/');
  const intakeId = decodeURIComponent(segments[segments.length - 1] || '');
  const api = new URL(`../v1/intakes/${encodeURIComponent(intakeId)}/recording`, location.href);

  // A token handed over in the fragment is kept in memory only, and taken
  // out of the address bar so it is not bookmarked or copied along.
  let fragmentToken = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fragmentToken) {
    history.replaceState(null, '', location.pathname + location.search);
  }

  // Read on every call: supabase-js refreshes its session in localStorage,
  // so a long listen picks up the renewed token.
  function token() {
    if (fragmentToken) return fragmentToken;
    try {
      for (let i = 0; i < localStorage.length; i++) {
        const key = localStorage.key(i);
        if (key && /^sb-.+-auth-token$/.test(key)) {
          const session = JSON.parse(localStorage.getItem(key) || 'null');
          if (session && session.access_token) return session.access_token;
        }
      }
    } catch (_) {
      // Storage can be unavailable (sandboxed frames, privacy modes).
    }
    return null;
  }

  function formatDuration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = String(s % 60).padStart(2, '0');
    return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
  }

  function show(state, text) {
    root.dataset.state = state;
    message.textContent = text;
    message.hidden = state === 'available';
    controls.hidden = state !== 'available';
  }

  function warn(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  // One API call. Returns {kind, body, lifetimeMs}: lifetimeMs is how long
  // the signed URL lives, measured on the server's clock (Date header) so a
  // skewed client clock does not make the renewal late.
  async function fetchRecording() {
    const t = token();
    if (!t) return { kind: 'unauthorized' };
    let res;
    try {
      res = await fetch(api, { headers: { authorization: `Bearer ${t}` }, cache: 'no-store' });
    } catch (_) {
      return { kind: 'error' };
    }
    if (res.status === 401) return { kind: 'unauthorized' };
    if (res.status === 403) return { kind: 'forbidden' };
    if (res.status === 404) return { kind: 'not_found' };
    if (!res.ok) return { kind: 'error' };
    let body;
    try {
      body = await res.json();
    } catch (_) {
      return { kind: 'error' };
    }
    let lifetimeMs = null;
    if (body.expires_at) {
      const serverNow = Date.parse(res.headers.get('date') || '');
      const now = Number.isNaN(serverNow) ? Date.now() : serverNow;
      lifetimeMs = Date.parse(body.expires_at) - now;
    }
    return { kind: 'ok', body, lifetimeMs };
  }

  let timer = null;
  let mediaErrors = 0;
  let renewing = false;
  // When the current signed URL stops working, on this page's clock.
  let urlExpiresAt = Infinity;

  function later(fn, ms) {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  }

  // Renew with a fifth of the lifetime left (at least one second ahead).
  function scheduleRenewal(lifetimeMs) {
    if (lifetimeMs == null) return;
    urlExpiresAt = Date.now() + lifetimeMs;
    later(renew, Math.max(1000, Math.min(lifetimeMs * 0.8, lifetimeMs - 1000)));
  }

  // Swaps the source and puts the position (and playing state) back.
  function setSource(url) {
    if (!audio.currentSrc) {
      audio.src = url;
      return;
    }
    const position = audio.currentTime;
    const playing = !audio.paused && !audio.ended;
    audio.addEventListener('loadedmetadata', () => {
      audio.currentTime = position;
      if (playing) audio.play().catch(() => {});
    }, { once: true });
    audio.src = url;
  }

  async function load() {
    const r = await fetchRecording();
    switch (r.kind) {
      case 'unauthorized': return show('unauthorized', 'Sign in to play this recording');
      case 'forbidden': return show('forbidden', 'Your account is not part of an organization');
      case 'not_found': return show('not_found', 'Recording not found');
      case 'error':
        show('error', 'Could not load the recording, retrying…');
        return later(load, RETRY_MS);
      default:
    }
    const b = r.body;
    if (b.duration_seconds != null) durationLabel.textContent = formatDuration(b.duration_seconds);
    switch (b.status) {
      case 'available':
        show('available', '');
        setSource(b.url);
        return scheduleRenewal(r.lifetimeMs);
      case 'processing':
        show('processing', 'Recording is being processed...');
        return later(load, POLL_PROCESSING_MS);
      case 'failed':
        return show('failed', 'Recording could not be stored');
      default:
        return show('none', 'No recording available');
    }
  }

  async function renew() {
    if (renewing) return;
    renewing = true;
    try {
      const r = await fetchRecording();
      if (r.kind === 'ok' && r.body.status === 'available') {
        warn('');
        setSource(r.body.url);
        scheduleRenewal(r.lifetimeMs);
      } else if (r.kind === 'unauthorized') {
        warn('Your session has expired: sign in again to keep listening.');
      } else {
        later(renew, RETRY_MS);
      }
    } finally {
      renewing = false;
    }
  }

  audio.addEventListener('loadedmetadata', () => {
    mediaErrors = 0;
    if (Number.isFinite(audio.duration)) durationLabel.textContent = formatDuration(audio.duration);
  });

  // Timers can fire late (a laptop slept, a background tab was throttled).
  // Chromium then stalls on the expired URL rather than failing, so a seek
  // or a stall past the expiry renews at once.
  for (const event of ['seeking', 'waiting', 'stalled']) {
    audio.addEventListener(event, () => {
      if (root.dataset.state === 'available' && Date.now() >= urlExpiresAt - 1000) renew();
    });
  }

  // Other browsers report the expired URL as a media error: fetch a fresh
  // URL and carry on from the same place.
  audio.addEventListener('error', () => {
    if (root.dataset.state !== 'available') return;
    mediaErrors += 1;
    if (mediaErrors > MAX_MEDIA_ERRORS) {
      show('error', 'The recording could not be played');
      return;
    }
    renew();
  });

  if (!intakeId) {
    show('not_found', 'Recording not found');
  } else {
    load();
  }
})();
