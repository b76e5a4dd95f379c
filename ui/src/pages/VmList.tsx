import type { MouseEvent } from "react";
import { bytes, stateName } from "../format";
import { errorText } from "../api";
import { navigate } from "../router";
import { useVmEvents, useVms } from "../vms";
import { PowerButtons } from "./PowerButtons";

export function VmList() {
  const vms = useVms();
  useVmEvents();
  if (vms.isPending) return <p className="loading">Loading VMs…</p>;
  if (vms.isError) return <p className="error">Could not list the VMs: {errorText(vms.error)}</p>;
  return (
    <section>
      <h1>Virtual machines</h1>
      {vms.data.length === 0 ? (
        <p>No VMs on this host.</p>
      ) : (
        <table className="vms">
          <thead>
            <tr>
              <th>Name</th>
              <th>State</th>
              <th>vCPUs</th>
              <th>Memory</th>
              <th>Actions</th>
            </tr>
          </thead>
          <tbody>
            {vms.data.map((vm) => {
              const name = vm.spec?.name ?? "";
              const open = (event: MouseEvent) => {
                event.preventDefault();
                navigate(`/vms/${encodeURIComponent(name)}`);
              };
              return (
                <tr key={name} data-vm={name}>
                  <td>
                    <a href={`/vms/${encodeURIComponent(name)}`} onClick={open}>
                      {name}
                    </a>
                  </td>
                  <td className={`state ${stateName(vm.state)}`} data-state={stateName(vm.state)}>
                    {stateName(vm.state)}
                  </td>
                  <td>{vm.spec?.vcpus}</td>
                  <td>{bytes((vm.spec?.memoryMib ?? 0n) * 1024n * 1024n)}</td>
                  <td>
                    <PowerButtons vm={vm} />
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      )}
    </section>
  );
}
