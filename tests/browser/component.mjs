// The React player (web/RecordingPlayer.tsx) in Debian's headless Chromium,
// against the real playback API. Run by tests/api/playback.rs in two steps:
//
//   node tests/browser/component.mjs build <out-dir>
//       bundles component/harness.tsx with esbuild and React from npm into
//       <out-dir>/index.html and <out-dir>/harness.js (the test serves them
//       from an origin the playback server allows);
//   node tests/browser/component.mjs run <page-url> '<spec JSON>'
//       drives the page: each state, the duration as m:ss, URL renewal that
//       keeps the position, a late seek on the renewed URL.
//
// Exit code 0 when every check passed; otherwise the failures are printed.

import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const [mode, ...args] = process.argv.slice(2);

if (mode === 'build') {
  const [out] = args;
  const esbuild = await import('esbuild');
  mkdirSync(out, { recursive: true });
  await esbuild.build({
    entryPoints: [path.join(here, 'component/harness.tsx')],
    outfile: path.join(out, 'harness.js'),
    bundle: true,
    format: 'iife',
    target: 'chrome120',
    jsx: 'automatic',
    // React's development build under StrictMode, as the UI team runs it:
    // effects mount, unmount and mount again, which a leaky cleanup fails.
    define: { 'process.env.NODE_ENV': '"development"' },
    // web/ has no node_modules of its own.
    nodePaths: [path.join(here, 'node_modules')],
    logLevel: 'warning',
  });
  writeFileSync(
    path.join(out, 'index.html'),
    '<!doctype html><html><head><meta charset="utf-8"><title>RecordingPlayer</title>' +
      '<link rel="icon" href="data:,"></head><body><div id="root"></div><script src="harness.js"></script></body></html>\n',
  );
  console.log(`bundled into ${out}`);
  process.exit(0);
}

if (mode !== 'run' || args.length !== 2) {
  console.error("usage: component.mjs build <out-dir> | run <page-url> '<spec JSON>'");
  process.exit(2);
}

const { chromium } = await import('playwright-core');
const [pageBase, specJson] = args;
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

async function openPage(state, token = spec.token) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.on('pageerror', (e) => failures.push(`${state}: uncaught page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') {
      console.log(`  [console ${state}] ${m.text()}`);
      // React reports broken rendering (keys, effects, hooks) as errors.
      if (m.text().includes('React')) failures.push(`${state}: React error: ${m.text()}`);
    }
  });
  const hash = new URLSearchParams({ api: spec.api, intake: spec.intakes[state] });
  if (token) hash.set('token', token);
  await page.goto(`${pageBase}#${hash}`);
  return { context, page };
}

const playerState = (page, s) =>
  page.waitForFunction((s) => document.querySelector('.recording-player')?.dataset.state === s, s);

async function expectState(state, expectedText, token) {
  const { context, page } = await openPage(state, token);
  try {
    const shown = token === null ? 'unauthorized' : state;
    await playerState(page, shown);
    const text = (await page.textContent('.recording-player > p')).trim();
    check(text === expectedText, `${shown}: shows "${expectedText}" (got "${text}")`);
    check(!(await page.isVisible('.recording-player audio')), `${shown}: no player`);
    await page.screenshot({ path: path.join(spec.artifacts, `component-${shown}.png`) });
  } finally {
    await context.close();
  }
}

// Waits for one media event after running a fixed action in the page.
const onEvent = (page, event, action) =>
  page.evaluate(
    ([event, action]) =>
      new Promise((resolve, reject) => {
        const audio = document.querySelector('.recording-player audio');
        const timer = setTimeout(() => reject(new Error(`no ${event} within 10s`)), 10_000);
        audio.addEventListener(event, () => { clearTimeout(timer); resolve(); }, { once: true });
        audio.addEventListener('error', () => {
          clearTimeout(timer);
          reject(new Error(`media error ${audio.error && audio.error.code}`));
        }, { once: true });
        if (action === 'seek-middle') audio.currentTime = audio.duration / 2;
        if (action === 'seek-three-quarters') audio.currentTime = (audio.duration * 3) / 4;
      }),
    [event, action],
  );

const audioState = (page) =>
  page.evaluate(() => {
    const a = document.querySelector('.recording-player audio');
    return { src: a.currentSrc, duration: a.duration, currentTime: a.currentTime, error: a.error && a.error.code };
  });

async function available() {
  const { context, page } = await openPage('available');
  const media = [];
  page.on('response', (r) => {
    if (r.url().includes('/object/sign/')) media.push({ url: r.url(), status: r.status(), at: Date.now() });
  });
  try {
    await playerState(page, 'available');
    await page.waitForFunction(() => document.querySelector('.recording-player audio').readyState >= 1);
    check(await page.isVisible('.recording-player audio'), 'available: player visible');
    let a = await audioState(page);
    check(Math.abs(a.duration - spec.expectedDuration) < 0.05,
      `available: <audio> duration ${a.duration} s ≈ ${spec.expectedDuration} s`);
    const label = (await page.textContent('.recording-player div p')).trim();
    check(label === `Duration ${spec.expectedLabel}`, `available: shows "${label}" (m:ss)`);

    const firstSrc = a.src;
    const tokensBefore = await page.evaluate(() => window.tokenRequests);
    await onEvent(page, 'seeked', 'seek-middle');
    a = await audioState(page);
    const middle = spec.expectedDuration / 2;
    check(Math.abs(a.currentTime - middle) < 0.5 && a.error === null,
      `available: seek to the middle lands at ${a.currentTime.toFixed(2)} s, no error`);
    await page.screenshot({ path: path.join(spec.artifacts, 'component-available.png') });

    // Renewal before expiry, through the API, keeping the position.
    const renewed = Date.now();
    await page.waitForFunction((first) => {
      const a = document.querySelector('.recording-player audio');
      return a.currentSrc !== first && a.readyState >= 1;
    }, firstSrc, { timeout: spec.ttlSeconds * 1000 + 5_000 });
    const renewedSrc = (await audioState(page)).src;
    const tokensAfter = await page.evaluate(() => window.tokenRequests);
    check(tokensAfter > tokensBefore,
      `available: URL renewed through the API after ${((Date.now() - renewed) / 1000).toFixed(1)} s (token asked again)`);
    const kept = await page
      .waitForFunction((m) => Math.abs(document.querySelector('.recording-player audio').currentTime - m) < 0.5,
        middle, { timeout: 3_000 })
      .then(() => true, () => false);
    a = await audioState(page);
    check(kept, `available: position kept across the renewal (${a.currentTime.toFixed(2)} s)`);

    // Past the first URL's expiry a seek fetches with the renewed URL.
    const waitMs = spec.ttlSeconds * 1000 + 1_000 - (Date.now() - renewed);
    if (waitMs > 0) await page.waitForTimeout(waitMs);
    const lateSeek = Date.now();
    await onEvent(page, 'seeked', 'seek-three-quarters');
    a = await audioState(page);
    const late = media.filter((m) => m.at >= lateSeek);
    check(late.length > 0 && late.every((m) => m.url !== firstSrc),
      `available: the late seek fetched ${late.length} range(s), none with the expired URL`);
    const refused = media.filter((m) => m.status >= 400).map((m) => m.status);
    check(refused.length === 0, `available: all ${media.length} media requests answered (refused: ${refused.length ? refused : 'none'})`);
    check(Math.abs(a.currentTime - (spec.expectedDuration * 3) / 4) < 0.5 && a.error === null,
      `available: late seek lands at ${a.currentTime.toFixed(2)} s, no error`);
    check(renewedSrc !== firstSrc, 'available: the renewed URL differs from the first');
    check((await page.getAttribute('.recording-player', 'data-state')) === 'available', 'available: still available');
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
console.log(`component checks took ${((Date.now() - started) / 1000).toFixed(1)} s`);
if (failures.length) {
  console.error(`${failures.length} check(s) failed:\n- ${failures.join('\n- ')}`);
  process.exit(1);
}
