//! `tokenbroker-admin`: the operator's command line for a running tokenbroker.
//!
//! It speaks the public gRPC API through `tokenbroker-client`, like any other caller, and never
//! links the broker itself. Two rules shape it:
//!
//! - **No secret on the command line.** Arguments show in `ps` and in shell history, so the
//!   caller's credential comes from the environment or a file, and token secrets come from
//!   stdin (`introspect`, `revoke --token-stdin`).
//! - **No secret in the output**, except the pair `issue --print-secrets` has just minted: that
//!   is the point of that flag, and without it `issue` prints ids only.
//!
//! Every failure ends in an exit code per error class ([`Exit`]), so scripts can branch on it.

mod render;

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{ArgGroup, Args as ClapArgs, Parser, Subcommand, ValueEnum};
use secrecy::{ExposeSecret as _, SecretSlice, SecretString, zeroize::Zeroize as _};
use tokenbroker_client::{
    BrokerEndpoint, Client, ClientError, ClientErrorKind, Code, EndpointError, ServingStatus,
    TlsOptions, pb,
};

/// The broker's address, `http://…` or `https://…` (same as `--endpoint`).
pub const ENV_ENDPOINT: &str = "TB_ENDPOINT";
/// An API key to authenticate with.
pub const ENV_API_KEY: &str = "TB_API_KEY";
/// A file holding the API key (same as `--api-key-file`).
pub const ENV_API_KEY_FILE: &str = "TB_API_KEY_FILE";
/// An operator's Cognito access token to authenticate with, instead of an API key.
pub const ENV_COGNITO_TOKEN: &str = "TB_COGNITO_TOKEN";
/// A PEM file with the CA certificates to trust for an https:// broker (same as `--ca-file`).
pub const ENV_CA_FILE: &str = "TB_CA_FILE";
/// A PEM file with this tool's client certificate, for mTLS (same as `--cert-file`).
pub const ENV_CERT_FILE: &str = "TB_CERT_FILE";
/// A PEM file with the client certificate's private key (same as `--key-file`).
pub const ENV_KEY_FILE: &str = "TB_KEY_FILE";
/// Where a dev-mode broker listens.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";
/// Longest `list --all-pages` follows `next_page_token`: a bound, not an expected size.
const MAX_PAGES: usize = 1000;

const ABOUT: &str = "The operator's command line for tokenbroker: inspect, revoke and list tokens, \
check health, and mint test tokens.";

const AFTER_HELP: &str = "\
CREDENTIALS
  The broker authenticates the caller with a bearer credential, taken from:
    --api-key-file FILE (or TB_API_KEY_FILE)  a file holding an API key; wins over:
    TB_API_KEY                                an API key, or
    TB_COGNITO_TOKEN                          an operator's Cognito access token
  (setting both of the last two is a usage error). A credential is never taken from the command
  line, and token secrets are read from stdin: arguments show in `ps` and shell history.
  health needs no credential, and neither does revoke --token-stdin (a secret's holder may
  revoke it). These TB_* variables are this tool's; the broker reads only TOKENBROKER_* ones.

OUTPUT
  Tables for people; with --json, one JSON document on stdout, and a failure as
  {\"error\": {\"code\": …, \"message\": …, \"exit_code\": …}} on stderr. Times are RFC 3339, UTC.
  No secret is ever printed, except the pair `issue --print-secrets` has just minted.

EXIT CODES
  0  success (introspect of an inactive token succeeds too: read `active`)
  1  anything else: internal error, failed precondition
  2  usage: bad flags or values, nothing on stdin, unreadable key file, malformed endpoint
  3  invalid argument: the broker refused the request (bad email or id, ttl over the maximum,
     unknown health service)
  4  unauthenticated: no credential, or an unknown, malformed or expired one
  5  permission denied: the credential lacks the role, or the token is another app client's
  6  unavailable: the broker cannot be reached, timed out, is throttling the caller, or is not
     serving

EXAMPLES
  export TB_ENDPOINT=http://127.0.0.1:50051
  export TB_API_KEY=\"$TB_ADMIN_KEY\"     # dev mode writes it to data/dev-keys.env
  tokenbroker-admin health
  tokenbroker-admin list --email alice@example.com --include-inactive
  tokenbroker-admin revoke --email alice@example.com      # sign alice out everywhere
  tokenbroker-admin revoke --family 01JD6Q…               # end one session
  printf %s \"$SECRET\" | tokenbroker-admin introspect --json | jq .active
  printf %s \"$SECRET\" | tokenbroker-admin revoke --token-stdin
  tokenbroker-admin --endpoint https://broker.internal list --account 01JD6P… --json
  tokenbroker-admin --endpoint https://broker.internal:50051 --ca-file ca.crt \\
    --cert-file ops.crt --key-file ops.key list --email alice@example.com   # mTLS";

/// tokenbroker-admin: inspect, revoke and list tokens on a running broker.
#[derive(Debug, Parser)]
#[command(
    name = "tokenbroker-admin",
    version,
    about = ABOUT,
    after_help = AFTER_HELP
)]
pub struct Args {
    /// The broker: http://HOST:PORT (plaintext), or https://HOST or https://HOST:PORT (TLS,
    /// verified against the platform's root certificates; SSL_CERT_FILE names a private CA
    /// bundle).
    #[arg(
        long,
        global = true,
        env = ENV_ENDPOINT,
        default_value = DEFAULT_ENDPOINT,
        value_name = "URL"
    )]
    pub endpoint: String,

    /// For an https:// broker: a PEM file with the CA certificates to trust, instead of the
    /// platform's roots.
    #[arg(long, global = true, env = ENV_CA_FILE, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// For a broker with mTLS: a PEM file with this tool's client certificate (with
    /// --key-file). A certificate mapped in the broker's cert_callers is a credential itself.
    #[arg(long, global = true, env = ENV_CERT_FILE, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,

    /// The PEM private key of --cert-file.
    #[arg(long, global = true, env = ENV_KEY_FILE, value_name = "FILE")]
    pub key_file: Option<PathBuf>,

    /// A file holding the API key (or a Cognito access token) to authenticate with.
    #[arg(long, global = true, env = ENV_API_KEY_FILE, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Deadline of the call, connection included.
    #[arg(long, global = true, default_value_t = 10, value_name = "SECONDS")]
    pub timeout: u64,

    /// Print JSON instead of tables (failures too, on stderr).
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mints a token pair for an email, as the trigger would (role trigger or admin). For
    /// testing: the secrets are printed only with --print-secrets.
    #[command(after_help = "\
EXAMPLES
  tokenbroker-admin issue --email test@example.com
  tokenbroker-admin issue --email test@example.com --client-id web --access-ttl 60 \\
    --metadata device=laptop --print-secrets --json > pair.json   # keep pair.json private")]
    Issue(IssueArgs),
    /// Reads a token secret from stdin and shows whether it is active, and its facts if it is
    /// (role service or admin).
    #[command(after_help = "\
EXAMPLES
  printf %s \"$SECRET\" | tokenbroker-admin introspect
  tokenbroker-admin introspect --json < secret.txt | jq -e .active")]
    Introspect(IntrospectArgs),
    /// Revokes tokens: the one whose secret is on stdin (no role needed), or by token id,
    /// family, account id or email (role admin). Idempotent.
    #[command(after_help = "\
EXAMPLES
  printf %s \"$SECRET\" | tokenbroker-admin revoke --token-stdin
  tokenbroker-admin revoke --token-id 01JD6R…    # a refresh token takes its session with it
  tokenbroker-admin revoke --family 01JD6Q…      # one session
  tokenbroker-admin revoke --email alice@example.com   # everything issued to alice until now")]
    Revoke(RevokeArgs),
    /// Lists an account's tokens, newest first, without secrets (role admin).
    #[command(after_help = "\
EXAMPLES
  tokenbroker-admin list --email alice@example.com
  tokenbroker-admin list --account 01JD6P… --include-inactive --all-pages --json")]
    List(ListArgs),
    /// Asks the broker's grpc.health.v1 service whether it is serving (no credential needed).
    #[command(after_help = "\
EXAMPLES
  tokenbroker-admin health
  tokenbroker-admin health --service tokenbroker.v1.TokenBroker/cognito   # Cognito keys loaded?")]
    Health(HealthArgs),
}

/// `issue`.
#[derive(Debug, ClapArgs)]
pub struct IssueArgs {
    /// The user's email.
    #[arg(long)]
    pub email: String,
    /// The Cognito app client the tokens are for.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// The user's Cognito `sub`.
    #[arg(long, value_name = "SUB")]
    pub cognito_sub: Option<String>,
    /// The Cognito user pool id.
    #[arg(long, value_name = "ID")]
    pub user_pool_id: Option<String>,
    /// A Cognito group of the user (repeatable).
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Access token lifetime (default: the broker's).
    #[arg(long, value_name = "SECONDS")]
    pub access_ttl: Option<u32>,
    /// Refresh token lifetime (default: the broker's).
    #[arg(long, value_name = "SECONDS")]
    pub refresh_ttl: Option<u32>,
    /// A label stored with both tokens (repeatable). Never put secrets here.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub metadata: Vec<(String, String)>,
    /// Makes a retry within the broker's window return the same pair.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Print the two secrets just minted (they cannot be shown again). Without it, ids only.
    #[arg(long)]
    pub print_secrets: bool,
}

/// Which kind a presented secret probably is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Hint {
    /// An access token.
    Access,
    /// A refresh token.
    Refresh,
}

/// `introspect`.
#[derive(Debug, ClapArgs)]
pub struct IntrospectArgs {
    /// Report a token issued for another app client as inactive.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// Which kind the secret probably is (never required to be right).
    #[arg(long, value_enum)]
    pub hint: Option<Hint>,
}

/// `revoke`: exactly one target.
#[derive(Debug, ClapArgs)]
#[command(group(
    ArgGroup::new("target")
        .required(true)
        .args(["token_stdin", "token_id", "family", "account", "email"])
))]
pub struct RevokeArgs {
    /// Revoke the token whose secret is on stdin.
    #[arg(long)]
    pub token_stdin: bool,
    /// Revoke one token by id; a refresh token takes its whole session with it.
    #[arg(long, value_name = "ID")]
    pub token_id: Option<String>,
    /// Revoke every token of a session.
    #[arg(long, value_name = "ID")]
    pub family: Option<String>,
    /// Revoke every token issued to an account until now.
    #[arg(long, value_name = "ID")]
    pub account: Option<String>,
    /// Revoke every token issued until now to the account with this email.
    #[arg(long, value_name = "EMAIL")]
    pub email: Option<String>,
    /// With --token-stdin: the token must be this app client's.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// With --token-stdin: which kind the secret probably is.
    #[arg(long, value_enum)]
    pub hint: Option<Hint>,
}

/// `list`: one account.
#[derive(Debug, ClapArgs)]
#[command(group(ArgGroup::new("whose").required(true).args(["email", "account"])))]
pub struct ListArgs {
    /// The account's email.
    #[arg(long)]
    pub email: Option<String>,
    /// The account id.
    #[arg(long, value_name = "ID")]
    pub account: Option<String>,
    /// Also list expired, revoked and rotated tokens.
    #[arg(long)]
    pub include_inactive: bool,
    /// Tokens per page (1 to 500).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub page_size: u32,
    /// Start at this page (the `next_page_token` of an earlier listing).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow next_page_token to the end.
    #[arg(long)]
    pub all_pages: bool,
}

/// `health`.
#[derive(Debug, ClapArgs)]
pub struct HealthArgs {
    /// The health service: "" (the server), tokenbroker.v1.TokenBroker, or
    /// tokenbroker.v1.TokenBroker/cognito (Cognito keys loaded).
    #[arg(long, default_value = "", value_name = "NAME")]
    pub service: String,
}

/// The exit codes, one per error class (documented in `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Success = 0,
    /// 1: anything not listed below.
    Other = 1,
    /// 2: the command line or its input is wrong.
    Usage = 2,
    /// 3: the broker refused the request's content.
    InvalidArgument = 3,
    /// 4: no, or a bad, credential.
    Unauthenticated = 4,
    /// 5: the credential lacks the role.
    PermissionDenied = 5,
    /// 6: the broker cannot answer now.
    Unavailable = 6,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

impl From<ClientErrorKind> for Exit {
    fn from(kind: ClientErrorKind) -> Self {
        match kind {
            ClientErrorKind::InvalidArgument => Exit::InvalidArgument,
            ClientErrorKind::Unauthenticated => Exit::Unauthenticated,
            ClientErrorKind::PermissionDenied => Exit::PermissionDenied,
            ClientErrorKind::Unavailable
            | ClientErrorKind::DeadlineExceeded
            | ClientErrorKind::ResourceExhausted => Exit::Unavailable,
            ClientErrorKind::FailedPrecondition | ClientErrorKind::Internal => Exit::Other,
        }
    }
}

/// A failed command: its exit code, a code name and a (secret-free) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    exit: Exit,
    code: &'static str,
    message: String,
}

impl Failure {
    /// A failure with `exit`, the code name `code` and `message`.
    fn new(exit: Exit, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            exit,
            code,
            message: message.into(),
        }
    }

    /// A usage failure (exit 2): the command line or its input is wrong.
    fn usage(message: impl Into<String>) -> Self {
        Self::new(Exit::Usage, "USAGE", message)
    }

    /// Returns the exit code.
    pub fn exit(&self) -> Exit {
        self.exit
    }

    /// Returns the code name: a gRPC code such as `PERMISSION_DENIED`, or `USAGE`,
    /// `NOT_SERVING`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Returns the message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ClientError> for Failure {
    fn from(err: ClientError) -> Self {
        Self {
            exit: err.kind().into(),
            code: code_name(err.code()),
            message: err.message().to_owned(),
        }
    }
}

/// Returns the canonical name of a gRPC code.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Runs the command line and returns its exit code, having printed the result or the failure.
pub async fn run(args: Args) -> ExitCode {
    let json = args.json;
    match execute(args).await {
        Ok(()) => Exit::Success.into(),
        Err(failure) => {
            let text = if json {
                render::failure_json(&failure).to_string()
            } else {
                format!(
                    "tokenbroker-admin: {}: {}",
                    failure.code.to_lowercase().replace('_', " "),
                    failure.message
                )
            };
            // Nothing useful is left to do if stderr is gone.
            let _ = writeln!(std::io::stderr(), "{text}");
            failure.exit.into()
        }
    }
}

async fn execute(args: Args) -> Result<(), Failure> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let out = Printer { json: args.json };
    if let Command::Health(health_args) = &args.command {
        let client = connect(&args, timeout).await?;
        return health(&client, &health_args.service, timeout, out).await;
    }
    // clap's `requires` counts a flag's default as present, so this one is checked by hand.
    if let Command::Revoke(revoke) = &args.command
        && !revoke.token_stdin
        && (revoke.client_id.is_some() || revoke.hint.is_some())
    {
        return Err(Failure::usage(
            "--client-id and --hint apply to --token-stdin only",
        ));
    }
    // Stdin first: whoever pastes a secret should not hold a connection open meanwhile.
    let secret = match &args.command {
        Command::Introspect(_) => Some(read_secret("the token secret")?),
        Command::Revoke(revoke) if revoke.token_stdin => Some(read_secret("the token secret")?),
        _ => None,
    };
    let credential = credential(args.api_key_file.as_deref(), &|name| {
        std::env::var(name).ok()
    })?;
    let mut client = connect(&args, timeout).await?;
    if let Some(credential) = &credential {
        client = client
            .with_api_key(credential)
            .map_err(|_| Failure::usage("the credential is not printable ASCII"))?;
    }
    match args.command {
        Command::Issue(issue_args) => issue(&client, issue_args, out).await,
        Command::Introspect(introspect_args) => {
            let secret = secret.expect("introspect read its secret");
            introspect(&client, &introspect_args, &secret, out).await
        }
        Command::Revoke(revoke_args) => revoke(&client, revoke_args, secret, out).await,
        Command::List(list_args) => list(&client, list_args, out).await,
        Command::Health(_) => unreachable!("handled above"),
    }
}

/// Where results go: a table or JSON on stdout.
#[derive(Debug, Clone, Copy)]
struct Printer {
    json: bool,
}

impl Printer {
    fn emit(self, table: impl FnOnce() -> String, json: impl FnOnce() -> serde_json::Value) {
        let text = if self.json {
            serde_json::to_string_pretty(&json()).expect("a json value serializes")
        } else {
            table()
        };
        // A closed pipe (`| head`) is not a failure of the command.
        let _ = writeln!(std::io::stdout().lock(), "{}", text.trim_end());
    }
}

/// Returns the caller's credential: `--api-key-file`, else `TB_API_KEY` or
/// `TB_COGNITO_TOKEN` (not both). `None` when there is none: the broker then decides
/// (UNAUTHENTICATED where one is needed).
fn credential(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, Failure> {
    if let Some(path) = file {
        let mut text = std::fs::read_to_string(path).map_err(|err| {
            Failure::usage(format!(
                "cannot read the key file {}: {err}",
                path.display()
            ))
        })?;
        let key = SecretString::from(text.trim().to_owned());
        text.zeroize();
        if key.expose_secret().is_empty() {
            return Err(Failure::usage(format!(
                "the key file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(key));
    }
    let present = |name| env(name).filter(|value| !value.trim().is_empty());
    match (present(ENV_API_KEY), present(ENV_COGNITO_TOKEN)) {
        (Some(_), Some(_)) => Err(Failure::usage(format!(
            "both {ENV_API_KEY} and {ENV_COGNITO_TOKEN} are set; unset one"
        ))),
        (Some(value), None) | (None, Some(value)) => {
            Ok(Some(SecretString::from(value.trim().to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// Reads one line from stdin as a secret; a prompt goes to stderr when stdin is a terminal.
fn read_secret(what: &str) -> Result<SecretString, Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let _ = write!(
            std::io::stderr(),
            "paste {what} and press Enter (it is echoed; a pipe avoids that): "
        );
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|err| Failure::usage(format!("cannot read {what} from stdin: {err}")))?;
    let secret = SecretString::from(line.trim().to_owned());
    line.zeroize();
    if secret.expose_secret().is_empty() {
        return Err(Failure::usage(format!("no {what} on stdin")));
    }
    Ok(secret)
}

/// Connects to the broker within `timeout` and returns a client whose calls have that deadline
/// (and no credential yet).
async fn connect(args: &Args, timeout: Duration) -> Result<Client, Failure> {
    let endpoint = args.endpoint.as_str();
    let mut broker = BrokerEndpoint::parse(endpoint)
        .map_err(|err| match err {
            EndpointError::InvalidUri => {
                Failure::usage(format!("--endpoint {endpoint:?} is not a valid URL"))
            }
            EndpointError::UnsupportedScheme => Failure::usage(format!(
                "--endpoint {endpoint:?} must start with http:// or https://"
            )),
            other => Failure::usage(other.to_string()),
        })?
        .with_connect_timeout(timeout);
    if broker.is_https() {
        // The files are read only for an https:// endpoint, as the flags apply only there.
        broker = broker
            .with_tls(&tls_options(args)?)
            .map_err(|err| Failure::usage(err.to_string()))?;
    } else if args.ca_file.is_some() || args.cert_file.is_some() {
        return Err(Failure::usage(
            "--ca-file, --cert-file and --key-file need an https:// endpoint",
        ));
    }
    // The connect timeout bounds opening the TCP connection; this bounds all of it, the
    // handshakes included.
    match tokio::time::timeout(timeout, broker.connect()).await {
        Ok(Ok(channel)) => Ok(Client::from_channel(channel).with_timeout(timeout)),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(Failure::new(
            Exit::Unavailable,
            "DEADLINE_EXCEEDED",
            format!("no connection to {endpoint} within {}s", timeout.as_secs()),
        )),
    }
}

/// TLS for an https:// endpoint: the CA to trust (the platform's roots by default) and the
/// client certificate to present, if any.
fn tls_options(args: &Args) -> Result<TlsOptions, Failure> {
    let read = |flag: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|err| Failure::usage(format!("cannot read {flag} {}: {err}", path.display())))
    };
    // Checked here: clap's `requires` misjudges global flags given before the subcommand.
    if args.cert_file.is_some() != args.key_file.is_some() {
        return Err(Failure::usage(
            "--cert-file and --key-file go together (the client certificate and its key)",
        ));
    }
    let mut tls = TlsOptions::new();
    if let Some(path) = &args.ca_file {
        tls = tls.with_ca_pem(read("--ca-file", path)?);
    }
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        // Zeroized when the options are dropped, once the TLS settings are built.
        let key = SecretSlice::from(read("--key-file", key)?);
        tls = tls.with_identity_pem(read("--cert-file", cert)?, key);
    }
    Ok(tls)
}

/// Splits `KEY=VALUE`.
fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn hint(hint: Option<Hint>) -> i32 {
    match hint {
        None => pb::TokenTypeHint::Unspecified,
        Some(Hint::Access) => pb::TokenTypeHint::AccessToken,
        Some(Hint::Refresh) => pb::TokenTypeHint::RefreshToken,
    }
    .into()
}

async fn issue(client: &Client, args: IssueArgs, out: Printer) -> Result<(), Failure> {
    let request = pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::Claims(
            pb::AssertedClaims {
                email: args.email,
                cognito_sub: args.cognito_sub.unwrap_or_default(),
                user_pool_id: args.user_pool_id.unwrap_or_default(),
                client_id: args.client_id.unwrap_or_default(),
                groups: args.groups,
            },
        )),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        access_ttl_seconds: args.access_ttl.unwrap_or(0),
        refresh_ttl_seconds: args.refresh_ttl.unwrap_or(0),
        metadata: args.metadata.into_iter().collect(),
    };
    let pair = client.issue_tokens(request).await?;
    let show = if args.print_secrets {
        render::Secrets::Show
    } else {
        render::Secrets::Hide
    };
    out.emit(
        || render::issue_table(&pair, show),
        || render::issue_json(&pair, show),
    );
    if show == render::Secrets::Hide && !out.json {
        let _ = writeln!(
            std::io::stderr(),
            "secrets not shown: pass --print-secrets to print them (they cannot be shown again)"
        );
    }
    Ok(())
}

async fn introspect(
    client: &Client,
    args: &IntrospectArgs,
    secret: &SecretString,
    out: Printer,
) -> Result<(), Failure> {
    let response = client
        .introspect(pb::IntrospectRequest {
            token: secret.expose_secret().to_owned(),
            token_type_hint: hint(args.hint),
            client_id: args.client_id.clone().unwrap_or_default(),
        })
        .await?;
    out.emit(
        || render::introspect_table(&response),
        || render::introspect_json(&response),
    );
    Ok(())
}

async fn revoke(
    client: &Client,
    args: RevokeArgs,
    secret: Option<SecretString>,
    out: Printer,
) -> Result<(), Failure> {
    use pb::revoke_request::Target;
    let (target, what) = if let Some(secret) = &secret {
        (
            Target::Token(secret.expose_secret().to_owned()),
            "the token".to_owned(),
        )
    } else if let Some(id) = args.token_id {
        (Target::TokenId(id.clone()), format!("token {id}"))
    } else if let Some(id) = args.family {
        (Target::FamilyId(id.clone()), format!("family {id}"))
    } else if let Some(id) = args.account {
        (Target::AccountId(id.clone()), format!("account {id}"))
    } else if let Some(email) = args.email {
        (Target::Email(email.clone()), format!("account {email}"))
    } else {
        unreachable!("clap requires one target");
    };
    let by_secret = secret.is_some();
    let response = client
        .revoke(pb::RevokeRequest {
            target: Some(target),
            token_type_hint: hint(args.hint),
            client_id: args.client_id.unwrap_or_default(),
        })
        .await?;
    out.emit(
        || render::revoke_table(&what, by_secret, response.revoked_count),
        || render::revoke_json(response.revoked_count),
    );
    Ok(())
}

async fn list(client: &Client, args: ListArgs, out: Printer) -> Result<(), Failure> {
    use pb::list_tokens_request::Account;
    let account = match (args.email, args.account) {
        (Some(email), _) => Account::Email(email),
        (None, Some(id)) => Account::AccountId(id),
        (None, None) => unreachable!("clap requires --email or --account"),
    };
    let mut page_token = args.page_token.unwrap_or_default();
    let mut listing = pb::ListTokensResponse::default();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_tokens(pb::ListTokensRequest {
                account: Some(account.clone()),
                page_size: args.page_size,
                page_token,
                include_inactive: args.include_inactive,
            })
            .await?;
        listing.account_id = page.account_id;
        listing.tokens.extend(page.tokens);
        listing.next_page_token = page.next_page_token;
        if !args.all_pages || listing.next_page_token.is_empty() {
            break;
        }
        page_token = listing.next_page_token.clone();
    }
    out.emit(
        || render::list_table(&listing),
        || render::list_json(&listing),
    );
    Ok(())
}

/// `health`: grpc.health.v1 `Check`, through tokenbroker-client (whose deadline is `timeout`).
/// Exit 0 only when serving.
async fn health(
    client: &Client,
    service: &str,
    timeout: Duration,
    out: Printer,
) -> Result<(), Failure> {
    let status = match client.check_health(service).await {
        Ok(status) => status,
        Err(err) if err.code() == Code::NotFound => {
            return Err(Failure::new(
                Exit::InvalidArgument,
                "NOT_FOUND",
                format!("the broker has no health service named {service:?}"),
            ));
        }
        Err(err) if err.kind() == ClientErrorKind::DeadlineExceeded => {
            return Err(Failure::new(
                Exit::Unavailable,
                "DEADLINE_EXCEEDED",
                format!("no health answer within {}s", timeout.as_secs()),
            ));
        }
        Err(err) => return Err(err.into()),
    };
    let name = status.as_str_name();
    out.emit(
        || name.to_owned(),
        || serde_json::json!({ "service": service, "status": name }),
    );
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(Failure::new(
            Exit::Unavailable,
            "NOT_SERVING",
            format!("health service {service:?} reports {name}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use clap::CommandFactory as _;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn credential_comes_from_the_file_before_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "tbk_from_file\n").unwrap();
        let key = credential(Some(&file), &env(&[(ENV_API_KEY, "tbk_from_env")]))
            .unwrap()
            .unwrap();
        assert_eq!(key.expose_secret(), "tbk_from_file");
        let key = credential(None, &env(&[(ENV_API_KEY, "tbk_from_env")]))
            .unwrap()
            .unwrap();
        assert_eq!(key.expose_secret(), "tbk_from_env");
        let token = credential(None, &env(&[(ENV_COGNITO_TOKEN, "eyJ.a.b")]))
            .unwrap()
            .unwrap();
        assert_eq!(token.expose_secret(), "eyJ.a.b");
        assert!(credential(None, &env(&[])).unwrap().is_none());
    }

    #[test]
    fn ambiguous_or_empty_credentials_are_usage_errors() {
        let both = env(&[(ENV_API_KEY, "k"), (ENV_COGNITO_TOKEN, "t")]);
        assert_eq!(credential(None, &both).unwrap_err().exit(), Exit::Usage);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        assert_eq!(
            credential(Some(&empty), &env(&[])).unwrap_err().exit(),
            Exit::Usage
        );
        let missing = dir.path().join("missing");
        assert_eq!(
            credential(Some(&missing), &env(&[])).unwrap_err().exit(),
            Exit::Usage
        );
    }

    #[test]
    fn error_kinds_map_to_documented_exit_codes() {
        let cases = [
            (ClientErrorKind::InvalidArgument, 3),
            (ClientErrorKind::Unauthenticated, 4),
            (ClientErrorKind::PermissionDenied, 5),
            (ClientErrorKind::Unavailable, 6),
            (ClientErrorKind::DeadlineExceeded, 6),
            (ClientErrorKind::ResourceExhausted, 6),
            (ClientErrorKind::FailedPrecondition, 1),
            (ClientErrorKind::Internal, 1),
        ];
        for (kind, code) in cases {
            assert_eq!(Exit::from(kind) as u8, code, "{kind:?}");
        }
        let failure = Failure::from(ClientError::from(tonic::Status::permission_denied("no")));
        assert_eq!(failure.code(), "PERMISSION_DENIED");
        assert_eq!(failure.exit(), Exit::PermissionDenied);
    }

    #[test]
    fn secrets_have_no_command_line_flag() {
        // A secret on argv shows in `ps`: only stdin and the environment may carry one.
        let command = Args::command();
        let mut names = Vec::new();
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments() {
                names.extend(arg.get_long().map(str::to_owned));
            }
        }
        for arg in command.get_arguments() {
            names.extend(arg.get_long().map(str::to_owned));
        }
        for forbidden in ["api-key", "token", "secret", "cognito-token", "key"] {
            assert!(
                !names.iter().any(|n| n == forbidden),
                "--{forbidden} exists"
            );
        }
    }

    #[test]
    fn labels_parse_as_key_value() {
        assert_eq!(
            parse_label("device=laptop=1").unwrap(),
            ("device".into(), "laptop=1".into())
        );
        assert!(parse_label("device").is_err());
    }
}
