import type { Vm } from "../gen/quantix/node/v1/node_pb";
import { actionLabel, actions } from "../format";
import { errorText } from "../api";
import { usePowerAction } from "../vms";

export function PowerButtons({ vm }: { vm: Vm }) {
  const power = usePowerAction();
  const name = vm.spec?.name ?? "";
  const busy = power.isPending && power.variables?.name === name;
  return (
    <span className="actions">
      {actions(vm.state).map((action) => (
        <button
          key={action}
          type="button"
          data-action={action}
          disabled={busy}
          onClick={() => power.mutate({ name, action })}
        >
          {actionLabel[action]}
        </button>
      ))}
      {power.isError && power.variables?.name === name && (
        <span className="error" role="alert">
          {errorText(power.error)}
        </span>
      )}
    </span>
  );
}
