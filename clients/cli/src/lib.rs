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
//!
//! The parts: `args` (the command line clap parses), `input` (the credential and stdin),
//! `connection` (the channel, through tokenbroker-client), `commands` (one broker call each),
//! `render` (tables and JSON) and `exit` (exit codes and failures). This file runs them in order.

mod args;
mod commands;
mod connection;
mod exit;
mod input;
mod render;

use std::{io::Write as _, process::ExitCode, time::Duration};

pub use crate::{
    args::{
        Args, Command, DEFAULT_ENDPOINT, ENV_API_KEY, ENV_API_KEY_FILE, ENV_CA_FILE, ENV_CERT_FILE,
        ENV_COGNITO_TOKEN, ENV_ENDPOINT, ENV_KEY_FILE, HealthArgs, Hint, IntrospectArgs, IssueArgs,
        ListArgs, RevokeArgs,
    },
    exit::{Exit, Failure},
};
use crate::{
    connection::connect,
    input::{credential, read_secret},
    render::Printer,
};

/// Runs the command line and returns its exit code, having printed the result or the failure.
pub async fn run(args: Args) -> ExitCode {
    let json = args.json;
    match execute(args).await {
        Ok(()) => Exit::Success.into(),
        Err(failure) => {
            let text = if json {
                render::failure_json(&failure).to_string()
            } else {
                render::failure_text(&failure)
            };
            // Nothing useful is left to do if stderr is gone.
            let _ = writeln!(std::io::stderr(), "{text}");
            failure.exit().into()
        }
    }
}

async fn execute(args: Args) -> Result<(), Failure> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let out = Printer { json: args.json };
    if let Command::Health(health_args) = &args.command {
        let client = connect(&args, timeout).await?;
        return commands::health(&client, &health_args.service, timeout, out).await;
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
        Command::Issue(issue_args) => commands::issue(&client, issue_args, out).await,
        Command::Introspect(introspect_args) => {
            let secret = secret.expect("introspect read its secret");
            commands::introspect(&client, &introspect_args, &secret, out).await
        }
        Command::Revoke(revoke_args) => commands::revoke(&client, revoke_args, secret, out).await,
        Command::List(list_args) => commands::list(&client, list_args, out).await,
        Command::Health(_) => unreachable!("handled above"),
    }
}
