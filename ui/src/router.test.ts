import { expect, test } from "vitest";
import { vmOfPath } from "./router";

test("a VM page's path names its VM", () => {
  expect(vmOfPath("/vms/web1")).toBe("web1");
  expect(vmOfPath("/vms/web1/")).toBe("web1");
  expect(vmOfPath("/vms/my%20vm")).toBe("my vm");
  expect(vmOfPath("/vms")).toBeNull();
  expect(vmOfPath("/vms/a/b")).toBeNull();
  expect(vmOfPath("/")).toBeNull();
});
