/**
 * The README's tour through this client, every answer checked (status and shape):
 *
 *     node dist/examples/tour.js http://127.0.0.1:3000
 *
 * (compiled first: `npx tsc -p tsconfig.json`). Only the typed client talks to the api, so what it
 * cannot express, a user of it could not do either. Prints `== <step>` as it goes and
 * `tour: every step passed` at the end; exits non-zero with `tour: FAILED: <step>: <why>` on the
 * first mismatch.
 */
import { randomUUID } from "node:crypto";

import { type ChatClient, type Schemas, createChatClient, streamEvents } from "../src/index.js";

/** Writes are persisted and indexed asynchronously: reads wait for them this long. */
const EVENTUALLY_MS = 30_000;

let step = "start";

function begin(name: string): void {
  step = name;
  console.log(`== ${name}`);
}

function check(condition: unknown, what: string): asserts condition {
  if (!condition) throw new Error(what);
}

const show = (value: unknown): string => JSON.stringify(value);

/** JSON with every object's keys sorted: the api keeps metadata's content, not its key order. */
const canonical = (value: unknown): string =>
  JSON.stringify(value, (_, inner: unknown) =>
    inner !== null && typeof inner === "object" && !Array.isArray(inner)
      ? Object.fromEntries(Object.entries(inner).sort(([a], [b]) => (a < b ? -1 : 1)))
      : inner,
  );

/** What every openapi-fetch call resolves to: the parsed body of a success or of an error. */
interface Answer<Data, Error> {
  data?: Data;
  error?: Error;
  response: Response;
}

/** The body of an answer of the expected status (a 204's is `undefined`). */
async function expectStatus<Data, Error>(
  call: Promise<Answer<Data, Error>>,
  status: number,
): Promise<Data> {
  const { data, error, response } = await call;
  check(
    response.status === status,
    `${response.url}: expected ${status}, got ${response.status}: ${show(data ?? error)}`,
  );
  return data as Data;
}

/** An error answer: its status, the one error body every failure has, and its stable code. */
async function expectError<Data>(
  call: Promise<Answer<Data, Schemas["ErrorBody"]>>,
  status: number,
  code: string,
  field?: string,
): Promise<void> {
  const { error, response } = await call;
  check(response.status === status, `${response.url}: expected ${status}, got ${response.status}`);
  check(error?.error.code === code, `code ${code}, not ${show(error)}`);
  check(typeof error.error.message === "string" && error.error.message !== "", "an error message");
  if (field !== undefined) check(error.error.field === field, `field ${field}, not ${show(error)}`);
}

/** Calls probe() until it returns something truthy, which is returned. */
async function eventually<T>(what: string, probe: () => Promise<T>): Promise<NonNullable<T>> {
  const deadline = Date.now() + EVENTUALLY_MS;
  for (;;) {
    const value = await probe();
    if (value) return value;
    check(Date.now() < deadline, `timed out waiting until ${what} (last: ${show(value)})`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const isTime = (value: unknown): boolean =>
  typeof value === "string" && !Number.isNaN(Date.parse(value));

/** A message as every read shows it: the types the document promises, checked at run time. */
function checkMessage(message: Schemas["MessageView"]): void {
  const ok =
    Number.isInteger(message.number) &&
    typeof message.body === "string" &&
    isTime(message.created_at) &&
    (message.sender === null || typeof message.sender === "string") &&
    (message.metadata === null || typeof message.metadata === "object") &&
    (message.edited_at === null || isTime(message.edited_at));
  check(ok, `a message's shape: ${show(message)}`);
}

function checkRateLimitHeaders(response: Response): void {
  for (const name of ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]) {
    check(/^\d+$/.test(response.headers.get(name) ?? ""), `${name} header on ${response.url}`);
  }
}

/** Every message of a chat, following `next_after` from page to page. */
async function walkMessages(
  client: ChatClient,
  chat: number,
  perPage: number,
): Promise<{ numbers: number[]; pages: number }> {
  const numbers: number[] = [];
  let after: number | undefined;
  for (let pages = 1; ; pages++) {
    const page = await expectStatus(
      client.GET("/api/v1/chats/{chat_number}/messages", {
        params: {
          path: { chat_number: chat },
          query: after === undefined ? { per_page: perPage } : { per_page: perPage, after },
        },
      }),
      200,
    );
    check(page.pagination.per_page === perPage, `per_page ${page.pagination.per_page}`);
    check(page.messages.length <= perPage, "a page holds at most per_page messages");
    page.messages.forEach(checkMessage);
    numbers.push(...page.messages.map((message) => message.number));
    const next = page.pagination.next_after;
    if (next === null || next === undefined) return { numbers, pages };
    after = next;
  }
}

/** Every hit of a search, one per page, following `next_cursor`; sorted. */
async function searchAll(client: ChatClient, chat: number, query: string): Promise<number[]> {
  const numbers: number[] = [];
  let cursor: string | undefined;
  for (;;) {
    const page = await expectStatus(
      client.GET("/api/v1/chats/{chat_number}/messages/search", {
        params: {
          path: { chat_number: chat },
          query: cursor === undefined ? { query, per_page: 1 } : { query, per_page: 1, cursor },
        },
      }),
      200,
    );
    numbers.push(...page.messages.map((message) => message.number));
    const next = page.pagination.next_cursor;
    if (next === null || next === undefined) return numbers.sort((a, b) => a - b);
    cursor = next;
  }
}

const same = (left: number[], right: number[]): boolean => show(left) === show(right);

async function tour(baseUrl: string): Promise<void> {
  begin("create an application");
  const anonymous = createChatClient(baseUrl);
  const created = await anonymous.POST("/api/v1/applications", { body: { name: "My Chat App" } });
  const application = await expectStatus(Promise.resolve(created), 201);
  checkRateLimitHeaders(created.response);
  const token = application.token;
  check(token.startsWith("chat_") && token.length === 41, `a chat_ token: ${show(application)}`);
  check(application.name === "My Chat App" && application.chats_count === 0, show(application));
  // The application's token is its credential, in Authorization: Bearer (never in a URL).
  const tenant = createChatClient(baseUrl, token);
  const shown = await expectStatus(tenant.GET("/api/v1/application"), 200);
  check(show(shown) === show(application), `show = create: ${show(shown)}`);
  const renamed = await expectStatus(
    tenant.PUT("/api/v1/application", { body: { name: "Renamed" } }),
    200,
  );
  check(renamed.name === "Renamed" && renamed.token === token, show(renamed));

  begin("create a chat");
  // Accepted (202) with its number, written a moment later; the body (title, metadata) optional.
  const chat = (
    await expectStatus(
      tenant.POST("/api/v1/chats", { params: { header: { "Idempotency-Key": randomUUID() } } }),
      202,
    )
  ).number;
  check(chat === 1, `the first chat is number 1, not ${chat}`);
  const titled = (
    await expectStatus(
      tenant.POST("/api/v1/chats", { body: { title: "Team room", metadata: { topic: "launch" } } }),
      202,
    )
  ).number;
  const room = await eventually("the titled chat is stored", async () => {
    const { data } = await tenant.GET("/api/v1/chats/{number}", {
      params: { path: { number: titled } },
    });
    return data;
  });
  check(
    room.title === "Team room" && canonical(room.metadata) === canonical({ topic: "launch" }),
    show(room),
  );
  check(isTime(room.created_at) && room.messages_count === 0, show(room));

  begin("post messages with an Idempotency-Key");
  const bodies = [
    "Hello, world!",
    "Hello, internationalization!",
    "internationally known",
    "nothing to see",
    "hello again",
  ];
  const keys = bodies.map(() => randomUUID());
  // Who sent each one (an id of the integrator's choosing), and the integrator's own data.
  const senders = ["u42", "u7", "u42", undefined, "u7"];
  const input = (index: number): Schemas["MessageInput"] => {
    const sender = senders[index];
    return {
      body: bodies[index] ?? "",
      metadata: { n: index },
      ...(sender === undefined ? {} : { sender }),
    };
  };
  const post = (index: number, key: string, body: Schemas["MessageInput"]) =>
    tenant.POST("/api/v1/chats/{chat_number}/messages", {
      params: { path: { chat_number: chat }, header: { "Idempotency-Key": key } },
      body,
    });
  const numbers: number[] = [];
  for (const [index, key] of keys.entries()) {
    numbers.push((await expectStatus(post(index, key, input(index)), 202)).number);
  }
  check(same(numbers, [1, 2, 3, 4, 5]), `numbered in order: ${show(numbers)}`);
  const firstKey = keys[0] ?? "";
  const retried = await expectStatus(post(0, firstKey, input(0)), 202);
  check(retried.number === 1, "a retry with the same key gets the first number");
  await expectError(post(0, firstKey, { body: "another body" }), 422, "idempotency_key_reused");

  begin("page through the messages by cursor");
  const pages = await eventually("the five messages are listed, each once", async () => {
    const walked = await walkMessages(tenant, chat, 2);
    return same(walked.numbers, numbers) ? walked.pages : undefined;
  });
  check(pages === 3, `five messages in pages of two are three pages, not ${pages}`);
  const listPage = (query: {
    per_page?: number;
    after?: number;
    before?: number;
    sender?: string;
  }) =>
    expectStatus(
      tenant.GET("/api/v1/chats/{chat_number}/messages", {
        params: { path: { chat_number: chat }, query },
      }),
      200,
    );
  const second = await listPage({ per_page: 2, after: 2 });
  check(
    same(
      second.messages.map((m) => m.number),
      [3, 4],
    ),
    `the page after 2: ${show(second)}`,
  );
  const before = second.pagination.previous_before;
  check(typeof before === "number", `previous_before: ${show(second.pagination)}`);
  const previous = await listPage({ per_page: 2, before });
  check(
    same(
      previous.messages.map((m) => m.number),
      [1, 2],
    ),
    "previous_before leads back",
  );
  const ofU7 = await listPage({ sender: "u7" });
  check(
    same(
      ofU7.messages.map((m) => m.number),
      [2, 5],
    ),
    "one sender's messages",
  );
  const first = await expectStatus(
    tenant.GET("/api/v1/chats/{chat_number}/messages/{number}", {
      params: { path: { chat_number: chat, number: 1 } },
    }),
    200,
  );
  checkMessage(first);
  check(first.body === bodies[0] && first.sender === "u42", show(first));
  check(canonical(first.metadata) === canonical({ n: 0 }) && first.edited_at === null, show(first));

  begin("update a message");
  // Synchronous; the sender stays, edited_at marks the first edit; the index follows.
  const updated = await expectStatus(
    tenant.PUT("/api/v1/chats/{chat_number}/messages/{number}", {
      params: { path: { chat_number: chat, number: 1 } },
      body: { body: "Updated internationalization notes", metadata: { n: 0, edited: true } },
    }),
    200,
  );
  check(
    updated.number === 1 && updated.body === "Updated internationalization notes",
    show(updated),
  );
  check(isTime(updated.updated_at) && isTime(updated.edited_at), show(updated));
  check(updated.sender === "u42", show(updated));
  check(canonical(updated.metadata) === canonical({ n: 0, edited: true }), show(updated));

  begin("search by word prefix, page by cursor");
  await eventually("the prefix search finds messages 1, 2 and 3", async () =>
    same(await searchAll(tenant, chat, "internation"), [1, 2, 3]),
  );
  await eventually("the old body of message 1 is no longer found", async () =>
    same(await searchAll(tenant, chat, "world"), []),
  );
  check(same(await searchAll(tenant, chat, "hello"), [2, 5]), "whole words, case-insensitive");
  check(same(await searchAll(tenant, chat, '"hello again"'), [5]), "a phrase in double quotes");
  const newest = await expectStatus(
    tenant.GET("/api/v1/chats/{chat_number}/messages/search", {
      params: {
        path: { chat_number: chat },
        query: {
          query: "internation",
          sender: "u42",
          sort: "newest",
          created_after: first.created_at,
        },
      },
    }),
    200,
  );
  check(
    same(
      newest.messages.map((m) => m.number),
      [3, 1],
    ),
    `u42's, newest first: ${show(newest)}`,
  );
  const again = await expectStatus(
    tenant.GET("/api/v1/chats/{chat_number}/messages/search", {
      params: { path: { chat_number: chat }, query: { query: "again" } },
    }),
    200,
  );
  const hit = again.messages[0];
  check(hit?.highlight === "hello <mark>again</mark>", `where it matched: ${show(again)}`);

  begin("delete a message");
  const message4 = { params: { path: { chat_number: chat, number: 4 } } };
  await expectStatus(tenant.DELETE("/api/v1/chats/{chat_number}/messages/{number}", message4), 204);
  await expectError(
    tenant.GET("/api/v1/chats/{chat_number}/messages/{number}", message4),
    404,
    "not_found",
  );
  await expectError(
    tenant.DELETE("/api/v1/chats/{chat_number}/messages/{number}", message4),
    404,
    "not_found",
  );
  const left = await walkMessages(tenant, chat, 2);
  check(same(left.numbers, [1, 2, 3, 5]), `the list leaves it out: ${show(left.numbers)}`);
  await eventually("the chat counts its messages, the deleted one not", async () => {
    const { data } = await tenant.GET("/api/v1/chats/{number}", {
      params: { path: { number: chat } },
    });
    return data?.messages_count === 4;
  });

  begin("errors share one body");
  await expectError(
    createChatClient(baseUrl, "A".repeat(32)).GET("/api/v1/application"),
    401,
    "application_key_required",
  );
  await expectError(
    tenant.GET("/api/v1/chats/{number}", { params: { path: { number: 99 } } }),
    404,
    "not_found",
  );
  await expectError(
    anonymous.POST("/api/v1/applications", { body: { name: "   " } }),
    422,
    "validation_failed",
    "name",
  );
  await expectError(listPageError(tenant, chat), 400, "bad_request", "per_page");

  await clientToken(baseUrl, tenant, chat);
}

/** A page bigger than the API allows: its 400. */
function listPageError(client: ChatClient, chat: number) {
  return client.GET("/api/v1/chats/{chat_number}/messages", {
    params: { path: { chat_number: chat }, query: { per_page: 1000 } },
  });
}

/** A client token: minted by the application for one end user, it posts and streams in its chat
 * only, as its sender; revoke-all ends it. */
async function clientToken(baseUrl: string, tenant: ChatClient, chat: number): Promise<void> {
  begin("mint a client token");
  const minted = await expectStatus(
    tenant.POST("/api/v1/application/client-tokens", {
      body: { sender: "u42", chats: [chat], scopes: ["read", "write"], expires_in: 600 },
    }),
    201,
  );
  check(
    minted.token.split(".").length === 3 && isTime(minted.expires_at),
    `a JWT: ${show(minted)}`,
  );
  const browser = createChatClient(baseUrl, minted.token);
  await expectError(
    browser.GET("/api/v1/chats/{chat_number}/messages", {
      params: { path: { chat_number: chat + 1 } },
    }),
    403,
    "insufficient_scope",
  );
  await expectError(browser.GET("/api/v1/chats"), 403, "insufficient_scope");
  await expectError(browser.GET("/api/v1/application"), 401, "application_key_required");

  begin("stream a posted message");
  // The stream takes the token in ?access_token=, as a browser's EventSource sends it (a client
  // without Authorization). Last-Event-ID 0: the chat as it is, then live, so the message posted
  // below arrives whether it is stored before or after the stream starts.
  const stop = new AbortController();
  const bound = setTimeout(() => stop.abort(), EVENTUALLY_MS);
  try {
    const stream = await createChatClient(baseUrl).GET(
      "/api/v1/chats/{chat_number}/messages/stream",
      {
        params: {
          path: { chat_number: chat },
          query: { access_token: minted.token },
          header: { "Last-Event-ID": 0 },
        },
        parseAs: "stream",
        signal: stop.signal,
      },
    );
    check(stream.response.status === 200, `the stream: ${stream.response.status}`);
    check(
      stream.response.headers.get("Content-Type")?.startsWith("text/event-stream"),
      "an event stream",
    );
    check(stream.data, "a stream body");
    const posted = (
      await expectStatus(
        browser.POST("/api/v1/chats/{chat_number}/messages", {
          params: { path: { chat_number: chat }, header: { "Idempotency-Key": randomUUID() } },
          body: { body: "from the browser" },
        }),
        202,
      )
    ).number;
    let streamed: Schemas["StreamedMessage"] | undefined;
    try {
      for await (const event of streamEvents(stream.data)) {
        const message = JSON.parse(event.data) as Schemas["StreamedMessage"];
        check(event.id !== undefined && /^\d+$/.test(event.id), `an event id: ${show(event)}`);
        if (event.event === "created" && message.number === posted) {
          streamed = message;
          break;
        }
      }
    } catch (error) {
      check(
        !stop.signal.aborted,
        `no created event of message ${posted} within ${EVENTUALLY_MS} ms`,
      );
      throw error;
    }
    check(streamed, `the stream ended before message ${posted} came`);
    check(streamed.body === "from the browser" && streamed.sender === "u42", show(streamed));
    check(streamed.version === 1 && isTime(streamed.updated_at), show(streamed));
  } finally {
    clearTimeout(bound);
    stop.abort();
  }

  begin("revoke the client tokens");
  await expectStatus(tenant.POST("/api/v1/application/client-tokens/revoke-all"), 204);
  await expectError(
    browser.GET("/api/v1/chats/{chat_number}/messages", {
      params: { path: { chat_number: chat } },
    }),
    401,
    "invalid_token",
  );
}

const baseUrl = process.argv[2];
if (baseUrl === undefined) {
  console.error("usage: node tour.js BASE_URL");
  process.exit(2);
}
tour(baseUrl).then(
  () => console.log("tour: every step passed"),
  (error: unknown) => {
    console.error(`tour: FAILED: ${step}: ${error instanceof Error ? error.message : show(error)}`);
    process.exitCode = 1;
  },
);
