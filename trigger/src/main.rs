//! The Lambda entry point (`bootstrap`): logging, settings and the broker client once per cold
//! start, then the runtime loop. Everything else is in the library.

use std::time::Instant;

use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;
use tokenbroker_client::Client;
use tokenbroker_trigger::{Config, config::ProcessEnv, handle};
use tracing::info;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    let started = Instant::now();
    lambda_runtime::tracing::init_default_subscriber();
    let config = Config::from_env(&ProcessEnv)?;
    // Lazy: the cold start does not wait for the broker; the first call connects.
    let client = Client::connect_lazy(&config.endpoint)?.with_api_key(&config.api_key)?;
    info!(
        endpoint = %config.endpoint,
        policy = config.failure_policy.as_str(),
        timeout_ms = config.timeout.as_millis() as u64,
        init_us = started.elapsed().as_micros() as u64,
        "trigger ready"
    );
    let (config, client) = (&config, &client);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        handle(event, config, client).await
    }))
    .await
}
