// Renders web/RecordingPlayer.tsx alone on a page, as the ZScribe UI would,
// for tests/browser/component.mjs. Bundled by esbuild with React from npm.
//
//   index.html#api=<playback base>&intake=<id>&token=<access token>
//
// Without `token`, the token getter returns null (a signed-out user). The
// getter counts its calls in window.tokenRequests, so the test can tell a
// renewal went through the API.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { RecordingPlayer } from '../../../web/RecordingPlayer';

declare global {
  interface Window {
    tokenRequests: number;
  }
}

const params = new URLSearchParams(window.location.hash.slice(1));
const api = params.get('api') ?? '';
const intake = params.get('intake') ?? '';
const token = params.get('token');
window.tokenRequests = 0;

const root = document.getElementById('root');
if (!root) throw new Error('no #root');
createRoot(root).render(
  <StrictMode>
    <RecordingPlayer
      intakeId={intake}
      apiBase={api}
      getAccessToken={async () => {
        window.tokenRequests += 1;
        return token;
      }}
    />
  </StrictMode>,
);
