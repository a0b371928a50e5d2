// Reads an evaluation page (report.html) in headless Chromium (Debian's `chromium`, through
// playwright-core) the way a person uses it: every request it makes, its studies and their chips,
// the chart, the filters, the sorting and the keyboard; screenshots of its top (SCREENSHOT) and of
// its studies with errors (SCREENSHOT with -errors before .png).
// Usage: node eval_page.mjs FILE_URL SCREENSHOT [OBSERVATION_CODE]   (prints one JSON line)
import { createRequire } from "node:module";
const require = createRequire(process.env.PLAYWRIGHT_CORE || import.meta.url);
const { chromium } = require("playwright-core");

const [url, shot, code] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const result = { url, requests: [], console: [] };
let ok = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("request", (r) => result.requests.push(r.url()));
  page.on("pageerror", (e) => { result.pageerror = String(e); });
  page.on("console", (m) => { if (m.type() === "error") result.console.push(m.text()); });
  await page.goto(url, { waitUntil: "load" });
  await page.screenshot({ path: shot, fullPage: false });
  const visible = () => page.$$eval(".study", (els) => els.filter((e) => !e.hidden).map((e) => e.dataset.id));
  result.studies = await page.$$eval(".study", (els) => els.length);
  result.shown_text = await page.textContent("#shown");
  result.images_loaded = await page.$$eval(".study img", (els) => els.filter((i) => i.complete && i.naturalWidth > 0).length);
  result.images = await page.$$eval(".study img", (els) => els.length);
  // Each study's chips: the reference's and, per model column, right / missed / invented codes.
  result.chips = await page.$$eval(".study", (els) => Object.fromEntries(els.map((s) => {
    const codes = (root, kind) => [...root.querySelectorAll(".chip." + kind)].map((c) => c.dataset.obs);
    const models = [...s.querySelectorAll(".col.model")].map((c) => ({
      model: c.dataset.model,
      right: codes(c, "right"), missed: codes(c, "missed"), invented: codes(c, "invented"),
      titles: [...c.querySelectorAll(".chip")].map((x) => x.title),
    }));
    return [s.dataset.id, { stated: codes(s.querySelector(".col.reference"), "stated"), models }];
  })));
  result.chart_groups = await page.$$eval("#observations svg g.obs", (els) => els.map((g) => g.dataset.observation));
  result.chart_bars = await page.$$eval("#observations svg rect.bar", (els) => els.length);
  result.best_cells = await page.$$eval("td.best", (els) => els.length);
  result.verdicts = await page.$$eval(".verdict", (els) => els.map((e) => e.textContent));
  result.all = await visible();
  // Keyboard: j twice focuses the second study, k back to the first.
  await page.keyboard.press("j");
  await page.keyboard.press("j");
  result.after_jj = await page.evaluate(() => document.activeElement?.dataset?.id ?? null);
  await page.keyboard.press("k");
  result.after_jjk = await page.evaluate(() => document.activeElement?.dataset?.id ?? null);
  // Filters.
  await page.check("#only-errors");
  result.only_errors = await visible();
  result.only_errors_text = await page.textContent("#shown");
  await page.uncheck("#only-errors");
  if (code) {
    await page.selectOption("#observation", code);
    result.observation = await visible();
    await page.check("#only-errors");
    result.observation_errors = await visible();
    await page.uncheck("#only-errors");
    await page.selectOption("#observation", "");
  }
  if (await page.$("#disagreements")) {
    await page.check("#disagreements");
    result.disagreements = await visible();
    await page.uncheck("#disagreements");
  }
  // Sorting: worst CE first, then back to the evaluation's order.
  await page.selectOption("#sort", "worst");
  result.worst_first = await page.$$eval(".study", (els) => els.map((e) => [e.dataset.id, parseFloat(e.dataset.ce)]));
  await page.selectOption("#sort", "order");
  result.restored = await visible();
  // The studies with errors, for a person to look at.
  await page.check("#only-errors");
  await page.evaluate(() => document.getElementById("studies").scrollIntoView());
  await page.screenshot({ path: shot.replace(/\.png$/, "-errors.png"), fullPage: false });
  ok = !result.pageerror;
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(ok ? 0 : 1);
