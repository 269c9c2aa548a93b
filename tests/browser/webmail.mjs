// End-to-end check: headless Chromium logs into Roundcube through logon-gate.
// Inputs come from the environment (see README.md); prints one JSON object on stdout and
// exits 0 on success, 1 on any failure. Diagnostics go to stderr.
//
// BASE_URL=http://127.0.0.1:PORT runs against Roundcube directly (no gateway): the
// gateway-only checks (protocol, Secure cookies, disabled host) are skipped, and
// GATEWAY_PORT, ENABLED_HOST, DISABLED_HOST, SPKI and PROTOCOL are not needed.
import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const STEP_TIMEOUT = 15_000;
// Hard stop below the caller's budget, so a hung browser still yields a JSON report.
const RUN_TIMEOUT = 50_000;

const env = process.env;
const result = { ok: false, steps: [], protocols: [], cookies: [], http_errors: [] };
let step = 'env';
let context = null;
let page = null;
let userDataDir = null;
let finished = false;

function need(name) {
  const v = env[name];
  if (!v) throw new Error(`environment variable ${name} is required`);
  return v;
}

function emit(obj, code) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(obj) + '\n');
  process.exitCode = code;
}

async function visibleText(p) {
  try {
    const t = await p.locator('body').innerText({ timeout: 2_000 });
    return t.replace(/\s+\n/g, '\n').trim().slice(0, 2000);
  } catch {
    return '';
  }
}

// Resolves with the key of the first promise to settle successfully; the losers get a catch
// so their later timeouts are not unhandled rejections (which would kill node).
function firstOf(named) {
  const entries = Object.entries(named);
  for (const [, p] of entries) p.catch(() => {});
  return Promise.any(entries.map(([k, p]) => p.then(() => k)));
}

async function navProtocol(target, label) {
  const proto = await target.evaluate(
    () => performance.getEntriesByType('navigation')[0]?.nextHopProtocol ?? null,
  );
  result.protocols.push({ page: label, protocol: proto });
  return proto;
}

async function main() {
  const baseOverride = env.BASE_URL ? env.BASE_URL.replace(/\/+$/, '') : null;
  const gateway = !baseOverride;
  const user = need('IMAP_USER');
  const pass = need('IMAP_PASS');
  const subject = need('SUBJECT');
  const bodyText = need('BODY_TEXT');
  const outDir = env.OUT_DIR || mkdtempSync(join(tmpdir(), 'webmail-out-'));
  mkdirSync(outDir, { recursive: true });
  result.out_dir = outDir;

  let base, disabledBase, protocol;
  const args = [
    '--headless',
    '--no-sandbox', // running as root (CI), where the sandbox cannot start
    '--disable-gpu',
    '--disable-quic', // keep to TCP: the gateway speaks h2/http1.1 over TLS only
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--no-proxy-server', // an inherited http(s)_proxy must not divert loopback traffic
  ];
  if (gateway) {
    const port = need('GATEWAY_PORT');
    const enabled = need('ENABLED_HOST');
    const disabled = need('DISABLED_HOST');
    const spki = need('SPKI');
    protocol = need('PROTOCOL');
    if (protocol !== 'h2' && protocol !== 'http/1.1') {
      throw new Error(`PROTOCOL must be h2 or http/1.1, got ${protocol}`);
    }
    base = `https://${enabled}:${port}`;
    disabledBase = `https://${disabled}:${port}`;
    // The test CA is not in any trust store; pinning the leaf's SPKI is how Chromium accepts
    // it (honoured only with an explicit --user-data-dir, which launchPersistentContext passes).
    args.push(`--ignore-certificate-errors-spki-list=${spki}`);
    args.push(`--host-resolver-rules=MAP ${enabled} 127.0.0.1, MAP ${disabled} 127.0.0.1`);
    // Without h2 in ALPN the gateway must fall back to HTTP/1.1.
    if (protocol === 'http/1.1') args.push('--disable-http2');
  } else {
    base = baseOverride;
  }
  result.base_url = base;

  step = 'launch';
  userDataDir = mkdtempSync(join(tmpdir(), 'webmail-profile-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args,
    viewport: { width: 1280, height: 800 }, // wide enough for elastic's 3-column layout
    locale: 'en-US',
    timeout: STEP_TIMEOUT,
  });
  context.setDefaultTimeout(STEP_TIMEOUT);
  context.setDefaultNavigationTimeout(STEP_TIMEOUT);
  page = context.pages()[0] ?? (await context.newPage());
  // Failed subrequests (assets, AJAX) explain many UI failures: keep the first few.
  // ERR_ABORTED is the browser cancelling a load it no longer needs (e.g. the preview
  // iframe's placeholder page when a message replaces it), not a server fault.
  const noteError = (e) => {
    if (result.http_errors.length < 20) result.http_errors.push({ step, ...e });
  };
  page.on('response', (r) => {
    if (r.status() >= 400) noteError({ url: r.url(), status: r.status() });
  });
  page.on('requestfailed', (r) => {
    const failure = r.failure()?.errorText ?? 'failed';
    if (failure !== 'net::ERR_ABORTED') noteError({ url: r.url(), failure });
  });
  const done = (name, extra = {}) => result.steps.push({ step: name, ...extra });
  const shot = (name) => page.screenshot({ path: join(outDir, `${name}.png`) });
  const checkProto = async (target, label) => {
    const got = await navProtocol(target, label);
    if (gateway && got !== protocol) {
      throw new Error(`${label}: nextHopProtocol is ${got}, expected ${protocol}`);
    }
  };

  step = 'open_login';
  const resp = await page.goto(`${base}/`, { waitUntil: 'load' });
  if (!resp || resp.status() !== 200) {
    throw new Error(`GET / answered ${resp ? resp.status() : 'nothing'}`);
  }
  await page.locator('#rcmloginuser').waitFor({ state: 'visible' });
  await checkProto(page, 'login');
  await shot('1-login');
  done(step, { status: resp.status() });

  step = 'login';
  await page.locator('#rcmloginuser').fill(user);
  await page.locator('#rcmloginpwd').fill(pass);
  await page.locator('#rcmloginsubmit').click();
  // Either the mail view comes up or Roundcube shows an error toast on the login page
  // (wrong password, "Your session is invalid or expired", ...): fail fast on the latter.
  const outcome = await firstOf({
    mail: page.locator('#messagelist').waitFor({ state: 'attached' }),
    error: page.locator('#messagestack .error, #messagestack .warning').first()
      .waitFor({ state: 'visible' }),
  });
  if (outcome === 'error') {
    const msg = await page.locator('#messagestack').innerText().catch(() => '');
    throw new Error(`login rejected: ${msg.trim()}`);
  }
  if (!/[?&]_task=mail/.test(page.url())) throw new Error(`not in mail view: ${page.url()}`);
  await checkProto(page, 'mail');
  done(step);

  step = 'inbox';
  const row = page.locator('#messagelist tbody tr').filter({ hasText: subject }).first();
  await row.waitFor({ state: 'visible' });
  await shot('2-inbox');
  done(step);

  step = 'cookies';
  const cookies = await context.cookies(base);
  result.cookies = cookies.map((c) => ({
    name: c.name, secure: c.secure, httpOnly: c.httpOnly, sameSite: c.sameSite, path: c.path,
  }));
  for (const name of ['roundcube_sessid', 'roundcube_sessauth']) {
    const c = cookies.find((x) => x.name === name);
    if (!c) throw new Error(`cookie ${name} not set`);
    if (gateway && !c.secure) throw new Error(`cookie ${name} is not Secure`);
  }
  done(step);

  step = 'open_message';
  // In elastic's widescreen layout a click opens the message in the preview iframe.
  await row.click();
  const frameEl = page.locator('#messagecontframe');
  await frameEl.waitFor({ state: 'visible' });
  const preview = page.frameLocator('#messagecontframe');
  await preview.locator('#messagebody').getByText(bodyText).first().waitFor({ state: 'visible' });
  const frame = await (await frameEl.elementHandle()).contentFrame();
  await checkProto(frame, 'message');
  await shot('3-message');
  done(step);

  step = 'logout';
  await page.locator('#taskmenu a.logout').click();
  await page.locator('#rcmloginuser').waitFor({ state: 'visible' });
  // Roundcube lands on ?_task=logout, which renders the login form again.
  if (!/[?&]_task=(login|logout)/.test(page.url())) {
    throw new Error(`not on the login page: ${page.url()}`);
  }
  await checkProto(page, 'logout');
  await shot('4-logout');
  done(step);

  if (gateway) {
    step = 'disabled_host';
    // A path of its own, so the test can tell from Roundcube's request log that it never
    // got there.
    const r = await page.goto(`${disabledBase}/?_task=login&probe=disabled-host`, { waitUntil: 'load' });
    if (!r) throw new Error('no response from the disabled host');
    const text = await r.text().catch(() => '');
    result.disabled = {
      status: r.status(),
      contentType: r.headers()['content-type'] ?? null,
      text: text.trim().slice(0, 2000),
    };
    await navProtocol(page, 'disabled');
    await shot('5-disabled');
    done(step, { status: r.status() });
  } else {
    result.skipped = ['protocol', 'secure_cookies', 'disabled_host'];
  }

  step = 'done';
  result.ok = true;
}

async function fail(err) {
  const report = {
    ok: false,
    step,
    error: String(err?.message ?? err).split('\n')[0].slice(0, 500),
    url: null,
    text: '',
    screenshot: null,
    steps: result.steps,
    protocols: result.protocols,
    cookies: result.cookies,
    http_errors: result.http_errors,
  };
  if (page) {
    report.url = page.url();
    report.text = await visibleText(page);
    const outDir = result.out_dir ?? tmpdir();
    const path = join(outDir, `failure-${step}.png`);
    try {
      await page.screenshot({ path, timeout: 5_000 });
      report.screenshot = path;
    } catch (e) {
      process.stderr.write(`screenshot failed: ${e.message}\n`);
    }
  }
  process.stderr.write(`webmail.mjs: step ${step} failed: ${err?.stack ?? err}\n`);
  emit(report, 1);
}

async function cleanup() {
  if (context) await context.close().catch(() => {});
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
}

const watchdog = setTimeout(async () => {
  await fail(new Error(`run exceeded ${RUN_TIMEOUT} ms`));
  await Promise.race([cleanup(), new Promise((r) => setTimeout(r, 3_000))]);
  process.exit(1); // playwright kills the browser on exit
}, RUN_TIMEOUT);

try {
  await main();
  emit(result, 0);
} catch (err) {
  await fail(err);
} finally {
  clearTimeout(watchdog);
  await cleanup();
}
