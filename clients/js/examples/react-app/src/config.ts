/**
 * The page's settings: `VITE_*` variables baked in by `vite build`, overridden field by field by
 * `config.json` next to the page when it is served (so one build runs against any pool and
 * broker; the browser test serves its own). None of them is a secret: they are all public in
 * the page anyway.
 */

/** Where the page gets the broker's tokens after the Cognito sign-in. */
export type TokenSource =
  /** IssueTokens over grpc-web with the user's own ID token as credential (`direct_exchange`). */
  | "direct"
  /** The claims the trigger (a Cognito pre-token-generation Lambda) put into the ID token. */
  | "claims";

export interface AppConfig {
  cognito: {
    /** `us-east-1_AbC123xyZ`. */
    userPoolId: string;
    /** The app client; it must allow USER_PASSWORD_AUTH. */
    clientId: string;
    /** Cognito's endpoint when it is not AWS's (a local double such as moto), ending in `/`. */
    endpoint?: string;
  };
  /** The broker's grpc-web address, e.g. `https://broker.example.com`. */
  brokerUrl: string;
  /** The movie API (api/server.ts). */
  apiUrl: string;
  tokens: TokenSource;
  /** The trigger's claim names (its `ACCESS_CLAIM` and `REFRESH_CLAIM`), for `tokens: "claims"`. */
  accessClaim: string;
  refreshClaim: string;
}

const env = import.meta.env;

function fromEnv(): AppConfig {
  return {
    cognito: {
      userPoolId: env.VITE_COGNITO_USER_POOL_ID ?? "",
      clientId: env.VITE_COGNITO_CLIENT_ID ?? "",
      endpoint: env.VITE_COGNITO_ENDPOINT || undefined,
    },
    brokerUrl: env.VITE_BROKER_URL ?? "http://127.0.0.1:50051",
    apiUrl: env.VITE_API_URL ?? "http://127.0.0.1:8787",
    tokens: env.VITE_TOKENS === "claims" ? "claims" : "direct",
    accessClaim: env.VITE_ACCESS_CLAIM ?? "fauna_access_token",
    refreshClaim: env.VITE_REFRESH_CLAIM ?? "fauna_refresh_token",
  };
}

/** Reads the settings; throws when one that has no default is missing. */
export async function loadConfig(): Promise<AppConfig> {
  const config = fromEnv();
  const response = await fetch(new URL("config.json", document.baseURI), { cache: "no-store" });
  // A dev server without one answers its index.html instead: only JSON counts.
  if (response.ok && response.headers.get("content-type")?.includes("json")) {
    const served = (await response.json()) as Partial<AppConfig>;
    Object.assign(config, { ...served, cognito: { ...config.cognito, ...served.cognito } });
  }
  if (config.cognito.userPoolId === "" || config.cognito.clientId === "") {
    throw new Error(
      "no user pool configured: set VITE_COGNITO_USER_POOL_ID and VITE_COGNITO_CLIENT_ID, " +
        "or serve a config.json (see config.example.json)",
    );
  }
  if (config.tokens !== "direct" && config.tokens !== "claims") {
    throw new Error(`tokens must be "direct" or "claims", not ${JSON.stringify(config.tokens)}`);
  }
  return config;
}
