// VM queries and power actions shared by the list and the detail page. States stay live: a WatchEvents stream
// refreshes the queries at each state change, and a slow poll covers a stream that broke.

import { useEffect } from "react";
import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { node } from "./api";
import type { Action } from "./format";

export function useVms() {
  return useQuery({ queryKey: ["vms"], queryFn: async () => (await node.listVms({})).vms, refetchInterval: 5000 });
}

export function useVm(name: string) {
  return useQuery({ queryKey: ["vm", name], queryFn: () => node.getVm({ name }), refetchInterval: 5000 });
}

/** Refreshes the VM queries whenever a VM changes state, while the calling page is shown. */
export function useVmEvents(vm = "") {
  const queries = useQueryClient();
  useEffect(() => {
    const stop = new AbortController();
    (async () => {
      while (!stop.signal.aborted) {
        try {
          for await (const event of node.watchEvents({ vm }, { signal: stop.signal })) {
            queries.invalidateQueries({ queryKey: ["vms"] });
            queries.invalidateQueries({ queryKey: ["vm", event.vm] });
          }
        } catch {
          // Aborted, or the stream broke: the poll carries on; try again in a while.
        }
        await new Promise((resolve) => setTimeout(resolve, 3000));
      }
    })();
    return () => stop.abort();
  }, [vm, queries]);
}

export function usePowerAction() {
  const queries = useQueryClient();
  return useMutation({
    mutationFn: ({ name, action }: { name: string; action: Action }) => {
      switch (action) {
        case "start":
          return node.startVm({ name });
        case "stop":
          return node.stopVm({ name, force: false });
        case "poweroff":
          return node.stopVm({ name, force: true });
        case "pause":
          return node.pauseVm({ name });
        case "resume":
          return node.resumeVm({ name });
      }
    },
    onSettled: (_vm, _error, { name }) => {
      queries.invalidateQueries({ queryKey: ["vms"] });
      queries.invalidateQueries({ queryKey: ["vm", name] });
    },
  });
}
