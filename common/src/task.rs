//! Async plumbing every crate repeats: the boxed future of object-safe async traits, and blocking work run on
//! tokio's blocking pool instead of a runtime thread.

use std::future::Future;
use std::pin::Pin;

/// The future an object-safe async trait method returns (`NetworkBackend`, `VolumeBackend`, `Pool`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs `work` (file I/O, fsync, a blocking syscall) on tokio's blocking pool and returns its result. A panic in
/// `work` is resumed in the caller, as if it had run inline; cancellation cannot happen once it started.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime shutting down cancels a blocking task; the caller is being torn down with it.
            Err(error) => panic!("blocking task cancelled: {error}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blocking_returns_the_value() {
        assert_eq!(blocking(|| 6 * 7).await, 42);
    }

    #[tokio::test]
    #[should_panic(expected = "inner panic")]
    async fn blocking_resumes_a_panic() {
        blocking(|| panic!("inner panic")).await
    }

    #[test]
    fn box_future_is_send() {
        fn check<T: Send>(_: T) {}
        let future: BoxFuture<'static, u8> = Box::pin(async { 1 });
        check(future);
    }
}
