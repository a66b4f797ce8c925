/**
 * `createNodeClient`: native gRPC over HTTP/2 (`@connectrpc/connect-node`), for services on
 * Node. It is a separate entry point (`@tokenbroker/client/node`) because it loads `node:http2`,
 * which a browser bundle cannot.
 */
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  type ClientOptions,
  TokenBrokerClient,
  resolveOptions,
  transportInterceptors,
} from "./client.js";

/**
 * Returns a client that speaks gRPC over HTTP/2 to `options.baseUrl` (`https://` uses TLS with
 * Node's trusted CAs; `NODE_EXTRA_CA_CERTS` adds a private one).
 *
 * @throws {TokenBrokerError} `InvalidArgument` for bad options (see {@link resolveOptions}).
 */
export function createNodeClient(options: ClientOptions): TokenBrokerClient {
  const resolved = resolveOptions(options);
  const transport = createGrpcTransport({
    baseUrl: resolved.baseUrl,
    defaultTimeoutMs: resolved.timeoutMs,
    interceptors: transportInterceptors(resolved, options.interceptors),
  });
  return new TokenBrokerClient(resolved, transport);
}

export * from "./index.js";
