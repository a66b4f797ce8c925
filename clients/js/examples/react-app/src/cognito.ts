/**
 * The Cognito sign-in, with `amazon-cognito-identity-js` as in the original app, but keeping
 * nothing: the library's tokens go to an in-memory storage (its default is `localStorage`),
 * which is emptied as soon as the ID token has been read. The broker's tokens replace
 * Cognito's session from then on.
 */
import {
  AuthenticationDetails,
  CognitoUser,
  CognitoUserPool,
  type ICognitoStorage,
} from "amazon-cognito-identity-js";
import type { AppConfig } from "./config";

/** `ICognitoStorage` in a Map: gone with the page, never readable by other scripts' storage. */
class MemoryStorage implements ICognitoStorage {
  readonly #items = new Map<string, string>();
  setItem(key: string, value: string): void {
    this.#items.set(key, value);
  }
  getItem(key: string): string | null {
    return this.#items.get(key) ?? null;
  }
  removeItem(key: string): void {
    this.#items.delete(key);
  }
  clear(): void {
    this.#items.clear();
  }
}

/**
 * Signs `email` in with USER_PASSWORD_AUTH and returns the ID token (a JWT: a secret, it
 * proves who the user is for an hour).
 */
export function signIn(config: AppConfig, email: string, password: string): Promise<string> {
  const storage = new MemoryStorage();
  const pool = new CognitoUserPool({
    UserPoolId: config.cognito.userPoolId,
    ClientId: config.cognito.clientId,
    endpoint: config.cognito.endpoint,
    Storage: storage,
  });
  const user = new CognitoUser({ Username: email, Pool: pool, Storage: storage });
  user.setAuthenticationFlowType("USER_PASSWORD_AUTH");
  const details = new AuthenticationDetails({ Username: email, Password: password });
  return new Promise((resolve, reject) => {
    user.authenticateUser(details, {
      onSuccess(session) {
        const idToken = session.getIdToken().getJwtToken();
        storage.clear();
        resolve(idToken);
      },
      onFailure(err: unknown) {
        storage.clear();
        // Cognito's messages name the problem ("Incorrect username or password."), never the
        // password.
        reject(new Error(err instanceof Error ? err.message : "sign-in failed"));
      },
      newPasswordRequired() {
        storage.clear();
        reject(new Error("this user must set a new password first (not handled by the example)"));
      },
    });
  });
}

/** The payload of a JWT, decoded without verification (the broker and Cognito verify it). */
export function jwtClaims(jwt: string): Record<string, unknown> {
  const payload = jwt.split(".")[1] ?? "";
  const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes)) as Record<string, unknown>;
}
