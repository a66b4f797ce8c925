/**
 * `createWebClient`: grpc-web over `fetch` (`@connectrpc/connect-web`), for browsers, and for
 * Node 20 and later, whose `fetch` is built in. The broker must have `server.grpc_web = true`,
 * and for a browser page its origin in `server.cors.allowed_origins` (`docs/configuration.md`).
 */
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { type ClientOptions, type TokenBrokerClient, clientOver } from "./client.js";

/**
 * Returns a client that speaks grpc-web (binary) to `options.baseUrl`.
 *
 * The requests carry no cookies (`fetch`'s default `credentials: "same-origin"`, for another
 * origin): the broker reads its credential from the `authorization` header only, and its CORS
 * answer does not allow credentialed requests.
 *
 * @throws {TokenBrokerError} `InvalidArgument` for bad options, as `createNodeClient`.
 */
export function createWebClient(options: ClientOptions): TokenBrokerClient {
  return clientOver(options, createGrpcWebTransport);
}

export * from "./index.js";
