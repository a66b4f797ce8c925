//! The current call's deadline, carried in a task-local so that layers below the gRPC adapter
//! (store retries, outbound query timeouts) can respect it without knowing about gRPC.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `work` with `deadline` as the current call's deadline.
pub fn scope<F: Future>(deadline: Instant, work: F) -> impl Future<Output = F::Output> {
    DEADLINE.scope(deadline, work)
}

/// Returns the time left before the current call's deadline, if one is set.
pub fn remaining() -> Option<Duration> {
    DEADLINE
        .try_with(|deadline| deadline.saturating_duration_since(Instant::now()))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn remaining_is_set_only_inside_a_scope() {
        assert_eq!(remaining(), None);
        let left = scope(Instant::now() + Duration::from_secs(5), async {
            remaining()
        })
        .await;
        let left = left.expect("inside the scope");
        assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(4));
    }
}
