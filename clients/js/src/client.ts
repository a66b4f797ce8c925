/**
 * The client: {@link TokenBrokerClient} over any Connect transport, with the API key, the
 * default deadline and the error mapping every caller needs. `node.ts` and `web.ts` pick the
 * transport.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import {
  Code,
  type Client,
  type Interceptor,
  type Transport,
  createClient,
} from "@connectrpc/connect";
import { HealthCheckResponse_ServingStatus, Health } from "./gen/grpc/health/v1/health_pb.js";
import {
  type IntrospectRequestSchema,
  type IntrospectResponse,
  type IssueTokensRequestSchema,
  type IssueTokensResponse,
  type ListTokensRequestSchema,
  type ListTokensResponse,
  type RefreshTokensRequestSchema,
  type RefreshTokensResponse,
  type RevokeRequestSchema,
  type RevokeResponse,
  TokenBroker,
} from "./gen/tokenbroker/v1/broker_pb.js";
import { ErrorKind, TokenBrokerError, toTokenBrokerError } from "./errors.js";
import { REDACTED, Secret } from "./secret.js";

/** Deadline of every call unless the options say otherwise: 5 s, the Rust client's. */
export const DEFAULT_TIMEOUT_MS = 5_000;

/** What {@link createNodeClient} and {@link createWebClient} take. */
export interface ClientOptions {
  /** The broker's address: `http://127.0.0.1:50051` or `https://broker.example.com`. */
  baseUrl: string;
  /**
   * The API key, sent as `authorization: Bearer <key>` on every call. Leave it out for the
   * calls whose credential is the token itself (RefreshTokens, Revoke by secret). A string is
   * wrapped in a {@link Secret} at once.
   */
  apiKey?: string | Secret;
  /** Each call's deadline in milliseconds (sent as `grpc-timeout`); 5 s when unset. */
  timeoutMs?: number;
  /**
   * More Connect interceptors (tracing headers and the like). They run before the API key is
   * set, so they never see it.
   */
  interceptors?: Interceptor[];
}

/** Per-call settings that override the client's. */
export interface CallOptions {
  /** This call's deadline in milliseconds. */
  timeoutMs?: number;
  /** Aborts the call. */
  signal?: AbortSignal;
  /** Extra request headers (such as a W3C `traceparent`). */
  headers?: HeadersInit;
}

/**
 * The options a client was built with, as it keeps them: the key is a {@link Secret}, so
 * printing or serialising them shows no key.
 */
export interface ResolvedOptions {
  readonly baseUrl: string;
  readonly apiKey: Secret | undefined;
  readonly timeoutMs: number;
}

/** A health check's answer. */
export const ServingStatus = HealthCheckResponse_ServingStatus;
/** One of the {@link ServingStatus} values. */
export type ServingStatus = HealthCheckResponse_ServingStatus;

/**
 * A tokenbroker client: one method per RPC of `tokenbroker.v1.TokenBroker`, plus
 * {@link TokenBrokerClient.checkHealth}. Every method rejects with a {@link TokenBrokerError}.
 */
export class TokenBrokerClient {
  /** The options, with the key wrapped. */
  readonly options: ResolvedOptions;
  readonly #broker: Client<typeof TokenBroker>;
  readonly #health: Client<typeof Health>;

  /**
   * Builds a client over `transport`, which must carry the API-key interceptor of the same
   * `options`; use `createNodeClient` or `createWebClient` instead.
   */
  constructor(options: ResolvedOptions, transport: Transport) {
    this.options = Object.freeze({ ...options });
    this.#broker = createClient(TokenBroker, transport);
    this.#health = createClient(Health, transport);
  }

  /** IssueTokens: gets or creates the account and mints a refresh and an access token. */
  issueTokens(
    request: MessageInitShape<typeof IssueTokensRequestSchema>,
    options?: CallOptions,
  ): Promise<IssueTokensResponse> {
    return call(() => this.#broker.issueTokens(request, options));
  }

  /** RefreshTokens: rotates a refresh token (the secret is the credential; no key needed). */
  refreshTokens(
    request: MessageInitShape<typeof RefreshTokensRequestSchema>,
    options?: CallOptions,
  ): Promise<RefreshTokensResponse> {
    return call(() => this.#broker.refreshTokens(request, options));
  }

  /**
   * Revoke: by secret (`{ target: { case: "token", value } }`, no key needed) or, with an admin
   * key, by `tokenId`, `familyId`, `accountId` or `email`.
   */
  revoke(
    request: MessageInitShape<typeof RevokeRequestSchema>,
    options?: CallOptions,
  ): Promise<RevokeResponse> {
    return call(() => this.#broker.revoke(request, options));
  }

  /** Introspect (RFC 7662): whether a secret is an active token, and its facts if it is. */
  introspect(
    request: MessageInitShape<typeof IntrospectRequestSchema>,
    options?: CallOptions,
  ): Promise<IntrospectResponse> {
    return call(() => this.#broker.introspect(request, options));
  }

  /** ListTokens: one page of an account's tokens, without secrets (admin). */
  listTokens(
    request: MessageInitShape<typeof ListTokensRequestSchema>,
    options?: CallOptions,
  ): Promise<ListTokensResponse> {
    return call(() => this.#broker.listTokens(request, options));
  }

  /**
   * grpc.health.v1 `Check`: the serving status of `service` ("" for the broker as a whole,
   * `tokenbroker.v1.TokenBroker` for the token service).
   */
  async checkHealth(service = "", options?: CallOptions): Promise<ServingStatus> {
    const answer = await call(() => this.#health.check({ service }, options));
    return answer.status;
  }

  /** Shows the base URL only. */
  toString(): string {
    return `TokenBrokerClient(${this.options.baseUrl})`;
  }

  /** What `JSON.stringify` shows: the options, with the key as `[redacted]`. */
  toJSON(): Record<string, unknown> {
    return {
      baseUrl: this.options.baseUrl,
      apiKey: this.options.apiKey === undefined ? undefined : REDACTED,
      timeoutMs: this.options.timeoutMs,
    };
  }
}

/**
 * Checks and normalises the options a factory was given.
 *
 * @throws {TokenBrokerError} `InvalidArgument` for a base URL that is not `http(s)://…`, an
 * empty API key or one that cannot be an HTTP header value, or a deadline that is not a
 * positive number. The message never repeats the key.
 */
function resolveOptions(options: ClientOptions): ResolvedOptions {
  const invalid = (message: string) =>
    new TokenBrokerError(ErrorKind.InvalidArgument, Code.InvalidArgument, message);
  let url: URL;
  try {
    url = new URL(options.baseUrl);
  } catch {
    throw invalid(`baseUrl ${JSON.stringify(options.baseUrl)} is not a URL`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw invalid(`baseUrl must start with http:// or https://, not ${url.protocol}//`);
  }
  const apiKey = typeof options.apiKey === "string" ? new Secret(options.apiKey) : options.apiKey;
  if (apiKey !== undefined && !/^[\x21-\x7e]+$/.test(apiKey.expose())) {
    throw invalid("apiKey must be non-empty printable ASCII without spaces");
  }
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) {
    throw invalid(`timeoutMs must be a positive number of milliseconds, not ${timeoutMs}`);
  }
  return { baseUrl: options.baseUrl, apiKey, timeoutMs };
}

/** What both Connect transport factories (gRPC and grpc-web) take from the client's options. */
export interface TransportOptions {
  baseUrl: string;
  defaultTimeoutMs: number;
  interceptors: Interceptor[];
}

/**
 * Builds a client over the transport `makeTransport` makes: the factories' shared half. The
 * options are checked first, so a bad one throws before any connection is set up.
 *
 * @throws {TokenBrokerError} `InvalidArgument` for bad options (see {@link resolveOptions}).
 */
export function clientOver(
  options: ClientOptions,
  makeTransport: (options: TransportOptions) => Transport,
): TokenBrokerClient {
  const resolved = resolveOptions(options);
  const transport = makeTransport({
    baseUrl: resolved.baseUrl,
    defaultTimeoutMs: resolved.timeoutMs,
    interceptors: transportInterceptors(resolved, options.interceptors),
  });
  return new TokenBrokerClient(resolved, transport);
}

/**
 * The interceptors every transport gets: the caller's own, then, innermost (Connect runs the
 * first of the list outermost), the API key's, which sets `authorization: Bearer <key>` just
 * before the request is sent. So no caller interceptor can drop the header, and none sees the
 * key (one that logs headers logs no secret). The key is read from the {@link Secret} only here.
 */
function transportInterceptors(resolved: ResolvedOptions, extra: Interceptor[] = []): Interceptor[] {
  const key = resolved.apiKey;
  if (key === undefined) {
    return extra;
  }
  const bearer: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${key.expose()}`);
    return next(req);
  };
  return [...extra, bearer];
}

/** Runs one call and turns its failure into a {@link TokenBrokerError}. */
async function call<T>(run: () => Promise<T>): Promise<T> {
  try {
    return await run();
  } catch (reason) {
    throw toTokenBrokerError(reason);
  }
}
