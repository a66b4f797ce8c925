/** A helper the test files share. */
import { expect } from "vitest";
import { TokenBrokerError } from "../src/index.js";

/** Runs `call`, which must fail, and returns its error. */
export async function failure(call: Promise<unknown>): Promise<TokenBrokerError> {
  const err = await call.then(
    () => undefined,
    (reason: unknown) => reason,
  );
  expect(err, "the call must fail").toBeInstanceOf(TokenBrokerError);
  return err as TokenBrokerError;
}
