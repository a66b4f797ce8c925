//! The `tokenbroker` binary: parses the command line and hands over to the library.

use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = tokenbroker::cli::Args::parse();
    match tokenbroker::cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tokenbroker: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
