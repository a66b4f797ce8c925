//! `tokenbroker-load prefill --postgres`: fills a PostgreSQL store with tokens in bulk.
//!
//! Going through the store API (one IssueTokens statement per session, as the embedded prefill
//! does) would take minutes for a million tokens; instead the schema is created by the store
//! itself (`PostgresStore::connect` runs the migrations), and then a few `INSERT … SELECT` over
//! `generate_series` write the rows, a chunk of sessions per statement. The rows are what the
//! store writes for a sign-in: an account per email, and per session a refresh token and its
//! access token in one family, with SHA-256 digests of secrets in the broker's format
//! (`tba_<32 hex>_<43 base64url>`, see `model::secret`). Where this differs from the broker:
//! the 20 digits after an id's 12-digit millisecond prefix count up instead of being random
//! (so that `pgbench-script` can compute the sampled ids), and the 43 secret characters are
//! derived from a random per-prefill seed and the id instead of drawn for each token (so that
//! the sample can be read back in SQL). Both are still unique and unguessable per prefill.

use std::{sync::Arc, time::Instant};

use anyhow::{Context as _, bail};
use tokenbroker::{
    model::{clock::SystemClock, random_hex},
    store::{PostgresSettings, PostgresStore, SslMode, TokenStore as _},
};
use tokio_postgres::{NoTls, config::Host};

use crate::{CLIENT_ID, PREFILL_ACCESS_TTL, PREFILL_REFRESH_TTL, PrefillArgs};

/// Sessions written per statement.
const CHUNK: i64 = 50_000;

/// `id_hex` of token `n` (`2i` the refresh token of session `i`, `2i + 1` its access token):
/// `$1` the 12-digit prefix.
const ID_HEX: &str = "$1::text || lpad(to_hex(n), 20, '0')";

/// The secret of token `n` (`prefix` its kind's): `$2` the seed.
const SECRET: &str = "prefix || id_hex || '_' || rtrim(translate(encode(sha256(convert_to(\
    $2::text || id_hex, 'UTF8')), 'base64'), '+/', '-_'), '=')";

pub(crate) async fn prefill(args: &PrefillArgs, conninfo: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = conninfo.parse().context("bad --postgres")?;
    let settings = settings(&config)?;
    // Creates (or checks) the schema, as a broker does at start.
    PostgresStore::connect(&settings, Arc::new(SystemClock))
        .await
        .context("failed to open the postgres store")?
        .close()
        .await?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("failed to connect to postgres")?;
    tokio::spawn(connection);

    let pairs = i64::try_from(args.tokens.div_ceil(2))?;
    let emails = i64::try_from(args.emails.unwrap_or(args.tokens / 20))?.clamp(1, pairs);
    let stride = (pairs / i64::try_from(args.sample)?.max(1)).max(1);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let prefix = format!("{:012x}", millis & 0xffff_ffff_ffff);
    let seed = random_hex();
    let now = i64::try_from(millis)? * 1000;
    eprintln!(
        "prefill: {pairs} sessions ({} tokens) over {emails} emails into postgres {}",
        pairs * 2,
        settings.dbname
    );
    let started = Instant::now();
    client
        .execute(
            "INSERT INTO accounts (id, email, cognito_sub, created_at)
             SELECT 'acc_' || $1::text || lpad(to_hex(e), 20, '0'),
                    'user' || lpad(e::text, 8, '0') || '@prefill.example',
                    md5(e::text)::uuid::text, $2::bigint
             FROM generate_series(0::bigint, $3::bigint - 1) AS e",
            &[&prefix, &now, &emails],
        )
        .await
        .context("failed to insert the accounts")?;
    let insert = format!(
        "INSERT INTO tokens (id, kind, account_id, family_id, parent_id, client_id, secret_sha256,
                             issued_at, expires_at, session_ends_at)
         SELECT 'tok_' || id_hex, kind,
                'acc_' || $1::text || lpad(to_hex(i % $3::bigint), 20, '0'),
                'fam_' || $1::text || lpad(to_hex(i), 20, '0'),
                CASE kind WHEN 'access' THEN 'tok_' || $1::text || lpad(to_hex(2 * i), 20, '0') END,
                $4::text, sha256(convert_to({SECRET}, 'UTF8')), $5::bigint,
                $5::bigint + CASE kind WHEN 'access' THEN $6::bigint ELSE $7::bigint END,
                $5::bigint + $7::bigint
         FROM generate_series($8::bigint, $9::bigint) AS i,
              (VALUES (0, 'refresh', 'tbr_'), (1, 'access', 'tba_')) AS k (k, kind, prefix),
              LATERAL (SELECT 2 * i + k AS n) AS number,
              LATERAL (SELECT {ID_HEX} AS id_hex) AS id"
    );
    let access_ttl = i64::try_from(PREFILL_ACCESS_TTL.as_micros())?;
    let refresh_ttl = i64::try_from(PREFILL_REFRESH_TTL.as_micros())?;
    let mut first = 0;
    while first < pairs {
        let last = (first + CHUNK).min(pairs) - 1;
        client
            .execute(
                &insert,
                &[
                    &prefix,
                    &seed,
                    &emails,
                    &CLIENT_ID,
                    &now,
                    &access_ttl,
                    &refresh_ttl,
                    &first,
                    &last,
                ],
            )
            .await
            .context("failed to insert tokens")?;
        first = last + 1;
        eprintln!(
            "prefill: {first}/{pairs} sessions, {:.0} sessions/s",
            first as f64 / started.elapsed().as_secs_f64()
        );
    }
    // Hint bits, the visibility map and statistics, so that the first measured calls do not
    // pay for them.
    client
        .batch_execute("VACUUM (ANALYZE) accounts, tokens")
        .await
        .context("VACUUM failed")?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "prefill: done, {pairs} sessions ({} tokens) in {secs:.1} s, {:.0} sessions/s",
        pairs * 2,
        pairs as f64 / secs
    );
    if let Some(path) = &args.secrets_out {
        let rows = client
            .query(
                &format!(
                    "SELECT {SECRET} FROM generate_series(0::bigint, $3::bigint - 1, $4::bigint)
                         AS i,
                     LATERAL (SELECT 'tba_'::text AS prefix, 2 * i + 1 AS n) AS number,
                     LATERAL (SELECT {ID_HEX} AS id_hex) AS id
                     ORDER BY i"
                ),
                &[&prefix, &seed, &pairs, &stride],
            )
            .await
            .context("failed to read the sample back")?;
        let mut text = String::new();
        for row in &rows {
            text.push_str(row.try_get::<_, &str>(0)?);
            text.push('\n');
        }
        std::fs::write(path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        eprintln!(
            "prefill: wrote {} access secrets to {}",
            rows.len(),
            path.display()
        );
    }
    Ok(())
}

/// Store settings for the server `config` names, without TLS (a benchmark on loopback).
fn settings(config: &tokio_postgres::Config) -> anyhow::Result<PostgresSettings> {
    let host = match config.get_hosts() {
        [Host::Tcp(host)] => host.clone(),
        [Host::Unix(dir)] => dir.display().to_string(),
        _ => bail!("--postgres must name exactly one host"),
    };
    Ok(PostgresSettings {
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        dbname: config
            .get_dbname()
            .context("--postgres needs dbname=")?
            .to_owned(),
        user: config
            .get_user()
            .context("--postgres needs user=")?
            .to_owned(),
        sslmode: SslMode::Disable,
        pool_size: 1,
        ..PostgresSettings::default()
    })
}
