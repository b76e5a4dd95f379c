// The app's routes are plain paths (/, /vms, /vms/<name>); qx-node serves index.html for each, so a reload or a
// link lands on the same page.

import { useSyncExternalStore } from "react";

function subscribe(callback: () => void): () => void {
  window.addEventListener("popstate", callback);
  return () => window.removeEventListener("popstate", callback);
}

export function usePath(): string {
  return useSyncExternalStore(subscribe, () => window.location.pathname);
}

export function navigate(path: string): void {
  if (path === window.location.pathname) return;
  window.history.pushState(null, "", path);
  window.dispatchEvent(new PopStateEvent("popstate"));
}

/** The VM name of a /vms/<name> path. */
export function vmOfPath(path: string): string | null {
  const match = /^\/vms\/([^/]+)\/?$/.exec(path);
  return match ? decodeURIComponent(match[1]) : null;
}
