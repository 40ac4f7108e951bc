// Calls to the k2serve API on this origin. The key lives in sessionStorage only: it goes
// in the Authorization header, never in a URL.

const KEY_ITEM = "k2serve.apiKey";

export const getKey = () => sessionStorage.getItem(KEY_ITEM) || "";

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

export class APIError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code;
  try {
    const body = await response.json();
    if (body?.error?.message) message = `${response.status}: ${body.error.message}`;
    code = body?.error?.code;
  } catch {
    // not JSON: the status line says enough
  }
  return new APIError(response.status, message, code);
}

// api("/v1/models") -> parsed JSON; {json} sends a JSON body, {form} a FormData,
// {raw: true} returns the Response (streams, audio).
export async function api(path, { method, json, form, signal, raw = false } = {}) {
  const headers = new Headers();
  const key = getKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const init = { method: method || (json || form ? "POST" : "GET"), headers, signal };
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return raw ? response : response.json();
}
