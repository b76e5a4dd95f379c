// Drives the Host UI in Debian's headless Chromium (playwright-core; no browser is downloaded) against a running
// qx-node, as agent/tests/ui_browser.rs starts it: a wrong password refused, a login, the host summary, the VM list
// with the VM running, its detail page and VNC console, an API call without the CSRF token refused, Pause and
// Resume, a click on Stop and the state changing to stopped. Screenshots of each page go to QX_UI_ARTIFACTS. The
// last line printed is a JSON report.
//
// Environment: QX_UI_URL (https://localhost:<port>), QX_UI_PASSWORD, QX_UI_VM, QX_UI_ARTIFACTS, and optionally
// QX_CHROMIUM (default /usr/bin/chromium).

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const url = process.env.QX_UI_URL;
const password = process.env.QX_UI_PASSWORD;
const vm = process.env.QX_UI_VM;
const artifacts = process.env.QX_UI_ARTIFACTS ?? "ui-artifacts";
if (!url || !password || !vm) throw new Error("QX_UI_URL, QX_UI_PASSWORD and QX_UI_VM must be set");
mkdirSync(artifacts, { recursive: true });

const profile = join(artifacts, "profile");
const flags = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--ignore-certificate-errors",
];
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.QX_CHROMIUM ?? "/usr/bin/chromium",
  args: flags,
  ignoreHTTPSErrors: true,
  viewport: { width: 1100, height: 700 },
});
const report = { steps: [] };
const step = (name, extra = {}) => {
  report.steps.push(name);
  Object.assign(report, extra);
  console.error(`browser: ${name}`);
};
const consoleErrors = [];
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => consoleErrors.push(String(error)));
  page.setDefaultTimeout(30_000);
  const shot = (name) => page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true });

  await page.goto(url);
  await page.locator("form.login").waitFor();
  await page.fill("input[name=password]", "not the password");
  await page.click("button[type=submit]");
  const refusal = await page.locator("form.login [role=alert]").textContent();
  if (!refusal.includes("wrong user name or password")) throw new Error(`wrong password: saw ${refusal}`);
  await shot("login-refused");
  step("wrong password refused", { refusal });

  await page.fill("input[name=password]", password);
  const loginAt = Date.now();
  await page.click("button[type=submit]");
  await page.locator("section.summary dd[data-accelerator]").waitFor();
  const summaryMs = Date.now() - loginAt;
  await page.locator("table.pools tbody tr").first().waitFor();
  const nodeName = await page.locator("section.summary h1").textContent();
  await shot("summary");
  step("host summary", { summary_ms: summaryMs, node_name: nodeName });

  // The page's own origin, with the cookie but not the CSRF token: the API refuses it (what a cross-site form
  // post amounts to).
  const forged = await page.evaluate(async () => {
    const response = await fetch("/quantix.node.v1.NodeService/GetNodeInfo", {
      method: "POST",
      headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
      body: new Uint8Array(5),
    });
    return { status: response.headers.get("grpc-status"), message: response.headers.get("grpc-message") };
  });
  if (forged.status !== "7") throw new Error(`an API call without the CSRF token: ${JSON.stringify(forged)}`);
  step("no CSRF token refused", { csrf_refusal: decodeURIComponent(forged.message ?? "") });

  await page.click("header nav a[href='/vms']");
  const row = page.locator(`table.vms tr[data-vm="${vm}"]`);
  await row.locator("td.state[data-state=running]").waitFor();
  const cells = await row.locator("td").allTextContents();
  await shot("vms");
  step("VM listed running", { row: cells });

  await row.locator("a").click();
  await page.locator(`section.vm[data-vm="${vm}"] table.devices tbody tr`).first().waitFor();
  const devices = await page.locator("section.vm table.devices tbody tr").allTextContents();
  await shot("vm-detail");
  step("VM detail", { devices });

  // The console: noVNC over the node's WebSocket bridge to the VM's VNC display.
  await page.click("button[data-action=console]");
  await page.locator(".console[data-status=connected] canvas").waitFor();
  const canvas = await page.locator(".console canvas").evaluate((c) => ({ width: c.width, height: c.height }));
  if (!(canvas.width > 0 && canvas.height > 0)) throw new Error(`the console canvas is empty: ${JSON.stringify(canvas)}`);
  await page.waitForTimeout(1000);
  await shot("console");
  step("VNC console connected", { framebuffer: canvas });

  // Console tickets: none, a forged one, and one of this VM shown for another are each refused and say why.
  const refusals = await page.evaluate(async (vm) => {
    const say = async (response) => `${response.status} ${(await response.json()).error}`;
    const out = {};
    out.none = await say(await fetch(`/api/vms/${vm}/vnc`));
    out.forged = await say(await fetch(`/api/vms/${vm}/vnc?ticket=00ff`));
    out.no_csrf = await say(await fetch(`/api/vms/${vm}/vnc-ticket`, { method: "POST" }));
    return out;
  }, vm);
  for (const [what, said] of Object.entries(refusals)) {
    if (!/^40[13] /.test(said)) throw new Error(`console ticket ${what}: ${said}`);
  }
  step("console tickets checked", { ticket_refusals: refusals });

  await page.goBack();
  await row.locator("button[data-action=pause]").click();
  await row.locator("td.state[data-state=paused]").waitFor();
  await row.locator("button[data-action=resume]").click();
  await row.locator("td.state[data-state=running]").waitFor();
  step("VM paused and resumed from the page");

  await row.locator("button[data-action=stop]").click();
  const stopAt = Date.now();
  await row.locator("td.state[data-state=stopped]").waitFor({ timeout: 90_000 });
  await shot("vms-stopped");
  step("VM stopped from the page", { stop_ms: Date.now() - stopAt });

  await page.reload();
  await row.locator("td.state[data-state=stopped]").waitFor();
  step("a reload keeps the session");
} catch (error) {
  report.error = String(error?.stack ?? error);
  try {
    const page = context.pages()[0];
    if (page) await page.screenshot({ path: join(artifacts, "failure.png"), fullPage: true });
  } catch {
    // The failure is what matters.
  }
} finally {
  report.console_errors = consoleErrors;
  await context.close();
}
console.log(JSON.stringify(report));
process.exit(report.error ? 1 : 0);
