//! grpc.health.v1 `Check` (the `health` feature): whether the broker, or one of its health
//! services, is serving.
//!
//! The broker registers `""` (the server), `tokenbroker.v1.TokenBroker` and
//! `tokenbroker.v1.TokenBroker/cognito` (Cognito keys loaded), and answers without a credential.

pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{Client, ClientResult};

impl Client {
    /// Asks the broker's health service `service` (`""` for the server as a whole) whether it
    /// is serving, within the client's deadline. No credential is sent: the health service needs
    /// none, and a credential should not travel where it is not needed.
    ///
    /// # Errors
    ///
    /// `DeadlineExceeded` when no answer arrives in time, `Unavailable` when the broker cannot
    /// be reached. A broker without a health service of that name answers `NOT_FOUND`, which
    /// arrives as [`ClientErrorKind::Internal`](crate::ClientErrorKind::Internal) with
    /// [`ClientError::code`](crate::ClientError::code) `NotFound`.
    pub async fn check_health(&self, service: &str) -> ClientResult<ServingStatus> {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        });
        request.set_timeout(self.timeout);
        let mut health = HealthClient::new(self.channel.clone());
        let response = Self::bounded(self.timeout, health.check(request)).await?;
        Ok(response.status())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::Code;

    use crate::{Client, ClientErrorKind};

    use super::ServingStatus;

    #[tokio::test]
    async fn reports_what_a_health_service_answers() {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("serving.Service", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("stopped.Service", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let client = Client::connect(&format!("http://{addr}"))
            .await
            .unwrap()
            .with_timeout(Duration::from_secs(10));
        assert_eq!(
            client.check_health("").await.unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(
            client.check_health("serving.Service").await.unwrap(),
            ServingStatus::Serving
        );
        assert_eq!(
            client.check_health("stopped.Service").await.unwrap(),
            ServingStatus::NotServing
        );
        let err = client.check_health("no.such.Service").await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err}");
        assert_eq!(err.kind(), ClientErrorKind::Internal);
        server.abort();
    }

    #[tokio::test]
    async fn a_hung_broker_hits_the_deadline() {
        let (addr, holder) = crate::tests::hung_broker().await;
        let client = Client::connect_lazy(&format!("http://{addr}"))
            .unwrap()
            .with_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let err = client.check_health("").await.unwrap_err();
        assert_eq!(err.kind(), ClientErrorKind::DeadlineExceeded, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        holder.abort();
    }
}
