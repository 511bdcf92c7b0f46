/**
 * The chat page at `/demo`: opens a chat with an application's token (the page mints a client
 * token for the chat and uses only that) or a pasted client token, follows it live over
 * `EventSource`, posts, edits, deletes and searches through the typed client.
 *
 * `/demo#token=<token>&chat=<n>` opens a chat at once: a fragment never reaches a server. Every
 * text of a message goes into the page as text (`textContent`); a search highlight is rebuilt from
 * its `<mark>` tags and escaped text, never parsed as HTML.
 *
 * Bundled with the client into `api/demo/demo.js` by `scripts/demo-bundle`.
 */
import { type ChatClient, type Schemas, createChatClient, streamUrl } from "../../clients/typescript/src/index.js";

type StreamedMessage = Schemas["StreamedMessage"];

/** How long a minted client token lives (seconds): the page mints a new one when it ends. */
const CLIENT_TOKEN_SECONDS = 3600;

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

const ui = {
  connect: element<HTMLFormElement>("connect"),
  token: element<HTMLInputElement>("token"),
  sender: element<HTMLInputElement>("sender"),
  chat: element<HTMLInputElement>("chat"),
  status: element<HTMLParagraphElement>("status"),
  room: element<HTMLElement>("room"),
  title: element<HTMLHeadingElement>("title"),
  messages: element<HTMLOListElement>("messages"),
  composer: element<HTMLFormElement>("composer"),
  body: element<HTMLInputElement>("body"),
  send: element<HTMLButtonElement>("send"),
  cancelEdit: element<HTMLButtonElement>("cancel-edit"),
  search: element<HTMLFormElement>("search"),
  query: element<HTMLInputElement>("query"),
  hits: element<HTMLOListElement>("hits"),
};

/** The open chat: the client token's client, the chat's number, its live stream. */
interface Room {
  client: ChatClient;
  chat: number;
  events: EventSource;
}

let room: Room | undefined;
/** The number of the message being edited in the composer, if any. */
let editing: number | undefined;

function say(text: string, error = false): void {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", error);
}

/** The message of an API error body, or of anything else thrown. */
function reason(error: unknown): string {
  const body = error as { error?: { message?: string } } | undefined;
  if (body?.error?.message) return body.error.message;
  return error instanceof Error ? error.message : String(error);
}

/** An `Idempotency-Key`: `crypto.randomUUID` exists only in secure contexts (not plain http). */
function idempotencyKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** A client token is a JWT (three dot-separated parts); an application's token is not. */
function isClientToken(token: string): boolean {
  return token.split(".").length === 3;
}

/**
 * The client token and chat to use: a pasted client token as it is; with an application's
 * token, the chat (a new one when none is given) and a client token minted for it and `sender`.
 */
async function clientTokenFor(
  token: string,
  sender: string,
  chat: number | undefined,
): Promise<{ clientToken: string; chat: number }> {
  if (isClientToken(token)) {
    if (chat === undefined) throw new Error("a client token needs a chat number");
    return { clientToken: token, chat };
  }
  const application = createChatClient(location.origin, token);
  if (chat === undefined) {
    const created = await application.POST("/api/v1/chats", {
      params: { header: { "Idempotency-Key": idempotencyKey() } },
    });
    if (!created.data) throw created.error;
    chat = created.data.number;
  }
  const minted = await application.POST("/api/v1/application/client-tokens", {
    body: { sender, chats: [chat], scopes: ["read", "write"], expires_in: CLIENT_TOKEN_SECONDS },
  });
  if (!minted.data) throw minted.error;
  return { clientToken: minted.data.token, chat };
}

async function open(token: string, sender: string, chat: number | undefined): Promise<void> {
  room?.events.close();
  room = undefined;
  say("Opening…");
  const opened = await clientTokenFor(token, sender, chat);
  // The fragment, so a reload (or a copied link) opens the same chat; it never reaches a server.
  history.replaceState(null, "", `#token=${encodeURIComponent(token)}&chat=${opened.chat}`);
  ui.chat.value = String(opened.chat);
  ui.messages.replaceChildren();
  ui.hits.replaceChildren();
  ui.title.textContent = `Chat ${opened.chat}`;
  ui.room.hidden = false;
  // `last_event_id=0`: the chat as it is now, then live; on a reconnection the browser sends
  // `Last-Event-ID` itself, which wins, so it resumes where it was.
  const url = new URL(streamUrl(location.origin, opened.chat, opened.clientToken));
  url.searchParams.set("last_event_id", "0");
  const events = new EventSource(url);
  const current: Room = {
    client: createChatClient(location.origin, opened.clientToken),
    chat: opened.chat,
    events,
  };
  room = current;
  events.addEventListener("open", () => say(`Live: chat ${current.chat}.`));
  events.addEventListener("error", () => {
    if (events.readyState === EventSource.CLOSED) say("The stream was refused (an expired token?): open the chat again.", true);
    else say("Reconnecting…");
  });
  for (const kind of ["created", "updated", "deleted"]) {
    events.addEventListener(kind, (event) => {
      const message = JSON.parse((event as MessageEvent<string>).data) as StreamedMessage;
      if (kind === "deleted") removeMessage(message.number);
      else showMessage(message);
    });
  }
}

function messageItem(number: number): HTMLLIElement | null {
  return ui.messages.querySelector<HTMLLIElement>(`li[data-number="${number}"]`);
}

/** A message's line above its body: its sender (as text), then `after`. */
function metaLine(sender: string | null | undefined, ...after: Node[]): HTMLDivElement {
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "sender";
  name.textContent = sender ?? "anonymous";
  meta.append(name, ...after);
  return meta;
}

/** Adds a message, or replaces the one with its number (an edit), in number order. */
function showMessage(message: StreamedMessage): void {
  const item = document.createElement("li");
  item.dataset.number = String(message.number);
  const time = document.createElement("time");
  time.dateTime = message.created_at;
  time.textContent = new Date(message.created_at).toLocaleTimeString();
  const meta = metaLine(message.sender, time);
  if (message.edited_at) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = "edited";
    edited.title = `edited ${new Date(message.edited_at).toLocaleString()}`;
    meta.append(edited);
  }
  const actions = document.createElement("span");
  actions.className = "actions";
  actions.append(
    button("edit", () => startEditing(message)),
    button("delete", () => void remove(message.number)),
  );
  meta.append(actions);
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = message.body;
  item.append(meta, body);

  const existing = messageItem(message.number);
  if (existing) {
    existing.replaceWith(item);
    return;
  }
  const later = Array.from(ui.messages.children).find(
    (other) => Number((other as HTMLElement).dataset.number) > message.number,
  );
  ui.messages.insertBefore(item, later ?? null);
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function removeMessage(number: number): void {
  messageItem(number)?.remove();
  if (editing === number) stopEditing();
}

function button(label: string, action: () => void): HTMLButtonElement {
  const made = document.createElement("button");
  made.type = "button";
  made.className = "quiet";
  made.textContent = label;
  made.addEventListener("click", action);
  return made;
}

function startEditing(message: StreamedMessage): void {
  editing = message.number;
  ui.body.value = message.body;
  ui.send.textContent = "Save";
  ui.cancelEdit.hidden = false;
  ui.body.focus();
}

function stopEditing(): void {
  editing = undefined;
  ui.body.value = "";
  ui.send.textContent = "Send";
  ui.cancelEdit.hidden = true;
}

async function send(current: Room, body: string): Promise<void> {
  const chat_number = current.chat;
  if (editing === undefined) {
    const posted = await current.client.POST("/api/v1/chats/{chat_number}/messages", {
      params: { path: { chat_number }, header: { "Idempotency-Key": idempotencyKey() } },
      body: { body },
    });
    if (posted.error) throw posted.error;
  } else {
    const number = editing;
    const edited = await current.client.PUT("/api/v1/chats/{chat_number}/messages/{number}", {
      params: { path: { chat_number, number } },
      body: { body },
    });
    if (edited.error) throw edited.error;
  }
  stopEditing();
}

async function remove(number: number): Promise<void> {
  const current = room;
  if (!current) return;
  const deleted = await current.client.DELETE("/api/v1/chats/{chat_number}/messages/{number}", {
    params: { path: { chat_number: current.chat, number } },
  });
  if (deleted.error) say(`Not deleted: ${reason(deleted.error)}`, true);
}

const ENTITIES: Record<string, string> = { "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'" };

/**
 * A search highlight as nodes: the server escapes the body and adds only `<mark>` and `</mark>`;
 * those two become a `<mark>` element, the rest is unescaped into text nodes. Nothing of it is
 * parsed as HTML, so a body can never become markup.
 */
function highlightNodes(highlight: string): Node[] {
  const nodes: Node[] = [];
  let mark: HTMLElement | undefined;
  for (const part of highlight.split(/(<mark>|<\/mark>)/)) {
    if (part === "<mark>") {
      mark = document.createElement("mark");
      nodes.push(mark);
    } else if (part === "</mark>") {
      mark = undefined;
    } else if (part) {
      const text = document.createTextNode(part.replace(/&(?:amp|lt|gt|quot|#39);/g, (entity) => ENTITIES[entity] ?? entity));
      if (mark) mark.append(text);
      else nodes.push(text);
    }
  }
  return nodes;
}

async function search(current: Room, query: string): Promise<void> {
  const found = await current.client.GET("/api/v1/chats/{chat_number}/messages/search", {
    params: { path: { chat_number: current.chat }, query: { query } },
  });
  if (!found.data) throw found.error;
  const items = found.data.messages.map((hit) => {
    const item = document.createElement("li");
    const number = document.createElement("span");
    number.textContent = `#${hit.number}`;
    const meta = metaLine(hit.sender, number);
    const body = document.createElement("div");
    body.className = "body highlight";
    body.append(...highlightNodes(hit.highlight));
    item.append(meta, body);
    return item;
  });
  if (items.length === 0) {
    const none = document.createElement("li");
    none.className = "meta";
    none.textContent = "No message matches.";
    items.push(none);
  }
  ui.hits.replaceChildren(...items);
}

/** Runs a form's action, reporting its failure in the status line. */
function onSubmit(form: HTMLFormElement, action: () => Promise<void>): void {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    action().catch((error: unknown) => say(reason(error), true));
  });
}

function chatNumber(text: string): number | undefined {
  const number = Number.parseInt(text, 10);
  return Number.isSafeInteger(number) && number > 0 ? number : undefined;
}

onSubmit(ui.connect, () => open(ui.token.value.trim(), ui.sender.value.trim() || "guest", chatNumber(ui.chat.value)));
onSubmit(ui.composer, async () => {
  if (room) await send(room, ui.body.value);
});
onSubmit(ui.search, async () => {
  if (room) await search(room, ui.query.value);
});
ui.cancelEdit.addEventListener("click", stopEditing);

// `#token=...&chat=...`: open that chat at once.
const fragment = new URLSearchParams(location.hash.slice(1));
const fragmentToken = fragment.get("token");
if (fragmentToken) {
  ui.token.value = fragmentToken;
  const sender = fragment.get("sender");
  if (sender) ui.sender.value = sender;
  open(fragmentToken, ui.sender.value.trim() || "guest", chatNumber(fragment.get("chat") ?? "")).catch(
    (error: unknown) => say(reason(error), true),
  );
}
