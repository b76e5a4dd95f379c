import { useEffect, useRef, useState } from "react";
import RFB from "@novnc/novnc";
import { consoleTicket } from "../api";

type Status = "connecting" | "connected" | "disconnected";

/** The VM's screen through noVNC, over the node's WebSocket bridge to its VNC display. */
export function Console({ vm }: { vm: string }) {
  const screen = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState<Status>("connecting");
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let rfb: RFB | null = null;
    let cancelled = false;
    (async () => {
      try {
        const ticket = await consoleTicket(vm);
        if (cancelled || !screen.current) return;
        const url = `wss://${window.location.host}${ticket.path}?ticket=${encodeURIComponent(ticket.ticket)}`;
        rfb = new RFB(screen.current, url, { shared: true });
        rfb.scaleViewport = true;
        rfb.addEventListener("connect", () => setStatus("connected"));
        rfb.addEventListener("disconnect", () => setStatus("disconnected"));
      } catch (e) {
        setError(e instanceof Error ? e.message : String(e));
        setStatus("disconnected");
      }
    })();
    return () => {
      cancelled = true;
      rfb?.disconnect();
    };
  }, [vm]);

  return (
    <div className="console" data-status={status}>
      <p>
        Console: <span className="status">{status}</span>
        {error && (
          <span className="error" role="alert">
            {" "}
            {error}
          </span>
        )}
      </p>
      <div className="screen" ref={screen} />
    </div>
  );
}
