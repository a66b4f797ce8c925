//! The command line: flags, subcommands, environment variables and `--help`, as clap parses
//! them. What each command does is in `commands`; this file only says what may be asked.

use std::path::PathBuf;

use clap::{ArgGroup, Args as ClapArgs, Parser, Subcommand, ValueEnum};

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
    /// Report a refresh token as inactive: the check a resource server makes.
    #[arg(long)]
    pub access_only: bool,
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

/// Splits `KEY=VALUE`.
pub(crate) fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        Args::command().debug_assert();
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
