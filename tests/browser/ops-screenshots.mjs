// Screenshots of Prometheus's own graph page for the README (run by
// scripts/ops-screenshots, not by the tests): one PNG per panel, in
// Debian's headless Chromium.
//   node ops-screenshots.mjs PROMETHEUS_URL OUT_DIR RANGE
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [base, outDir, range] = process.argv.slice(2);
mkdirSync(outDir, { recursive: true });

// Each panel: the file, and the expressions graphed on one page.
const panels = [
  {
    file: 'queue-lag.png',
    exprs: ['max(recording_relay_queue_lag_seconds)'],
  },
  {
    file: 'time-to-playable.png',
    exprs: [[0.5, 0.95]
      .map(
        (q) =>
          `label_replace(histogram_quantile(${q}, sum by (le) (rate(recording_relay_processing_seconds_bucket[1m]))), "quantile", "${q}", "", "")`,
      )
      .join(' or ')],
  },
  {
    file: 'webhook-outcomes.png',
    exprs: ['sum by (outcome, status) (rate(recording_relay_webhooks_total[1m]))'],
  },
];

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
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
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 700 } });
  for (const panel of panels) {
    const params = new URLSearchParams();
    panel.exprs.forEach((expr, i) => {
      params.set(`g${i}.expr`, expr);
      params.set(`g${i}.tab`, '0');
      params.set(`g${i}.range_input`, range);
    });
    const page = await context.newPage();
    page.setDefaultTimeout(30_000);
    await page.goto(`${base}/graph?${params}`);
    // The navigation bar is fixed to the viewport: in a full-page shot it
    // would float over the middle of the page.
    await page.addStyleTag({ content: '.navbar.fixed-top { position: absolute !important; }' });
    // Debian's build serves the classic console: one Rickshaw chart per
    // expression, each with a legend line per series.
    await page.waitForFunction(
      (n) => document.querySelectorAll('.rickshaw_legend').length >= n,
      panel.exprs.length,
    );
    await page.waitForTimeout(500);
    const series = await page.locator('.rickshaw_legend .line').count();
    console.log(`${panel.file}: ${series} series`);
    if (series === 0) failed = true;
    await page.screenshot({ path: path.join(outDir, panel.file), fullPage: true });
    await page.close();
  }
} finally {
  await browser.close();
}
if (failed) {
  console.error('a panel drew no series: is the demo scraped?');
  process.exit(1);
}
