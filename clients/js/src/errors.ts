/**
 * The errors a call can end with: {@link TokenBrokerError}, whose {@link ErrorKind} mirrors the
 * Rust client's `ClientErrorKind` (`clients/rust/src/lib.rs`), so code in either language
 * branches on the same classes.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { RetryInfoSchema } from "./gen/google/rpc/retry_info_pb.js";

/** The class of a failed call, mirroring the broker's error table (`docs/api.md`). */
export const ErrorKind = {
  /** The request was malformed (`INVALID_ARGUMENT`, `OUT_OF_RANGE`), or the client's options. */
  InvalidArgument: "InvalidArgument",
  /** No, or a bad, credential; or an inactive refresh token (`UNAUTHENTICATED`). */
  Unauthenticated: "Unauthenticated",
  /** The credential lacks the role, or the token is another client's (`PERMISSION_DENIED`). */
  PermissionDenied: "PermissionDenied",
  /** The broker is not configured for this call (`FAILED_PRECONDITION`). */
  FailedPrecondition: "FailedPrecondition",
  /** The caller is over its budget (`RESOURCE_EXHAUSTED`); see {@link TokenBrokerError.retryAfter}. */
  ResourceExhausted: "ResourceExhausted",
  /** The broker or its store cannot answer now, or cannot be reached (`UNAVAILABLE`). */
  Unavailable: "Unavailable",
  /** The deadline passed (`DEADLINE_EXCEEDED`). */
  DeadlineExceeded: "DeadlineExceeded",
  /** Anything else: a bug or misconfiguration on either side. */
  Internal: "Internal",
} as const;

/** One of the {@link ErrorKind} values. */
export type ErrorKind = (typeof ErrorKind)[keyof typeof ErrorKind];

/**
 * A failed call: its class, the gRPC code and the broker's message (which never holds a
 * secret: the broker's rule, `docs/api.md`).
 *
 * Nothing secret is reachable from it: it keeps no request, no header and no client option,
 * so `String(err)`, `JSON.stringify(err)`, `err.stack` and `util.inspect(err)` are safe to log.
 * The Connect error it was made from is not kept either (its `cause` would print the response
 * metadata); {@link TokenBrokerError.code} and the message carry what it said.
 */
export class TokenBrokerError extends Error {
  /** The class to branch on. */
  readonly kind: ErrorKind;
  /** The gRPC status code (`Code` of `@connectrpc/connect`; 0 to 16). */
  readonly code: Code;
  readonly #retryAfterMs: number | undefined;

  /** Builds an error of class `kind`; prefer {@link toTokenBrokerError} for a failed call. */
  constructor(kind: ErrorKind, code: Code, message: string, retryAfterMs?: number) {
    super(message);
    this.name = "TokenBrokerError";
    this.kind = kind;
    this.code = code;
    this.#retryAfterMs = retryAfterMs;
  }

  /**
   * For a throttled call (`RESOURCE_EXHAUSTED`), how many milliseconds to wait before a retry
   * can succeed, from the `google.rpc.RetryInfo` the broker puts in `grpc-status-details-bin`;
   * `undefined` when the answer carried none.
   */
  retryAfter(): number | undefined {
    return this.#retryAfterMs;
  }

  /** The fields `JSON.stringify` shows: the class, the code, the message and the delay. */
  toJSON(): Record<string, unknown> {
    return {
      name: this.name,
      kind: this.kind,
      code: Code[this.code],
      message: this.message,
      retryAfterMs: this.#retryAfterMs,
    };
  }
}

/**
 * Turns whatever a Connect call threw into a {@link TokenBrokerError}.
 *
 * The code decides the class, as in the Rust client. Two cases need more than the code:
 * - A failure on this side before any answer (connection refused, reset, DNS) reaches Connect
 *   as a thrown `TypeError` or system error; the gRPC transport reports it as `UNAVAILABLE`,
 *   but the grpc-web transport (fetch) as `UNKNOWN`, and a connection that breaks under a call
 *   comes as `INTERNAL`, `ABORTED` or `CANCELED`. Such an error, caused by a network failure
 *   and without any response metadata, was made here, not sent by the broker: it is
 *   `Unavailable`, "cannot reach the broker", like the Rust client's transport errors.
 * - The client's own deadline firing is `DEADLINE_EXCEEDED` in both transports already.
 */
export function toTokenBrokerError(reason: unknown): TokenBrokerError {
  if (reason instanceof TokenBrokerError) {
    return reason;
  }
  const err = ConnectError.from(reason);
  const answered = [...err.metadata.keys()].length > 0;
  if (LOCAL_CODES.includes(err.code) && !answered && isNetwork(err.cause)) {
    return new TokenBrokerError(
      ErrorKind.Unavailable,
      Code.Unavailable,
      `cannot reach the broker: ${causeText(err.cause)}`,
    );
  }
  const kind = kindOf(err.code);
  const retry = kind === ErrorKind.ResourceExhausted ? retryDelayMs(err) : undefined;
  return new TokenBrokerError(kind, err.code, err.rawMessage, retry);
}

/** The class of a gRPC code. */
function kindOf(code: Code): ErrorKind {
  switch (code) {
    case Code.InvalidArgument:
    case Code.OutOfRange:
      return ErrorKind.InvalidArgument;
    case Code.Unauthenticated:
      return ErrorKind.Unauthenticated;
    case Code.PermissionDenied:
      return ErrorKind.PermissionDenied;
    case Code.FailedPrecondition:
      return ErrorKind.FailedPrecondition;
    case Code.ResourceExhausted:
      return ErrorKind.ResourceExhausted;
    case Code.Unavailable:
      return ErrorKind.Unavailable;
    case Code.DeadlineExceeded:
      return ErrorKind.DeadlineExceeded;
    default:
      return ErrorKind.Internal;
  }
}

/** The first `RetryInfo` delay of the error's details, in milliseconds. */
function retryDelayMs(err: ConnectError): number | undefined {
  const [info] = err.findDetails(RetryInfoSchema);
  const delay = info?.retryDelay;
  if (delay === undefined) {
    return undefined;
  }
  return Number(delay.seconds) * 1000 + Math.floor(delay.nanos / 1_000_000);
}

/**
 * The codes Connect gives a failure it caught on this side: fetch's `TypeError` is `UNKNOWN`;
 * Node's HTTP/2 errors are `INTERNAL` (a session that went away), `ABORTED` (`ECONNRESET`) or
 * `CANCELED`.
 */
const LOCAL_CODES: readonly Code[] = [Code.Unknown, Code.Canceled, Code.Internal, Code.Aborted];

/**
 * Node's errors for a connection that broke or went away under a call (besides the `E…` system
 * errors): the broker closed it (GOAWAY on shutdown, or at `server.max_connection_age_seconds`)
 * or it was reset.
 */
const CONNECTION_GONE = [
  "ERR_HTTP2_GOAWAY_SESSION",
  "ERR_HTTP2_INVALID_SESSION",
  "ERR_HTTP2_SESSION_ERROR",
  "ERR_HTTP2_STREAM_CANCEL",
  "ERR_HTTP2_STREAM_ERROR",
  "ERR_STREAM_PREMATURE_CLOSE",
  "ERR_SOCKET_CLOSED",
];

/**
 * Whether `cause`, or an error in its `cause` chain, is a network failure: what `fetch` throws
 * when no response came (a `TypeError`, by the Fetch standard), a Node system error
 * (`ECONNREFUSED`, `ECONNRESET`, `ENOTFOUND`, `EAI_AGAIN`, ...) or one of
 * {@link CONNECTION_GONE}. A caller's abort (`AbortError`) and an exception thrown by the
 * caller's own interceptor are none of these, and keep their code.
 */
function isNetwork(cause: unknown): boolean {
  for (let next = cause, depth = 0; next instanceof Error && depth < 8; depth++) {
    if (next instanceof TypeError) {
      return true;
    }
    const code = (next as { code?: unknown }).code;
    if (typeof code === "string" && (/^E[A-Z_]+$/.test(code) || CONNECTION_GONE.includes(code))) {
      return true;
    }
    next = next.cause;
  }
  return false;
}

/**
 * The chain of messages of a local failure (`fetch failed: connect ECONNREFUSED 127.0.0.1:1`).
 * These come from the network stack and name an address at most, never a header.
 */
function causeText(cause: unknown): string {
  const parts: string[] = [];
  let next: unknown = cause;
  while (next instanceof Error && parts.length < 4) {
    parts.push(next.message);
    next = next.cause;
  }
  return parts.length > 0 ? parts.join(": ") : String(cause);
}
