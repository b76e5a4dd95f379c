import { useEffect, useState, type MouseEvent, type ReactNode } from "react";
import { useQueryClient } from "@tanstack/react-query";
import { currentSession, logout, onSessionLost, type Session } from "./api";
import { navigate, usePath, vmOfPath } from "./router";
import { Login } from "./pages/Login";
import { Summary } from "./pages/Summary";
import { VmList } from "./pages/VmList";
import { VmDetail } from "./pages/VmDetail";

export function App() {
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const queries = useQueryClient();

  useEffect(() => {
    currentSession().then(setSession, () => setSession(null));
    return onSessionLost(() => {
      queries.clear();
      setSession(null);
    });
  }, [queries]);

  if (session === undefined) return <p className="loading">Loading…</p>;
  if (session === null) return <Login onLogin={setSession} />;
  return (
    <Shell
      user={session.user}
      onLogout={async () => {
        await logout();
        queries.clear();
        setSession(null);
      }}
    />
  );
}

function Link({ to, children }: { to: string; children: ReactNode }) {
  const path = usePath();
  const active = to === "/" ? path === "/" : path.startsWith(to);
  const click = (event: MouseEvent) => {
    event.preventDefault();
    navigate(to);
  };
  return (
    <a href={to} onClick={click} className={active ? "active" : undefined}>
      {children}
    </a>
  );
}

function Shell({ user, onLogout }: { user: string; onLogout: () => void }) {
  const path = usePath();
  const vm = vmOfPath(path);
  let page: ReactNode;
  if (vm !== null) page = <VmDetail name={vm} />;
  else if (path === "/vms" || path === "/vms/") page = <VmList />;
  else if (path === "/") page = <Summary />;
  else page = <p className="error">No page at {path}.</p>;
  return (
    <div className="shell">
      <header>
        <span className="brand">Quantix Host</span>
        <nav>
          <Link to="/">Host</Link>
          <Link to="/vms">Virtual machines</Link>
        </nav>
        <span className="user">
          {user}{" "}
          <button type="button" onClick={onLogout}>
            Log out
          </button>
        </span>
      </header>
      <main>{page}</main>
    </div>
  );
}
