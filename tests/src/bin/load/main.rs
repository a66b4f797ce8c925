//! `tokenbroker-load`: the load tool behind `scripts/bench` and `scripts/soak`. It serves the
//! do-nothing echo broker (the ceiling), prefills an embedded store with many tokens, drives
//! Introspect or IssueTokens against a target, printing one JSON line of results, and runs the
//! soak ([`soak`]): mixed load while the broker's process is sampled.
//!
//! Why a tool of our own rather than k6, h2load or rlt: it uses the generated tonic client, so
//! every call goes through the same codec and HTTP/2 stack as real callers (k6 brings its own
//! gRPC client); it reads the `grpc-status` of every call (h2load counts any HTTP 200 as a
//! success, whatever the trailer says); and it needs no crate beyond the workspace's (rlt would
//! be one more, with its own command line). Latencies are kept as one `u32` of
//! microseconds per call and sorted at the end: at the few tens of thousands of calls per second
//! this machine manages, that is a few megabytes, and it avoids a histogram dependency.

mod pg_prefill;
mod pgbench;
mod sampler;
mod soak;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use secrecy::{ExposeSecret as _, SecretString};
use tokenbroker::{
    app::coalesce::CoalescedWrites,
    model::clock::SystemClock,
    model::{Email, Metadata, NewSession},
    store::{Durability, EmbeddedStore, EmbeddedStoreConfig, TokenStore as _},
};
use tokenbroker_proto::v1::{
    AssertedClaims, IntrospectRequest, IssueTokensRequest, TokenTypeHint,
    issue_tokens_request::Subject, token_broker_client::TokenBrokerClient,
};
use tokenbroker_tests::echo::serve_echo;
use tokio::{net::TcpListener, task::JoinSet};
use tonic::{
    Code, Request, Status,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint},
};

/// Deadline of every call: a hung server turns into DEADLINE_EXCEEDED errors instead of a run
/// that never ends.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of prefilled access tokens: long enough to stay active through a whole benchmark.
const PREFILL_ACCESS_TTL: Duration = Duration::from_secs(3600);
/// Lifetime of prefilled refresh tokens.
const PREFILL_REFRESH_TTL: Duration = Duration::from_secs(24 * 3600);
/// The app client id the load tool claims, like a real Cognito app client.
const CLIENT_ID: &str = "5g2lhd0cbench0load0client0";
/// The user pool id the load tool claims.
const USER_POOL_ID: &str = "us-east-1_BenchLoad1";

/// Load tool for tokenbroker: echo ceiling, store prefill, and RPC load runs.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker-load")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the do-nothing echo broker (same codec and HTTP/2 stack, no work) until killed.
    Echo {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50151")]
        listen: SocketAddr,
    },
    /// Fills an embedded store with tokens through the store API, as fast as it can; or, with
    /// --postgres, a PostgreSQL store in bulk.
    Prefill(PrefillArgs),
    /// Drives one RPC against a target and prints one JSON line of results.
    Run(RunArgs),
    /// Mixed load (legit sessions and garbage) against a broker while its process is sampled
    /// every second; prints a table and a JSON line, and exits non-zero if a call got an
    /// unexpected answer or RSS or open fds strayed after the warm-up.
    Soak(soak::SoakArgs),
    /// Prints a pgbench script that runs the PostgreSQL store's own IssueTokens or Introspect
    /// statement with fresh values per transaction (the database's ceiling).
    PgbenchScript(pgbench::ScriptArgs),
}

#[derive(Debug, clap::Args)]
struct PrefillArgs {
    /// Data directory of the embedded store (created if missing).
    #[arg(long, value_name = "DIR", required_unless_present = "postgres")]
    data_dir: Option<PathBuf>,
    /// Fill this PostgreSQL database instead, in bulk SQL (see `pg_prefill`): a libpq-style
    /// connection string without TLS, such as "host=127.0.0.1 port=5432 user=postgres
    /// dbname=tokenbroker".
    #[arg(long, value_name = "CONNINFO", conflicts_with = "data_dir")]
    postgres: Option<String>,
    /// How many tokens to create (half refresh, half access: N/2 sessions).
    #[arg(long, value_name = "N")]
    tokens: u64,
    /// How many distinct emails the sessions spread over; default N/20 (10 sessions each).
    #[arg(long, value_name = "N")]
    emails: Option<u64>,
    /// Most store operations in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Writes a uniform sample of the access secrets, one per line, to this file (for
    /// `run --tokens-file`).
    #[arg(long, value_name = "FILE")]
    secrets_out: Option<PathBuf>,
    /// How many access secrets the sample holds (at most).
    #[arg(long, default_value_t = 10_000)]
    sample: u64,
}

/// Which RPC a run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Rpc {
    /// Introspect an access secret (role service or admin).
    Introspect,
    /// IssueTokens with asserted claims (role trigger or admin).
    Issue,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The server to load, host:port (plaintext HTTP/2).
    #[arg(long, value_name = "ADDR")]
    target: SocketAddr,
    /// The RPC to drive.
    #[arg(long, value_enum)]
    rpc: Rpc,
    /// Calls in flight at once (one task each).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the tasks share (one tonic Channel each, round robin).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts (not counted).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// API key sent with every measured call (service for introspect, trigger for issue).
    #[arg(long, env = "TB_LOAD_KEY", hide_env_values = true, value_parser = secret)]
    key: SecretString,
    /// API key (role trigger) used once to issue the access token to introspect, when neither
    /// --token nor --tokens-file is given.
    #[arg(long, env = "TB_LOAD_ISSUE_KEY", hide_env_values = true, value_parser = secret)]
    issue_key: Option<SecretString>,
    /// The access secret to introspect on every call.
    #[arg(long, env = "TB_LOAD_TOKEN", hide_env_values = true, value_parser = secret)]
    token: Option<SecretString>,
    /// A file of access secrets, one per line (from `prefill --secrets-out`); each call
    /// introspects one picked at random, so lookups spread over the whole store.
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    tokens_file: Option<PathBuf>,
    /// Count an Introspect answer of `active = false` as an error (use against the broker, not
    /// the echo server, which always answers inactive).
    #[arg(long)]
    expect_active: bool,
    /// IssueTokens: percent of calls that sign in again with an email this run already used
    /// (a new session on an existing account); the others use a fresh random email (a first
    /// sign-in that creates the account). 0 means every call creates an account.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    returning: u8,
}

fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(value.to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tokenbroker-load: failed to start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tokenbroker-load: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Echo { listen } => echo(listen).await,
        Command::Prefill(args) => prefill(args).await,
        Command::Run(args) => load(args).await,
        Command::Soak(args) => return soak::soak(args).await,
        Command::PgbenchScript(args) => {
            print!("{}", pgbench::script(&args)?);
            Ok(())
        }
    }
    .map(|()| ExitCode::SUCCESS)
}

async fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    let address = listener.local_addr().context("listener has no address")?;
    eprintln!("echo broker listening on {address}");
    serve_echo(listener).await.context("echo server failed")
}

// ---------------------------------------------------------------------------------------------
// prefill

async fn prefill(args: PrefillArgs) -> anyhow::Result<()> {
    if args.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let data_dir = match (&args.data_dir, &args.postgres) {
        (_, Some(conninfo)) => return pg_prefill::prefill(&args, conninfo).await,
        (Some(dir), None) => dir.clone(),
        (None, None) => bail!("prefill needs --data-dir or --postgres"),
    };
    let pairs = args.tokens.div_ceil(2);
    let emails = args.emails.unwrap_or(args.tokens / 20).clamp(1, pairs);
    let stride = (pairs / args.sample.max(1)).max(1);
    let store = Arc::new(
        EmbeddedStore::open(
            &EmbeddedStoreConfig {
                dir: data_dir.clone(),
                durability: Durability::Normal,
                // Nothing expires during a prefill; keep the collector out of the way.
                cleanup_interval: Duration::from_secs(3600),
                max_queued_writes: 4096,
            },
            Arc::new(SystemClock),
        )
        .context("failed to open the embedded store")?,
    );
    eprintln!(
        "prefill: {pairs} sessions ({} tokens) over {emails} emails into {}",
        pairs * 2,
        data_dir.display()
    );

    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let sample = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let store = Arc::clone(&store);
        let next = Arc::clone(&next);
        let done = Arc::clone(&done);
        let sample = Arc::clone(&sample);
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= pairs {
                    return Ok::<_, anyhow::Error>(());
                }
                let n = i % emails;
                let session = NewSession {
                    email: Email::parse(&format!("user{n:08}@prefill.example"))
                        .map_err(|err| anyhow::anyhow!("bad generated email: {err}"))?,
                    known_account: None,
                    cognito_sub: Some(fake_uuid(n)),
                    client_id: Some(CLIENT_ID.to_owned()),
                    access_ttl: PREFILL_ACCESS_TTL,
                    refresh_ttl: PREFILL_REFRESH_TTL,
                    session_ttl: PREFILL_REFRESH_TTL,
                    metadata: Metadata::new(),
                };
                let pair = store.issue(session).await.context("store issue failed")?;
                if i.is_multiple_of(stride) {
                    sample
                        .lock()
                        .expect("the sample lock is never poisoned")
                        .push(pair.access.secret.expose_secret().to_owned());
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let progress = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let n = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprintln!(
                    "prefill: {n}/{pairs} sessions, {:.0} sessions/s",
                    n as f64 / secs
                );
            }
        })
    };
    let mut failure = None;
    while let Some(joined) = workers.join_next().await {
        if let Err(err) = joined.context("prefill worker panicked").and_then(|r| r) {
            failure.get_or_insert(err);
            next.store(pairs, Ordering::Relaxed);
        }
    }
    progress.abort();
    store.close().await.context("failed to close the store")?;
    if let Some(err) = failure {
        return Err(err);
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "prefill: done, {pairs} sessions ({} tokens) in {secs:.1} s, {:.0} sessions/s",
        pairs * 2,
        pairs as f64 / secs
    );
    if let Some(path) = args.secrets_out {
        let sample = sample.lock().expect("the sample lock is never poisoned");
        let mut text = sample.join("\n");
        text.push('\n');
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        eprintln!(
            "prefill: wrote {} access secrets to {}",
            sample.len(),
            path.display()
        );
    }
    Ok(())
}

/// Returns a UUID-shaped Cognito `sub` derived from `n`.
fn fake_uuid(n: u64) -> String {
    let h = format!("{:032x}", u128::from(n).wrapping_mul(MIX));
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// An odd 128-bit constant: multiplying by it spreads consecutive numbers over all digits.
const MIX: u128 = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835;

// ---------------------------------------------------------------------------------------------
// run

/// What each call of a run sends.
#[derive(Debug)]
enum Plan {
    /// Introspect one of these secrets (picked at random when there are several).
    Introspect {
        tokens: Arc<Vec<String>>,
        expect_active: bool,
    },
    /// IssueTokens, with this percent of returning users.
    Issue { returning: u8, run_id: String },
}

/// What one task saw during the measured window.
#[derive(Debug, Default)]
struct TaskStats {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

async fn load(args: RunArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.connections == 0 {
        bail!("--concurrency and --connections must be at least 1");
    }
    if !(args.duration > 0.0 && args.warmup >= 0.0) {
        bail!("--duration must be positive and --warmup not negative");
    }
    let endpoint = Endpoint::from_shared(format!("http://{}", args.target))
        .context("bad target")?
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // One connection per channel, its writes coalesced as the broker's are: calls that
        // finish together send their next requests in one write, so the load tool, which shares
        // the machine with the servers it measures, spends less of it per call.
        let target = args.target;
        let connect = tower::service_fn(move |_: tonic::codegen::http::Uri| async move {
            let tcp = tokio::net::TcpStream::connect(target).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(TokioIo::new(CoalescedWrites::new(tcp)))
        });
        channels.push(
            endpoint
                .connect_with_connector(connect)
                .await
                .with_context(|| format!("failed to connect to {}", args.target))?,
        );
    }
    let auth = bearer(&args.key)?;

    let plan = match args.rpc {
        Rpc::Introspect => {
            let tokens = introspect_tokens(&args, &channels[0]).await?;
            Plan::Introspect {
                tokens: Arc::new(tokens),
                expect_active: args.expect_active,
            }
        }
        Rpc::Issue => Plan::Issue {
            returning: args.returning,
            run_id: format!("{:08x}", rand::rng().random::<u32>()),
        },
    };
    let plan = Arc::new(plan);

    // One probe call before the clock starts: a wrong key or role fails the run at once with
    // the server's message, rather than after a full run of identical errors.
    let mut rng = StdRng::from_os_rng();
    let mut scratch = Vec::new();
    call(
        &plan,
        &channels[0],
        &auth,
        &mut rng,
        &mut scratch,
        usize::MAX,
    )
    .await
    .map_err(|status| anyhow::anyhow!("probe call failed: {status}"))?;

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let measure_to = measure_from + Duration::from_secs_f64(args.duration);
    let mut tasks = JoinSet::new();
    for task in 0..args.concurrency {
        let channel = channels[task % channels.len()].clone();
        let auth = auth.clone();
        let plan = Arc::clone(&plan);
        tasks.spawn(async move {
            let mut rng = StdRng::from_os_rng();
            let mut used_emails = Vec::new();
            let mut stats = TaskStats::default();
            loop {
                let sent = Instant::now();
                if sent >= measure_to {
                    break;
                }
                let outcome = call(&plan, &channel, &auth, &mut rng, &mut used_emails, task).await;
                let done = Instant::now();
                // A call counts when it completes inside the window, whenever it started.
                if done < measure_from || done > measure_to {
                    continue;
                }
                match outcome {
                    Ok(()) => stats
                        .latencies_us
                        .push(u32::try_from((done - sent).as_micros()).unwrap_or(u32::MAX)),
                    Err(status) => {
                        stats.errors += 1;
                        stats.first_error.get_or_insert_with(|| status.to_string());
                    }
                }
            }
            stats
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let stats = joined.context("load task panicked")?;
        latencies.extend(stats.latencies_us);
        errors += stats.errors;
        if first_error.is_none() {
            first_error = stats.first_error;
        }
    }
    if let Some(error) = first_error {
        eprintln!("tokenbroker-load: {errors} calls failed; first: {error}");
    }
    latencies.sort_unstable();
    let requests = latencies.len() as u64;
    let seconds = args.duration;
    let line = serde_json::json!({
        "rpc": match args.rpc { Rpc::Introspect => "introspect", Rpc::Issue => "issue" },
        "target": args.target.to_string(),
        "requests": requests,
        "errors": errors,
        "seconds": seconds,
        "rps": (requests as f64 / seconds * 10.0).round() / 10.0,
        "p50_us": percentile(&latencies, 0.50),
        "p99_us": percentile(&latencies, 0.99),
    });
    println!("{line}");
    Ok(())
}

/// Returns the nearest-rank `q` quantile of sorted `values`, or 0 when there are none.
fn percentile(values: &[u32], q: f64) -> u32 {
    if values.is_empty() {
        return 0;
    }
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn bearer(key: &SecretString) -> anyhow::Result<AsciiMetadataValue> {
    AsciiMetadataValue::try_from(format!("Bearer {}", key.expose_secret()))
        .context("the API key is not valid in a header")
}

/// Returns the secrets a run introspects: --token, the lines of --tokens-file, or one access
/// token freshly issued with --issue-key.
async fn introspect_tokens(args: &RunArgs, channel: &Channel) -> anyhow::Result<Vec<String>> {
    if let Some(token) = &args.token {
        return Ok(vec![token.expose_secret().to_owned()]);
    }
    if let Some(path) = &args.tokens_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if tokens.is_empty() {
            bail!("{} holds no secrets", path.display());
        }
        return Ok(tokens);
    }
    let Some(issue_key) = &args.issue_key else {
        bail!(
            "introspect needs --token, --tokens-file or --issue-key (a trigger key to issue one)"
        );
    };
    let mut request = Request::new(issue_request(
        "load-introspect@load.example".to_owned(),
        fake_uuid(0),
    ));
    request
        .metadata_mut()
        .insert("authorization", bearer(issue_key)?);
    let response = TokenBrokerClient::new(channel.clone())
        .issue_tokens(request)
        .await
        .context("failed to issue the access token to introspect")?
        .into_inner();
    let access = response
        .access
        .context("IssueTokens answered without an access token")?;
    Ok(vec![access.secret])
}

fn issue_request(email: String, cognito_sub: String) -> IssueTokensRequest {
    IssueTokensRequest {
        subject: Some(Subject::Claims(AssertedClaims {
            email,
            cognito_sub,
            user_pool_id: USER_POOL_ID.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            groups: Vec::new(),
        })),
        ..IssueTokensRequest::default()
    }
}

/// Makes one call of `plan`. `used` holds the (email, sub) pairs this task has signed in, for
/// returning users; `task` makes fresh emails unique across tasks.
async fn call(
    plan: &Plan,
    channel: &Channel,
    auth: &AsciiMetadataValue,
    rng: &mut StdRng,
    used: &mut Vec<(String, String)>,
    task: usize,
) -> Result<(), Status> {
    let mut client = TokenBrokerClient::new(channel.clone());
    match plan {
        Plan::Introspect {
            tokens,
            expect_active,
        } => {
            let token = if tokens.len() == 1 {
                tokens[0].clone()
            } else {
                tokens[rng.random_range(0..tokens.len())].clone()
            };
            let request = with_auth(
                IntrospectRequest {
                    token,
                    token_type_hint: TokenTypeHint::AccessToken as i32,
                    client_id: String::new(),
                    access_only: false,
                },
                auth,
            );
            let response = client.introspect(request).await?.into_inner();
            if *expect_active && !response.active {
                return Err(Status::new(Code::Unknown, "token reported inactive"));
            }
            Ok(())
        }
        Plan::Issue { returning, run_id } => {
            let returning_user = !used.is_empty() && rng.random_range(0..100u8) < *returning;
            let (email, sub) = if returning_user {
                used[rng.random_range(0..used.len())].clone()
            } else {
                let n: u64 = rng.random();
                let pair = (
                    format!("u{task}-{n:016x}@{run_id}.load.example"),
                    fake_uuid(n),
                );
                if *returning > 0 {
                    used.push(pair.clone());
                }
                pair
            };
            client
                .issue_tokens(with_auth(issue_request(email, sub), auth))
                .await?;
            Ok(())
        }
    }
}

fn with_auth<T>(message: T, auth: &AsciiMetadataValue) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request.set_timeout(CALL_TIMEOUT);
    request
}
