import { bytes, stateName } from "../format";
import { errorText } from "../api";
import { DiskFormat, VmState } from "../gen/quantix/node/v1/node_pb";
import { useVm, useVmEvents } from "../vms";
import { PowerButtons } from "./PowerButtons";
import { lazy, Suspense, useState } from "react";

// noVNC is most of the console's weight: it loads when a console opens, not with the first page.
const Console = lazy(() => import("./Console").then((module) => ({ default: module.Console })));

export function VmDetail({ name }: { name: string }) {
  const vm = useVm(name);
  const [consoleOpen, setConsoleOpen] = useState(false);
  useVmEvents(name);
  if (vm.isPending) return <p className="loading">Loading {name}…</p>;
  if (vm.isError) return <p className="error">{errorText(vm.error)}</p>;
  const { spec, runtime, devices } = vm.data;
  const nicStatus = new Map((runtime?.nics ?? []).map((nic) => [nic.id, nic]));
  return (
    <section className="vm" data-vm={name}>
      <h1>
        {name}{" "}
        <span className={`state ${stateName(vm.data.state)}`} data-state={stateName(vm.data.state)}>
          {stateName(vm.data.state)}
        </span>
      </h1>
      <PowerButtons vm={vm.data} />
      <dl className="facts">
        <dt>UUID</dt>
        <dd>{spec?.uuid}</dd>
        <dt>vCPUs</dt>
        <dd>
          {spec?.vcpus}
          {spec?.maxVcpus !== undefined && ` (up to ${spec.maxVcpus})`}
        </dd>
        <dt>Memory</dt>
        <dd>{bytes((spec?.memoryMib ?? 0n) * 1024n * 1024n)}</dd>
        <dt>Machine</dt>
        <dd>{spec?.machine}</dd>
        <dt>CPU model</dt>
        <dd>{spec?.cpu || "default"}</dd>
        {runtime && runtime.pid > 0 && (
          <>
            <dt>QEMU</dt>
            <dd>
              pid {runtime.pid}, {runtime.accelerator}, since {new Date(Number(runtime.startedAtUnix) * 1000).toLocaleString()}
            </dd>
          </>
        )}
        {runtime?.lastReason && (
          <>
            <dt>Last change</dt>
            <dd>{runtime.lastReason}</dd>
          </>
        )}
      </dl>

      <h2>Console</h2>
      {spec?.vncDisplay === undefined ? (
        <p>No VNC display: set vnc_display in the VM's spec.</p>
      ) : vm.data.state !== VmState.RUNNING && vm.data.state !== VmState.PAUSED ? (
        <p>The display is there while the VM runs.</p>
      ) : consoleOpen ? (
        <Suspense fallback={<p className="loading">Loading the console…</p>}>
          <Console vm={name} />
        </Suspense>
      ) : (
        <button type="button" data-action="console" onClick={() => setConsoleOpen(true)}>
          Open console
        </button>
      )}

      <h2>Devices</h2>
      {devices.length === 0 ? (
        <p>No disks or NICs.</p>
      ) : (
        <table className="devices">
          <thead>
            <tr>
              <th>Id</th>
              <th>Kind</th>
              <th>Root port</th>
              <th>QEMU device</th>
            </tr>
          </thead>
          <tbody>
            {devices.map((device) => (
              <tr key={device.id}>
                <td>{device.id}</td>
                <td>{device.kind}</td>
                <td>{device.rootPort ? `rp${device.rootPort}` : "—"}</td>
                <td>{device.qemuDevice}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}

      <h2>Disks</h2>
      {(spec?.disks ?? []).length === 0 ? (
        <p>No disks{spec?.kernelBoot ? ": boots a kernel directly" : ""}.</p>
      ) : (
        <table className="disks">
          <thead>
            <tr>
              <th>Id</th>
              <th>Source</th>
              <th>Format</th>
              <th>Mode</th>
            </tr>
          </thead>
          <tbody>
            {spec!.disks.map((disk) => (
              <tr key={disk.id}>
                <td>{disk.id}</td>
                <td>{disk.volume || disk.path}</td>
                <td>{DiskFormat[disk.format]?.toLowerCase()}</td>
                <td>{disk.readOnly ? "read-only" : "read-write"}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}

      <h2>NICs</h2>
      {(spec?.nics ?? []).length === 0 ? (
        <p>No NICs.</p>
      ) : (
        <table className="nics">
          <thead>
            <tr>
              <th>Id</th>
              <th>Kind</th>
              <th>MAC</th>
              <th>Network</th>
              <th>Switch port</th>
            </tr>
          </thead>
          <tbody>
            {spec!.nics.map((nic) => {
              const status = nicStatus.get(nic.id);
              return (
                <tr key={nic.id}>
                  <td>{nic.id}</td>
                  <td>{nic.kind || "user"}</td>
                  <td>{nic.mac}</td>
                  <td>{nic.network || "—"}</td>
                  <td>{status ? `${status.tap}${status.ofport > 0n ? ` (ofport ${status.ofport})` : ""}` : "—"}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
    </section>
  );
}
