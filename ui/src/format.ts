// How the pages show the node's values.

import { VmState } from "./gen/quantix/node/v1/node_pb";

/** `VM_STATE_RUNNING` as "running". */
export function stateName(state: VmState): string {
  const name = VmState[state] as string | undefined;
  return name ? name.toLowerCase() : `unknown (${state})`;
}

/** Bytes in binary units, one decimal below 10: "512 MiB", "1.5 GiB". */
export function bytes(value: bigint | number): string {
  let n = Number(value);
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let unit = 0;
  while (n >= 1024 && unit < units.length - 1) {
    n /= 1024;
    unit++;
  }
  const digits = unit > 0 && n < 10 && !Number.isInteger(n) ? 1 : 0;
  return `${n.toFixed(digits)} ${units[unit]}`;
}

/** The power actions a VM in `state` takes, in the order the page shows them. */
export type Action = "start" | "stop" | "poweroff" | "pause" | "resume";

export function actions(state: VmState): Action[] {
  switch (state) {
    case VmState.STOPPED:
    case VmState.CRASHED:
      return ["start"];
    case VmState.RUNNING:
      return ["stop", "poweroff", "pause"];
    case VmState.PAUSED:
      return ["resume", "poweroff"];
    case VmState.STARTING:
    case VmState.STOPPING:
      return ["poweroff"];
    default:
      return [];
  }
}

export const actionLabel: Record<Action, string> = {
  start: "Start",
  stop: "Stop",
  poweroff: "Power off",
  pause: "Pause",
  resume: "Resume",
};
