/**
 * A typed client for the chat platform's HTTP API: `paths` and `components` are generated from
 * `docs/openapi.json` by openapi-typescript (src/schema.d.ts, never edited by hand); every call
 * goes through openapi-fetch, so a path, a parameter or a body the document does not describe is
 * a compile error, and each answer's `data`/`error` has the type the document gives its status.
 */
import createClient, { type Client, type ClientOptions } from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type { components, operations, paths } from "./schema.js";

/** The document's named shapes: `Schemas["MessageView"]`, `Schemas["ErrorBody"]`, ... */
export type Schemas = components["schemas"];

/** An openapi-fetch client over the API's paths: `client.GET("/api/v1/chats/{number}", ...)`. */
export type ChatClient = Client<paths>;

/** What openapi-fetch takes besides the base URL (a `fetch` of your own, more headers, ...). */
export type ChatClientOptions = Omit<ClientOptions, "baseUrl">;

/**
 * A client for the API at `baseUrl` (its origin, e.g. `http://127.0.0.1:3000`), sending `token` as
 * `Authorization: Bearer`: an application's token (`chat_...`) or a client token minted for one end
 * user. Without a token, only what needs none works (creating an application, the stream with
 * `access_token`).
 */
export function createChatClient(
  baseUrl: string,
  token?: string,
  options: ChatClientOptions = {},
): ChatClient {
  const headers = new Headers(options.headers as HeadersInit | undefined);
  if (token !== undefined) headers.set("Authorization", `Bearer ${token}`);
  return createClient<paths>({ ...options, baseUrl: baseUrl.replace(/\/+$/, ""), headers });
}

/**
 * The URL of a chat's live stream (Server-Sent Events) for a client token, as a browser's
 * `EventSource` needs it: it cannot send `Authorization`, so the token goes in `?access_token=`
 * (only a client token is accepted there; an application's token never belongs in a URL).
 */
export function streamUrl(baseUrl: string, chat: number, accessToken: string): string {
  const url = new URL(`/api/v1/chats/${chat}/messages/stream`, baseUrl);
  url.searchParams.set("access_token", accessToken);
  return url.toString();
}

/** One Server-Sent Event as the stream sends it: `event`, `id` and the JSON text of `data`. */
export interface StreamEvent {
  event: string;
  id: string | undefined;
  data: string;
}

/**
 * The events of a Server-Sent Events body (a `fetch` response's `body`), one by one as they arrive,
 * for runtimes without `EventSource` (Node). Comments (keep-alives) are skipped.
 */
export async function* streamEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<StreamEvent> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffered += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end: number;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const block = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        const event = parseEvent(block);
        if (event) yield event;
      }
    }
  } finally {
    await reader.cancel().catch(() => undefined);
  }
}

function parseEvent(block: string): StreamEvent | undefined {
  let event = "message";
  let id: string | undefined;
  const data: string[] = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  return data.length > 0 ? { event, id, data: data.join("\n") } : undefined;
}
