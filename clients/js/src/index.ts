/**
 * `@tokenbroker/client`: the parts shared by both transports. Import `createNodeClient` from
 * `@tokenbroker/client/node` and `createWebClient` from `@tokenbroker/client/web`; both entry
 * points re-export everything here.
 */
export {
  type CallOptions,
  type ClientOptions,
  DEFAULT_TIMEOUT_MS,
  type ResolvedOptions,
  ServingStatus,
  TokenBrokerClient,
} from "./client.js";
export { ErrorKind, TokenBrokerError, toTokenBrokerError } from "./errors.js";
export { Secret } from "./secret.js";
export * from "./gen/tokenbroker/v1/broker_pb.js";
