//! Writes that wait one turn of the scheduler, so that the responses of calls finishing together
//! on one connection leave in one system call.
//!
//! hyper runs each HTTP/2 stream in a task of its own and the connection in another. A finished
//! call queues its frames and wakes the connection's task, which tokio runs next (a task woken
//! from a worker takes that worker's "LIFO slot"), so without help every response is written on
//! its own: one `writev` per call, and on loopback the kernel runs the receiving side's TCP
//! stack inside that same syscall. Calls do finish together: one store statement answers a whole
//! batch of Introspect calls (see `docs/stores.md`).
//!
//! [`CoalescedWrites`] makes each write yield once first: it wakes its own task and answers
//! `Pending`, and tokio puts a task that woke itself at the back of the run queue. The tasks
//! that were already runnable go first and queue their frames; the connection's task then runs
//! again and h2 writes everything it holds, in one call. Nothing is copied (the writer keeps
//! its buffer until the write goes through), no timer is involved, and an idle server pays one
//! extra poll of the connection's task per write. With 32 Introspect calls in flight over 4
//! connections this took the broker from 0.8 to about 0.26 `writev` per call
//! (`docs/performance.md`).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A stream whose every write first yields to the tasks already runnable (see the module).
/// Reads, flushes and shutdowns pass straight through.
#[derive(Debug)]
pub struct CoalescedWrites<IO> {
    io: IO,
    /// Whether the pending write has already yielded once.
    yielded: bool,
}

impl<IO> CoalescedWrites<IO> {
    /// Wraps `io`.
    pub fn new(io: IO) -> Self {
        Self { io, yielded: false }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Yields the first time a write is attempted, then lets `write` run; after a write goes
    /// through, the next one yields again.
    fn write_after_yield<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        IO: Unpin,
    {
        if !self.yielded {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let written = write(Pin::new(&mut self.io), cx);
        if written.is_ready() {
            self.yielded = false;
        }
        written
    }
}

impl<IO: Connected> Connected for CoalescedWrites<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CoalescedWrites<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_after_yield(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write_after_yield(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A sink that counts the writes that reach it.
    #[derive(Default, Clone)]
    struct CountingSink {
        writes: Arc<AtomicUsize>,
        bytes: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for CountingSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn each_write_yields_once_and_wakes_its_task_then_goes_through() {
        let sink = CountingSink::default();
        let mut stream = CoalescedWrites::new(sink.clone());
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(Arc::clone(&flag));
        let mut cx = Context::from_waker(&waker);
        for round in 0..2 {
            flag.0.store(false, Ordering::SeqCst);
            assert!(
                Pin::new(&mut stream)
                    .poll_write(&mut cx, b"ab")
                    .is_pending()
            );
            assert!(
                flag.0.load(Ordering::SeqCst),
                "round {round}: the task was not woken"
            );
            assert_eq!(sink.writes.load(Ordering::SeqCst), round);
            match Pin::new(&mut stream).poll_write(&mut cx, b"ab") {
                Poll::Ready(Ok(2)) => {}
                other => panic!("round {round}: {other:?}"),
            }
            assert_eq!(sink.writes.load(Ordering::SeqCst), round + 1);
        }
        assert_eq!(&*sink.bytes.lock().unwrap(), b"abab");
        assert!(Pin::new(&mut stream).poll_flush(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn bytes_cross_a_real_stream_both_ways() {
        let (near, far) = tokio::io::duplex(64);
        let mut near = CoalescedWrites::new(near);
        let mut far = CoalescedWrites::new(far);
        near.write_all(b"request").await.unwrap();
        let mut got = [0; 7];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
        // More than the duplex buffer holds: the write also waits for room, and still ends.
        let mut back = vec![0; 200];
        let (written, read) = tokio::join!(far.write_all(&[7; 200]), near.read_exact(&mut back));
        written.unwrap();
        read.unwrap();
        assert_eq!(back, vec![7; 200]);
    }

    /// What the wrapper is for, on tokio's multi-thread scheduler with one worker (so the order
    /// is deterministic): 4 tasks become ready together, and each queues a chunk for a writer
    /// task and wakes it, as hyper's stream tasks do for the connection's task. Through
    /// `CoalescedWrites` the 4 chunks leave in one write; straight to the sink, the writer runs
    /// after each task (the woken task takes the LIFO slot) and writes 4 times.
    #[test]
    fn chunks_queued_by_tasks_that_were_ready_together_leave_in_one_write() {
        assert_eq!(writes_for_four_chunks(true), 1);
        assert_eq!(writes_for_four_chunks(false), 4);
    }

    fn writes_for_four_chunks(coalesce: bool) -> usize {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async move {
            let sink = CountingSink::default();
            let queue = Arc::new(Mutex::new(Vec::<u8>::new()));
            let (wake_writer, mut woken) = tokio::sync::mpsc::unbounded_channel::<()>();
            let writer = {
                let (sink, queue) = (sink.clone(), Arc::clone(&queue));
                tokio::spawn(async move {
                    let mut out: Pin<Box<dyn AsyncWrite + Send>> = if coalesce {
                        Box::pin(CoalescedWrites::new(sink))
                    } else {
                        Box::pin(sink)
                    };
                    let mut written = 0;
                    while written < 4 {
                        if woken.recv().await.is_none() {
                            break;
                        }
                        // Like h2: whatever is queued when the write happens goes in it.
                        let pending = std::future::poll_fn(|cx| {
                            let chunk = queue.lock().unwrap().clone();
                            if chunk.is_empty() {
                                return Poll::Ready(Ok(0));
                            }
                            let n = std::task::ready!(out.as_mut().poll_write(cx, &chunk))?;
                            queue.lock().unwrap().drain(..n);
                            Poll::Ready(Ok::<_, io::Error>(n))
                        })
                        .await
                        .unwrap();
                        written += pending;
                    }
                })
            };
            let (start, go) = tokio::sync::watch::channel(false);
            let (parked, mut all_parked) = tokio::sync::mpsc::unbounded_channel::<()>();
            let tasks: Vec<_> = (0..4u8)
                .map(|i| {
                    let (queue, wake_writer, parked, mut go) = (
                        Arc::clone(&queue),
                        wake_writer.clone(),
                        parked.clone(),
                        go.clone(),
                    );
                    tokio::spawn(async move {
                        // The one worker runs on into `wait_for` before anything else runs.
                        parked.send(()).unwrap();
                        go.wait_for(|go| *go).await.unwrap();
                        queue.lock().unwrap().push(i);
                        let _ = wake_writer.send(());
                    })
                })
                .collect();
            for _ in 0..4 {
                all_parked.recv().await.unwrap();
            }
            // Released together, from a task on the worker, as a store statement's answer
            // releases its batch of calls.
            tokio::spawn(async move { start.send(true).unwrap() })
                .await
                .unwrap();
            for task in tasks {
                task.await.unwrap();
            }
            writer.await.unwrap();
            assert_eq!(sink.bytes.lock().unwrap().len(), 4);
            sink.writes.load(Ordering::SeqCst)
        })
    }
}
