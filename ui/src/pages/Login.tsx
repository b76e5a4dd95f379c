import { useState, type FormEvent } from "react";
import { login, type Session } from "../api";

export function Login({ onLogin }: { onLogin: (session: Session) => void }) {
  const [user, setUser] = useState("root");
  const [password, setPassword] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      onLogin(await login(user, password));
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
      setPassword("");
    } finally {
      setBusy(false);
    }
  };

  return (
    <form className="login" onSubmit={submit}>
      <h1>Quantix Host</h1>
      <label>
        User
        <input name="user" value={user} onChange={(e) => setUser(e.target.value)} autoComplete="username" />
      </label>
      <label>
        Password
        <input
          name="password"
          type="password"
          value={password}
          onChange={(e) => setPassword(e.target.value)}
          autoComplete="current-password"
          autoFocus
        />
      </label>
      <button type="submit" disabled={busy}>
        Log in
      </button>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
    </form>
  );
}
