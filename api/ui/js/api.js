// The /v1 API as the dashboard calls it: the key from session storage, errors as one readable message,
// server-sent events read through fetch (EventSource cannot send an Authorization header).

const KEY = "srcompress.apiKey";

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (key) => sessionStorage.setItem(KEY, key);
export const forgetKey = () => sessionStorage.removeItem(KEY);

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export const REJECTED_KEY =
  "This API key was not accepted: it is unknown or revoked. Check it (srcompress keys list) and enter it again.";

export async function api(path, { method = "GET", json, form, headers = {}, raw = false, signal } = {}) {
  const key = getKey();
  if (!key) throw new ApiError(401, "no_key", "Enter your API key above first.");
  const init = { method, headers: { Authorization: `Bearer ${key}`, ...headers }, signal };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", `The server cannot be reached (${error.message}).`);
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch { /* not JSON */ }
    const error = body && body.error ? body.error : {};
    const message = response.status === 401 ? REJECTED_KEY : error.message || `HTTP ${response.status}`;
    throw new ApiError(response.status, error.code || "http", message, error.details);
  }
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.blob();
}

// A URL for an authenticated image or file (revoke it when the view goes away).
export async function objectUrl(path, signal) {
  const blob = await api(path, { signal });
  return URL.createObjectURL(blob);
}

// Save an authenticated download under `name` (the browser's own download).
export async function download(path, name) {
  const url = await objectUrl(path);
  const link = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function parseBlock(block) {
  const message = {};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    message[name] = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
  }
  return message;
}

// Call onEvent(event) for each of the job's events until the stream says the job ended; reconnects
// (replaying from the last event seen) when the connection drops. Resolves when the job has ended.
export async function followEvents(jobId, onEvent, signal) {
  let last = 0;
  while (!signal.aborted) {
    try {
      const response = await api(`/v1/jobs/${jobId}/events?after=${last}`, { raw: true, signal });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (message.event === "end") return;
          if (message.data === undefined) continue;
          const event = JSON.parse(message.data);
          last = event.id;
          onEvent(event);
        }
      }
    } catch (error) {
      if (signal.aborted || error.name === "AbortError") return;
      if (error.status && error.status !== 0 && error.status < 500) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 2000)); // the server's retry: 2000
  }
}
