/**
 * `createNodeClient`: native gRPC over HTTP/2 (`@connectrpc/connect-node`), for services on
 * Node. It is a separate entry point (`@tokenbroker/client/node`) because it loads `node:http2`,
 * which a browser bundle cannot.
 */
import { createGrpcTransport } from "@connectrpc/connect-node";
import { type ClientOptions, type TokenBrokerClient, clientOver } from "./client.js";

/**
 * Returns a client that speaks gRPC over HTTP/2 to `options.baseUrl` (`https://` uses TLS with
 * Node's trusted CAs; `NODE_EXTRA_CA_CERTS` adds a private one).
 *
 * @throws {TokenBrokerError} `InvalidArgument` for a base URL that is not `http(s)://…`, an
 * empty API key or one that cannot be a header value, or a deadline that is not positive.
 */
export function createNodeClient(options: ClientOptions): TokenBrokerClient {
  return clientOver(options, createGrpcTransport);
}

export * from "./index.js";
