import { type FormEvent, useState } from "react";
import { signIn } from "./cognito";
import type { AppConfig } from "./config";
import { BrokerSession, SessionEnded, type SessionInfo } from "./session";

interface Movie {
  title: string;
  year: number;
}

type Notice = { kind: "info" | "refused" | "error"; text: string } | undefined;

/** What an error says to the user; never a token (the client's errors carry none). */
const describe = (err: unknown) => (err instanceof Error ? err.message : String(err));

export function App({ config }: { config: AppConfig }) {
  const [session, setSession] = useState<BrokerSession>();
  const [info, setInfo] = useState<SessionInfo>();
  const [movies, setMovies] = useState<Movie[]>([]);
  const [apiCalls, setApiCalls] = useState(0);
  const [busy, setBusy] = useState(false);
  const [notice, setNotice] = useState<Notice>();

  function end(next: Notice) {
    setSession(undefined);
    setInfo(undefined);
    setMovies([]);
    setNotice(next);
  }

  async function loadMovies(current: BrokerSession) {
    setBusy(true);
    try {
      const response = await current.fetch("/movies");
      setApiCalls((n) => n + 1);
      if (!response.ok) {
        throw new Error(`the movie API answered ${response.status}`);
      }
      const body = (await response.json()) as { movies: Movie[] };
      setMovies(body.movies);
      setNotice(undefined);
    } catch (err) {
      if (err instanceof SessionEnded) {
        end({ kind: "refused", text: `Refused: ${err.message}. Sign in again.` });
      } else {
        setNotice({ kind: "error", text: describe(err) });
      }
    } finally {
      setBusy(false);
    }
  }

  async function onSignIn(event: FormEvent<HTMLFormElement>) {
    event.preventDefault();
    const form = new FormData(event.currentTarget);
    setBusy(true);
    setNotice({ kind: "info", text: "Signing in…" });
    try {
      const idToken = await signIn(config, String(form.get("email")), String(form.get("password")));
      const started = await BrokerSession.start(config, idToken);
      started.onChange = setInfo;
      setSession(started);
      setInfo(started.info);
      setNotice(undefined);
      await loadMovies(started);
    } catch (err) {
      setNotice({ kind: "error", text: `Sign-in failed: ${describe(err)}` });
    } finally {
      setBusy(false);
    }
  }

  async function onLogOut() {
    if (session === undefined) return;
    setBusy(true);
    try {
      await session.logOut();
      end({ kind: "info", text: "Logged out: the broker revoked the session." });
    } catch (err) {
      // The tokens are forgotten either way; the broker may still hold them until they expire.
      end({
        kind: "error",
        text: `Logged out here, but the broker was not told: ${describe(err)}`,
      });
    } finally {
      setBusy(false);
    }
  }

  return (
    <main>
      <h1>Movies</h1>
      <p className="status" data-testid="status">
        {info ? `Signed in as ${info.email}` : "Signed out"}
      </p>
      {notice && (
        <p className={`notice ${notice.kind}`} data-testid="notice" role="status">
          {notice.text}
        </p>
      )}
      {session === undefined ? (
        <form onSubmit={onSignIn}>
          <label>
            Email <input name="email" type="email" autoComplete="username" required />
          </label>
          <label>
            Password{" "}
            <input name="password" type="password" autoComplete="current-password" required />
          </label>
          <button type="submit" disabled={busy}>
            Sign in
          </button>
        </form>
      ) : (
        <>
          <div className="actions">
            <button type="button" disabled={busy} onClick={() => loadMovies(session)}>
              Reload movies
            </button>
            <button type="button" disabled={busy} onClick={onLogOut}>
              Log out
            </button>
          </div>
          <ul data-testid="movies">
            {movies.map((movie) => (
              <li key={movie.title}>
                {movie.title} <span className="year">({movie.year})</span>
              </li>
            ))}
          </ul>
          <dl className="session">
            <dt>Access token id</dt>
            <dd data-testid="access-id">{info?.accessTokenId || "(from the ID token)"}</dd>
            <dt>Rotations (RefreshTokens)</dt>
            <dd data-testid="rotations">{info?.rotations ?? 0}</dd>
            <dt>Movie API calls</dt>
            <dd data-testid="api-calls">{apiCalls}</dd>
            <dt>Tokens from</dt>
            <dd>
              {config.tokens === "direct" ? "direct exchange" : "the trigger's ID-token claims"}
            </dd>
          </dl>
        </>
      )}
    </main>
  );
}
