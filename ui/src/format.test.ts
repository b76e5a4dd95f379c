import { describe, expect, test } from "vitest";
import { VmState } from "./gen/quantix/node/v1/node_pb";
import { actions, bytes, stateName } from "./format";

describe("format", () => {
  test("state names drop the enum prefix", () => {
    expect(stateName(VmState.RUNNING)).toBe("running");
    expect(stateName(VmState.INCOMING)).toBe("incoming");
    expect(stateName(99 as VmState)).toBe("unknown (99)");
  });

  test("bytes in binary units", () => {
    expect(bytes(0)).toBe("0 B");
    expect(bytes(1023)).toBe("1023 B");
    expect(bytes(256n * 1024n * 1024n)).toBe("256 MiB");
    expect(bytes(1.5 * 1024 ** 3)).toBe("1.5 GiB");
    expect(bytes(24n * 1024n ** 3n)).toBe("24 GiB");
  });

  test("each state offers only the actions it takes", () => {
    expect(actions(VmState.STOPPED)).toEqual(["start"]);
    expect(actions(VmState.RUNNING)).toEqual(["stop", "poweroff", "pause"]);
    expect(actions(VmState.PAUSED)).toEqual(["resume", "poweroff"]);
    expect(actions(VmState.MIGRATING)).toEqual([]);
  });
});
