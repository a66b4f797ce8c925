/**
 * The user's broker tokens, in memory only (private fields of one object: no cookie, no
 * `localStorage`, nothing on `window`), and the one way the page uses them: {@link
 * BrokerSession.fetch}, which sends the access token to the movie API and, when the API answers
 * 401 (the token expired or was revoked), rotates the pair with RefreshTokens over grpc-web and
 * retries once. Only token ids (public) ever leave this object for the UI.
 */
import { ErrorKind, TokenBrokerError, createWebClient } from "@tokenbroker/client/web";
import type { AppConfig } from "./config";
import { jwtClaims } from "./cognito";

/** The broker refused the session (revoked, expired, or reused): the user must sign in again. */
export class SessionEnded extends Error {}

/** What the page may show about a session: no secret. */
export interface SessionInfo {
  email: string;
  /** The current access token's id, or "" when the trigger's claims gave no id. */
  accessTokenId: string;
  familyId: string;
  /** How many times the pair was rotated in this page. */
  rotations: number;
}

export class BrokerSession {
  readonly #config: AppConfig;
  #access: string;
  #refresh: string | undefined;
  #rotating: Promise<void> | undefined;
  #info: SessionInfo;
  /** Called after every rotation, so the page can show the new token id. */
  onChange: (info: SessionInfo) => void = () => {};

  private constructor(
    config: AppConfig,
    access: string,
    refresh: string | undefined,
    info: SessionInfo,
  ) {
    this.#config = config;
    this.#access = access;
    this.#refresh = refresh;
    this.#info = info;
  }

  /**
   * Turns a Cognito ID token into a broker session: by direct exchange (the ID token is both the
   * credential and the `cognito_token` of IssueTokens: no API key in the page), or from the
   * claims the trigger added to it.
   */
  static async start(config: AppConfig, idToken: string): Promise<BrokerSession> {
    const claims = jwtClaims(idToken);
    const email = typeof claims.email === "string" ? claims.email : "";
    if (config.tokens === "claims") {
      const access = claims[config.accessClaim];
      const refresh = claims[config.refreshClaim];
      if (typeof access !== "string" || access === "") {
        throw new Error(
          `the ID token has no ${config.accessClaim} claim: is the trigger attached?`,
        );
      }
      return new BrokerSession(config, access, typeof refresh === "string" ? refresh : undefined, {
        email,
        accessTokenId: "",
        familyId: "",
        rotations: 0,
      });
    }
    const exchange = createWebClient({ baseUrl: config.brokerUrl, apiKey: idToken });
    const pair = await exchange.issueTokens({ subject: { case: "cognitoToken", value: idToken } });
    return new BrokerSession(config, pair.access?.secret ?? "", pair.refresh?.secret, {
      email,
      accessTokenId: pair.access?.tokenId ?? "",
      familyId: pair.familyId,
      rotations: 0,
    });
  }

  get info(): SessionInfo {
    return { ...this.#info };
  }

  /**
   * GETs `path` from the movie API with the access token. On 401 it rotates once and retries;
   * a second 401, or a refused rotation, ends the session.
   *
   * @throws {SessionEnded} when the broker no longer accepts the session.
   */
  async fetch(path: string): Promise<Response> {
    const first = await this.#get(path);
    if (first.status !== 401) {
      return first;
    }
    await this.#rotate();
    const second = await this.#get(path);
    if (second.status === 401) {
      throw new SessionEnded("the movie API refused the rotated token");
    }
    return second;
  }

  /** Log out: Revoke by secret (no key needed), which ends the whole session at the broker. */
  async logOut(): Promise<void> {
    const token = this.#refresh ?? this.#access;
    this.#access = "";
    this.#refresh = undefined;
    await this.#client().revoke({
      target: { case: "token", value: token },
      clientId: this.#config.cognito.clientId,
    });
  }

  #get(path: string): Promise<Response> {
    return fetch(new URL(path, this.#config.apiUrl), {
      headers: { authorization: `Bearer ${this.#access}` },
    });
  }

  /** RefreshTokens, once at a time: two rotations of one refresh token would look like reuse. */
  #rotate(): Promise<void> {
    this.#rotating ??= this.#rotateNow().finally(() => {
      this.#rotating = undefined;
    });
    return this.#rotating;
  }

  async #rotateNow(): Promise<void> {
    if (this.#refresh === undefined) {
      throw new SessionEnded("the access token expired and there is no refresh token");
    }
    try {
      const pair = await this.#client().refreshTokens({
        refreshToken: this.#refresh,
        clientId: this.#config.cognito.clientId,
      });
      this.#access = pair.access?.secret ?? "";
      this.#refresh = pair.refresh?.secret;
      this.#info = {
        ...this.#info,
        accessTokenId: pair.access?.tokenId ?? "",
        familyId: pair.familyId,
        rotations: this.#info.rotations + 1,
      };
      this.onChange(this.info);
    } catch (err) {
      if (err instanceof TokenBrokerError && err.kind === ErrorKind.Unauthenticated) {
        this.#access = "";
        this.#refresh = undefined;
        throw new SessionEnded("the broker refused the refresh token");
      }
      throw err;
    }
  }

  /** A grpc-web client without a key: RefreshTokens and Revoke by secret need none. */
  #client() {
    return createWebClient({ baseUrl: this.#config.brokerUrl });
  }

  /** Never shows a token. */
  toJSON(): SessionInfo {
    return this.info;
  }
}
