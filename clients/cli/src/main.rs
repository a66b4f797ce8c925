//! The `tokenbroker-admin` binary: parses the command line and hands over to the library, whose
//! result is already an exit code.

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tokenbroker_cli::run(tokenbroker_cli::Args::parse()).await
}
