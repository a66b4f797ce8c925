//! `tokenbroker-load pgbench-script`: prints a pgbench custom script that runs the PostgreSQL
//! store's own IssueTokens or Introspect statement, the database's ceiling in `scripts/bench`.
//!
//! The statement is the store's SQL itself ([`ISSUE_SQL`], [`INTROSPECT_SQL`]), never a copy:
//! each `$n` parameter is replaced by an SQL expression over pgbench variables, so every
//! transaction does the broker's work with fresh values. IssueTokens: one `\set` random number
//! per transaction, from which the expressions derive a fresh email, account, family and token
//! ids in the broker's time-ordered format, and SHA-256 digests; every call is a first sign-in
//! (no known account), like `run --rpc issue --returning 0`. Introspect: the id of one of the
//! sampled access tokens of `prefill --postgres` (`--tokens-file`), picked at random per
//! transaction, as `run --tokens-file` picks one of the same secrets, as an array of one: the
//! statement takes the ids of concurrent calls, and pgbench runs one call per transaction.
//!
//! The server evaluates these expressions (a few `md5`, `sha256` and `to_hex` calls per
//! IssueTokens), which the broker computes on its own side: a few microseconds per transaction
//! that count against pgbench, not the broker.

use std::path::PathBuf;

use anyhow::{Context as _, bail, ensure};
use tokenbroker::store::postgres::{INTROSPECT_SQL, ISSUE_SQL};

use crate::{CLIENT_ID, Rpc};

/// The broker's default lifetimes (`tokens.access_ttl_seconds`, `refresh_ttl_seconds`,
/// `max_session_seconds`), in microseconds, for the expiries the statement stores.
const ACCESS_TTL_US: i64 = 600 * 1_000_000;
const REFRESH_TTL_US: i64 = 3600 * 1_000_000;
const SESSION_TTL_US: i64 = 2_592_000 * 1_000_000;

#[derive(Debug, clap::Args)]
pub(crate) struct ScriptArgs {
    /// The RPC whose statement the script runs.
    #[arg(long, value_enum)]
    rpc: Rpc,
    /// Introspect: the sampled access secrets that `prefill --postgres` wrote
    /// (`--secrets-out`); the script introspects their tokens.
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
}

pub(crate) fn script(args: &ScriptArgs) -> anyhow::Result<String> {
    match args.rpc {
        Rpc::Issue => issue_script(),
        Rpc::Introspect => {
            let Some(path) = &args.tokens_file else {
                bail!("--rpc introspect needs --tokens-file (from prefill --postgres)");
            };
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            introspect_script(&text).with_context(|| {
                format!("{} does not come from prefill --postgres", path.display())
            })
        }
    }
}

/// The current time in microseconds, as the broker stores it.
const NOW_US: &str = "(extract(epoch FROM now()) * 1000000)::bigint";

/// The transaction's random number.
const R: &str = "(:r)::bigint";

/// 32 hex digits like `ordered_hex`: 12 of milliseconds, then 20 derived from the
/// transaction's random number and `tag`.
fn ordered_hex(tag: &str) -> String {
    format!(
        "lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint), 12, '0') \
         || substr(md5({R}::text || '{tag}'), 1, 20)"
    )
}

/// The SHA-256 digest of a secret shaped like the broker's: `prefix`, the id's hex, `_`, and
/// random characters.
fn digest(prefix: &str, tag: &str) -> String {
    format!(
        "sha256(convert_to('{prefix}' || {} || '_' || md5({R}::text || '{tag}s'), 'UTF8'))",
        ordered_hex(tag)
    )
}

fn issue_script() -> anyhow::Result<String> {
    let params = [
        // $1 new account id, $2 email, $3 Cognito sub, $4 now, $5 known account: none.
        format!("'acc_' || {}", ordered_hex("a")),
        format!("'u' || {R}::text || '@pgbench.load.example'"),
        format!("md5({R}::text || 's')::uuid::text"),
        NOW_US.to_owned(),
        "NULL".to_owned(),
        // $6 family, $7 client, $8 refresh id, $9 its digest, $10 its expiry.
        format!("'fam_' || {}", ordered_hex("f")),
        format!("'{CLIENT_ID}'"),
        format!("'tok_' || {}", ordered_hex("r")),
        digest("tbr_", "r"),
        format!("{NOW_US} + {REFRESH_TTL_US}"),
        // $11 access id, $12 its digest, $13 its expiry, $14 session end, $15 metadata.
        format!("'tok_' || {}", ordered_hex("x")),
        digest("tba_", "x"),
        format!("{NOW_US} + {ACCESS_TTL_US}"),
        format!("{NOW_US} + {SESSION_TTL_US}"),
        "'{}'".to_owned(),
    ];
    let statement = substitute(ISSUE_SQL, &params)?;
    Ok(format!(
        "\\set r random(1, 4611686018427387903)\n{statement};\n"
    ))
}

/// The script for the secrets of `prefill --postgres`: their token ids are
/// `tok_<12 hex><20 hex of n>` with one 12-digit prefix and `n` in an arithmetic progression,
/// so the script computes the id of the `k`-th from a random `k` without a lookup table.
fn introspect_script(secrets: &str) -> anyhow::Result<String> {
    let mut prefix = None;
    let mut numbers = Vec::new();
    for line in secrets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let hex = line
            .strip_prefix("tba_")
            .and_then(|rest| rest.get(..32))
            .context("a line is not an access secret")?;
        let (head, tail) = hex.split_at(12);
        ensure!(
            *prefix.get_or_insert(head) == head,
            "the secrets' ids do not share one prefix"
        );
        numbers.push(u64::from_str_radix(tail, 16).context("an id is not hex")?);
    }
    let (Some(prefix), Some(&first)) = (prefix, numbers.first()) else {
        bail!("no secrets");
    };
    let step = numbers
        .get(1)
        .map_or(0, |second| second.wrapping_sub(first));
    for (k, &n) in numbers.iter().enumerate() {
        ensure!(
            Some(n)
                == (k as u64)
                    .checked_mul(step)
                    .and_then(|d| d.checked_add(first)),
            "the secrets' ids are not evenly spaced"
        );
    }
    // The statement takes an array of ids, the lookups of concurrent calls; pgbench's
    // transactions each look up one, as the broker's statement for a call that finds no other
    // in flight.
    let ids =
        format!("ARRAY['tok_{prefix}' || lpad(to_hex({first} + (:k)::bigint * {step}), 20, '0')]");
    let statement = substitute(INTROSPECT_SQL, &[ids])?;
    Ok(format!(
        "\\set k random(0, {})\n{statement};\n",
        numbers.len() - 1
    ))
}

/// Replaces every `$n` of `sql` with `(params[n - 1])`; fails unless the statement uses exactly
/// parameters 1 to `params.len()`, so a statement that changes its parameters fails here
/// instead of being measured wrong. Also refuses a statement in which pgbench would take
/// something for a variable (`:name` that is not part of a `::` cast).
fn substitute(sql: &str, params: &[String]) -> anyhow::Result<String> {
    let bytes = sql.as_bytes();
    for (i, window) in bytes.windows(2).enumerate() {
        let after_colon = i > 0 && bytes[i - 1] == b':';
        if window[0] == b':'
            && !after_colon
            && (window[1].is_ascii_alphabetic() || window[1] == b'_')
        {
            bail!("the statement has a `:name` that pgbench would read as a variable");
        }
    }
    let mut out = String::with_capacity(sql.len() * 2);
    let mut used = vec![false; params.len()];
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        ensure!(digits > 0, "a `$` that is not a parameter");
        let n: usize = rest[at + 1..at + 1 + digits].parse()?;
        let Some(param) = n.checked_sub(1).and_then(|i| params.get(i)) else {
            bail!(
                "the statement uses ${n}, but the script knows {} parameters",
                params.len()
            );
        };
        used[n - 1] = true;
        out.push('(');
        out.push_str(param);
        out.push(')');
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    if let Some(unused) = used.iter().position(|u| !u) {
        bail!(
            "the statement no longer uses ${}; the script is out of date",
            unused + 1
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_replaces_every_parameter_and_checks_the_count() {
        let params = ["'a'".to_owned(), "2".to_owned()];
        assert_eq!(
            substitute("SELECT $1::text, $2::int, $1::text", &params).unwrap(),
            "SELECT ('a')::text, (2)::int, ('a')::text"
        );
        assert!(substitute("SELECT $1::text", &params).is_err());
        assert!(substitute("SELECT $1, $2, $3", &params).is_err());
        assert!(substitute("SELECT $1, $2 FROM t WHERE x = :y", &params).is_err());
    }

    #[test]
    fn introspect_script_needs_evenly_spaced_ids_with_one_prefix() {
        let secret = |prefix: &str, n: u64| format!("tba_{prefix}{n:020x}_secret");
        let good = [1, 101, 201].map(|n| secret("0123456789ab", n)).join("\n");
        let script = introspect_script(&good).unwrap();
        assert!(script.starts_with("\\set k random(0, 2)\n"), "{script}");
        assert!(
            script.contains(
                "(ARRAY['tok_0123456789ab' || lpad(to_hex(1 + (:k)::bigint * 100), 20, '0')])"
            ),
            "{script}"
        );
        let uneven = [1, 101, 202].map(|n| secret("0123456789ab", n)).join("\n");
        assert!(introspect_script(&uneven).is_err());
        let mixed = [secret("0123456789ab", 1), secret("ba9876543210", 101)].join("\n");
        assert!(introspect_script(&mixed).is_err());
    }

    #[test]
    fn the_issue_script_covers_the_store_statement() {
        let script = issue_script().unwrap();
        assert!(!script.contains('$'), "{script}");
    }
}
