/**
 * A Cognito user pool double for the tests: an RSA key, its JWKS served over HTTP on
 * loopback, and ID tokens signed with it carrying the claims Cognito puts in its own (RS256,
 * `kid`, `iss` of the pool, `aud` the app client, `token_use: "id"`, `email_verified`).
 */
import { createSign, generateKeyPairSync, randomUUID } from "node:crypto";
import { type Server, createServer } from "node:http";
import type { AddressInfo } from "node:net";

/** The pool's issuer, as in real Cognito tokens. */
export const ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_JsTest001";
/** The app client the tokens are issued to. */
export const CLIENT_ID = "jsclient0example0000000000";

const KID = "js-test-key";

const base64url = (data: string | Buffer) => Buffer.from(data).toString("base64url");

/** A running pool double. */
export interface TestPool {
  /** Where the broker fetches the keys. */
  jwksUrl: string;
  /** An ID token for `email` and `sub`, valid for `seconds` (negative: already expired). */
  idToken(email: string, sub: string, seconds?: number): string;
  /** The `[[cognito.pools]]` entry that trusts this pool, with direct exchange on or off. */
  config(directExchange: boolean): string;
  close(): Promise<void>;
}

/** Starts the JWKS server on a port the OS picks. */
export async function startPool(): Promise<TestPool> {
  const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  const jwk = { ...publicKey.export({ format: "jwk" }), kid: KID, alg: "RS256", use: "sig" };
  const body = JSON.stringify({ keys: [jwk] });
  const server: Server = createServer((_request, response) => {
    response.writeHead(200, { "content-type": "application/json" });
    response.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  const jwksUrl = `http://127.0.0.1:${port}/.well-known/jwks.json`;
  return {
    jwksUrl,
    idToken(email, sub, seconds = 3600) {
      const now = Math.floor(Date.now() / 1000);
      const header = base64url(JSON.stringify({ kid: KID, alg: "RS256" }));
      const claims = base64url(
        JSON.stringify({
          sub,
          email_verified: true,
          iss: ISSUER,
          "cognito:username": sub,
          aud: CLIENT_ID,
          token_use: "id",
          auth_time: now - 60,
          iat: Math.min(now, now + seconds - 60),
          exp: now + seconds,
          jti: randomUUID(),
          email,
        }),
      );
      const signer = createSign("RSA-SHA256");
      signer.update(`${header}.${claims}`);
      return `${header}.${claims}.${base64url(signer.sign(privateKey))}`;
    },
    config(directExchange) {
      return [
        "[[cognito.pools]]",
        `issuer = "${ISSUER}"`,
        `jwks_url = "${jwksUrl}"`,
        `client_ids = ["${CLIENT_ID}"]`,
        `direct_exchange = ${directExchange}`,
      ].join("\n");
    },
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
