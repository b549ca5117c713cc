// Drives the player page in Debian's headless Chromium.
//
//   node tests/browser/player.mjs <base-url> '<spec JSON>'
//
// The spec (written by tests/api/playback.rs) names one intake per state, a
// user token, the expected duration and where screenshots go. Exit code 0
// when every check passed; otherwise the failures are printed and it is 1.
// Chromium comes from apt (`chromium`), never from `npx playwright install`.

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [base, specJson] = process.argv.slice(2);
if (!base || !specJson) {
  console.error("usage: node player.mjs <base-url> '<spec JSON>'");
  process.exit(2);
}
const spec = JSON.parse(specJson);
mkdirSync(spec.artifacts, { recursive: true });

const failures = [];
function check(ok, what) {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures.push(what);
}

const browser = await chromium.launch({
  executablePath: spec.chromium || '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  timeout: 30_000,
});

const pageUrl = (state, token = spec.token) =>
  `${base}/play/${spec.intakes[state]}${token ? `#token=${encodeURIComponent(token)}` : ''}`;

async function openPage(state, token) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('pageerror', (e) => failures.push(`${state}: uncaught page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') console.log(`  [console ${state}] ${m.text()}`);
  });
  await page.goto(pageUrl(state, token));
  return { context, page };
}

async function expectState(state, expectedText, token) {
  const { context, page } = await openPage(state, token);
  try {
    const shown = token === null ? 'unauthorized' : state;
    await page.waitForFunction((s) => document.getElementById('player').dataset.state === s, shown);
    const text = (await page.textContent('#message')).trim();
    check(text === expectedText, `${shown}: shows "${expectedText}" (got "${text}")`);
    const audioVisible = await page.isVisible('#audio');
    check(!audioVisible, `${shown}: no player`);
    check(!page.url().includes('token='), `${shown}: the token left the address bar`);
    await page.screenshot({ path: path.join(spec.artifacts, `player-${shown}.png`) });
  } finally {
    await context.close();
  }
}

// Waits for one media event after running `action` in the page.
const onEvent = (page, event, action) =>
  page.evaluate(
    ([event, action]) =>
      new Promise((resolve, reject) => {
        const audio = document.getElementById('audio');
        const timer = setTimeout(() => reject(new Error(`no ${event} within 10s`)), 10_000);
        audio.addEventListener(event, () => { clearTimeout(timer); resolve(); }, { once: true });
        audio.addEventListener('error', () => {
          clearTimeout(timer);
          reject(new Error(`media error ${audio.error && audio.error.code}`));
        }, { once: true });
        // The action is one of a few fixed strings, run here.
        if (action === 'seek-middle') audio.currentTime = audio.duration / 2;
        if (action === 'seek-three-quarters') audio.currentTime = (audio.duration * 3) / 4;
      }),
    [event, action],
  );

const audioState = (page) =>
  page.evaluate(() => {
    const a = document.getElementById('audio');
    return {
      src: a.currentSrc,
      duration: a.duration,
      currentTime: a.currentTime,
      readyState: a.readyState,
      error: a.error && a.error.code,
    };
  });

async function available() {
  const { context, page } = await openPage('available');
  // Every request <audio> makes for the recording, to see which URL a seek
  // used and that none was refused.
  const media = [];
  page.on('response', (r) => {
    if (r.url().includes('/object/sign/')) media.push({ url: r.url(), status: r.status(), at: Date.now() });
  });
  try {
    await page.waitForFunction(() => document.getElementById('player').dataset.state === 'available');
    await page.waitForFunction(() => document.getElementById('audio').readyState >= 1);
    let a = await audioState(page);
    check(Math.abs(a.duration - spec.expectedDuration) < 0.05,
      `available: <audio> duration ${a.duration} s ≈ ${spec.expectedDuration} s`);
    const label = (await page.textContent('#duration')).trim();
    check(label === spec.expectedLabel, `available: duration label "${label}" = "${spec.expectedLabel}"`);
    check(await page.isVisible('#audio'), 'available: player visible');
    check(!page.url().includes('token='), 'available: the token left the address bar');

    const firstSrc = a.src;
    await onEvent(page, 'seeked', 'seek-middle');
    a = await audioState(page);
    const middle = spec.expectedDuration / 2;
    check(Math.abs(a.currentTime - middle) < 0.5 && a.error === null,
      `available: seek to the middle lands at ${a.currentTime.toFixed(2)} s, no error`);
    await page.screenshot({ path: path.join(spec.artifacts, 'player-available.png') });

    // The page renews its signed URL before it expires and keeps the position.
    const renewed = Date.now();
    await page.waitForFunction((first) => {
      const a = document.getElementById('audio');
      return a.currentSrc !== first && a.readyState >= 1;
    }, firstSrc, { timeout: spec.ttlSeconds * 1000 + 5_000 });
    const renewedSrc = (await audioState(page)).src;
    check(true, `available: signed URL renewed after ${((Date.now() - renewed) / 1000).toFixed(1)} s`);
    const kept = await page
      .waitForFunction((m) => Math.abs(document.getElementById('audio').currentTime - m) < 0.5, middle, { timeout: 3_000 })
      .then(() => true, () => false);
    a = await audioState(page);
    check(kept, `available: position kept across the renewal (${a.currentTime.toFixed(2)} s)`);

    // Past the first URL's expiry, a seek still works (it uses the new URL).
    const waitMs = spec.ttlSeconds * 1000 + 1_000 - (Date.now() - renewed);
    if (waitMs > 0) await page.waitForTimeout(waitMs);
    const lateSeek = Date.now();
    await onEvent(page, 'seeked', 'seek-three-quarters');
    a = await audioState(page);
    const lateFetches = media.filter((m) => m.at >= lateSeek);
    check(lateFetches.length > 0 && lateFetches.every((m) => m.url === renewedSrc),
      `available: the late seek fetched ${lateFetches.length} range(s) with the renewed URL`);
    const refused = media.filter((m) => m.status >= 400).map((m) => m.status);
    check(refused.length === 0,
      `available: all ${media.length} media requests answered (${refused.length ? `refused: ${refused}` : 'none refused'})`);
    check(Math.abs(a.currentTime - (spec.expectedDuration * 3) / 4) < 0.5 && a.error === null,
      `available: seek after the first URL expired lands at ${a.currentTime.toFixed(2)} s, no error`);
    check((await page.getAttribute('#player', 'data-state')) === 'available', 'available: still available');
  } finally {
    await context.close();
  }
}

const started = Date.now();
try {
  await expectState('processing', 'Recording is being processed...');
  await expectState('failed', 'Recording could not be stored');
  await expectState('none', 'No recording available');
  await expectState('none', 'Sign in to play this recording', null);
  await available();
} catch (e) {
  failures.push(`unexpected: ${e.stack || e}`);
} finally {
  await browser.close();
}
console.log(`browser checks took ${((Date.now() - started) / 1000).toFixed(1)} s`);
if (failures.length) {
  console.error(`${failures.length} check(s) failed:\n- ${failures.join('\n- ')}`);
  process.exit(1);
}
