//! `tokenbroker-load soak`: a long run of mixed load against one broker while its process is
//! sampled once a second, ending in a verdict.
//!
//! The load, all at once and each part paced at a steady rate:
//! - **legit flows** from the default loopback address, each what one user's session does: the
//!   trigger's IssueTokens with an idempotency key (sometimes sent twice, as Cognito's retries
//!   do), Introspect of the access token with the service key, RefreshTokens with the refresh
//!   secret and its app client id, Introspect of the new access token, Revoke of the new
//!   refresh secret, and Introspect of that secret, which must now be inactive;
//! - **garbage** from several other loopback addresses (all of 127.0.0.0/8 is this host):
//!   well-formed forged refresh and revoke secrets, malformed requests and calls without a
//!   credential, each address a little over the broker's default anonymous limit so admission
//!   control refuses some;
//! - **wrong API keys** from one more address, which empty that address's failed-authentication
//!   bucket.
//!
//! Every answer is judged by what its kind must get (see [`classify`]): a legit call must
//! succeed, so a legit caller is paced to stay under every limit it is subject to; a garbage
//! call must get its own error code, or `RESOURCE_EXHAUSTED`.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use rand::Rng as _;
use secrecy::SecretString;
use tokenbroker_proto::v1::{
    IntrospectRequest, RefreshTokensRequest, RevokeRequest, TokenTypeHint, revoke_request::Target,
    token_broker_client::TokenBrokerClient,
};
use tokio::{task::JoinSet, time::MissedTickBehavior};
use tonic::{
    Code, Request,
    metadata::AsciiMetadataValue,
    transport::{Channel, Endpoint},
};

use crate::{
    CALL_TIMEOUT, CLIENT_ID, bearer, fake_uuid, issue_request,
    sampler::{self, ProcSource, Sample, Steady},
    secret, with_auth,
};

#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// The broker to load, host:port (plaintext HTTP/2).
    #[arg(long, value_name = "ADDR")]
    target: SocketAddr,
    /// The broker's process id, sampled from /proc.
    #[arg(long)]
    pid: u32,
    /// The broker's metrics listener, host:port, scraped for the writer queue length.
    #[arg(long, value_name = "ADDR")]
    metrics: SocketAddr,
    /// Seconds of load, the warm-up included.
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Seconds at the start that the flatness verdict ignores; default min(120, 20 % of
    /// --duration).
    #[arg(long)]
    warmup: Option<f64>,
    /// How far RSS and open fds may stray from their post-warm-up median (0.10 is ±10 %).
    #[arg(long, default_value_t = 0.10)]
    tolerance: f64,
    /// Writes one line per second here: time, RSS, fds, CPU, writer queue, calls, unexpected.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Legit flows (sessions) started per second, in all; each makes six or seven calls, two
    /// of them without a credential (RefreshTokens, Revoke), which must stay under the
    /// broker's per-address anonymous limit (100/s by default).
    #[arg(long, default_value_t = 25.0)]
    flows_per_second: f64,
    /// Tasks running legit flows, each at its share of --flows-per-second.
    #[arg(long, default_value_t = 16)]
    flow_workers: usize,
    /// Distinct users the flows sign in (each flow picks one at random), so the account cache
    /// reaches a steady size instead of growing all run long.
    #[arg(long, default_value_t = 2000)]
    users: u64,
    /// Loopback addresses sending garbage: 127.0.2.1, 127.0.2.2, ...
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=250))]
    flood_addresses: u8,
    /// Garbage calls per second from each flood address; four in five go without a
    /// credential, so the default of 150 is a little over the default anonymous limit.
    #[arg(long, default_value_t = 150.0)]
    flood_rate: f64,
    /// Calls per second with a wrong API key, from 127.0.3.1.
    #[arg(long, default_value_t = 20.0)]
    wrong_key_rate: f64,
    /// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clock_ticks: u64,
    /// API key with role trigger, for the flows' IssueTokens.
    #[arg(long, env = "TB_SOAK_TRIGGER_KEY", hide_env_values = true, value_parser = secret)]
    trigger_key: SecretString,
    /// API key with role service, for the flows' Introspect.
    #[arg(long, env = "TB_SOAK_SERVICE_KEY", hide_env_values = true, value_parser = secret)]
    service_key: SecretString,
}

/// What a call is for. Each kind has one right answer ([`Kind::expected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// A flow's IssueTokens (trigger key, idempotency key).
    Issue,
    /// The same IssueTokens again: must return the same pair, marked replayed.
    IssueReplay,
    /// Introspect of a live access token: must be active.
    Introspect,
    /// A flow's RefreshTokens with its refresh secret and app client id.
    Refresh,
    /// Revoke of a flow's refresh secret, with its app client id.
    Revoke,
    /// Introspect of the revoked refresh secret: must be inactive.
    IntrospectRevoked,
    /// RefreshTokens with a well-formed secret that names no token: UNAUTHENTICATED.
    ForgedRefresh,
    /// Revoke of a well-formed secret that names no token: OK, without effect (RFC 7009).
    ForgedRevoke,
    /// A malformed request (an IssueTokens email without `@`, a Revoke without a target):
    /// INVALID_ARGUMENT.
    Malformed,
    /// Introspect without a credential: UNAUTHENTICATED.
    NoCredential,
    /// Introspect with an API key the broker does not know: UNAUTHENTICATED.
    WrongKey,
}

impl Kind {
    pub(crate) const ALL: [Kind; 11] = [
        Kind::Issue,
        Kind::IssueReplay,
        Kind::Introspect,
        Kind::Refresh,
        Kind::Revoke,
        Kind::IntrospectRevoked,
        Kind::ForgedRefresh,
        Kind::ForgedRevoke,
        Kind::Malformed,
        Kind::NoCredential,
        Kind::WrongKey,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Issue => "issue",
            Kind::IssueReplay => "issue_replay",
            Kind::Introspect => "introspect",
            Kind::Refresh => "refresh",
            Kind::Revoke => "revoke",
            Kind::IntrospectRevoked => "introspect_revoked",
            Kind::ForgedRefresh => "forged_refresh",
            Kind::ForgedRevoke => "forged_revoke",
            Kind::Malformed => "malformed",
            Kind::NoCredential => "no_credential",
            Kind::WrongKey => "wrong_key",
        }
    }

    /// Whether a real caller would make this call and need it to succeed.
    pub(crate) fn is_legit(self) -> bool {
        matches!(
            self,
            Kind::Issue
                | Kind::IssueReplay
                | Kind::Introspect
                | Kind::Refresh
                | Kind::Revoke
                | Kind::IntrospectRevoked
        )
    }

    /// The status this kind of call must get.
    pub(crate) fn expected(self) -> Code {
        match self {
            Kind::ForgedRefresh | Kind::NoCredential | Kind::WrongKey => Code::Unauthenticated,
            Kind::Malformed => Code::InvalidArgument,
            _ => Code::Ok,
        }
    }
}

/// What a call got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// OK, and the response says what it must.
    Ok,
    /// OK, but the response is wrong (the reason says how).
    Wrong(&'static str),
    /// An error status.
    Failed(Code, String),
}

impl Answer {
    fn of<T>(result: Result<T, tonic::Status>) -> Self {
        match result {
            Ok(_) => Answer::Ok,
            Err(status) => Answer::failed(&status),
        }
    }

    fn failed(status: &tonic::Status) -> Self {
        Answer::Failed(status.code(), status.message().to_owned())
    }
}

/// How an answer is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The answer the kind must get.
    Expected,
    /// `RESOURCE_EXHAUSTED` for a garbage call: admission control at work.
    Throttled,
    /// Anything else: a legit call that failed, or garbage that got the wrong code.
    Unexpected,
}

/// Judges one answer. A legit call must succeed; `RESOURCE_EXHAUSTED` is unexpected for it,
/// since the soak paces legit callers under their limits. A garbage call must get its own code,
/// or `RESOURCE_EXHAUSTED` (its address is over a limit); a garbage call that succeeds where it
/// must fail is unexpected.
pub(crate) fn classify(kind: Kind, answer: &Answer) -> Outcome {
    match answer {
        Answer::Ok if kind.expected() == Code::Ok => Outcome::Expected,
        Answer::Failed(code, _) if *code == kind.expected() && *code != Code::Ok => {
            Outcome::Expected
        }
        Answer::Failed(Code::ResourceExhausted, _) if !kind.is_legit() => Outcome::Throttled,
        _ => Outcome::Unexpected,
    }
}

/// Counts of one kind.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counts {
    pub(crate) calls: u64,
    pub(crate) throttled: u64,
    pub(crate) unexpected: u64,
    /// The first unexpected answer, for the report (status messages carry no secret).
    pub(crate) first_unexpected: Option<String>,
}

/// Every answer of the run, by kind.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    kinds: Mutex<BTreeMap<Kind, Counts>>,
}

impl Tally {
    pub(crate) fn record(&self, kind: Kind, answer: &Answer) {
        let outcome = classify(kind, answer);
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let counts = kinds.entry(kind).or_default();
        counts.calls += 1;
        match outcome {
            Outcome::Expected => {}
            Outcome::Throttled => counts.throttled += 1,
            Outcome::Unexpected => {
                counts.unexpected += 1;
                counts.first_unexpected.get_or_insert_with(|| match answer {
                    Answer::Ok => "OK where an error was due".to_owned(),
                    Answer::Wrong(why) => (*why).to_owned(),
                    Answer::Failed(code, message) => format!("{code:?}: {message}"),
                });
            }
        }
    }

    /// (calls, unexpected) over every kind.
    pub(crate) fn totals(&self) -> (u64, u64) {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds
            .values()
            .fold((0, 0), |(c, u), k| (c + k.calls, u + k.unexpected))
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<Kind, Counts> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The warm-up the verdict ignores unless told: min(120 s, 20 % of the run).
pub(crate) fn default_warmup(duration: f64) -> f64 {
    (duration * 0.2).min(120.0)
}

/// Runs the soak; the exit code is the verdict.
pub(crate) async fn soak(args: SoakArgs) -> anyhow::Result<ExitCode> {
    if !args.duration.is_finite() || args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    if args.flow_workers == 0 || args.users == 0 {
        bail!("--flow-workers and --users must be at least 1");
    }
    for (name, rate) in [
        ("--flows-per-second", args.flows_per_second),
        ("--flood-rate", args.flood_rate),
        ("--wrong-key-rate", args.wrong_key_rate),
    ] {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("{name} must be positive");
        }
    }
    let warmup = args.warmup.unwrap_or_else(|| default_warmup(args.duration));
    let proc = ProcSource::pid(args.pid);
    proc.read()
        .with_context(|| format!("cannot sample process {}", args.pid))?;
    let metrics_url = format!("http://{}/metrics", args.metrics);
    let http = reqwest::Client::new();
    sampler::queue_length(&http, &metrics_url).await?;

    let legit = connect(args.target, None).await?;
    let trigger = bearer(&args.trigger_key)?;
    let service = bearer(&args.service_key)?;
    // A key of the right shape that the broker was never configured with.
    let wrong = bearer(&tokenbroker::app::dev::generate_api_key())?;
    let mut flood = Vec::new();
    for a in 1..=args.flood_addresses {
        flood.push(connect(args.target, Some(Ipv4Addr::new(127, 0, 2, a).into())).await?);
    }
    let wrong_key_channel = connect(args.target, Some(Ipv4Addr::new(127, 0, 3, 1).into())).await?;

    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let mut load = JoinSet::new();

    let flow_period = Duration::from_secs_f64(args.flow_workers as f64 / args.flows_per_second);
    let started = Arc::new(AtomicU64::new(0));
    for worker in 0..args.flow_workers {
        let flows = Flows {
            client: TokenBrokerClient::new(legit.clone()),
            trigger: trigger.clone(),
            service: service.clone(),
            users: args.users,
            run_id: run_id.clone(),
            tally: Arc::clone(&tally),
            started: Arc::clone(&started),
        };
        // Spread the workers' first ticks over one period, so flows do not start in bursts.
        let offset = flow_period.mul_f64(worker as f64 / args.flow_workers as f64);
        load.spawn(paced(start + offset, end, flow_period, move || {
            flows.clone().flow()
        }));
    }
    // Each flood address: four tasks, each a quarter of its rate.
    let flood_period = Duration::from_secs_f64(4.0 / args.flood_rate);
    for channel in &flood {
        for task in 0..4u32 {
            let garbage = Garbage {
                client: TokenBrokerClient::new(channel.clone()),
                trigger: trigger.clone(),
                tally: Arc::clone(&tally),
            };
            let offset = flood_period.mul_f64(f64::from(task) / 4.0);
            let mut turn = task as usize;
            load.spawn(paced(start + offset, end, flood_period, move || {
                turn += 1;
                garbage.clone().call(turn)
            }));
        }
    }
    {
        let client = TokenBrokerClient::new(wrong_key_channel.clone());
        let tally = Arc::clone(&tally);
        let period = Duration::from_secs_f64(1.0 / args.wrong_key_rate);
        load.spawn(paced(start, end, period, move || {
            let mut client = client.clone();
            let wrong = wrong.clone();
            let tally = Arc::clone(&tally);
            async move {
                let request = with_auth(introspect_request(forged("tba_")), &wrong);
                tally.record(
                    Kind::WrongKey,
                    &Answer::of(client.introspect(request).await),
                );
            }
        }));
    }

    let samples = sample(
        &proc,
        &http,
        &metrics_url,
        args.clock_ticks,
        &tally,
        start,
        end,
        args.csv.as_ref(),
    )
    .await;
    while let Some(joined) = load.join_next().await {
        joined.context("a load task panicked")?;
    }
    let (samples, scrape_failures) = samples?;
    // Rates are per second of load; the flows under way at its end finish after it.
    let seconds = args.duration;
    let report = Report {
        seconds,
        warmup,
        tolerance: args.tolerance,
        kinds: tally.snapshot(),
        steady: sampler::steady(&samples, warmup, args.tolerance),
        scrape_failures,
    };
    report.print();
    Ok(if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Opens one HTTP/2 connection to `target`, from `local` if given.
async fn connect(target: SocketAddr, local: Option<IpAddr>) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{target}"))
        .context("bad target")?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .local_address(local)
        .connect()
        .await
        .with_context(|| match local {
            Some(local) => format!("failed to connect to {target} from {local}"),
            None => format!("failed to connect to {target}"),
        })
}

/// Runs `step` once per `period` from `first` until `end`. A step that overruns its period
/// delays the next one instead of being followed by a burst of catch-up steps.
async fn paced<F, Fut>(first: Instant, end: Instant, period: Duration, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval_at(first.into(), period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            return;
        }
        step().await;
    }
}

/// A well-formed secret of the broker's shape (`<prefix><32 hex id>_<43 base64url>`) that names
/// no token.
fn forged(prefix: &str) -> String {
    use base64::Engine as _;
    let mut rng = rand::rng();
    format!(
        "{prefix}{:032x}_{}",
        rng.random::<u128>(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rng.random::<[u8; 32]>())
    )
}

/// A random number, from a generator that is not held across an await (it is not `Send`).
fn random_u64() -> u64 {
    rand::rng().random()
}

fn introspect_request(token: String) -> IntrospectRequest {
    IntrospectRequest {
        token,
        token_type_hint: TokenTypeHint::AccessToken as i32,
        client_id: String::new(),
        access_only: false,
    }
}

/// A request with the call deadline and no credential.
fn anonymous<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// What legit flows share.
#[derive(Debug, Clone)]
struct Flows {
    client: TokenBrokerClient<Channel>,
    trigger: AsciiMetadataValue,
    service: AsciiMetadataValue,
    users: u64,
    run_id: String,
    tally: Arc<Tally>,
    /// Flows started so far, over every worker.
    started: Arc<AtomicU64>,
}

/// One flow in eight (the first, the ninth, ...) sends its IssueTokens twice.
const REPLAY_EVERY: u64 = 8;

impl Flows {
    /// One user's session, start to end; it stops at the first call that fails, since the next
    /// ones need its tokens.
    async fn flow(mut self) {
        let (n, key) = {
            let mut rng = rand::rng();
            (rng.random_range(0..self.users), rng.random::<u128>())
        };
        let mut request = issue_request(
            format!("soak{n:06}@{}.soak.example", self.run_id),
            fake_uuid(n),
        );
        request.idempotency_key = format!("soak-{key:032x}");
        let issued = match self
            .client
            .issue_tokens(with_auth(request.clone(), &self.trigger))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return self.tally.record(Kind::Issue, &Answer::failed(&status)),
        };
        let (Some(access), Some(refresh)) = (issued.access, issued.refresh) else {
            return self.tally.record(
                Kind::Issue,
                &Answer::Wrong("IssueTokens answered without a pair"),
            );
        };
        self.tally.record(Kind::Issue, &Answer::Ok);

        if self
            .started
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(REPLAY_EVERY)
        {
            let answer = match self
                .client
                .issue_tokens(with_auth(request, &self.trigger))
                .await
            {
                Ok(again) => {
                    let again = again.into_inner();
                    let same =
                        again.refresh.as_ref().map(|t| &t.token_id) == Some(&refresh.token_id);
                    if again.replayed && same {
                        Answer::Ok
                    } else {
                        Answer::Wrong("a repeated idempotency key minted a new pair")
                    }
                }
                Err(status) => Answer::failed(&status),
            };
            self.tally.record(Kind::IssueReplay, &answer);
        }

        if !self.introspect(Kind::Introspect, access.secret, true).await {
            return;
        }
        let refreshed = match self
            .client
            .refresh_tokens(anonymous(RefreshTokensRequest {
                refresh_token: refresh.secret,
                access_ttl_seconds: 0,
                refresh_ttl_seconds: 0,
                client_id: CLIENT_ID.to_owned(),
            }))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return self.tally.record(Kind::Refresh, &Answer::failed(&status)),
        };
        let (Some(access), Some(refresh)) = (refreshed.access, refreshed.refresh) else {
            return self.tally.record(
                Kind::Refresh,
                &Answer::Wrong("RefreshTokens answered without a pair"),
            );
        };
        self.tally.record(Kind::Refresh, &Answer::Ok);
        if !self.introspect(Kind::Introspect, access.secret, true).await {
            return;
        }
        let revoked = self
            .client
            .revoke(anonymous(RevokeRequest {
                target: Some(Target::Token(refresh.secret.clone())),
                token_type_hint: TokenTypeHint::RefreshToken as i32,
                client_id: CLIENT_ID.to_owned(),
            }))
            .await;
        let answer = Answer::of(revoked);
        self.tally.record(Kind::Revoke, &answer);
        if answer == Answer::Ok {
            self.introspect(Kind::IntrospectRevoked, refresh.secret, false)
                .await;
        }
    }

    /// Introspects `secret` with the service key and records whether it was answered with
    /// `active`; returns whether the answer was the expected one.
    async fn introspect(&mut self, kind: Kind, secret: String, active: bool) -> bool {
        let mut request = introspect_request(secret);
        if !active {
            request.token_type_hint = TokenTypeHint::RefreshToken as i32;
        }
        let answer = match self
            .client
            .introspect(with_auth(request, &self.service))
            .await
        {
            Ok(response) if response.get_ref().active == active => Answer::Ok,
            Ok(_) if active => Answer::Wrong("a live token was reported inactive"),
            Ok(_) => Answer::Wrong("a revoked token was reported active"),
            Err(status) => Answer::failed(&status),
        };
        self.tally.record(kind, &answer);
        answer == Answer::Ok
    }
}

/// A flood address's tasks.
#[derive(Debug, Clone)]
struct Garbage {
    client: TokenBrokerClient<Channel>,
    trigger: AsciiMetadataValue,
    tally: Arc<Tally>,
}

impl Garbage {
    /// Garbage call number `turn`: the kinds take turns, so each address sends all of them.
    async fn call(mut self, turn: usize) {
        let (kind, answer) = match turn % 5 {
            0 => (
                Kind::ForgedRefresh,
                Answer::of(
                    self.client
                        .refresh_tokens(anonymous(RefreshTokensRequest {
                            refresh_token: forged("tbr_"),
                            client_id: CLIENT_ID.to_owned(),
                            ..Default::default()
                        }))
                        .await,
                ),
            ),
            1 => (
                Kind::ForgedRevoke,
                Answer::of(
                    self.client
                        .revoke(anonymous(RevokeRequest {
                            target: Some(Target::Token(forged(if turn.is_multiple_of(2) {
                                "tbr_"
                            } else {
                                "tba_"
                            }))),
                            ..Default::default()
                        }))
                        .await,
                ),
            ),
            2 => (
                Kind::Malformed,
                Answer::of(
                    self.client
                        .revoke(anonymous(RevokeRequest::default()))
                        .await,
                ),
            ),
            3 => {
                let n = random_u64();
                let request = issue_request(format!("no-at-sign-{n:x}.soak.example"), fake_uuid(n));
                (
                    Kind::Malformed,
                    Answer::of(
                        self.client
                            .issue_tokens(with_auth(request, &self.trigger))
                            .await,
                    ),
                )
            }
            _ => (
                Kind::NoCredential,
                Answer::of(
                    self.client
                        .introspect(anonymous(introspect_request(forged("tba_"))))
                        .await,
                ),
            ),
        };
        self.tally.record(kind, &answer);
    }
}

/// Samples the broker once a second from `start` until `end`, writing each sample to `csv` as
/// it is taken (so a run cut short keeps its data). Returns the samples and how many metrics
/// scrapes failed (such a sample repeats the last queue length seen).
#[allow(clippy::too_many_arguments)]
async fn sample(
    proc: &ProcSource,
    http: &reqwest::Client,
    metrics_url: &str,
    clock_ticks: u64,
    tally: &Tally,
    start: Instant,
    end: Instant,
    csv: Option<&PathBuf>,
) -> anyhow::Result<(Vec<Sample>, u64)> {
    let mut out = match csv {
        Some(path) => {
            let mut file = std::fs::File::create(path)
                .with_context(|| format!("failed to create {}", path.display()))?;
            writeln!(file, "{}", Sample::CSV_HEADER)?;
            Some(file)
        }
        None => None,
    };
    let mut samples = Vec::new();
    let mut failures = 0;
    let mut queue = 0.0;
    let mut before = (Instant::now(), proc.read()?.cpu_ticks);
    let mut tick = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let reading = proc
            .read()
            .context("the broker's process is gone or unreadable")?;
        match sampler::queue_length(http, metrics_url).await {
            Ok(length) => queue = length,
            Err(_) => failures += 1,
        }
        let (calls, unexpected) = tally.totals();
        let sample = Sample {
            t: (now - start).as_secs_f64(),
            rss_kib: reading.rss_kib,
            fds: reading.fds,
            cpu_percent: sampler::cpu_percent(
                reading.cpu_ticks.saturating_sub(before.1),
                clock_ticks,
                now - before.0,
            ),
            queue,
            calls,
            unexpected,
        };
        before = (now, reading.cpu_ticks);
        if let Some(file) = out.as_mut() {
            writeln!(file, "{}", sample.csv_row())?;
            file.flush()?;
        }
        samples.push(sample);
        // The last sample is the one at (or just before) the end of the load.
        if now + Duration::from_millis(500) >= end {
            break;
        }
    }
    Ok((samples, failures))
}

/// What the soak found.
#[derive(Debug)]
struct Report {
    seconds: f64,
    warmup: f64,
    tolerance: f64,
    kinds: BTreeMap<Kind, Counts>,
    steady: Option<Steady>,
    scrape_failures: u64,
}

impl Report {
    /// Why the soak failed; empty when it passed.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let unexpected: u64 = self.kinds.values().map(|k| k.unexpected).sum();
        if unexpected > 0 {
            failures.push(format!("{unexpected} unexpected answers"));
        }
        match &self.steady {
            None => failures.push("no sample after the warm-up".to_owned()),
            Some(steady) => {
                let pct = self.tolerance * 100.0;
                if !steady.rss_kib.flat {
                    failures.push(format!("RSS left ±{pct:.0} % of its median"));
                }
                if !steady.fds.flat {
                    failures.push(format!("open fds left ±{pct:.0} % of their median"));
                }
            }
        }
        failures
    }

    /// The table on stderr, one JSON line on stdout.
    fn print(&self) {
        let rate = |n: u64| n as f64 / self.seconds;
        eprintln!(
            "soak: {:.0} s of load, verdict after {:.0} s of warm-up",
            self.seconds, self.warmup
        );
        eprintln!();
        eprintln!("| kind | calls | per second | throttled | unexpected |");
        eprintln!("| --- | ---: | ---: | ---: | ---: |");
        let mut kinds = serde_json::Map::new();
        for kind in Kind::ALL {
            let counts = self.kinds.get(&kind).cloned().unwrap_or_default();
            eprintln!(
                "| {} | {} | {:.1} | {} | {} |",
                kind.name(),
                counts.calls,
                rate(counts.calls),
                counts.throttled,
                counts.unexpected
            );
            if let Some(first) = &counts.first_unexpected {
                eprintln!("|   first unexpected: {first} | | | | |");
            }
            kinds.insert(
                kind.name().to_owned(),
                serde_json::json!({
                    "legit": kind.is_legit(),
                    "calls": counts.calls,
                    "throttled": counts.throttled,
                    "unexpected": counts.unexpected,
                    "first_unexpected": counts.first_unexpected,
                }),
            );
        }
        let calls: u64 = self.kinds.values().map(|k| k.calls).sum();
        let unexpected: u64 = self.kinds.values().map(|k| k.unexpected).sum();
        eprintln!(
            "| **all** | {calls} | {:.1} | {} | {unexpected} |",
            rate(calls),
            self.kinds.values().map(|k| k.throttled).sum::<u64>()
        );
        let band_json = |b: &sampler::Band| {
            serde_json::json!({
                "min": b.min, "median": b.median, "max": b.max, "mean": b.mean, "flat": b.flat,
            })
        };
        let mut steady_json = serde_json::Value::Null;
        if let Some(steady) = &self.steady {
            let mib = |kib: f64| kib / 1024.0;
            eprintln!();
            eprintln!("After the warm-up ({} samples):", steady.samples);
            eprintln!();
            eprintln!(
                "| series | min | median | max | mean | flat (±{:.0} %) |",
                self.tolerance * 100.0
            );
            eprintln!("| --- | ---: | ---: | ---: | ---: | --- |");
            let r = &steady.rss_kib;
            eprintln!(
                "| RSS (MiB) | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                mib(r.min),
                mib(r.median),
                mib(r.max),
                mib(r.mean),
                yes(r.flat)
            );
            let f = &steady.fds;
            eprintln!(
                "| open fds | {} | {} | {} | {:.1} | {} |",
                f.min,
                f.median,
                f.max,
                f.mean,
                yes(f.flat)
            );
            let c = &steady.cpu_percent;
            eprintln!(
                "| CPU (% of a core) | {:.1} | {:.1} | {:.1} | {:.1} | |",
                c.min, c.median, c.max, c.mean
            );
            let q = &steady.queue;
            eprintln!(
                "| writer queue | {} | {} | {} | {:.2} | |",
                q.min, q.median, q.max, q.mean
            );
            steady_json = serde_json::json!({
                "samples": steady.samples,
                "rss_kib": band_json(&steady.rss_kib),
                "fds": band_json(&steady.fds),
                "cpu_percent": band_json(&steady.cpu_percent),
                "writer_queue": band_json(&steady.queue),
            });
        }
        if self.scrape_failures > 0 {
            eprintln!(
                "soak: {} metrics scrapes failed (those samples repeat the last queue length)",
                self.scrape_failures
            );
        }
        let failures = self.failures();
        if failures.is_empty() {
            eprintln!("\nsoak: passed");
        } else {
            eprintln!("\nsoak: FAILED: {}", failures.join("; "));
        }
        let line = serde_json::json!({
            "seconds": self.seconds,
            "warmup": self.warmup,
            "calls": calls,
            "unexpected": unexpected,
            "kinds": kinds,
            "steady": steady_json,
            "scrape_failures": self.scrape_failures,
            "passed": failures.is_empty(),
            "failures": failures,
        });
        println!("{line}");
    }
}

fn yes(flat: bool) -> &'static str {
    if flat { "yes" } else { "NO" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(code: Code) -> Answer {
        Answer::Failed(code, "message".to_owned())
    }

    #[test]
    fn a_legit_call_must_succeed() {
        for kind in Kind::ALL.into_iter().filter(|k| k.is_legit()) {
            assert_eq!(classify(kind, &Answer::Ok), Outcome::Expected, "{kind:?}");
            assert_eq!(
                classify(kind, &Answer::Wrong("inactive")),
                Outcome::Unexpected,
                "{kind:?}"
            );
            // Legit callers are paced under their limits: being throttled is a failure too.
            for code in [
                Code::ResourceExhausted,
                Code::Unauthenticated,
                Code::Unavailable,
                Code::DeadlineExceeded,
                Code::Internal,
            ] {
                assert_eq!(
                    classify(kind, &failed(code)),
                    Outcome::Unexpected,
                    "{kind:?}"
                );
            }
        }
    }

    #[test]
    fn garbage_must_get_its_own_code_or_be_throttled() {
        let cases = [
            (Kind::ForgedRefresh, Code::Unauthenticated),
            (Kind::Malformed, Code::InvalidArgument),
            (Kind::NoCredential, Code::Unauthenticated),
            (Kind::WrongKey, Code::Unauthenticated),
        ];
        for (kind, code) in cases {
            assert!(!kind.is_legit());
            assert_eq!(classify(kind, &failed(code)), Outcome::Expected, "{kind:?}");
            assert_eq!(
                classify(kind, &failed(Code::ResourceExhausted)),
                Outcome::Throttled,
                "{kind:?}"
            );
            // Garbage that succeeds, or fails the wrong way, is a finding.
            assert_eq!(classify(kind, &Answer::Ok), Outcome::Unexpected, "{kind:?}");
            assert_eq!(
                classify(kind, &failed(Code::Internal)),
                Outcome::Unexpected,
                "{kind:?}"
            );
            assert_eq!(
                classify(kind, &failed(Code::PermissionDenied)),
                Outcome::Unexpected,
                "{kind:?}"
            );
        }
        // Revoking a secret that names no token succeeds without effect (RFC 7009).
        assert_eq!(classify(Kind::ForgedRevoke, &Answer::Ok), Outcome::Expected);
        assert_eq!(
            classify(Kind::ForgedRevoke, &failed(Code::ResourceExhausted)),
            Outcome::Throttled
        );
        assert_eq!(
            classify(Kind::ForgedRevoke, &failed(Code::Unauthenticated)),
            Outcome::Unexpected
        );
        // Every kind is judged by one of the lists above.
        assert_eq!(
            Kind::ALL.iter().filter(|k| k.is_legit()).count() + cases.len() + 1,
            Kind::ALL.len()
        );
    }

    #[test]
    fn the_tally_counts_and_keeps_the_first_surprise() {
        let tally = Tally::default();
        tally.record(Kind::Issue, &Answer::Ok);
        tally.record(Kind::ForgedRefresh, &failed(Code::ResourceExhausted));
        tally.record(Kind::ForgedRefresh, &failed(Code::Unauthenticated));
        tally.record(
            Kind::Refresh,
            &Answer::Failed(Code::Unavailable, "first".into()),
        );
        tally.record(
            Kind::Refresh,
            &Answer::Failed(Code::Internal, "second".into()),
        );
        assert_eq!(tally.totals(), (5, 2));
        let kinds = tally.snapshot();
        assert_eq!(kinds[&Kind::ForgedRefresh].throttled, 1);
        assert_eq!(kinds[&Kind::ForgedRefresh].unexpected, 0);
        assert_eq!(
            kinds[&Kind::Refresh].first_unexpected.as_deref(),
            Some("Unavailable: first")
        );
    }

    #[test]
    fn the_warm_up_is_a_fifth_of_the_run_up_to_two_minutes() {
        assert_eq!(default_warmup(30.0), 6.0);
        assert_eq!(default_warmup(600.0), 120.0);
        assert_eq!(default_warmup(3600.0), 120.0);
    }

    #[test]
    fn forged_secrets_have_the_brokers_shape() {
        let secret = forged("tbr_");
        let (id, tail) = secret["tbr_".len()..].split_once('_').expect("two parts");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(tail.len(), 43);
        assert_ne!(forged("tbr_"), secret);
    }
}
