// The node API as the browser calls it: NodeService over gRPC-Web on this origin (the client generated from
// proto/), with the session cookie the browser sends by itself and the session's CSRF token in x-csrf-token.
// The session endpoints (/api/login, /api/logout, /api/session) are plain JSON.

import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { NodeService } from "./gen/quantix/node/v1/node_pb";

export interface Session {
  user: string;
  csrf_token: string;
}

let csrfToken: string | null = null;
const listeners = new Set<() => void>();

/** Called when the node says the session is gone (expired, logged out elsewhere, daemon restarted). */
export function onSessionLost(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

const csrf: Interceptor = (next) => async (request) => {
  if (csrfToken) request.header.set("x-csrf-token", csrfToken);
  try {
    return await next(request);
  } catch (error) {
    if (ConnectError.from(error).code === Code.Unauthenticated) {
      csrfToken = null;
      listeners.forEach((listener) => listener());
    }
    throw error;
  }
};

const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  interceptors: [csrf],
  // The cookie is HttpOnly and same-site; fetch sends it to this origin.
  fetch: (input, init) => fetch(input, { ...init, credentials: "same-origin" }),
});

export const node = createClient(NodeService, transport);

async function jsonError(response: Response): Promise<string> {
  try {
    const body = await response.json();
    if (typeof body.error === "string") return body.error;
  } catch {
    // Not JSON: say the status.
  }
  return `${response.status} ${response.statusText}`;
}

/** The session the cookie holds, if any: a reloaded page picks up where it was. */
export async function currentSession(): Promise<Session | null> {
  const response = await fetch("/api/session", { credentials: "same-origin" });
  if (!response.ok) return null;
  const session = (await response.json()) as Session;
  csrfToken = session.csrf_token;
  return session;
}

/** Logs in; throws an Error with the node's message (wrong password, locked out) on refusal. */
export async function login(user: string, password: string): Promise<Session> {
  const response = await fetch("/api/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user, password }),
  });
  if (!response.ok) throw new Error(await jsonError(response));
  const session = (await response.json()) as Session;
  csrfToken = session.csrf_token;
  return session;
}

export async function logout(): Promise<void> {
  const headers: Record<string, string> = csrfToken ? { "x-csrf-token": csrfToken } : {};
  await fetch("/api/logout", { method: "POST", credentials: "same-origin", headers });
  csrfToken = null;
}

/** What an RPC failure says, for the page. */
export function errorText(error: unknown): string {
  if (error instanceof ConnectError) return error.rawMessage || Code[error.code];
  return error instanceof Error ? error.message : String(error);
}

export interface ConsoleTicket {
  ticket: string;
  path: string;
  expires_in_seconds: number;
}

/** A one-use ticket for a VM's VNC console WebSocket (a WebSocket cannot carry the CSRF header). */
export async function consoleTicket(vm: string): Promise<ConsoleTicket> {
  const headers: Record<string, string> = csrfToken ? { "x-csrf-token": csrfToken } : {};
  const response = await fetch(`/api/vms/${encodeURIComponent(vm)}/vnc-ticket`, {
    method: "POST",
    credentials: "same-origin",
    headers,
  });
  if (!response.ok) throw new Error(await jsonError(response));
  return (await response.json()) as ConsoleTicket;
}
