import { useQuery } from "@tanstack/react-query";
import { errorText, node } from "../api";
import { bytes } from "../format";

export function Summary() {
  const info = useQuery({ queryKey: ["node"], queryFn: () => node.getNodeInfo({}), refetchInterval: 10000 });
  const pools = useQuery({ queryKey: ["pools"], queryFn: async () => (await node.listPools({})).pools });
  const networks = useQuery({ queryKey: ["networks"], queryFn: async () => (await node.listNetworks({})).networks });
  if (info.isPending) return <p className="loading">Loading the host…</p>;
  if (info.isError) return <p className="error">{errorText(info.error)}</p>;
  const n = info.data;
  const used = n.memoryTotalBytes - n.memoryAvailableBytes;
  return (
    <section className="summary">
      <h1 data-node={n.nodeName}>{n.nodeName}</h1>
      <dl className="facts">
        <dt>Host name</dt>
        <dd>{n.hostname}</dd>
        <dt>qx-node</dt>
        <dd>{n.version}</dd>
        <dt>CPU</dt>
        <dd>
          {n.cpuCount} × {n.cpuModel}
        </dd>
        <dt>Memory</dt>
        <dd>
          {bytes(used)} used of {bytes(n.memoryTotalBytes)}
        </dd>
        <dt>QEMU</dt>
        <dd>
          {n.qemuVersion} ({n.qemuBinary})
        </dd>
        <dt>Accelerator</dt>
        <dd data-accelerator={n.accelerator}>
          {n.accelerator}
          {n.acceleratorReason && `: ${n.acceleratorReason}`}
        </dd>
        <dt>VMs</dt>
        <dd data-vms-running={n.vmsRunning}>
          {n.vmsRunning} running of {n.vmsTotal}
        </dd>
        <dt>Warm pool</dt>
        <dd>
          {n.warmPoolReady} ready, {n.warmPoolReserved} reserved
        </dd>
      </dl>
      <h2>Storage pools</h2>
      {pools.isError ? (
        <p className="error">{errorText(pools.error)}</p>
      ) : (
        <table className="pools">
          <thead>
            <tr>
              <th>Name</th>
              <th>Kind</th>
              <th>Available</th>
              <th>Capacity</th>
              <th>Volumes</th>
              <th>Images</th>
            </tr>
          </thead>
          <tbody>
            {(pools.data ?? []).map((pool) => (
              <tr key={pool.name}>
                <td>{pool.name}</td>
                <td>{pool.kind}</td>
                <td>{bytes(pool.availableBytes)}</td>
                <td>{bytes(pool.capacityBytes)}</td>
                <td>{pool.volumes}</td>
                <td>{pool.images}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      <h2>Networks</h2>
      {networks.isError ? (
        <p className="error">{errorText(networks.error)}</p>
      ) : (networks.data ?? []).length === 0 ? (
        <p>No node networks.</p>
      ) : (
        <table className="networks">
          <thead>
            <tr>
              <th>Name</th>
              <th>Kind</th>
              <th>Bridge / switch</th>
              <th>VLAN</th>
            </tr>
          </thead>
          <tbody>
            {networks.data!.map((network) => (
              <tr key={network.name}>
                <td>{network.name}</td>
                <td>{network.kind || "ovs"}</td>
                <td>{network.bridge || network.logicalSwitch || network.name}</td>
                <td>{network.vlan ?? "—"}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
