// Drives the duplex browser client in Debian's headless Chromium (never a downloaded browser)
// for the server's browser tests (crates/duplex-server/tests/browser/). The Rust test starts
// the real server, then runs
//
//   node tests/browser/drive.mjs '<plan as JSON>'
//
// where the plan is {url, wav, chromium?, timeoutMs?, steps: [...]}. `wav` is the fake
// microphone: Chromium plays the file (16-bit WAV) into getUserMedia, in a loop. Each step:
//
//   {do: 'goto'}                              open the page
//   {do: 'click', name}                       click the button with that accessible name
//   {do: 'setToken', token}                   open Settings and type a bearer token
//   {do: 'waitStatus', states, timeoutMs?}    until the status line's state is one of these
//   {do: 'waitStats', until, timeoutMs?}      until `until` (a JS function of the page's
//                                             window.duplexStats()) returns true
//   {do: 'waitEnabled', id}                  until the element with that id is enabled
//   {do: 'sleep', ms}
//   {do: 'screenshot', path}
//   {do: 'snapshot', name}                    record the page's counters and what it shows
//   {do: 'signal', name}                      print {"signal": name}, wait for a line on stdin
//
// Output: one JSON line per signal, then {"result": {snapshots, consoleErrors, pageErrors}}.
// A failed step prints {"error": ..., "result": ...} and exits 1, so the test sees how far
// the page got.
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const plan = JSON.parse(process.argv[2]);
const result = { snapshots: {}, consoleErrors: [], pageErrors: [], consoleLog: [] };
const stdinLines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const browser = await chromium.launch({
  executablePath: plan.chromium || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    // This machine reaches no outside host: stop Chromium's own background requests.
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-ui-for-media-stream',
    '--use-fake-device-for-media-stream',
    `--use-file-for-fake-audio-capture=${plan.wav}`,
    '--autoplay-policy=no-user-gesture-required',
  ],
});

let page;
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 1000 } });
  await context.grantPermissions(['microphone'], { origin: new URL(plan.url).origin });
  page = await context.newPage();
  page.on('console', (m) => {
    const line = `${m.type()}: ${m.text()}`;
    result.consoleLog.push(line);
    if (m.type() === 'error') result.consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => result.pageErrors.push(String(e)));
  const timeout = plan.timeoutMs || 30000;
  for (const step of plan.steps) {
    const t = step.timeoutMs || timeout;
    switch (step.do) {
      case 'goto':
        await page.goto(plan.url, { waitUntil: 'load', timeout: t });
        break;
      case 'click':
        await page.getByRole('button', { name: step.name, exact: true }).click({ timeout: t });
        break;
      case 'setToken':
        await page.locator('#settings summary').click();
        await page.getByLabel('Bearer token (JWT)').fill(step.token);
        await page.getByLabel('Bearer token (JWT)').dispatchEvent('change');
        break;
      case 'waitStatus':
        await page.waitForFunction(
          (states) => states.includes(document.getElementById('status').dataset.state),
          step.states,
          { timeout: t, polling: 50 },
        );
        break;
      case 'waitStats': {
        // The predicate runs here, in Node, on the page's counters: the page's CSP (rightly)
        // forbids evaluating strings as code inside it.
        const until = new Function('s', `return (${step.until})(s);`);
        const deadline = Date.now() + t;
        for (;;) {
          const stats = await page.evaluate(() => window.duplexStats());
          if (until(stats)) break;
          if (Date.now() > deadline) throw new Error(`timed out after ${t} ms waiting for ${step.until}`);
          // Each poll serialises the page's counters (seconds of level log): not too often, or
          // the test itself takes the CPU the engines need.
          await page.waitForTimeout(250);
        }
        break;
      }
      case 'waitEnabled':
        await page.waitForFunction((id) => !document.getElementById(id).disabled, step.id, {
          timeout: t,
          polling: 50,
        });
        break;
      case 'sleep':
        await page.waitForTimeout(step.ms);
        break;
      case 'screenshot':
        await page.screenshot({ path: step.path, fullPage: true });
        break;
      case 'snapshot':
        result.snapshots[step.name] = await snapshot(page);
        break;
      case 'signal':
        console.log(JSON.stringify({ signal: step.name }));
        await stdinLines.next();
        break;
      default:
        throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
  }
  console.log(JSON.stringify({ result }));
  await browser.close();
} catch (e) {
  if (page) {
    try {
      result.snapshots.atError = await snapshot(page);
    } catch {
      // The page itself is gone: report what we have.
    }
  }
  console.log(JSON.stringify({ error: String(e && e.stack ? e.stack : e), result }));
  await browser.close();
  process.exit(1);
}
process.exit(0);

/** The page's counters and what a person sees on it. */
async function snapshot(p) {
  return p.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent.trim();
    return {
      stats: window.duplexStats(),
      status: text('status'),
      state: document.getElementById('status').dataset.state,
      banner: document.getElementById('banner').hidden ? '' : text('banner'),
      errors: [...document.querySelectorAll('#errors li')].map((li) => li.textContent.trim()),
      usageText: text('usage-text'),
      startDisabled: document.getElementById('start').disabled,
      stopDisabled: document.getElementById('stop').disabled,
      transcript: [...document.querySelectorAll('#transcript li')].map((li) => ({
        kind: li.className,
        text: li.querySelector('.text').textContent,
        heard: li.querySelector('.heard') ? li.querySelector('.heard').textContent : null,
        cut: li.querySelector('.cut') ? li.querySelector('.cut').textContent : null,
      })),
    };
  });
}
