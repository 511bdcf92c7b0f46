// Two browser sessions on the chat page (`/demo`), driven through puppeteer-core in Debian's
// headless chromium: A posts and B sees it live, with its sender; an edit shows B the "edited"
// mark; a search shows a <mark> highlight; a deletion disappears; then 20 messages are timed from
// A's click to B's page showing them. Run by tests/it/demo_page.rs:
//
//   NODE_PATH=<puppeteer's node_modules> CHROMIUM=/usr/bin/chromium \
//     node tests/demo/two_browsers.cjs ORIGIN APPLICATION_TOKEN CHAT SCREENSHOT.png
//
// Prints one JSON line: {"latencies_ms": [...]} (the timed messages). Fails (exit 1) on any
// check, on an error in a page (a refused Content-Security-Policy included), or past a bound.
"use strict";
const puppeteer = require("puppeteer-core");

const [origin, token, chat, screenshot] = process.argv.slice(2);
if (!screenshot) throw new Error("usage: two_browsers.cjs ORIGIN TOKEN CHAT SCREENSHOT");
/** How soon a message posted in one browser must show in the other. */
const LIVE_BOUND_MS = 2000;
/** Patience for what is not live (a search index catching up on a loaded machine). */
const PATIENCE_MS = 30000;

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

/** A session of its own (cookies, storage) on the page, as `sender`; waits until it is live. */
async function session(browser, sender, errors) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  await page.setViewport({ width: 1100, height: 700 });
  page.on("pageerror", (error) => errors.push(`${sender}: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(`${sender}: ${message.text()} (${message.location().url})`);
  });
  await page.goto(`${origin}/demo#token=${encodeURIComponent(token)}&chat=${chat}&sender=${sender}`);
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Live"), {
    timeout: PATIENCE_MS,
  });
  // When each message body first shows (the page's clock is the machine's, like this script's).
  await page.evaluate(() => {
    window.seenAt = new Map();
    const note = () => {
      for (const body of document.querySelectorAll("#messages .body")) {
        if (!window.seenAt.has(body.textContent)) window.seenAt.set(body.textContent, Date.now());
      }
    };
    new MutationObserver(note).observe(document.getElementById("messages"), {
      childList: true,
      subtree: true,
      characterData: true,
    });
    note();
  });
  return page;
}

/** Types `text` into the composer and sends it; the time of the click. */
async function post(page, text) {
  await page.type("#body", text);
  const clicked = Date.now();
  await page.click("#send");
  return clicked;
}

/** Waits until `page` shows a message with this body; when it first did. */
async function seen(page, text, timeout) {
  await page.waitForFunction((body) => window.seenAt.has(body), { timeout, polling: "mutation" }, text);
  return page.evaluate((body) => window.seenAt.get(body), text);
}

/**
 * Searches on `page` until the hits show `marks` highlights or more (the search index catches up
 * a moment after a message is stored); the highlighted texts.
 */
async function search(page, query, marks) {
  const started = Date.now();
  for (;;) {
    await page.evaluate((words) => {
      document.getElementById("query").value = words;
      document.getElementById("search").requestSubmit();
    }, query);
    await new Promise((resolve) => setTimeout(resolve, 300));
    const marked = await page.$$eval("#hits mark", (found) => found.map((mark) => mark.textContent));
    if (marked.length >= marks) return marked;
    check(Date.now() - started < PATIENCE_MS, `a search for ${query} finds ${marks} highlights`);
  }
}

/** The list item of the message with this body on `page`. */
function itemOf(page, text) {
  return page.evaluateHandle(
    (body) => Array.from(document.querySelectorAll("#messages li")).find((li) => li.querySelector(".body").textContent === body),
    text,
  );
}

async function main() {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    // Root in a container: no sandbox; /dev/shm may be small.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  const errors = [];
  try {
    const a = await session(browser, "alice", errors);
    const b = await session(browser, "bob", errors);

    // A posts; B sees it within the bound, with its sender, as text (never as markup).
    const first = "Hello <b>Bob</b> & welcome";
    const sent = await post(a, first);
    const shown = await seen(b, first, LIVE_BOUND_MS + 1000);
    check(shown - sent <= LIVE_BOUND_MS, `B saw the message ${shown - sent} ms after A's click`);
    const shownFirst = await (await itemOf(b, first)).evaluate((li) => ({
      sender: li.querySelector(".sender").textContent,
      bold: li.querySelector("b") !== null,
    }));
    check(shownFirst.sender === "alice", `B shows the sender: ${JSON.stringify(shownFirst)}`);
    check(!shownFirst.bold, "a body is text, not markup");

    // A edits it; B shows the new body with the "edited" mark.
    const edited = "Hello Bob, welcome to the chat";
    await seen(a, first, PATIENCE_MS);
    await (await itemOf(a, first)).evaluate((li) => li.querySelector(".actions button").click());
    await a.evaluate(() => {
      document.getElementById("body").value = "";
    });
    await post(a, edited);
    await seen(b, edited, PATIENCE_MS);
    const editedMark = await (await itemOf(b, edited)).evaluate((li) => li.querySelector(".edited")?.textContent);
    check(editedMark === "edited", `B shows the edited mark: ${editedMark}`);

    // B searches; a hit shows its match in a <mark>.
    const marked = await search(b, "welcome", 1);
    check(marked.includes("welcome"), `the highlight marks the word: ${JSON.stringify(marked)}`);

    // A posts and deletes a message; it disappears from B's page.
    const mistake = "oops, wrong chat";
    await post(a, mistake);
    await seen(b, mistake, PATIENCE_MS);
    await seen(a, mistake, PATIENCE_MS);
    await (await itemOf(a, mistake)).evaluate((li) => li.querySelectorAll(".actions button")[1].click());
    await b.waitForFunction(
      (body) => !Array.from(document.querySelectorAll("#messages .body")).some((node) => node.textContent === body),
      { timeout: PATIENCE_MS },
      mistake,
    );

    // 20 messages, each timed from A's click to B's page showing it.
    const latencies = [];
    for (let i = 1; i <= 20; i += 1) {
      const text = `timed message ${i}`;
      const clicked = await post(a, text);
      latencies.push((await seen(b, text, LIVE_BOUND_MS + 1000)) - clicked);
    }

    // A short conversation for the screenshot: two senders, an edit, a search.
    const reply = "Thanks Alice! Is the search live too?";
    await post(b, reply);
    await seen(a, reply, PATIENCE_MS);
    const answer = "It is: try searching for live";
    await post(a, answer);
    await seen(b, answer, PATIENCE_MS);
    await search(a, "live", 2);
    await a.screenshot({ path: screenshot });

    check(errors.length === 0, `no error in the pages: ${JSON.stringify(errors)}`);
    console.log(JSON.stringify({ latencies_ms: latencies }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
