/**
 * A value that must not be printed: an API key the client sends, or a token secret a caller
 * chooses to wrap.
 *
 * `String(secret)`, `JSON.stringify` and Node's `util.inspect` (so `console.log`) all show
 * `[redacted]`; only {@link Secret.expose} returns the value. The value lives in a private
 * class field, which neither `Object.keys`, the spread operator nor `structuredClone` reach.
 */
export class Secret {
  readonly #value: string;

  /** Wraps `value`. */
  constructor(value: string) {
    this.#value = value;
  }

  /** Returns the wrapped value, for the one place that sends it. */
  expose(): string {
    return this.#value;
  }

  /** Returns `[redacted]`. */
  toString(): string {
    return REDACTED;
  }

  /** Returns `[redacted]`, so `JSON.stringify` prints no secret. */
  toJSON(): string {
    return REDACTED;
  }

  /**
   * What Node's `util.inspect` and `console.log` print. The symbol is looked up by its
   * registered name rather than imported from `node:util`, so this file also loads in browsers.
   */
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return REDACTED;
  }
}

/** What a secret prints as. */
export const REDACTED = "[redacted]";
