/**
 * The code-to-class table of `toTokenBrokerError`, code by code, as the Rust client's
 * `status_codes_map_to_kinds` test does; the calls in client.test.ts reach each class through
 * a real broker, this covers the codes a broker of this version never sends (OUT_OF_RANGE,
 * INTERNAL, UNKNOWN, ...).
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { expect, test } from "vitest";
import { ErrorKind, TokenBrokerError, toTokenBrokerError } from "../src/index.js";

/** A ConnectError as an answer from a server makes it: with response metadata. */
function answered(code: Code): ConnectError {
  return new ConnectError("from the broker", code, { "grpc-status": String(code) });
}

/** A ConnectError as a transport makes it from what it caught, before any answer. */
function caught(cause: unknown, code: Code): ConnectError {
  return new ConnectError(String(cause), code, undefined, undefined, cause);
}

test("every gRPC code maps to the Rust client's class", () => {
  const expected: [Code, ErrorKind][] = [
    [Code.Canceled, ErrorKind.Internal],
    [Code.Unknown, ErrorKind.Internal],
    [Code.InvalidArgument, ErrorKind.InvalidArgument],
    [Code.DeadlineExceeded, ErrorKind.DeadlineExceeded],
    [Code.NotFound, ErrorKind.Internal],
    [Code.AlreadyExists, ErrorKind.Internal],
    [Code.PermissionDenied, ErrorKind.PermissionDenied],
    [Code.ResourceExhausted, ErrorKind.ResourceExhausted],
    [Code.FailedPrecondition, ErrorKind.FailedPrecondition],
    [Code.Aborted, ErrorKind.Internal],
    [Code.OutOfRange, ErrorKind.InvalidArgument],
    [Code.Unimplemented, ErrorKind.Internal],
    [Code.Internal, ErrorKind.Internal],
    [Code.Unavailable, ErrorKind.Unavailable],
    [Code.DataLoss, ErrorKind.Internal],
    [Code.Unauthenticated, ErrorKind.Unauthenticated],
  ];
  for (const [code, kind] of expected) {
    const err = toTokenBrokerError(answered(code));
    expect(err.kind, Code[code]).toBe(kind);
    expect(err.code).toBe(code);
    expect(err.message).toBe("from the broker");
    expect(err.retryAfter()).toBeUndefined();
  }
});

test("a failure before any answer is Unavailable, a caller's abort is not", () => {
  const refused = new TypeError("fetch failed", { cause: new Error("connect ECONNREFUSED") });
  const local = toTokenBrokerError(caught(refused, Code.Unknown));
  expect(local.kind).toBe(ErrorKind.Unavailable);
  expect(local.message).toBe("cannot reach the broker: fetch failed: connect ECONNREFUSED");

  const abort = new DOMException("This operation was aborted", "AbortError");
  const aborted = toTokenBrokerError(caught(abort, Code.Canceled));
  expect(aborted.kind).toBe(ErrorKind.Internal);
  expect(aborted.code).toBe(Code.Canceled);

  // A bug on this side (an interceptor that throws) is not the network.
  const bug = toTokenBrokerError(new Error("boom"));
  expect(bug).toBeInstanceOf(TokenBrokerError);
  expect(bug.kind).toBe(ErrorKind.Internal);

  // What connect-node makes of a connection reset (ABORTED) and of a session the broker closed
  // with GOAWAY (INTERNAL), as in its connectErrorFromNodeReason.
  const reset = Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" });
  expect(toTokenBrokerError(caught(reset, Code.Aborted)).kind).toBe(ErrorKind.Unavailable);
  const goaway = Object.assign(new Error("New streams cannot be created after receiving a GOAWAY"), {
    code: "ERR_HTTP2_GOAWAY_SESSION",
  });
  expect(toTokenBrokerError(caught(goaway, Code.Internal)).kind).toBe(ErrorKind.Unavailable);
  // An INTERNAL the broker sent stays Internal.
  expect(toTokenBrokerError(answered(Code.Internal)).kind).toBe(ErrorKind.Internal);
});
