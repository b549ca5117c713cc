// A React player for an intake's call recording, for the ZScribe UI.
//
// Same behaviour as the daemon's player page (web/player.js): asks
// recording-relay's playback API for a short-lived signed URL (the bucket is
// private, so intakes.recording_url cannot play), shows the recording's
// state, and renews the URL before it expires, keeping the position.
//
//   <RecordingPlayer
//     intakeId={intake.id}
//     apiBase="https://playback.example.com"
//     getAccessToken={async () => (await supabase.auth.getSession()).data.session?.access_token}
//   />
//
// The playback server must list the UI's origin in playback.allowed_origins.
import { useEffect, useRef, useState } from 'react';

/** `GET /v1/intakes/{id}/recording`. */
export type RecordingStatus = 'available' | 'processing' | 'failed' | 'none';

export interface RecordingResponse {
  status: RecordingStatus;
  duration_seconds: number | null;
  /** A signed URL, only when `status` is `available`. */
  url: string | null;
  /** RFC 3339; when `url` stops working. */
  expires_at: string | null;
}

export interface RecordingPlayerProps {
  intakeId: string;
  /** The playback server's base URL, without a trailing slash. */
  apiBase: string;
  /** The user's Supabase access token. Called before every request, so a
   * token supabase-js refreshed meanwhile is used. */
  getAccessToken: () => Promise<string | null | undefined> | string | null | undefined;
}

type View =
  | 'loading'
  | RecordingStatus
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'error';

const MESSAGES: Record<Exclude<View, 'available'>, string> = {
  loading: 'Loading…',
  processing: 'Recording is being processed...',
  failed: 'Recording could not be stored',
  none: 'No recording available',
  unauthorized: 'Sign in to play this recording',
  forbidden: 'Your account is not part of an organization',
  not_found: 'Recording not found',
  error: 'Could not load the recording, retrying…',
};

const POLL_PROCESSING_MS = 5000;
const RETRY_MS = 5000;
const MAX_MEDIA_ERRORS = 3;

type Fetched =
  | { kind: 'ok'; body: RecordingResponse; lifetimeMs: number | null }
  | { kind: 'unauthorized' | 'forbidden' | 'not_found' | 'error' };

async function fetchRecording(
  apiBase: string,
  intakeId: string,
  getAccessToken: RecordingPlayerProps['getAccessToken'],
): Promise<Fetched> {
  const token = await getAccessToken();
  if (!token) return { kind: 'unauthorized' };
  let res: Response;
  try {
    res = await fetch(`${apiBase}/v1/intakes/${encodeURIComponent(intakeId)}/recording`, {
      headers: { authorization: `Bearer ${token}` },
      cache: 'no-store',
    });
  } catch {
    return { kind: 'error' };
  }
  if (res.status === 401) return { kind: 'unauthorized' };
  if (res.status === 403) return { kind: 'forbidden' };
  if (res.status === 404) return { kind: 'not_found' };
  if (!res.ok) return { kind: 'error' };
  const body = (await res.json()) as RecordingResponse;
  // Measured on the server's clock, so a skewed client clock is harmless.
  const serverNow = Date.parse(res.headers.get('date') ?? '');
  const lifetimeMs = body.expires_at
    ? Date.parse(body.expires_at) - (Number.isNaN(serverNow) ? Date.now() : serverNow)
    : null;
  return { kind: 'ok', body, lifetimeMs };
}

export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

export function RecordingPlayer({ intakeId, apiBase, getAccessToken }: RecordingPlayerProps) {
  const [view, setView] = useState<View>('loading');
  const [duration, setDuration] = useState<number | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const audioRef = useRef<HTMLAudioElement>(null);
  // The latest token getter, without restarting the effect on every render.
  const tokenRef = useRef(getAccessToken);
  useEffect(() => {
    tokenRef.current = getAccessToken;
  });

  useEffect(() => {
    let cancelled = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let urlExpiresAt = Infinity;
    let renewing = false;
    let mediaErrors = 0;
    const later = (fn: () => void, ms: number) => {
      clearTimeout(timer);
      timer = setTimeout(fn, ms);
    };
    const get = () => fetchRecording(apiBase, intakeId, () => tokenRef.current());

    // Swaps the source and puts the position (and playing state) back.
    const setSource = (url: string) => {
      const audio = audioRef.current;
      if (!audio) return;
      if (audio.currentSrc) {
        const position = audio.currentTime;
        const playing = !audio.paused && !audio.ended;
        audio.addEventListener('loadedmetadata', () => {
          audio.currentTime = position;
          if (playing) audio.play().catch(() => undefined);
        }, { once: true });
      }
      audio.src = url;
    };
    const scheduleRenewal = (lifetimeMs: number | null) => {
      if (lifetimeMs == null) return;
      urlExpiresAt = Date.now() + lifetimeMs;
      // Renew with a fifth of the lifetime left (at least one second ahead).
      later(renew, Math.max(1000, Math.min(lifetimeMs * 0.8, lifetimeMs - 1000)));
    };

    async function renew() {
      if (renewing || cancelled) return;
      renewing = true;
      try {
        const r = await get();
        if (cancelled) return;
        if (r.kind === 'ok' && r.body.status === 'available' && r.body.url) {
          setNotice(null);
          setSource(r.body.url);
          scheduleRenewal(r.lifetimeMs);
        } else if (r.kind === 'unauthorized') {
          setNotice('Your session has expired: sign in again to keep listening.');
        } else {
          later(renew, RETRY_MS);
        }
      } finally {
        renewing = false;
      }
    }

    async function load() {
      const r = await get();
      if (cancelled) return;
      if (r.kind !== 'ok') {
        setView(r.kind);
        if (r.kind === 'error') later(load, RETRY_MS);
        return;
      }
      setDuration(r.body.duration_seconds);
      setView(r.body.status);
      if (r.body.status === 'available' && r.body.url) {
        setSource(r.body.url);
        scheduleRenewal(r.lifetimeMs);
      } else if (r.body.status === 'processing') {
        later(load, POLL_PROCESSING_MS);
      }
    }

    // Timers can fire late (sleep, throttled tabs): a seek or a stall on an
    // expired URL renews at once; so does a media error.
    const onStall = () => {
      if (Date.now() >= urlExpiresAt - 1000) void renew();
    };
    const onError = () => {
      mediaErrors += 1;
      if (mediaErrors > MAX_MEDIA_ERRORS) setNotice('The recording could not be played.');
      else void renew();
    };
    const onLoaded = () => {
      mediaErrors = 0;
    };
    const audio = audioRef.current;
    const events = ['seeking', 'waiting', 'stalled'] as const;
    events.forEach((e) => audio?.addEventListener(e, onStall));
    audio?.addEventListener('error', onError);
    audio?.addEventListener('loadedmetadata', onLoaded);

    setView('loading');
    void load();
    return () => {
      cancelled = true;
      clearTimeout(timer);
      events.forEach((e) => audio?.removeEventListener(e, onStall));
      audio?.removeEventListener('error', onError);
      audio?.removeEventListener('loadedmetadata', onLoaded);
    };
  }, [apiBase, intakeId]);

  return (
    <div className="recording-player" data-state={view} aria-live="polite">
      {/* Always rendered, so the ref and its listeners exist from the start. */}
      <div hidden={view !== 'available'}>
        <audio
          ref={audioRef}
          controls
          preload="metadata"
          onLoadedMetadata={(e) => {
            const d = e.currentTarget.duration;
            if (Number.isFinite(d)) setDuration(d);
          }}
        />
        <p>Duration {duration == null ? '-:--' : formatDuration(duration)}</p>
      </div>
      {view !== 'available' && <p>{MESSAGES[view]}</p>}
      {notice && <p className="recording-player-notice">{notice}</p>}
    </div>
  );
}

export default RecordingPlayer;
