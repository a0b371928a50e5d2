// Drives the web demo in headless Chromium (Debian's `chromium`, through playwright-core):
// load the page, upload an X-ray, ask a question, wait for the streamed answer, screenshot.
// Usage: node web_demo.mjs URL IMAGE SCREENSHOT   (prints one JSON line; exit 1 on failure)
import { createRequire } from "node:module";
const require = createRequire(process.env.PLAYWRIGHT_CORE || import.meta.url);
const { chromium } = require("playwright-core");

const [url, image, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
let ok = false;
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  page.on("pageerror", (e) => { result.pageerror = String(e); });
  await page.goto(url);
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("ready"));
  await page.setInputFiles("#file", image);
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("image ready"), null, { timeout: 60000 });
  result.image_shown = await page.evaluate(() => {
    const img = document.getElementById("shown");
    return !!img && img.complete && img.naturalWidth > 0;
  });
  result.default_question = await page.inputValue("#query");
  await page.click("#send");
  await page.waitForSelector(".bot[data-state=done], .bot[data-state=error]", { timeout: 120000 });
  result.state = await page.getAttribute(".bot", "data-state");
  result.answer = (await page.textContent(".bot")).replace(/^答：/, "");
  result.question = await page.textContent(".user");
  await page.screenshot({ path: shot, fullPage: true });
  ok = result.state === "done" && result.answer.length > 0 && result.image_shown && !result.pageerror;
} catch (e) {
  result.error = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
process.exit(ok ? 0 : 1);
